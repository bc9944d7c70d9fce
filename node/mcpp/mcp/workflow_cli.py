"""`mcpp workflow run FILE.yaml --param k=v` (and `status`, `result`, `graph`) against a node's MCP URL.

`run` submits the template, shows the steps' progress (rich) until the workflow is final, then
prints the results as JSON; exit 0 if it completed, 1 if it failed or was cancelled, 2 on a
refused request.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mcpp.errors import ArgumentError

__all__ = ["add_arguments", "run"]

console = Console(stderr=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a node's MCP URL (default: $MCPP_URL, else node-0 of .cluster/cluster.json)")
    sub = p.add_subparsers(dest="workflow_command", required=True)
    r = sub.add_parser("run", help="run a YAML workflow template and wait for it")
    r.add_argument("file", help="YAML template (name, params, steps)")
    r.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="template parameter; V is parsed as YAML (so 5 is a number) (repeatable)")
    r.add_argument("--name", help="workflow name (default: the template's)")
    r.add_argument("--failure-policy", choices=["fail_fast", "continue"], default="fail_fast")
    r.add_argument("--workflow-id")
    r.add_argument("--timeout-s", type=float, default=600)
    r.add_argument("--no-wait", action="store_true", help="print the submission and return")
    for name in ("status", "result", "graph"):
        s = sub.add_parser(name, help=f"a workflow's {name}")
        s.add_argument("workflow_id")
        if name == "graph":
            s.add_argument("--format", default="mermaid", choices=["json", "dot", "mermaid"])


def _params(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise ArgumentError("--param", f"{pair!r} is not K=V")
        out[k] = yaml.safe_load(v) if v else ""
    return out


class _Failed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


async def _run(url: str, token: str | None, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    from mcpp.mcp.client import open_client

    def check(r: Any) -> dict[str, Any]:
        if r.is_error:
            raise _Failed(" ".join(getattr(c, "text", "") for c in r.content))
        return dict(r.structured_content)

    async with open_client(url, token) as c:
        cmd = args.workflow_command
        if cmd == "status":
            return check(await c.call_tool("workflow_status", {"workflow_id": args.workflow_id})), 0
        if cmd == "result":
            return check(await c.call_tool("workflow_result", {"workflow_id": args.workflow_id})), 0
        if cmd == "graph":
            return check(await c.call_tool("workflow_dependencies", {"workflow_id": args.workflow_id,
                                                                      "format": args.format})), 0
        text = Path(args.file).read_text()
        import yaml

        doc = yaml.safe_load(text)
        name = args.name or (doc.get("name") if isinstance(doc, dict) else None) or Path(args.file).stem
        a: dict[str, Any] = {"name": name, "template": text, "params": _params(args.param),
                             "failure_policy": args.failure_policy}
        if args.workflow_id:
            a["workflow_id"] = args.workflow_id
        sub = check(await c.call_tool("workflow_submit", a))
        console.print(f"workflow {sub['workflow_id']} ({sub['steps']} steps, levels {sub['levels']}) "
                      f"coordinated by {sub['coordinator'][-8:]}")
        if args.no_wait:
            return sub, 0
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            bar = progress.add_task("running", total=sub["steps"])
            with trio.move_on_after(args.timeout_s):
                while True:
                    st = check(await c.call_tool("workflow_status", {"workflow_id": sub["workflow_id"],
                                                                     "include_steps": False}))
                    progress.update(bar, completed=st["progress"]["completed"],
                                    description=f"{st['status']}: running {', '.join(st['current_steps'][:4])}")
                    if st["status"] != "running":
                        break
                    await trio.sleep(0.2)
        res = check(await c.call_tool("workflow_result", {"workflow_id": sub["workflow_id"], "include_steps": True}))
        return res, 0 if res["status"] == "completed" else 1


def run(args: argparse.Namespace) -> int:
    from mcpp.mcp.client import cli_endpoint  # the mcp SDK loads only when a verb runs

    url, token = cli_endpoint(args.url)
    try:
        out, code = trio.run(_run, url, token, args)
    except _Failed as e:
        print(f"mcpp: error: {e}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as eg:  # the SDK client wraps what is raised inside its session
        group, _ = eg.split(_Failed)
        failed: BaseException | None = group
        while isinstance(failed, BaseExceptionGroup):
            failed = failed.exceptions[0]
        if failed is None:
            from mcpp.mcp.client import explain_failure

            print(f"mcpp: error: {explain_failure(url, token, eg)}", file=sys.stderr)
        else:
            print(f"mcpp: error: {failed}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mcpp: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, sort_keys=True))
    return code
