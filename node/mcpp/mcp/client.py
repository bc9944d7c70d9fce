"""A small MCP client for mcpp nodes (streamable HTTP), used by the demo, bench, CLI and tests.

`open_client(url, token)` is the one way mcpp opens a session: with a token it sends
`Authorization: Bearer <token>` on every request (nodes with a token refuse anything else).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.client import ClaimContext, ClientExtension, ResultClaim
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult

from mcpp.errors import ArgumentError
from mcpp.mcp.tasks import EXTENSION, CreateTaskResult, GetTaskRequest, GetTaskResult, TaskIdParams

__all__ = ["call_tool", "ToolCallError", "open_client", "structured", "auth_headers", "token_from_env",
           "explain_failure", "cli_endpoint", "TasksClient", "get_task"]

logging.getLogger("httpx").setLevel(logging.WARNING)


class ToolCallError(Exception):
    """The tool answered with isError: true; the message is the tool's."""


def token_from_env() -> str | None:
    """MCPP_TOKEN, or the contents of MCPP_TOKEN_FILE (what `mcpp task/workflow` use by default)."""
    token = os.environ.get("MCPP_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("MCPP_TOKEN_FILE")
    if path:
        with open(path) as f:
            return f.read().strip() or None
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.asynccontextmanager
async def _authed(url: str, token: str) -> AsyncIterator[Any]:
    async with create_mcp_http_client(headers=auth_headers(token)) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            yield streams


def open_client(url: str, token: str | None = None, **options: Any) -> Client:
    """An MCP session to a node (use as `async with`); token: the node's bearer token, if any;
    options: the SDK Client's (mode="legacy" for the 2025-11-25 handshake, extensions=...)."""
    if not token:
        return Client(url, **options)
    return Client(_authed(url, token), **options)


async def get_task(session: ClientSession, task_id: str, timeout_s: float | None = None) -> GetTaskResult:
    """`tasks/get` on a session (`client.session` of a 2026-07-28 connection)."""
    return await session.send_request(GetTaskRequest(params=TaskIdParams(task_id=task_id)), GetTaskResult,
                                      request_read_timeout_seconds=timeout_s)


async def _poll_to_result(handle: CreateTaskResult, claim: ClaimContext) -> CallToolResult:
    """Resolve a task handle: `tasks/get` every pollIntervalMs until the task is final. (The
    SDK runs this on anyio: it sleeps with anyio, so that it works on asyncio too.)"""
    while True:
        got = await get_task(claim.session, handle.task_id, claim.read_timeout_seconds)
        if got.status == "completed" and got.result is not None:
            return CallToolResult.model_validate(got.result, by_name=False)
        if got.status == "failed":
            err = got.error or {}
            raise MCPError(code=int(err.get("code", -32603)), message=str(err.get("message", "task failed")),
                           data=err.get("data"))
        if got.status == "cancelled":
            return CallToolResult.model_validate({"content": [{"type": "text", "text": f"task {handle.task_id} "
                                                               "was cancelled"}], "isError": True})
        if got.status != "working":  # input_required (mcpp never asks), or a completed one without result
            raise MCPError(code=-32603, message=f"task {handle.task_id}: unexpected status {got.status!r}"
                           + (" without a result" if got.status == "completed" else ""))
        await anyio.sleep((got.poll_interval_ms or handle.poll_interval_ms or 1000) / 1000)


class TasksClient(ClientExtension):
    """The MCP tasks extension for the SDK's Client: it declares `io.modelcontextprotocol/tasks`
    on every request, so that `task_submit` and `workflow_submit` answer with a task handle.
    `Client.call_tool` then polls it to the final result by itself; `client.session.call_tool(...,
    allow_claimed=True)` returns the handle (a CreateTaskResult) to poll with `get_task`."""

    identifier = EXTENSION

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=CreateTaskResult, resolve=_poll_to_result)]


def explain_failure(url: str, token: str | None, error: BaseException) -> str:
    """A readable reason why a session to `url` failed (the SDK reports an HTTP 401 only as
    'Server returned an error response'): probe the endpoint once with plain HTTP."""
    import httpx

    try:
        r = httpx.post(url, json={"jsonrpc": "2.0", "id": 0, "method": "ping"}, timeout=5,
                       headers={"accept": "application/json, text/event-stream", **auth_headers(token)})
    except httpx.HTTPError as e:
        return f"cannot reach {url}: {e}"
    if r.status_code == 401:
        return (f"{url} refused the {'token' if token else 'request'} (HTTP 401): "
                + ("set MCPP_TOKEN or MCPP_TOKEN_FILE to the node's bearer token" if not token
                   else "MCPP_TOKEN / MCPP_TOKEN_FILE does not hold this node's token"))
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        subs = getattr(e, "exceptions", None)
        if subs:
            for x in subs:
                walk(x)
        else:
            leaves.append(e)

    walk(error)
    return f"cannot talk to {url}: " + "; ".join(f"{type(e).__name__}: {e}" for e in leaves)


def structured(result: Any) -> dict[str, Any]:
    if result.is_error:
        text = " ".join(getattr(c, "text", "") for c in result.content)
        raise ToolCallError(text)
    if result.structured_content is not None:
        return dict(result.structured_content)
    return dict(json.loads(result.content[0].text))


async def call_tool(url: str, name: str, arguments: dict[str, Any] | None = None, token: str | None = None) -> dict[str, Any]:
    """One call in a fresh session; raises ToolCallError for isError results."""
    async with open_client(url, token) as c:
        result = await c.call_tool(name, arguments or {})
    return structured(result)


def cli_endpoint(url: str | None) -> tuple[str, str | None]:
    """For the CLIs: the node's MCP URL and bearer token: `url` (--url) / $MCPP_URL / node-0 of .cluster/cluster.json;
    the token from $MCPP_TOKEN / $MCPP_TOKEN_FILE, else from .cluster/cluster.json."""
    f = Path(".cluster") / "cluster.json"
    cluster = json.loads(f.read_text()) if f.exists() else None
    token = token_from_env() or (cluster or {}).get("token")
    if url:
        return str(url), token
    if os.environ.get("MCPP_URL"):
        return os.environ["MCPP_URL"], token
    if cluster is not None:
        return str(cluster["nodes"][0]["mcp_url"]), token
    raise ArgumentError("--url", "give a node's MCP URL (or set MCPP_URL, or run `mcpp cluster up` here)")
