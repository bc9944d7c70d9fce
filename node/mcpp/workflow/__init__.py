"""Workflows: DAGs of tasks run across the mesh (model: specs, validation, templates, graphs;
engine: the coordinator; store: records in the queue's SQLite file).

May import: the base modules and `mcpp.queue` (every step is a queue task); never the node's
internals or the MCP surface.
"""

from mcpp.workflow.engine import TEMPLATES, WF_STATUSES, WorkflowEngine
from mcpp.workflow.model import Step, parse_steps, render_template

__all__ = ["WorkflowEngine", "Step", "parse_steps", "render_template", "TEMPLATES", "WF_STATUSES"]
