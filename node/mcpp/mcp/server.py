"""The MCP server of a node: the peer tools, plus /healthz, /readyz, /metrics and /status.

Runs in the node's own trio loop (hypercorn's trio worker for HTTP, the SDK's stdio
transport otherwise): a tool call reaches the network with no thread hop and no asyncio.
Every expected failure becomes a `ToolError` whose message starts with the argument's name.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import trio

if TYPE_CHECKING:  # trio-typing's stubs (a py-libp2p dependency) shadow trio's own annotations
    from trio_typing import TaskStatus
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from mcpp import __version__
from mcpp.errors import MCPPError
from mcpp.log import kv
from mcpp.mcp.tasks import MeshTasks
from mcpp.metrics import CONTENT_TYPE
from mcpp.node import PEER_STATUSES, SORT_KEYS, Node
from mcpp.queue import QueueService
from mcpp.queue.model import STATUSES
from mcpp.workflow.engine import WF_STATUSES, WorkflowEngine
from mcpp.workflow.model import FAILURE_POLICIES, GRAPH_FORMATS

__all__ = ["build_server", "serve_http", "serve_stdio", "PEER_TOOLS", "QUEUE_TOOLS", "WORKFLOW_TOOLS"]

log = logging.getLogger("mcpp.mcp")
PEER_TOOLS = ("peer_discover", "peer_connect", "peer_disconnect", "peer_list", "peer_metrics", "bootstrap_network")
QUEUE_TOOLS = (
    "task_submit", "task_status", "task_result", "task_cancel", "task_list", "task_priority", "task_retry",
    "queue_stats", "queue_pause", "queue_resume", "queue_clear", "worker_register", "worker_unregister",
    "worker_status",
)
WORKFLOW_TOOLS = ("workflow_submit", "workflow_status", "workflow_cancel", "workflow_list", "workflow_dependencies",
                  "workflow_result")
PROGRESS_EVERY_S = 1.0

F = TypeVar("F", bound=Callable[..., Awaitable[dict[str, Any]]])


def _instrument(node: Node, fn: F) -> F:
    """Count the call by outcome and turn mcpp errors into ToolError (message names the argument)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        outcome = "error"
        try:
            result = await fn(*args, **kwargs)
            outcome = "ok"
            return result
        except MCPPError as e:
            limit = getattr(e, "limit", None)
            if isinstance(limit, str):
                node.metrics.limit_hit(limit)
            raise ToolError(str(e)) from e
        except ToolError:
            raise
        except Exception as e:
            outcome = "internal_error"
            log.exception("tool failed", extra=kv(tool=name))
            raise ToolError(f"internal error in {name}: {type(e).__name__}: {e}") from e
        finally:
            node.metrics.observe_tool(name, outcome, time.perf_counter() - t0)

    return wrapper  # type: ignore[return-value]


def _wants_progress(ctx: Context) -> bool:
    """Did the client send a progress token? (Without one, a wait needs no progress loop.)"""
    try:
        meta = ctx.request_context.meta
    except (AttributeError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("progress_token") is not None or meta.get("progressToken") is not None)


