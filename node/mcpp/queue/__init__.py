"""The durable task queue of the mesh: owners (broker), workers, handlers and the store.

See service.py for how the 14 queue tools map onto these parts.
"""

from mcpp.queue.handlers import HandlerRegistry, TaskContext, TaskFailed
from mcpp.queue.model import STATUSES, RetryPolicy, TaskRecord
from mcpp.queue.service import QueueService

__all__ = ["QueueService", "HandlerRegistry", "TaskContext", "TaskFailed", "TaskRecord", "RetryPolicy", "STATUSES"]
