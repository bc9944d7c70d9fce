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

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from mcpp.errors import ArgumentError

__all__ = ["call_tool", "ToolCallError", "open_client", "structured", "auth_headers", "token_from_env",
           "explain_failure", "cli_endpoint"]

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


def open_client(url: str, token: str | None = None) -> Client:
    """An MCP session to a node (use as `async with`); token: the node's bearer token, if any."""
    if not token:
        return Client(url)
    return Client(_authed(url, token))


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