async def _wait_reporting(
    ctx: Context | None,
    progress: Callable[[], Awaitable[tuple[float, float, str]]],
    wait: Callable[[], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """Run `wait`; meanwhile, if the client sent a progress token, send it `progress()` every
    PROGRESS_EVERY_S (a notification on the request's SSE stream: the default response mode)."""
    if ctx is None or not _wants_progress(ctx):
        return await wait()
    out: dict[str, Any] = {}
    failed: list[MCPPError] = []
    async with trio.open_nursery() as n:

        async def waiter() -> None:
            try:
                out.update(await wait())
            except MCPPError as e:
                failed.append(e)
            finally:
                n.cancel_scope.cancel()

        n.start_soon(waiter)
        last = -1.0
        while True:
            await trio.sleep(PROGRESS_EVERY_S)
            try:
                done, total, message = await progress()
                if done > last:  # MCP: progress MUST increase with each notification (a retried
                    last = done  # task restarts its own progress at 0: nothing is sent until it passes)
                    await ctx.report_progress(done, total, message)
            except Exception as e:  # best effort: the wait goes on (a status the owner did not
                log.debug("progress not sent", extra=kv(error=f"{type(e).__name__}: {e}"))  # answer...)
    if failed:
        raise failed[0]
    return out


def _enum(values: tuple[str, ...], doc: str) -> Any:
    return Field(description=doc, json_schema_extra={"enum": list(values)})


def build_server(node: Node, queue: QueueService, workflows: WorkflowEngine) -> MCPServer:
    server = MCPServer(
        "mcpp",
        version=__version__,
        instructions="An mcpp mesh node: its tools act on the whole peer-to-peer mesh.",
        log_level="WARNING",
        extensions=[MeshTasks(queue, workflows)],  # MCP tasks (SEP-2663) for task_submit, workflow_submit
    )

    async def peer_discover(
        capability_filter: list[str] | None = None,
        max_peers: int = 20,
        include_metrics: bool = False,
        timeout_s: float = 5,
    ) -> dict[str, Any]:
        """Find mesh peers through the DHT now (provider records of the mesh key, and of each
        capability in capability_filter). With include_metrics, each peer gets a fresh measured RTT
        and a quality score."""
        return await node.discover(capability_filter, max_peers, include_metrics, timeout_s)

    async def peer_connect(
        peer_id: str | None = None,
        multiaddr: str | None = None,
        timeout_s: float = 10,
        retries: int = 2,
        persistent: bool = False,
    ) -> dict[str, Any]:
        """Connect to a peer by multiaddr (/ip4/.../tcp/.../p2p/<id>) or by peer id (resolved through
        the DHT). persistent=True reconnects whenever the connection drops. Returns the measured RTT."""
        return await node.connect(peer_id, multiaddr, timeout_s, retries, persistent)

    async def peer_disconnect(peer_id: str, reason: str | None = None) -> dict[str, Any]:
        """Gracefully close the connection to a peer and clear its persistent flag."""
        return await node.disconnect(peer_id, reason)

    async def peer_list(
        status: Annotated[str, _enum(PEER_STATUSES, "connected | known | all | members (every live member, by gossip)")] = "connected",
        capability: str | None = None,
        sort_by: Annotated[str, _enum(SORT_KEYS, "latency | last_seen | peer_id | reputation")] = "peer_id",
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        """List this node's peer table; latency_ms is the last RTT measured by ping (sub-ms)."""
        return node.list_peers(status, capability, sort_by, limit, offset)

    async def peer_metrics(peer_id: str | None = None, include_history: bool = False) -> dict[str, Any]:
        """Measured RTT p50/p99, bandwidth, reliability, quality and reputation of one peer; with no
        peer_id, this node's totals plus process RSS, CPU and uptime."""
        return node.peer_metrics(peer_id, include_history)

    async def bootstrap_network(
        bootstrap_peers: list[str] | None = None,
        min_connections: int = 1,
        timeout_s: float = 10,
    ) -> dict[str, Any]:
        """(Re-)join the mesh through bootstrap multiaddrs (the configured ones when none are given)."""
        return await node.bootstrap_network(bootstrap_peers, min_connections, timeout_s)

    for fn in (peer_discover, peer_connect, peer_disconnect, peer_list, peer_metrics, bootstrap_network):
        server.add_tool(_instrument(node, fn), structured_output=True)
    _add_queue_tools(node, queue, server)
    _add_workflow_tools(node, workflows, server)

    # the SDK's custom_route decorator is untyped
    @server.custom_route("/healthz", methods=["GET"])  # type: ignore[untyped-decorator]
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    @server.custom_route("/readyz", methods=["GET"])  # type: ignore[untyped-decorator]
    async def readyz(request: Request) -> Response:
        if node.joined.is_set():
            return PlainTextResponse("ready\n")
        return PlainTextResponse("not joined the mesh yet\n", status_code=503)

    @server.custom_route("/metrics", methods=["GET"])  # type: ignore[untyped-decorator]
    async def metrics(request: Request) -> Response:
        return Response(node.metrics.render(), media_type=CONTENT_TYPE)

    @server.custom_route("/status", methods=["GET"])  # type: ignore[untyped-decorator]
    async def status(request: Request) -> Response:
        return JSONResponse(node.status())

    return server


def _add_queue_tools(node: Node, q: QueueService, server: MCPServer) -> None:

    async def task_submit(
        task_type: str,
        payload: Any = {},  # noqa: B006 (never mutated)
        task_id: str | None = None,
        priority: float = 1.0,
        depends_on: list[str] = [],  # noqa: B006
        tags: list[str] = [],  # noqa: B006
        timeout_s: float = 300,
        retry_policy: dict[str, Any] | None = None,
        metadata: dict[str, Any] = {},  # noqa: B006
        cache_ttl_s: float = 0,
    ) -> dict[str, Any]:
        """Submit a task to the mesh. This node owns it (durably) and dispatches it to a worker that
        serves task_type; higher priority first, FIFO within a priority. task_id (optional) is an
        idempotency key. depends_on: task ids that must complete first. retry_policy defaults to
        {max_attempts: 3, backoff_s: 0.5, backoff_factor: 2}. cache_ttl_s > 0 returns the result of
        an identical completed task younger than that without running it again."""
        return await q.submit(task_type, payload, task_id, priority, depends_on, tags, timeout_s, retry_policy,
                              metadata, cache_ttl_s)

    async def task_status(task_id: str, include_metrics: bool = False) -> dict[str, Any]:
        """Status of any task of the mesh (asked of its owner): blocked | queued | running | completed |
        failed | cancelled | dead_lettered, worker, attempts, progress; with metrics, wait and run times."""
        return await q.status(task_id, include_metrics)

    async def task_result(
        task_id: str,
        wait: bool = False,
        timeout_s: float = 30,
        include_logs: bool = False,
        include_history: bool = False,
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Result of any task of the mesh. wait=True blocks until it is final (at most timeout_s) and
        reports progress when the client sent a progress token. include_logs: the handler's log lines;
        include_history: every attempt with its worker, times and error."""

        async def progress() -> tuple[float, float, str]:
            st = await q.status(task_id, False)
            return float(st["progress"]), 1.0, f"{st['status']} (attempt {st['attempts']})"

        return await _wait_reporting(ctx if wait else None, progress,
                                     lambda: q.result(task_id, wait, timeout_s, include_logs, include_history))

    async def task_cancel(task_id: str, reason: str | None = None, force: bool = False) -> dict[str, Any]:
        """Cancel a task: a queued one at once; a running one is asked to stop on its worker and given
        a short grace period, or cancelled at once with force."""
        return await q.cancel(task_id, reason, force)

    async def task_list(
        status: Annotated[str | None, _enum(STATUSES, "filter by status")] = None,
        task_type: str | None = None,
        tag: str | None = None,
        worker: str | None = None,
        min_priority: float | None = None,
        max_priority: float | None = None,
        limit: int = 100,
        offset: int = 0,
        scope: Annotated[str, _enum(("mesh", "local"), "mesh: every node; local: this node's own tasks")] = "mesh",
    ) -> dict[str, Any]:
        """List tasks, newest first, across the mesh (or this node's own); limit 1-1000."""
        return await q.list_tasks(status, task_type, tag, worker, min_priority, max_priority, limit, offset, scope)

    async def task_priority(task_id: str, priority: float | None = None, boost: float | None = None) -> dict[str, Any]:
        """Set (priority) or raise/lower (boost) the priority of a queued task; the queue re-orders.
        Returns the old and new priority and the new queue position."""
        return await q.set_priority(task_id, priority, boost)

    async def task_retry(
        task_id: str,
        priority: float | None = None,
        timeout_s: float | None = None,
        retry_policy: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Re-queue a failed, cancelled or dead-lettered task, optionally with new settings; its earlier
        attempts stay in its history."""
        return await q.retry(task_id, priority, timeout_s, retry_policy)

    async def queue_stats(
        scope: Annotated[str, _enum(("mesh", "local"), "mesh: every node; local: this node")] = "mesh",
        include_worker_stats: bool = False,
    ) -> dict[str, Any]:
        """Counts by status and type, per node, completed per second (last 60 s), mean wait and run
        time; with include_worker_stats, every worker's figures. Mesh scope reads the other nodes'
        gossiped summaries (at most ~2 s old; summaries_as_of gives their times)."""
        return await q.stats(scope, include_worker_stats)

    async def queue_pause(task_type: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """Stop dispatching this node's queued tasks (all, or one task type); they stay queued."""
        return q.pause(task_type, reason)

    async def queue_resume(task_type: str | None = None, reorder: bool = False) -> dict[str, Any]:
        """Restart dispatch on this node (all, or one type). reorder=True also moves tasks waiting out a
        retry backoff into the queue at once, in priority order."""
        return q.resume(task_type, reorder)

    async def queue_clear(
        confirm: bool,
        status: Annotated[str, _enum(STATUSES, "which tasks to remove")] = "queued",
        task_type: str | None = None,
        tag: str | None = None,
    ) -> dict[str, Any]:
        """Remove this node's tasks in one status (optionally of one type / tag). Refuses unless
        confirm is true. Returns how many were removed."""
        return q.clear(confirm, status, task_type, tag)

    async def worker_register(
        capabilities: list[str],
        max_concurrent: int = 4,
        resources: dict[str, float] | None = None,
        worker_id: str | None = None,
    ) -> dict[str, Any]:
        """Start or reconfigure this node's worker: the task types it runs, how many at once, and
        resource limits (e.g. {"cpu": 2, "memory_mb": 512}) that tasks' metadata.resources count against.
        Advertised to the mesh (peer table and DHT) at once."""
        return q.register(capabilities, max_concurrent, resources, worker_id)

    async def worker_unregister(worker_id: str, drain: bool = True) -> dict[str, Any]:
        """Stop a worker of the mesh taking tasks; it finishes its running tasks (drain) or stops them
        and their owners queue them again (drain=false)."""
        return await q.unregister(worker_id, drain)

    async def worker_status(worker_id: str | None = None, include_tasks: bool = False) -> dict[str, Any]:
        """One or all workers of the mesh: capabilities, running, completed, failed, load, RSS, CPU,
        reputation (+ the tasks each holds). All workers: from gossiped summaries (RSS and CPU of
        other nodes null); a worker_id or include_tasks asks those workers directly."""
        return await q.worker_status(worker_id, include_tasks)

    for fn in (task_submit, task_status, task_result, task_cancel, task_list, task_priority, task_retry,
               queue_stats, queue_pause, queue_resume, queue_clear, worker_register, worker_unregister,
               worker_status):
        server.add_tool(_instrument(node, fn), structured_output=True)


def _add_workflow_tools(node: Node, wf: WorkflowEngine, server: MCPServer) -> None:

    async def workflow_submit(
        name: str,
        steps: list[dict[str, Any]] | None = None,
        workflow_id: str | None = None,
        template: str | None = None,
        params: dict[str, Any] = {},  # noqa: B006 (never mutated)
        failure_policy: Annotated[str, _enum(FAILURE_POLICIES, "fail_fast | continue")] = "fail_fast",
        priority: float = 1.0,
        tags: list[str] = [],  # noqa: B006
        metadata: dict[str, Any] = {},  # noqa: B006
    ) -> dict[str, Any]:
        """Run a DAG of tasks across the mesh; this node coordinates it. Give exactly one of steps
        ([{id, task_type, payload, depends_on, priority?, timeout_s?, retry_policy?, tags?}], also
        spelled {step_id, action, ...}) or template (YAML text with params and ${params.x}
        placeholders, or a shipped template: diamond, map-reduce). A payload value
        {"$ref": "steps.<id>.result.<path>"} takes part of a dependency's result. Validated before
        anything runs (unknown dependency, duplicate id, cycle, bad $ref, unknown task type).
        workflow_id (optional) is an idempotency key."""
        return await wf.submit(name, steps, workflow_id, template, params, failure_policy, priority, tags, metadata)

    async def workflow_status(workflow_id: str, include_steps: bool = True, include_metrics: bool = False) -> dict[str, Any]:
        """Status (running | completed | failed | cancelled), progress counts and percent, the steps
        now queued or running, and each step's status, task, worker and times (+ wait/run times)."""
        return await wf.status(workflow_id, include_steps, include_metrics)

    async def workflow_cancel(workflow_id: str, reason: str | None = None, force: bool = False) -> dict[str, Any]:
        """Cancel pending and running steps (running ones get a short grace period, or stop at once
        with force). Returns cancelled_steps."""
        return await wf.cancel(workflow_id, reason, force)

    async def workflow_list(
        status: Annotated[str | None, _enum(WF_STATUSES, "filter by status")] = None,
        peer: str | None = None,
        tag: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        """Workflows across the mesh (or those coordinated by one peer), newest first; limit 1-1000."""
        return await wf.list_workflows(status, peer, tag, limit, offset)

    async def workflow_dependencies(
        workflow_id: str | None = None,
        steps: list[dict[str, Any]] | None = None,
        format: Annotated[str, _enum(GRAPH_FORMATS, "json | dot | mermaid")] = "json",
    ) -> dict[str, Any]:
        """The dependency graph of a submitted workflow, or of a step list without running it, as
        json, dot or mermaid; plus levels and the critical path (weighted by measured step
        durations once every step ran, by step count before) and its length."""
        return await wf.dependencies(workflow_id, steps, format)

    async def workflow_result(
        workflow_id: str,
        wait: bool = False,
        timeout_s: float = 60,
        include_steps: bool = True,
        include_logs: bool = False,
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Results by step id, errors by step id and the duration; wait=True blocks until the
        workflow is final (at most timeout_s) and reports progress (steps completed of all) when
        the client sent a progress token."""

        async def progress() -> tuple[float, float, str]:
            p = (await wf.status(workflow_id, False, False))["progress"]
            return (float(p["completed"]), float(p["total"]),
                    f"{p['completed']} of {p['total']} steps completed, {p['running']} running")

        return await _wait_reporting(ctx if wait else None, progress,
                                     lambda: wf.result(workflow_id, wait, timeout_s, include_steps, include_logs))

    for fn in (workflow_submit, workflow_status, workflow_cancel, workflow_list, workflow_dependencies,
               workflow_result):
        server.add_tool(_instrument(node, fn), structured_output=True)


def _security(node: Node) -> TransportSecuritySettings:
    hosts = {"127.0.0.1", "localhost", "[::1]", node.config.mcp_host, *node.config.allowed_hosts}
    allowed = sorted({h for h in hosts} | {f"{h}:*" for h in hosts if not h.endswith(":*")})
    origins = sorted({f"http://{h}" for h in allowed})
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=allowed, allowed_origins=origins
    )


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
OPEN_PATHS = ("/healthz", "/readyz")  # probes never need the token


class BearerAuth:
    """ASGI middleware: requests to /mcp (and /metrics, /status with protect_metrics) need
    `Authorization: Bearer <token>`; otherwise 401 with a JSON body that says what is missing.
    Tokens are compared in constant time."""

    def __init__(self, app: Any, token: str, protect_metrics: bool, on_fail: Callable[[str], None]) -> None:
        self.app = app
        self._expected = b"Bearer " + token.encode()
        self._protected = ("/mcp", "/metrics", "/status") if protect_metrics else ("/mcp",)
        self._on_fail = on_fail

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        if path and path not in OPEN_PATHS and path.startswith(self._protected):
            got = b""
            for k, v in scope.get("headers", ()):
                if k.lower() == b"authorization":
                    got = v
                    break
            if not hmac.compare_digest(got, self._expected):
                self._on_fail(path.split("/")[1] if "/" in path else path)
                reason = "missing" if not got else "wrong"
                body = json.dumps({"error": "unauthorized", "message":
                                   f"Authorization: {reason} bearer token (send 'Authorization: Bearer <token>'; "
                                   "the harness records it as token in cluster.json)"}).encode()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="mcpp"'),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def mcp_bind_host(config: Any) -> str:
    """Where MCP listens: the configured host, or loopback when no token is configured."""
    if config.token or config.mcp_host in LOOPBACK_HOSTS:
        return str(config.mcp_host)
    return "127.0.0.1"


async def serve_http(
    node: Node, server: MCPServer, *, task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve streamable HTTP at /mcp (SSE responses, which carry progress; or JSON with
    mcp_response=json) until cancelled;
    reports the URL. With a token configured every /mcp request needs it; without one MCP binds to
    loopback only, whatever mcp_host says."""
    cfgn = node.config
    host = mcp_bind_host(cfgn)
    if not cfgn.token and host != cfgn.mcp_host:
        log.warning("no token configured (MCPP_TOKEN / token_file): MCP bound to loopback only, not to "
                    f"{cfgn.mcp_host}", extra=kv(mcp_host=host, asked=cfgn.mcp_host))
    elif not cfgn.token:
        log.info("no token configured: MCP is open to local clients only", extra=kv(mcp_host=host))
    else:
        log.info("MCP requires a bearer token", extra=kv(mcp_host=host, protect_metrics=cfgn.protect_metrics))
    app: Any = server.streamable_http_app(json_response=cfgn.mcp_response == "json", transport_security=_security(node), host=host)
    if cfgn.token:
        app = BearerAuth(app, cfgn.token, cfgn.protect_metrics, lambda p: node.metrics.auth_failures.labels(p).inc())
    cfg = HyperConfig()
    cfg.bind = [f"{host}:{cfgn.mcp_port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.graceful_timeout = 1.0

    async def _serve(task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, cfg, task_status=task_status)

    async with trio.open_nursery() as nursery:
        bound: list[str] = await nursery.start(_serve)
        base = bound[0]
        if host in ("0.0.0.0", "::"):
            base = base.replace("0.0.0.0", "127.0.0.1")
        node.mcp_url = base + "/mcp"
        log.info("mcp http serving", extra=kv(url=node.mcp_url))
        task_status.started(node.mcp_url)


class StdinLines:
    """The MCP client's stdin as lines, read with os.read in one of trio's worker threads, which
    a cancel abandons (they are daemon threads: an abandoned read does not hold up the exit).
    The SDK's own reader (`anyio.wrap_file`) runs `readline` in an anyio thread that a cancel
    must wait for, so a node told to stop (SIGTERM) stayed until the client closed stdin.
    Lines are split on bytes and decoded whole (a character split across reads stays intact).

    While it is open, fd 0 points at /dev/null (as the SDK does when it claims stdin itself), so
    child processes read EOF instead of the MCP stream; `close` puts the stream back."""

    def __init__(self) -> None:
        self._fd: int | None = os.dup(0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._eof = False

    def __aiter__(self) -> StdinLines:
        return self

    async def __anext__(self) -> str:
        while (nl := self._buf.find(b"\n", self._scanned)) < 0:
            self._scanned = len(self._buf)
            if self._eof or self._fd is None:
                if not self._buf:
                    raise StopAsyncIteration
                line = bytes(self._buf)
                self._buf.clear()
                return line.decode("utf-8", errors="replace")
            # (trio-typing's stubs still call abandon_on_cancel `cancellable`)
            chunk = await trio.to_thread.run_sync(os.read, self._fd, 65536, abandon_on_cancel=True)  # type: ignore[call-arg]
            self._eof = not chunk
            self._buf += chunk
        line = bytes(self._buf[:nl + 1])
        del self._buf[:nl + 1]
        self._scanned = 0
        return line.decode("utf-8", errors="replace")

    def close(self) -> None:
        """Give fd 0 back its stream; our duplicate is closed unless a read may still use it (one
        abandoned in its thread by a cancel: the process is about to exit)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.dup2(self._fd, 0)
        if self._eof:
            os.close(self._fd)
        self._fd = None


async def serve_stdio(server: MCPServer) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin, or until cancelled (SIGTERM,
    SIGINT): a cancel does not wait for stdin to close (see StdinLines)."""
    stdin = StdinLines()
    try:
        # MCPServer.run_stdio_async takes no stdin: run its low-level server (no public handle)
        # on the SDK's stdio transport with ours; stdout stays the SDK's (fd 1 goes to stderr)
        lowlevel = server._lowlevel_server
        async with stdio_server(stdin=cast(Any, stdin)) as (read_stream, write_stream):
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
    finally:
        stdin.close()
