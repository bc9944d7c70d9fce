"""`mcpp task submit|status|result|list|cancel|retry`: the queue tools from a shell, against a node's MCP URL.

Each prints the tool's structured result as JSON (exit 0), or the tool's error on stderr (exit 2).
The URL comes from --url, else MCPP_URL, else the first node of `.cluster/cluster.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from mcpp.errors import ArgumentError

__all__ = ["add_arguments", "run"]


def _json_arg(name: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ArgumentError(name, f"not JSON: {e}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a node's MCP URL (default: $MCPP_URL, else node-0 of .cluster/cluster.json)")
    sub = p.add_subparsers(dest="task_command", required=True)
    s = sub.add_parser("submit", help="submit a task")
    s.add_argument("task_type")
    s.add_argument("--payload", default="{}", help="JSON payload (default {})")
    s.add_argument("--task-id")
    s.add_argument("--priority", type=float, default=1.0)
    s.add_argument("--depends-on", nargs="+", default=[])
    s.add_argument("--tag", dest="tags", action="append", default=[])
    s.add_argument("--timeout-s", type=float, default=300)
    s.add_argument("--retry-policy", help='JSON, e.g. {"max_attempts": 5}')
    s.add_argument("--cache-ttl-s", type=float, default=0)
    s.add_argument("--wait", action="store_true", help="then wait for the result and print it")
    st = sub.add_parser("status", help="a task's status")
    st.add_argument("task_id")
    st.add_argument("--metrics", action="store_true")
    r = sub.add_parser("result", help="a task's result")
    r.add_argument("task_id")
    r.add_argument("--wait", action="store_true")
    r.add_argument("--timeout-s", type=float, default=30)
    r.add_argument("--logs", action="store_true")
    r.add_argument("--history", action="store_true")
    ls = sub.add_parser("list", help="list tasks of the mesh")
    ls.add_argument("--status")
    ls.add_argument("--type", dest="task_type")
    ls.add_argument("--tag")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--scope", default="mesh", choices=["mesh", "local"])
    c = sub.add_parser("cancel", help="cancel a task")
    c.add_argument("task_id")
    c.add_argument("--force", action="store_true")
    c.add_argument("--reason")
    rt = sub.add_parser("retry", help="re-queue a failed / cancelled / dead-lettered task")
    rt.add_argument("task_id")


def _calls(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    cmd = args.task_command
    if cmd == "submit":
        a = {"task_type": args.task_type, "payload": _json_arg("--payload", args.payload), "priority": args.priority,
             "depends_on": args.depends_on, "tags": args.tags, "timeout_s": args.timeout_s,
             "cache_ttl_s": args.cache_ttl_s}
        if args.task_id:
            a["task_id"] = args.task_id
        if args.retry_policy:
            a["retry_policy"] = _json_arg("--retry-policy", args.retry_policy)
        return [("task_submit", a)]
    if cmd == "status":
        return [("task_status", {"task_id": args.task_id, "include_metrics": args.metrics})]
    if cmd == "result":
        return [("task_result", {"task_id": args.task_id, "wait": args.wait, "timeout_s": args.timeout_s,
                                 "include_logs": args.logs, "include_history": args.history})]
    if cmd == "list":
        a = {"limit": args.limit, "scope": args.scope}
        for k in ("status", "task_type", "tag"):
            if getattr(args, k):
                a[k] = getattr(args, k)
        return [("task_list", a)]
    if cmd == "cancel":
        return [("task_cancel", {"task_id": args.task_id, "force": args.force, "reason": args.reason})]
    return [("task_retry", {"task_id": args.task_id})]


async def _run(url: str, token: str | None, calls: list[tuple[str, dict[str, Any]]], then_wait: bool) -> list[Any]:
    """The raw results, stopping at the first error (raising inside the session would arrive
    wrapped in an exception group)."""
    from mcpp.mcp.client import open_client

    out: list[Any] = []
    async with open_client(url, token) as c:
        for name, a in calls:
            out.append(await c.call_tool(name, a))
            if out[-1].is_error:
                return out
        if then_wait and out[0].structured_content:
            tid = out[0].structured_content["task_id"]
            out.append(await c.call_tool("task_result", {"task_id": tid, "wait": True, "timeout_s": 300}))
    return out


def run(args: argparse.Namespace) -> int:
    from mcpp.mcp.client import ToolCallError, structured

    from mcpp.mcp.client import cli_endpoint  # the mcp SDK loads only when a verb runs

    url, token = cli_endpoint(args.url)
    try:
        raw = trio.run(_run, url, token, _calls(args), bool(getattr(args, "wait", False)) and args.task_command == "submit")
    except (OSError, BaseExceptionGroup) as e:
        from mcpp.mcp.client import explain_failure

        print(f"mcpp: error: {explain_failure(url, token, e)}", file=sys.stderr)
        return 2
    try:
        results = [structured(r) for r in raw]
    except ToolCallError as e:
        print(f"mcpp: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r, indent=2, sort_keys=True))
    return 0
