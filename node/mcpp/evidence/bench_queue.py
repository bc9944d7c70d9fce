"""Queue figures for `mcpp bench`: cross-peer task round trip (in-process API and MCP), a P2P
tool call, no-op throughput with 1-3 worker nodes, and RSS growth with 10,000 queued tasks.

Set-up: a 3-node mesh of processes (the harness) plus, for the in-process API figures, one
more node inside the benchmark process that owns the tasks and serves no task type itself, so
every task it submits runs on another node.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import trio

from mcpp.config import NodeConfig
from mcpp.harness import ProcessCluster
from mcpp.mcp.client import open_client, structured
from mcpp.net.peers import percentile
from mcpp.runner import Services, open_services

__all__ = ["measure_queue", "measure_replication"]

ALL_TYPES = ["echo", "sleep", "sha256", "fail"]
CLOSED_LOOP = 8  # submit loops of the closed-loop variant (each waits for its acknowledgement)
CPU_ROUNDS = 20_000  # the same as the peers' (bench_peers.PeerCounts.rounds)


def _lat(ms: list[float]) -> dict[str, Any]:
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(percentile(ms, 99) or 0.0, 3),
            "mean_ms": round(statistics.mean(ms), 3), "samples": len(ms)}


async def _register(c: ProcessCluster, serving: int, max_concurrent: int) -> None:
    """Nodes 0..serving-1 serve echo; the others only sleep."""
    for i, n in enumerate(c.nodes):
        caps = ALL_TYPES if i < serving else ["sleep"]
        async with open_client(n.mcp_url, c.token) as s:
            structured(await s.call_tool("worker_register", {"capabilities": caps, "max_concurrent": max_concurrent}))


async def _wait_views(app: Services, serving: int) -> None:
    q = app.queue
    with trio.fail_after(20):
        while sum(1 for w in q.worker_views() if "echo" in w.task_types) != serving:
            await trio.sleep(0.02)


async def _round_trips(app: Services, n: int) -> list[float]:
    q = app.queue
    out = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        s = await q.submit("echo", {"i": i}, None, 1.0, [], [], 300, None, {}, 0)
        r = await q.result(s["task_id"], True, 30, False, False)
        if i >= 50:
            out.append((time.perf_counter() - t0) * 1000)
        assert r["status"] == "completed" and r["worker"] != app.node.peer_id
    return out


async def _throughput(app: Services, n: int, task_type: str = "echo", rounds: int = 0,
                      submitters: int | None = None) -> dict[str, Any]:
    """n tasks submitted at once (as the peers' map / remote calls are), or by `submitters`
    closed loops; done when every task is final."""
    q = app.queue
    submitters = submitters or n
    ids: list[str] = []
    t0 = time.perf_counter()

    def payload(i: int) -> Any:
        return {"data": f"t{i}", "rounds": rounds} if task_type == "sha256" else {"i": i}

    async def submitter(k: int, base: int) -> None:
        for i in range(base, base + k):
            s = await q.submit(task_type, payload(i), None, 1.0, [], [], 300, None, {}, 0)
            ids.append(s["task_id"])

    async with trio.open_nursery() as nursery:
        for j in range(submitters):
            nursery.start_soon(submitter, n // submitters, j * (n // submitters))
    t_submitted = time.perf_counter()
    for tid in ids:
        await q.broker.wait_final(tid)
    t1 = time.perf_counter()
    workers: dict[str, int] = {}
    for tid in ids:
        rec = q.store.get(tid)
        assert rec is not None and rec.status == "completed", rec
        workers[str(rec.worker)] = workers.get(str(rec.worker), 0) + 1
    return {"tasks": len(ids), "tasks_per_s": round(len(ids) / (t1 - t0), 1), "submit_s": round(t_submitted - t0, 3),
            "total_s": round(t1 - t0, 3), "per_worker": sorted(workers.values(), reverse=True)}


REPLICATION_SETTINGS = (("replicas 0", 0, False), ("replicas 1, sync (default)", 1, True),
                        ("replicas 1, async", 1, False))


async def _replication_cost(app: Services, rounds: int, rtts: int, tasks: int) -> list[dict[str, Any]]:
    """What acknowledging on two nodes costs: round trips and no-op throughput (3 workers) with
    each replication setting of the owner (this process), interleaved in rounds, same run."""
    rep = app.queue.replicator
    saved = (rep.copies, rep.sync)
    got: dict[str, dict[str, list[float]]] = {name: {"rtt": [], "tput": [], "loop": []}
                                              for name, _, _ in REPLICATION_SETTINGS}
    try:
        for _ in range(rounds):
            for name, copies, sync in REPLICATION_SETTINGS:
                rep.copies, rep.sync = copies, sync
                got[name]["rtt"] += await _round_trips(app, rtts)
                got[name]["tput"].append((await _throughput(app, tasks))["tasks_per_s"])
                got[name]["loop"].append((await _throughput(app, tasks, submitters=CLOSED_LOOP))["tasks_per_s"])
    finally:
        rep.copies, rep.sync = saved
    return [{"setting": name, "rtt_p50_ms": _lat(v["rtt"])["p50_ms"], "rtt_p99_ms": _lat(v["rtt"])["p99_ms"],
             "noop_tasks_per_s": round(statistics.median(v["tput"]), 1), "noop_tasks_per_s_all": v["tput"],
             f"noop_tasks_per_s_{CLOSED_LOOP}_loops": round(statistics.median(v["loop"]), 1)}
            for name, v in got.items()]


async def _queued_rss(app: Services, n: int) -> dict[str, Any]:
    q = app.queue
    proc = psutil.Process()
    q.pause(None, "rss benchmark")
    gc.collect()
    before = proc.memory_info().rss / 2**20
    for i in range(n):
        await q.submit("echo", {"i": i, "pad": "x" * 64}, None, 1.0, [], [], 300, None, {}, 0)
    gc.collect()
    after = proc.memory_info().rss / 2**20
    q.clear(True, "queued", None, None)
    q.resume(None, False)
    return {"queued": n, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "rss_growth_mb": round(after - before, 1)}


async def _mcp_figures(c: ProcessCluster, n: int) -> dict[str, Any]:
    a, cnode = c.nodes[0], c.nodes[2]
    rtt, hop = [], []
    async with open_client(a.mcp_url, c.token) as sa, open_client(cnode.mcp_url, c.token) as sc:
        task_id = ""
        for i in range(n + 30):
            t0 = time.perf_counter()
            s = structured(await sa.call_tool("task_submit", {"task_type": "echo", "payload": {"i": i}}))
            r = structured(await sa.call_tool("task_result", {"task_id": s["task_id"], "wait": True}))
            if i >= 30:
                rtt.append((time.perf_counter() - t0) * 1000)
            assert r["status"] == "completed" and r["worker"] != a.peer_id
            task_id = s["task_id"]
        for i in range(n + 30):
            t0 = time.perf_counter()
            st = structured(await sc.call_tool("task_status", {"task_id": task_id}))
            if i >= 30:
                hop.append((time.perf_counter() - t0) * 1000)
            assert st["owner"] == a.peer_id
    return {"mcp_task_rtt": {**_lat(rtt), "samples_ms": rtt}, "p2p_tool_call": {**_lat(hop), "samples_ms": hop}}


@asynccontextmanager
async def _bench_owner(c: ProcessCluster, tmp: Path) -> AsyncIterator[Services]:
    """A node inside this process that owns the tasks and serves no task type of the bench."""
    boot = c.nodes[0]
    cfg = NodeConfig(role="worker", bootstrap=(f"{boot.multiaddrs[0]}",) if "/p2p/" in boot.multiaddrs[0]
                     else (f"{boot.multiaddrs[0]}/p2p/{boot.peer_id}",),
                     data_dir=str(tmp / "bench-owner"), capabilities=("bench-owner",), log_level="warning",
                     swarm_key=c.swarm_key)
    async with open_services(cfg) as app:
        with trio.fail_after(30):
            while len(app.node.table.connected()) < len(c.nodes):
                await trio.sleep(0.05)
        yield app


def measure_replication(tmp: Path, quick: bool) -> list[dict[str, Any]]:
    """`mcpp bench --only replication`: `_replication_cost` alone, on a fresh 3-node mesh."""
    async def main(c: ProcessCluster) -> list[dict[str, Any]]:
        async with _bench_owner(c, tmp) as app:
            await _register(c, 3, 64)
            await _wait_views(app, 3)
            return await _replication_cost(app, 1 if quick else 3, 200 if quick else 500, 1000 if quick else 3000)

    with ProcessCluster(3, tmp / "replication", formation_timeout_s=60, node_args=["--log-level", "warning"]) as c:
        return trio.run(main, c)


async def _in_process(c: ProcessCluster, tmp: Path, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with _bench_owner(c, tmp) as app:
        await _register(c, 3, 4)
        await _wait_views(app, 3)
        rt = await _round_trips(app, 300 if quick else 1000)
        out["api_task_rtt"] = {**_lat(rt), "samples_ms": rt}
        from mcpp.evidence.bench_workflow import measure_step_overhead

        out["step_overhead"] = await measure_step_overhead(app, 20, 3 if quick else 7)
        from mcpp.evidence.bench_workflow import measure_diamonds_in_process

        out["diamonds_in_process"] = await measure_diamonds_in_process(app, 200)
        out["throughput"] = []
        for serving in (1, 2, 3):
            await _register(c, serving, 64)
            await _wait_views(app, serving)
            await trio.sleep(0.5)
            t = await _throughput(app, 2000 if quick else 6000)
            out["throughput"].append({"worker_nodes": serving, "max_concurrent": 64, **t})
            await _register(c, serving, 4)
            await _wait_views(app, serving)
            t = await _throughput(app, 150 if quick else 600, "sha256", CPU_ROUNDS)
            out.setdefault("cpu_throughput", []).append({"worker_nodes": serving, "max_concurrent": 4,
                                                         "rounds": CPU_ROUNDS, **t})
        await _register(c, 3, 64)
        await _wait_views(app, 3)
        out["replication_cost"] = await _replication_cost(app, 1 if quick else 3, 200 if quick else 500,
                                                          1000 if quick else 3000)
        out["queued_rss"] = await _queued_rss(app, 10_000)
        await _register(c, 3, 4)
    return out


async def _first_result(url: str, token: str | None) -> None:
    async with open_client(url, token) as s:
        t = structured(await s.call_tool("task_submit", {"task_type": "echo", "payload": 1}))
        structured(await s.call_tool("task_result", {"task_id": t["task_id"], "wait": True}))


def measure_queue(tmp: Path, quick: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    with ProcessCluster(3, tmp / "queue3", formation_timeout_s=60, node_args=["--log-level", "warning"]) as c:
        trio.run(_first_result, c.nodes[0].mcp_url, c.token)
        startup = time.perf_counter() - t0
        time.sleep(2)
        idle = round(sum(psutil.Process(n.pid).memory_info().rss for n in c.nodes) / 2**20, 1)
        out = trio.run(_in_process, c, tmp, quick)
        out["startup_s"] = round(startup, 3)
        out["idle_rss_mb_3_nodes"] = idle
        trio.run(_register_mcp_layout, c)
        out |= trio.run(_mcp_figures, c, 300 if quick else 1000)
        from mcpp.evidence.bench_workflow import measure_mcpp_diamonds

        trio.run(_register, c, 3, 4)
        trio.run(trio.sleep, 1.0)
        out["diamonds"] = measure_mcpp_diamonds(c, 200)
    return out


async def _register_mcp_layout(c: ProcessCluster) -> None:
    """node-0 (where the MCP client submits) serves no echo: every task crosses to node-1 or node-2."""
    for i, n in enumerate(c.nodes):
        caps = ["sleep"] if i == 0 else ALL_TYPES
        async with open_client(n.mcp_url, c.token) as s:
            structured(await s.call_tool("worker_register", {"capabilities": caps, "max_concurrent": 4}))
    await trio.sleep(1.0)
