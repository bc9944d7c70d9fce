"""Shared fixtures: real node processes on loopback, a real MCP client over HTTP."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from mcpp.harness import ProcessCluster
from mcpp.mcp.client import ToolCallError, open_client, structured

# One MCP bearer token for every cluster the tests start (each cluster still gets its own swarm
# key): helpers send it on every call. test_security.py checks what happens without it.
TOKEN = secrets.token_urlsafe(32)


@pytest.fixture(autouse=True)
def _clean_mcpp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("MCPP_"):
            monkeypatch.delenv(k)


def call(url: str, tool: str, args: dict[str, Any] | None = None, token: str | None = TOKEN) -> dict[str, Any]:
    """Call a tool through the MCP SDK client; raises ToolCallError on isError."""

    async def go() -> Any:
        async with open_client(url, token) as c:
            return await c.call_tool(tool, args or {})

    return structured(trio.run(go))


def error_of(url: str, tool: str, args: dict[str, Any]) -> str:
    """The message of the tool error that calling `tool` must raise."""
    with pytest.raises(ToolCallError) as ei:
        call(url, tool, args)
    return str(ei.value)


def status_or_none(url: str, tool: str, args: dict[str, Any]) -> str | None:
    """The `status` a status tool returns, or None while it answers with an error."""
    try:
        return str(call(url, tool, args)["status"])
    except ToolCallError:
        return None


def call_raw(url: str, tool: str, args: dict[str, Any]) -> Any:
    async def go() -> Any:
        async with open_client(url, TOKEN) as c:
            return await c.call_tool(tool, args)

    return trio.run(go)


def wait_until(pred: Any, timeout_s: float, interval_s: float = 0.1) -> float:
    """Poll `pred` until true; returns the seconds it took; fails the test on timeout."""
    import time

    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    """A 5-node mesh shared by the read-mostly tests."""
    d: Path = tmp_path_factory.mktemp("cluster5")
    with ProcessCluster(5, d, formation_timeout_s=60, token=TOKEN) as c:
        yield c
