"""Workflow figures for `mcpp bench`: per-step orchestration overhead, and concurrent workflow
throughput (200 diamonds on a 3-node mesh) next to the same graph on Dask distributed, in the
same run on the same machine.

Like for like: both run 200 diamonds of 4 no-op steps (fetch -> left, right -> join) on 3
worker processes, submitted all at once from the benchmark process, which also holds the
coordinator (mcpp: an in-process node; Dask: the LocalCluster scheduler), waiting for every
join. Not like for like: mcpp persists every workflow and step in SQLite and dispatches over
libp2p; Dask keeps its graph in memory. A second mcpp figure submits the 200 through MCP to
the 3 node processes, which then coordinate them: that is the product's own interface.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import trio

from mcpp.harness import ProcessCluster
from mcpp.mcp.client import open_client, structured
from mcpp.runner import Services

__all__ = ["measure_step_overhead", "measure_diamonds_in_process", "measure_mcpp_diamonds", "measure_dask_diamonds",
           "DIAMOND"]

DIAMOND = [
    {"id": "fetch", "task_type": "echo", "payload": {"v": 1}},
    {"id": "left", "task_type": "echo", "depends_on": ["fetch"], "payload": {"$ref": "steps.fetch.result.v"}},
    {"id": "right", "task_type": "echo", "depends_on": ["fetch"], "payload": {"$ref": "steps.fetch.result.v"}},
    {"id": "join", "task_type": "echo", "depends_on": ["left", "right"],
     "payload": [{"$ref": "steps.left.result"}, {"$ref": "steps.right.result"}]},
]


async def measure_step_overhead(app: Services, chain_len: int = 20, runs: int = 5) -> dict[str, Any]:
    """A chain of `chain_len` echo steps, minus `chain_len` single task round trips (in-process API,
    every task runs on another node): the engine's cost per step."""
    wf, q = app.workflows, app.queue
    steps = [{"id": f"s{i}", "task_type": "echo", "payload": i, **({"depends_on": [f"s{i - 1}"]} if i else {})}
             for i in range(chain_len)]
    chain_ms, single_ms = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        for i in range(chain_len):
            s = await q.submit("echo", i, None, 1.0, [], [], 300, None, {}, 0)
            await q.result(s["task_id"], True, 30, False, False)
        single_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        sub = await wf.submit("chain", steps, None, None, {}, "fail_fast", 1.0, [], {})
        r = await wf.result(sub["workflow_id"], True, 60, False, False)
        chain_ms.append((time.perf_counter() - t0) * 1000)
        assert r["status"] == "completed"
    chain, single = sorted(chain_ms)[runs // 2], sorted(single_ms)[runs // 2]
    return {"chain_steps": chain_len, "runs": runs, "chain_ms_median": round(chain, 3),
            "single_tasks_ms_median": round(single, 3),
            "overhead_ms_per_step": round((chain - single) / chain_len, 3)}


async def _diamonds_via_mcp(urls: list[str], token: str | None, n: int) -> dict[str, Any]:
    ids: list[tuple[str, str]] = []
    t0 = time.perf_counter()

    async def submit(url: str, count: int) -> None:
        async with open_client(url, token) as c:
            for _ in range(count):
                r = structured(await c.call_tool("workflow_submit", {"name": "bench-diamond", "steps": DIAMOND}))
                ids.append((url, r["workflow_id"]))

    async with trio.open_nursery() as nursery:
        for i, url in enumerate(urls):
            nursery.start_soon(submit, url, n // len(urls) + (1 if i < n % len(urls) else 0))
    t_submitted = time.perf_counter()

    async def wait(url: str, wf_ids: list[str]) -> None:
        async with open_client(url, token) as c:
            for wid in wf_ids:
                r = structured(await c.call_tool("workflow_result", {"workflow_id": wid, "wait": True,
                                                                     "timeout_s": 120, "include_steps": False}))
                assert r["status"] == "completed" and r["results"]["join"] == [1, 1], r

    async with trio.open_nursery() as nursery:
        for url in urls:
            nursery.start_soon(wait, url, [w for u, w in ids if u == url])
    t1 = time.perf_counter()
    return {"workflows": len(ids), "workflows_per_s": round(len(ids) / (t1 - t0), 1),
            "submit_s": round(t_submitted - t0, 3), "total_s": round(t1 - t0, 3)}


async def measure_diamonds_in_process(app: Services, n: int) -> dict[str, Any]:
    """200 diamonds coordinated by a node inside the benchmark process (as Dask's scheduler runs
    in its client's process), every step run by the 3 worker node processes."""
    wf = app.workflows
    t0 = time.perf_counter()
    ids = [(await wf.submit("bench-diamond", DIAMOND, None, None, {}, "fail_fast", 1.0, [], {}))["workflow_id"]
           for _ in range(n)]
    t_submitted = time.perf_counter()
    for wid in ids:
        r = await wf.result(wid, True, 120, False, False)
        assert r["status"] == "completed" and r["results"]["join"] == [1, 1], r
    t1 = time.perf_counter()
    return {"workflows": n, "workflows_per_s": round(n / (t1 - t0), 1), "submit_s": round(t_submitted - t0, 3),
            "total_s": round(t1 - t0, 3)}


def measure_mcpp_diamonds(c: ProcessCluster, n: int) -> dict[str, Any]:
    return trio.run(_diamonds_via_mcp, [x.mcp_url for x in c.nodes], c.token, n)


def _echo(x: Any) -> Any:
    return x


def _join(a: Any, b: Any) -> Any:
    return [a, b]


def measure_dask_diamonds(n: int, tmp: Path) -> dict[str, Any]:
    """The same 200 diamonds on Dask distributed: LocalCluster, 3 worker processes, 1 thread each."""
    import logging

    from dask.distributed import Client as DaskClient
    from dask.distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=3, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1",
        local_directory=str(tmp / "dask"))
    with cluster, DaskClient(cluster) as client:  # type: ignore[no-untyped-call]
        startup = time.perf_counter() - t_start
        client.submit(_echo, 0).result()
        t0 = time.perf_counter()
        joins = []
        for _ in range(n):
            f = client.submit(_echo, 1, pure=False)
            left = client.submit(_echo, f, pure=False)
            right = client.submit(_echo, f, pure=False)
            joins.append(client.submit(_join, left, right, pure=False))
        results = client.gather(joins)
        t1 = time.perf_counter()
        assert all(r == [1, 1] for r in results)
        procs = [psutil.Process(p.pid) for p in psutil.Process().children(recursive=True)]
        rss = sum(p.memory_info().rss for p in procs) / 2**20
    return {"workflows": n, "workflows_per_s": round(n / (t1 - t0), 1), "total_s": round(t1 - t0, 3),
            "cluster_startup_s": round(startup, 3), "worker_processes_rss_mb": round(rss, 1)}
