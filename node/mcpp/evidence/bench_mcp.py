"""MCP response modes for `mcpp bench`: the cost of one tool call with SSE responses (the
default: they carry progress notifications) and with JSON responses (no notifications), on
both protocol revisions the SDK client speaks."""

from __future__ import annotations

import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import trio

from mcpp.harness import ProcessCluster
from mcpp.mcp.client import open_client
from mcpp.net.peers import percentile

__all__ = ["measure_response_modes", "response_mode_rows"]

REVISIONS = {"auto": "2026-07-28", "legacy": "2025-11-25"}


async def _timed_calls(url: str, token: str, mode: str, warmup: int, calls: int) -> list[float]:
    async with open_client(url, token, mode=mode) as c:
        for _ in range(warmup):
            await c.call_tool("peer_list", {})
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await c.call_tool("peer_list", {})
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure_response_modes(tmp: Path, calls: int = 500, warmup: int = 50) -> list[dict[str, Any]]:
    """p50 / p99 of `peer_list` on a warm session of the SDK client, per response mode of the
    node (sse, json) and protocol revision (2026-07-28, 2025-11-25): one node, one client."""
    rows = []
    for response in ("sse", "json"):
        token = secrets.token_urlsafe(24)
        with ProcessCluster(1, tmp / f"mcp-{response}", token=token, formation_timeout_s=60,
                            node_args=["--mcp-response", response, "--log-level", "warning"]) as c:
            for mode, revision in REVISIONS.items():
                ms = trio.run(_timed_calls, c.nodes[0].mcp_url, token, mode, warmup, calls)
                rows.append({"response": response, "revision": revision, "calls": calls,
                             "p50_ms": round(statistics.median(ms), 3), "p99_ms": round(percentile(ms, 99) or 0, 3),
                             "mean_ms": round(statistics.mean(ms), 3)})
    return rows


def response_mode_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table rows (figure | value | target)."""
    return [f"| MCP peer_list on a warm SDK session, {r['response']} responses"
            f"{' (default)' if r['response'] == 'sse' else ''}, {r['revision']}: p50 / p99 | "
            f"{r['p50_ms']} / {r['p99_ms']} ms | |" for r in rows]
