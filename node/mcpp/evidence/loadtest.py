"""`mcpp loadtest`: start a cluster with the harness, run Locust headless against its MCP
endpoints (loadtests/locustfile.py) for a bounded time and user count, and summarise.

Writes Locust's CSV files (DIR/locust_*.csv) and DIR/summary.json =
{calls_per_s, errors, p50_ms, p99_ms, per_tool: {tool: {calls, failures, calls_per_s, p50_ms, p99_ms}}, ...}.
Traffic goes only to the cluster's loopback (or published container) ports.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from mcpp.errors import ArgumentError, HarnessError
from mcpp.harness import ProcessCluster
from mcpp.harness.image import repo_root

__all__ = ["run", "summarise"]

console = Console()
SETUP_CALLS = ("initialize", "initialized")
MAX_USERS = 512
MAX_DURATION_S = 600


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except (ValueError, IndexError):
        raise ArgumentError("--duration", f"{text!r} is not a duration like 30s or 2m") from None


def summarise(csv_path: Path) -> dict[str, Any]:
    """Locust's *_stats.csv -> the summary (tool calls only; session set-up is counted in errors)."""
    rows = list(csv.DictReader(csv_path.open()))
    per_tool: dict[str, dict[str, Any]] = {}
    errors = 0
    for r in rows:
        name = r["Name"]
        if name == "Aggregated":
            continue
        errors += int(r["Failure Count"])
        if name in SETUP_CALLS:
            continue
        per_tool[name] = {"calls": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                          "calls_per_s": round(float(r["Requests/s"]), 1), "p50_ms": float(r["50%"]),
                          "p99_ms": float(r["99%"]), "mean_ms": round(float(r["Average Response Time"]), 2)}
    agg = next((r for r in rows if r["Name"] == "Aggregated"), None)
    return {
        "calls_per_s": round(sum(t["calls_per_s"] for t in per_tool.values()), 1),
        "calls": sum(t["calls"] for t in per_tool.values()),
        "errors": errors,
        "p50_ms": float(agg["50%"]) if agg else None,
        "p99_ms": float(agg["99%"]) if agg else None,
        "per_tool": per_tool,
    }


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.users <= MAX_USERS:
        raise ArgumentError("--users", f"must be between 1 and {MAX_USERS}")
    if not 1 <= args.nodes <= 20:
        raise ArgumentError("--nodes", "must be between 1 and 20")
    duration = "15s" if args.quick else args.duration
    secs = _seconds(duration)
    if not 1 <= secs <= MAX_DURATION_S:
        raise ArgumentError("--duration", f"must be between 1 s and {MAX_DURATION_S} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    locustfile = repo_root() / "loadtests" / "locustfile.py"
    cluster: Any
    if args.backend == "docker":
        from mcpp.harness.docker import DockerCluster

        cluster = DockerCluster(args.nodes, out / "cluster", env={"MCPP_MCP_RESPONSE": args.mcp_response})
    else:
        cluster = ProcessCluster(args.nodes, out / "cluster",
                                 node_args=["--log-level", "warning", "--mcp-response", args.mcp_response])
    with console.status(f"starting a {args.nodes}-node mesh ({args.backend})"):
        cluster.__enter__()
    try:
        console.print(f"mesh of {args.nodes} formed in {cluster.formed_in_s:.2f} s; "
                      f"Locust: {args.users} users for {duration}")
        cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(args.users),
               "-r", str(args.users), "-t", duration, "--stop-timeout", "5", "--csv", str(out / "locust"),
               "--host", cluster.nodes[0].base_url, "--only-summary", "--loglevel", "WARNING"]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MCPP_")},
               "MCPP_CLUSTER_FILE": str(cluster.cluster_file())}
        t0 = time.monotonic()
        with console.status(f"load for {duration}"):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=secs + 120)
        (out / "locust.log").write_text(res.stdout + res.stderr)
        if not (out / "locust_stats.csv").exists():
            raise HarnessError(f"locust wrote no stats (exit {res.returncode}): {res.stderr[-2000:]}")
        summary = summarise(out / "locust_stats.csv")
        summary.update({"nodes": args.nodes, "users": args.users, "duration": duration, "backend": args.backend,
                        "mcp_response": args.mcp_response,
                        "wall_s": round(time.monotonic() - t0, 1), "locust_exit_code": res.returncode})
    finally:
        cluster.stop()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"{summary['calls']} tool calls, {summary['calls_per_s']} calls/s, {summary['errors']} errors, "
                  f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms")
    for tool, t in sorted(summary["per_tool"].items()):
        console.print(f"  {tool:>18}: {t['calls_per_s']:>7} calls/s  p50 {t['p50_ms']} ms  p99 {t['p99_ms']} ms  "
                      f"failures {t['failures']}")
    console.print(f"wrote {out / 'summary.json'} and Locust's CSV files")
    return 0
