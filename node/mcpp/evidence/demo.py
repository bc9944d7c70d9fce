"""`mcpp demo`: a local mesh doing real work, printed step by step, then a clean stop."""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mcpp.harness import ProcessCluster
from mcpp.harness.cli import nodes_table
from mcpp.mcp.client import call_tool

__all__ = ["run"]

console = Console()


Call = Callable[[Any, str, dict[str, Any]], dict[str, Any]]


def _call(node: Any, tool: str, args: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    console.print(f"[bold cyan]→ {node.name}[/] [bold]{tool}[/]({json.dumps(args)})")
    t0 = time.perf_counter()
    res = trio.run(functools.partial(call_tool, node.mcp_url, tool, args, token=token))
    console.print(f"  [dim]answered in {(time.perf_counter() - t0) * 1000:.1f} ms (MCP over HTTP, new session)[/]")
    return res


def _queue_demo(cluster: ProcessCluster, names: dict[str, str], call: Call) -> None:
    boot, w1, w2 = cluster.nodes[0], cluster.nodes[1], cluster.nodes[-1]
    console.rule("6. tasks: submitted on the bootstrap (which serves no sha256), run on the workers")
    call(boot, "worker_register", {"capabilities": ["echo", "sleep"], "max_concurrent": 4})
    time.sleep(0.5)  # the change reaches every peer
    ids = trio.run(_submit_many, boot.mcp_url, cluster.token, 12)
    console.print(f"  12 sha256 tasks (20,000 rounds each) accepted by {boot.name}, which owns them (SQLite, WAL)")
    res = call(w2, "task_result", {"task_id": ids[0], "wait": True, "include_history": True})
    console.print(f"  result read on {w2.name}: digest {str(res['result']['digest'])[:16]}... "
                  f"ran on {names.get(res['worker'], res['worker'])} in {res['duration_ms']} ms")
    rows = call(w1, "task_list", {"task_type": "sha256", "limit": 100})
    t = Table("task", "status", "owner", "worker", "attempts")
    for r in rows["tasks"]:
        t.add_row(r["task_id"][:16], r["status"], names.get(r["owner"], "?"), names.get(r["worker"] or "", "-"),
                  str(r["attempts"]))
    console.print(t)
    console.rule("7. a task that always fails: retried with backoff, then dead-lettered")
    s = call(w1, "task_submit", {"task_type": "fail", "retry_policy": {"max_attempts": 2, "backoff_s": 0.2}})
    res = call(boot, "task_result", {"task_id": s["task_id"], "wait": True, "include_history": True})
    console.print(f"  status={res['status']} after {res['attempts']} attempts: {res['error']}")
    stats = call(w2, "queue_stats", {"include_worker_stats": True})
    console.print({k: stats[k] for k in ("completed_count", "dead_lettered_count", "retries", "mean_run_s")})
    t = Table("worker", "task types", "completed", "failed", "load", "rss MB")
    # each worker asked by id: its own figures now (the mesh-wide list is the gossiped summaries,
    # which carry no RSS and may be 2 s behind)
    for w in [call(w2, "worker_status", {"worker_id": pid})["workers"][0] for pid in names]:
        t.add_row(names.get(w["peer_id"], "?"), ",".join(w["capabilities"]), str(w["completed"]), str(w["failed"]),
                  str(w["load"]), str(w["rss_mb"]))
    console.print(t)
    console.rule("8. a workflow: the shipped diamond template (fetch -> left, right -> join)")
    sub = call(w1, "workflow_submit", {"name": "demo-diamond", "template": "diamond", "params": {"text": "demo"}})
    console.print(f"  levels {sub['levels']}, coordinated by {names.get(sub['coordinator'], '?')}")
    res = call(boot, "workflow_result", {"workflow_id": sub["workflow_id"], "wait": True})
    t = Table("step", "status", "worker", "ran ms")
    for st in res["steps"]:
        ran = "-" if st["run_s"] is None else f"{st['run_s'] * 1000:.1f}"
        t.add_row(st["id"], st["status"], names.get(st["worker"] or "", "-"), ran)
    console.print(t)
    console.print(f"  workflow {res['status']} in {res['duration_ms']} ms; join received "
                  f"{json.dumps(res['results']['join'])[:60]}...")
    g = call(w2, "workflow_dependencies", {"workflow_id": sub["workflow_id"], "format": "mermaid"})
    console.print(f"  critical path {' -> '.join(g['critical_path'])} ({g['critical_path_length']} ms, measured)")


def _security_demo(cluster: ProcessCluster) -> None:
    import httpx

    console.rule("9. security: MCP needs the cluster's token; the mesh is a private network")
    url = cluster.nodes[0].mcp_url
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    hdrs = {"accept": "application/json, text/event-stream"}
    r = httpx.post(url, json=body, headers=hdrs, timeout=5)
    console.print(f"  POST {url} without a token: HTTP {r.status_code} {r.json().get('error')}")
    console.print("  with it: every call above sent 'Authorization: Bearer <token>' "
                  f"(the token is in {cluster.cluster_file()}, key 'token')")
    console.print("  libp2p: every node holds the cluster's swarm key (PSK); a node without it cannot connect")


async def _submit_many(url: str, token: str | None, n: int) -> list[str]:
    from mcpp.mcp.client import open_client, structured

    ids = []
    async with open_client(url, token) as c:
        for i in range(n):
            r = await c.call_tool("task_submit", {"task_type": "sha256", "payload": {"data": f"demo-{i}", "rounds": 20000}})
            ids.append(structured(r)["task_id"])
        for tid in ids:
            structured(await c.call_tool("task_result", {"task_id": tid, "wait": True}))
    return ids


def run(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    console.rule(f"mcpp demo: a {args.nodes}-node mesh on 127.0.0.1")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("starting nodes, forming the mesh through the DHT", total=args.nodes)
        cluster = ProcessCluster(
            args.nodes, d, progress=lambda done, total, _: progress.update(task, completed=done, total=total)
        )
        cluster.__enter__()
    try:
        names = {n.peer_id: n.name for n in cluster.nodes}
        console.print(nodes_table([n.__dict__ for n in cluster.nodes]))
        console.print(f"Mesh formed in [bold]{cluster.formed_in_s:.2f} s[/] (process start included). "
                      f"Workers were given only the bootstrap's multiaddr.\n")

        call: Call = functools.partial(_call, token=cluster.token)
        boot, w1, w2 = cluster.nodes[0], cluster.nodes[1], cluster.nodes[-1]
        console.rule("1. discovery through the DHT, from a worker")
        res = call(w2, "peer_discover", {"include_metrics": True})
        t = Table("peer", "connected", "rtt ms (measured now)", "quality", "multiaddr")
        for p in res["peers"]:
            m = p.get("metrics") or {}
            t.add_row(names.get(p["peer_id"], p["peer_id"][-8:]), str(p["connected"]), str(m.get("rtt_ms")),
                      str(m.get("quality")), p["multiaddrs"][0] if p["multiaddrs"] else "-")
        console.print(t)

        console.rule("2. the bootstrap's peer table, by latency")
        res = call(boot, "peer_list", {"sort_by": "latency"})
        t = Table("peer", "role", "latency ms", "reputation", "last seen (s ago)")
        for p in res["peers"]:
            t.add_row(names.get(p["peer_id"], "?"), p["role"], str(p["latency_ms"]), str(p["reputation"]),
                      f"{time.time() - (p['last_seen'] or 0):.2f}")
        console.print(t)

        console.rule("3. link metrics between two workers, and a node's totals")
        m = call(w1, "peer_metrics", {"peer_id": w2.peer_id})
        console.print({k: m[k] for k in ("rtt_p50_ms", "rtt_p99_ms", "rtt_samples", "bandwidth_in_bps",
                                         "bandwidth_out_bps", "reliability", "quality", "reputation")})
        own = call(w1, "peer_metrics", {})
        console.print({k: own[k] for k in ("peers_connected", "rss_mb", "cpu_seconds", "uptime_s", "rpc_calls_ok")})

        console.rule("4. disconnect two workers, reconnect by peer id alone (resolved through the DHT)")
        call(w1, "peer_disconnect", {"peer_id": w2.peer_id, "reason": "demo"})
        res = call(w1, "peer_connect", {"peer_id": w2.peer_id})
        console.print(f"  connected again: rtt {res['rtt_ms']} ms after {res['attempts']} attempt(s)")

        console.rule("5. re-join through the configured bootstrap")
        res = call(w2, "bootstrap_network", {"min_connections": 1})
        console.print(f"  satisfied={res['satisfied']} routing table={res['routing_table_size']} "
                      f"peers connected={res['peers_connected']}")

        _queue_demo(cluster, names, call)
        _security_demo(cluster)
    finally:
        console.rule("stopping every node (SIGTERM)")
        cluster.stop()
        codes = {name: cluster.exit_code(name) for name in cluster._procs}
        console.print(f"exit codes: {codes}")
    ok = all(c == 0 for c in codes.values())
    console.print("[bold green]demo finished: clean stop[/]" if ok else "[bold red]a node did not exit cleanly[/]")
    return 0 if ok else 1


