"""MCP tasks (SEP-2663, extension `io.modelcontextprotocol/tasks`) backed by the mesh.

A client on the 2026-07-28 revision that declares the extension in a request's capabilities
gets, for `task_submit` and `workflow_submit`, a task handle (`resultType: "task"`) instead of
the submit's result. The handle's `taskId` *is* the mesh task id (or workflow id), so:

- `tasks/get` works at any node (the mesh finds the owner, as `task_status` does), flat as
  the spec shapes it; once the task is final, the `CallToolResult` of the work, inline as
  `result`: what `task_result` / `workflow_result` return. A task that ran and failed (or was
  dead-lettered) is `completed` with `isError: true`; `failed` is kept for protocol errors
  (the mesh could not answer), `cancelled` for cancelled ones.
- the handle is answered only after the submit returned, i.e. once the task is durable at its
  owner (and copied to its replicas, per `--replication`): a `tasks/get` for it resolves, and
  it survives a node restart like the task itself.
- `tasks/cancel` at any node cancels the mesh task or workflow; `tasks/update` is acknowledged
  (mcpp tasks never ask for input: `input_required` is not used).

Clients that do not declare the extension, and 2025-11-25 connections, get the tools' results
as before. The wire models (flat `Task` fields: `taskId`, `status`, `createdAt`,
`lastUpdatedAt`, `ttlMs`, `pollIntervalMs`, `statusMessage`) follow the SEP text and the Rust
SDK (mcp 2.3 ships only the 2025-11-25 shapes): they are written here, for the server and
for clients (`mcpp.mcp.client.TasksClient`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, CallToolRequestParams, CallToolResult, Request, RequestParams, Result
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ConfigDict

from mcpp.errors import ArgumentError, MCPPError, OwnerError
from mcpp.queue import QueueService
from mcpp.log import kv
from mcpp.workflow.engine import WorkflowEngine

__all__ = ["EXTENSION", "MeshTasks", "TaskIdParams", "UpdateTaskParams", "GetTaskRequest", "CancelTaskRequest",
           "UpdateTaskRequest", "CreateTaskResult", "GetTaskResult", "AckResult", "declared"]

log = logging.getLogger("mcpp.mcp")
EXTENSION = "io.modelcontextprotocol/tasks"
KINDS_KEPT = 10_000  # ids whose kind (task or workflow) this node remembers
MODERN = frozenset(MODERN_PROTOCOL_VERSIONS)
POLL_INTERVAL_MS = 1000
TASK_TOOLS = ("task_submit", "workflow_submit")
WORKING = {"blocked", "queued", "running"}  # mesh task statuses that are the spec's `working`


# ---- wire models (2026-07-28; camelCase on the wire through RequestParams / Result) ----------
class TaskIdParams(RequestParams):
    task_id: str


class UpdateTaskParams(TaskIdParams):
    input_responses: dict[str, Any]


class GetTaskRequest(Request[TaskIdParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: TaskIdParams
    name_param = "taskId"  # the client sends `Mcp-Name: <taskId>`, as the SEP asks


class CancelTaskRequest(Request[TaskIdParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: TaskIdParams
    name_param = "taskId"


class UpdateTaskRequest(Request[UpdateTaskParams, Literal["tasks/update"]]):
    method: Literal["tasks/update"] = "tasks/update"
    params: UpdateTaskParams
    name_param = "taskId"


class CreateTaskResult(Result):
    """A task handle: the answer to a task-augmented `tools/call`."""

    model_config = ConfigDict(extra="allow")
    result_type: Literal["task"]
    task_id: str
    status: str
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None
    status_message: str | None = None


class GetTaskResult(Result):
    """`tasks/get`: the task, flat, with `result` (completed) or `error` (failed)."""

    model_config = ConfigDict(extra="allow")
    result_type: str | None = None
    task_id: str
    status: str
    created_at: str | None = None
    last_updated_at: str | None = None
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None
    status_message: str | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class AckResult(Result):
    model_config = ConfigDict(extra="allow")


# ---- server side ---------------------------------------------------------------------------
def declared(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Did this request (2026-07-28) declare the extension in its capabilities? On a
    handshake-era connection the capabilities are the initialize ones: never tasks there."""
    if ctx.protocol_version not in MODERN:
        return False
    caps = ctx.session.client_capabilities
    return caps is not None and EXTENSION in (caps.extensions or {})


