"""The durable task queue of the mesh: the owner side (broker: state, dispatch, attempts,
dependencies), workers, handlers, replicas and the SQLite store; service.py maps the 14 queue
tools onto these parts.

May import: the base modules and `mcpp.node` (the service plugs into a node's RPC endpoint and
hooks; the node never imports the queue).
"""

from mcpp.queue.handlers import HandlerRegistry, TaskContext, TaskFailed
from mcpp.queue.model import STATUSES, RetryPolicy, TaskRecord
from mcpp.queue.service import QueueService

__all__ = ["QueueService", "HandlerRegistry", "TaskContext", "TaskFailed", "TaskRecord", "RetryPolicy", "STATUSES"]
