"""The MCP server of a node: the peer tools, plus /healthz, /readyz, /metrics and /status.

Runs in the node's own trio loop (hypercorn's trio worker for HTTP, the SDK's stdio
transport otherwise): a tool call reaches the network with no thread hop and no asyncio.
Every expected failure becomes a `ToolError` whose message starts with the argument's name.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import trio

if TYPE_CHECKING:  # trio-typing's stubs (a py-libp2p dependency) shadow trio's own annotations
    from trio_typing import TaskStatus
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from mcpp import __version__
from mcpp.errors import MCPPError
from mcpp.log import kv
from mcpp.metrics import CONTENT_TYPE
from mcpp.node import PEER_STATUSES, SORT_KEYS, Node

__all__ = ["build_server", "serve_http", "serve_stdio", "PEER_TOOLS"]

log = logging.getLogger("mcpp.mcp")
PEER_TOOLS = ("peer_discover", "peer_connect", "peer_disconnect", "peer_list", "peer_metrics", "bootstrap_network")

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


def _enum(values: tuple[str, ...], doc: str) -> Any:
    return Field(description=doc, json_schema_extra={"enum": list(values)})


def build_server(node: Node) -> MCPServer:
    server = MCPServer(
        "mcpp",
        version=__version__,
        instructions="An mcpp mesh node: its tools act on the whole peer-to-peer mesh.",
        log_level="WARNING",
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
        status: Annotated[str, _enum(PEER_STATUSES, "connected | known | all")] = "connected",
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


def _security(node: Node) -> TransportSecuritySettings:
    hosts = {"127.0.0.1", "localhost", "[::1]", node.config.mcp_host, *node.config.allowed_hosts}
    allowed = sorted({h for h in hosts} | {f"{h}:*" for h in hosts if not h.endswith(":*")})
    origins = sorted({f"http://{h}" for h in allowed})
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=allowed, allowed_origins=origins
    )


async def serve_http(
    node: Node, server: MCPServer, *, task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve streamable HTTP (JSON responses) at /mcp until cancelled; reports the base URL."""
    app = server.streamable_http_app(json_response=True, transport_security=_security(node), host=node.config.mcp_host)
    cfg = HyperConfig()
    cfg.bind = [f"{node.config.mcp_host}:{node.config.mcp_port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.graceful_timeout = 1.0

    async def _serve(task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, cfg, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        bound: list[str] = await nursery.start(_serve)
        base = bound[0]
        if node.config.mcp_host in ("0.0.0.0", "::"):
            base = base.replace("0.0.0.0", "127.0.0.1")
        node.mcp_url = base + "/mcp"
        log.info("mcp http serving", extra=kv(url=node.mcp_url))
        task_status.started(node.mcp_url)


async def serve_stdio(server: MCPServer) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin."""
    await server.run_stdio_async()