def _unknown(e: MCPPError) -> bool:
    """No such task / workflow, or not an id at all: here (an ArgumentError: TaskNotFound and
    WorkflowNotFound are ones), or at the owner the call was forwarded to (class name = code)."""
    return isinstance(e, ArgumentError) or (
        isinstance(e, OwnerError) and e.code in ("TaskNotFound", "WorkflowNotFound", "ArgumentError"))


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _tool_result(doc: dict[str, Any], is_error: bool, text: str | None = None) -> dict[str, Any]:
    """A CallToolResult as the wire carries it (the tools' structured output and its JSON text)."""
    return {"content": [{"type": "text", "text": text or json.dumps(doc)}], "structuredContent": doc,
            "isError": is_error}


class MeshTasks(Extension):
    """The tasks extension over the mesh's tasks and workflows (see the module docstring)."""

    identifier = EXTENSION

    def __init__(self, queue: QueueService, workflows: WorkflowEngine) -> None:
        self.queue = queue
        self.workflows = workflows
        self._kinds: OrderedDict[str, str] = OrderedDict()  # id -> "task" | "workflow", newest last

    def _remember(self, task_id: str, kind: str) -> None:
        self._kinds[task_id] = kind
        self._kinds.move_to_end(task_id)
        while len(self._kinds) > KINDS_KEPT:
            self._kinds.popitem(last=False)

    def _first_guess(self, task_id: str) -> str:
        """Which kind to ask for first: remembered, or held here (a coordinator asked for its own
        workflow would otherwise ask the whole mesh for a task of that id first)."""
        if task_id in self._kinds:
            return self._kinds[task_id]
        return "workflow" if self.workflows.store.exists(task_id) else "task"

    async def _status_of(self, kind: str, task_id: str) -> dict[str, Any]:
        if kind == "task":
            return await self.queue.status(task_id, False)
        return await self.workflows.status(task_id, False, False)

    def methods(self) -> Sequence[MethodBinding]:
        return [MethodBinding("tasks/get", TaskIdParams, self._get, protocol_versions=MODERN),
                MethodBinding("tasks/update", UpdateTaskParams, self._update, protocol_versions=MODERN),
                MethodBinding("tasks/cancel", TaskIdParams, self._cancel, protocol_versions=MODERN)]

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if params.name not in TASK_TOOLS or not declared(ctx):
            return await call_next(ctx)
        res = await call_next(ctx)  # the submit: it returns once the task is durable at its owner
        if not isinstance(res, CallToolResult) or res.is_error or not res.structured_content:
            return res  # refused (bad input, quota...): the tool's error, as without the extension
        doc = res.structured_content
        kind = "task" if params.name == "task_submit" else "workflow"
        task_id = str(doc[f"{kind}_id"])
        self._remember(task_id, kind)
        try:
            task = await self._detailed(task_id, with_result=False)
        except MCPError as e:  # submitted and durable, but its owner did not answer the status now:
            log.warning("task handle without a fresh status", extra=kv(task_id=task_id, error=e.error.message))
            now = _iso(time.time())  # the client must still learn the id (a retry would run it twice)
            task = {"taskId": task_id, "status": "working", "statusMessage": str(doc.get("status")),
                    "createdAt": now, "lastUpdatedAt": now, "ttlMs": None, "pollIntervalMs": POLL_INTERVAL_MS}
        return {"resultType": "task", **task}

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> HandlerResult:
        require_client_extension(ctx, EXTENSION)
        return {"resultType": "complete", **await self._detailed(params.task_id, with_result=True)}

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> HandlerResult:
        require_client_extension(ctx, EXTENSION)
        await self._lookup(params.task_id)  # unknown id: -32602; mcpp never asks for input
        return {}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> HandlerResult:
        require_client_extension(ctx, EXTENSION)
        kind, st = await self._lookup(params.task_id)
        if st["status"] in WORKING:
            try:
                if kind == "task":
                    await self.queue.cancel(params.task_id, "tasks/cancel", False)
                else:
                    await self.workflows.cancel(params.task_id, "tasks/cancel", False)
            except MCPPError as e:  # it became final meanwhile: cancellation is best effort
                if (await self._lookup(params.task_id))[1]["status"] in WORKING:
                    raise MCPError(code=INTERNAL_ERROR, message=f"cancel failed: {e}") from e
        return {}  # a final task is acknowledged and left as it is

    async def _lookup(self, task_id: str) -> tuple[str, dict[str, Any]]:
        """("task" | "workflow", its status), asked of its owner; -32602 if the mesh has neither
        (or it is not an id), -32603 if its owner cannot answer."""
        first = self._first_guess(task_id)
        for kind in (first, "workflow" if first == "task" else "task"):
            try:
                st = await self._status_of(kind, task_id)
            except MCPPError as e:
                if _unknown(e):
                    continue
                raise MCPError(code=INTERNAL_ERROR, message=f"Failed to retrieve task {task_id!r}: {e}") from e
            self._remember(task_id, kind)
            return kind, st
        raise MCPError(code=INVALID_PARAMS, message=f"Failed to retrieve task: no task or workflow {task_id!r} "
                                                     "in the mesh")

    async def _detailed(self, task_id: str, with_result: bool) -> dict[str, Any]:
        """The spec's (Detailed)Task for a mesh task or workflow."""
        kind, st = await self._lookup(task_id)
        status, message = (self._task_status(st) if kind == "task" else self._workflow_status(st))
        out: dict[str, Any] = {
            "taskId": task_id, "status": status, "statusMessage": message,
            "createdAt": _iso(float(st["created_at"])),
            "lastUpdatedAt": _iso(max(float(t) for t in (st["created_at"], st.get("started_at"), st.get("finished_at"))
                                      if t is not None)),
            "ttlMs": None,  # kept until queue_clear: no expiry
            "pollIntervalMs": POLL_INTERVAL_MS,
        }
        if with_result and status == "completed":
            try:
                if kind == "task":
                    doc = await self.queue.result(task_id, False, 0, False, False)
                else:
                    doc = await self.workflows.result(task_id, False, 0, True, False)
            except MCPPError as e:
                raise MCPError(code=INTERNAL_ERROR, message=f"Failed to read the result of {task_id!r}: {e}") from e
            failed = doc["status"] != "completed"
            text = f"{kind} {task_id} {doc['status']}: {doc.get('error') or doc.get('errors')}" if failed else None
            out["result"] = _tool_result(doc, failed, text)
        return out

    @staticmethod
    def _task_status(st: dict[str, Any]) -> tuple[str, str]:
        s = st["status"]
        if s in WORKING:
            where = f" on {st['assigned_worker'][-8:]}" if s == "running" and st.get("assigned_worker") else ""
            return "working", f"{s}{where}, attempt {st['attempts']}, {float(st['progress']):.0%} done"
        if s == "cancelled":
            return "cancelled", "cancelled"
        return "completed", s if s == "completed" else f"{s}: {st.get('error')}"

    @staticmethod
    def _workflow_status(st: dict[str, Any]) -> tuple[str, str]:
        p = st["progress"]
        if st["status"] == "running":
            return "working", f"{p['completed']} of {p['total']} steps completed, {p['running']} running"
        if st["status"] == "cancelled":
            return "cancelled", "cancelled"
        return "completed", f"{st['status']}: {p['completed']} of {p['total']} steps completed"
