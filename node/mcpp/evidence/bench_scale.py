"""A large mesh at work (issue 16's targets beyond formation): placement of a burst of tasks
on members that are not neighbours, and how fast a failure, a clean stop and a join reach
every member's view.

Times of the view changes are read from the members' own logs (each `member suspect|dead|
left|alive` line carries its wall-clock time), not from polling 50 `/status` endpoints, whose
rounds take 1-2 s on a loaded 2-core machine and would hide the figure being measured.

Run alone: `python -m mcpp.evidence.bench_scale 50` prints the JSON (`mcpp bench` runs it too).
"""

from __future__ import annotations

import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from mcpp.harness import ProcessCluster, node_status
from mcpp.harness.process import NodeRecord, poll_statuses
from mcpp.mcp.client import open_client, structured

__all__ = ["measure_large_mesh"]

GONE = ("member suspect", "member dead", "member left")  # what takes a member out of `members`


def _first_log_time(c: ProcessCluster, node: NodeRecord, peer_id: str, since: float, msgs: tuple[str, ...]) -> float | None:
    """Wall time of the first line of `node`'s log about `peer_id` with one of `msgs`, at or after `since`."""
    for line in (c.directory / "logs" / f"{node.name}.log").read_text(errors="replace").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("peer") == peer_id and d.get("msg") in msgs and float(d.get("ts", 0)) >= since:
            return float(d["ts"])
    return None


def _reached_all(c: ProcessCluster, victim: NodeRecord, since: float, msgs: tuple[str, ...], ref: float) -> float | None:
    """Seconds from `ref` until the last of the other members logged the change (None: one never did)."""
    times = [_first_log_time(c, r, victim.peer_id, since, msgs) for r in c.nodes if r.name != victim.name]
    if any(t is None for t in times):
        return None
    return round(max(0.0, max(t for t in times if t is not None) - ref), 3)


def _wait_views(c: ProcessCluster, victim: NodeRecord, present: bool, timeout_s: float) -> bool:
    others = [r.base_url for r in c.nodes if r.name != victim.name]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sts = poll_statuses(others, c.headers())
        if all(s is not None and (victim.peer_id in s.get("members", ())) == present for s in sts):
            return True
    return False


def _events(c: ProcessCluster, name: str, sig: int) -> dict[str, Any]:
    """Stop `name` with `sig`: until every member dropped it; restart: until every member knows it
    again, counted from the moment the new process said ready."""
    victim = c.record(name)
    t_stop = time.time()
    c.kill(name, sig)
    gone_polled = _wait_views(c, victim, False, 60)
    time.sleep(1.0)  # the last log lines
    gone = _reached_all(c, victim, t_stop, GONE, t_stop)
    t_start = time.time()
    c.restart(name)
    while not (node_status(victim.base_url, 1.0, c.headers()) or {}).get("ready"):
        if time.time() - t_start > 60:
            break
        time.sleep(0.05)
    t_ready = time.time()
    back_polled = _wait_views(c, victim, True, 60)
    time.sleep(1.0)
    known = _reached_all(c, victim, t_start, ("member alive",), t_ready)
    return {"gone_from_every_view_s": gone, "gone_seen_by_polling": gone_polled,
            "restart_to_ready_s": round(t_ready - t_start, 3),
            "known_by_every_member_after_ready_s": known, "back_seen_by_polling": back_polled}


async def _burst(url: str, token: str, tasks: int, seconds: float) -> dict[str, Any]:
    async with open_client(url, token) as s:
        t0 = time.monotonic()
        subs: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []

        async def submit() -> None:
            subs.append(structured(await s.call_tool("task_submit", {"task_type": "sleep", "payload": {"seconds": seconds}})))

        async def result(task_id: str) -> None:
            results.append(structured(await s.call_tool("task_result", {"task_id": task_id, "wait": True, "timeout_s": 120})))

        async with trio.open_nursery() as n:
            for _ in range(tasks):
                n.start_soon(submit)
        submitted = time.monotonic() - t0
        async with trio.open_nursery() as n:
            for x in subs:
                n.start_soon(result, x["task_id"])
        done = time.monotonic() - t0
    workers = [r.get("worker") for r in results]
    return {"tasks": tasks, "task_seconds": seconds, "submitted_in_s": round(submitted, 3),
            "all_finished_after_first_submit_s": round(done, 3),
            "finished_after_last_submit_s": round(done - submitted, 3),
            "completed": sum(r.get("status") == "completed" for r in results),
            "distinct_workers": len(set(workers)),
            "tasks_per_worker_max": max(workers.count(w) for w in set(workers)) if workers else 0}


def measure_large_mesh(tmp: Path, n: int = 50, tasks: int = 200, settle_s: float = 30.0) -> dict[str, Any]:
    """An n-node mesh: formation, then (after `settle_s`) `tasks` 1 s sleep tasks submitted at
    once at node-0 through MCP, then kill -9 of one member and SIGTERM of another, each restarted."""
    with ProcessCluster(n, tmp / f"large{n}", formation_timeout_s=240, secure=True) as c:
        out: dict[str, Any] = {"nodes": n, "formed_in_s": round(c.formed_in_s, 3), "up_in_s": round(c.up_in_s, 3)}
        time.sleep(settle_s)
        links = [len((st or {}).get("connected", [])) for st in poll_statuses([r.base_url for r in c.nodes], c.headers())]
        out["links_per_node_mean"] = round(statistics.mean(links), 1)
        out["node0_links"] = links[0]
        out["placement"] = trio.run(_burst, c.nodes[0].mcp_url, c.token, tasks, 1.0)
        time.sleep(10)
        out["kill9"] = _events(c, f"node-{n // 3}", signal.SIGKILL)
        time.sleep(10)
        out["sigterm"] = _events(c, f"node-{n // 2}", signal.SIGTERM)
        return out


if __name__ == "__main__":
    print(json.dumps(measure_large_mesh(Path(tempfile.mkdtemp(prefix="mcpp-scale-")),
                                        int(sys.argv[1]) if len(sys.argv) > 1 else 50), indent=1))
