"""The task queue on a real 4-node mesh (processes, sockets, MCP over HTTP)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import TOKEN, call, error_of, wait_until
from mcpp.harness import ProcessCluster
from mcpp.mcp.client import ToolCallError, open_client, structured

TESTS = Path(__file__).parent
ALL = ["echo", "sleep", "sha256", "fail", "reverse", "upper"]


def _plugin_dist(d: Path) -> Path:
    """A tiny installed distribution whose entry point (group mcpp.handlers) names a handler."""
    info = d / "mcpp_test_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mcpp-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mcpp.handlers]\nreverse = taskplugins:reverse\n")
    return d


@pytest.fixture(scope="module")
def qc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    d = tmp_path_factory.mktemp("queue4")
    args = ["--lease-s", "1.5", "--quota", "batch=3/1", "--handler", "upper=taskplugins:upper"]
    env = {"PYTHONPATH": f"{TESTS}:{_plugin_dist(d / 'site')}"}
    with ProcessCluster(4, d, node_args=args, env=env, formation_timeout_s=60, token=TOKEN) as c:
        yield c


def urls(c: ProcessCluster) -> list[str]:
    return [n.mcp_url for n in c.nodes]


def many(url: str, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Several tool calls in one MCP session; a failed call gives its ToolCallError in the list."""

    async def go() -> list[Any]:
        out: list[Any] = []
        async with open_client(url, TOKEN) as s:
            for name, a in calls:
                r = await s.call_tool(name, a)
                try:
                    out.append(structured(r))
                except ToolCallError as e:
                    out.append(e)
        return out

    return trio.run(go)


def register(c: ProcessCluster, caps: dict[int, list[str]], max_concurrent: int = 4,
             all_types: list[str] = ALL) -> None:
    """Configure each node's worker; nodes not named serve every type (all_types)."""
    for i, n in enumerate(c.nodes):
        call(n.mcp_url, "worker_register", {"capabilities": caps.get(i, all_types), "max_concurrent": max_concurrent})
    # every node must have heard of the change before the test dispatches
    # (a member that is not one of the cluster's nodes, e.g. a raw peer of an earlier test that
    # has just left, may still be listed for a moment: only the cluster's own nodes count)
    def seen() -> bool:
        by_peer = {w["peer_id"]: w for w in call(c.nodes[0].mcp_url, "worker_status", {})["workers"]}
        return all(n.peer_id in by_peer and by_peer[n.peer_id]["capabilities"] == caps.get(i, all_types)
                   for i, n in enumerate(c.nodes))
    wait_until(seen, 10)
    time.sleep(0.3)


def wait_final(url: str, task_ids: list[str], timeout_s: float = 30) -> list[dict[str, Any]]:
    return many(url, [("task_result", {"task_id": t, "wait": True, "timeout_s": timeout_s, "include_history": True})
                      for t in task_ids])


def test_submit_on_a_run_on_b_read_on_c(qc: ProcessCluster) -> None:
    register(qc, {0: ["sleep"], 1: ["echo"], 2: ["sleep"], 3: ["sleep"]})
    a, b, c = qc.nodes[0], qc.nodes[1], qc.nodes[2]
    subs = many(a.mcp_url, [("task_submit", {"task_type": "echo", "payload": {"n": i}}) for i in range(20)])
    assert all(s["owner"] == a.peer_id for s in subs)
    results = wait_final(c.mcp_url, [s["task_id"] for s in subs])
    assert [r["result"] for r in results] == [{"n": i} for i in range(20)]
    # only node-1 serves echo: the others never got one
    assert {r["worker"] for r in results} == {b.peer_id}
    st = call(qc.nodes[3].mcp_url, "task_status", {"task_id": subs[0]["task_id"], "include_metrics": True})
    assert st["status"] == "completed" and st["owner"] == a.peer_id and st["assigned_worker"] == b.peer_id
    assert st["metrics"]["run_s"] is not None
    worker_a = call(c.mcp_url, "worker_status", {"worker_id": a.peer_id})["workers"][0]
    assert "echo" not in worker_a["capabilities"]


def test_mesh_stats_and_worker_status_read_gossiped_summaries(qc: ProcessCluster) -> None:
    """queue_stats(scope=mesh) and worker_status at D read every member's gossiped load summary:
    A's completions show up at D without D calling A, even while A is frozen (SIGSTOP); a
    worker asked for by id is read directly (RSS, CPU)."""
    import signal

    register(qc, {})
    a, d = qc.nodes[0], qc.nodes[3]
    subs = many(a.mcp_url, [("task_submit", {"task_type": "echo", "payload": {"n": i}}) for i in range(10)])
    wait_final(a.mcp_url, [s["task_id"] for s in subs])
    exact = call(a.mcp_url, "queue_stats", {"scope": "local"})["completed_count"]
    assert exact >= 10

    def mesh() -> dict[str, Any]:
        return call(d.mcp_url, "queue_stats", {"scope": "mesh", "include_worker_stats": True})

    wait_until(lambda: mesh()["per_node"].get(a.peer_id, {}).get("completed_count") == exact, 10)
    qc.kill(a.name, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        st = mesh()
        took = time.monotonic() - t0
    finally:
        qc.kill(a.name, signal.SIGCONT)
    assert took < 2.0, f"a frozen member held up the mesh read for {took:.1f} s"
    assert st["per_node"][a.peer_id]["completed_count"] == exact and st["unreachable"] == []
    assert set(st["per_node"]) == {n.peer_id for n in qc.nodes} and isinstance(st["summaries_as_of"][a.peer_id], float)
    assert st["completed_count"] >= exact and {w["peer_id"] for w in st["workers"]} == {n.peer_id for n in qc.nodes}
    wait_until(lambda: sum(w["completed"] for w in call(d.mcp_url, "worker_status", {})["workers"]) >= 10, 10)
    direct = call(d.mcp_url, "worker_status", {"worker_id": a.peer_id})["workers"]
    assert len(direct) == 1 and direct[0]["peer_id"] == a.peer_id and direct[0]["rss_mb"] > 0


def test_500_tasks_spread_over_all_workers(qc: ProcessCluster) -> None:
    register(qc, {})
    # 0.25 s each: a backlog builds up (500 x 0.25 s over 16 slots is ~8 s of work), so the
    # dispatcher must use every worker, not only the best-placed one
    subs = many(qc.nodes[0].mcp_url, [("task_submit", {"task_type": "sleep", "payload": {"seconds": 0.25},
                                                        "tags": ["spread"]}) for _ in range(500)])
    assert len({s["task_id"] for s in subs}) == 500

    def done() -> bool:
        r = call(qc.nodes[3].mcp_url, "task_list", {"tag": "spread", "status": "completed", "limit": 1})
        return bool(r["total"] == 500)

    wait_until(done, 60, 0.5)
    rows = call(qc.nodes[2].mcp_url, "task_list", {"tag": "spread", "limit": 1000})
    assert rows["total"] == 500 and rows["count"] == 500 and not rows["has_more"]
    workers = {t["worker"] for t in rows["tasks"]}
    assert workers == {n.peer_id for n in qc.nodes}, "every worker took some of the 500"
    assert all(t["attempts"] == 1 for t in rows["tasks"])
    page = call(qc.nodes[2].mcp_url, "task_list", {"tag": "spread", "limit": 100, "offset": 450})
    assert page["count"] == 50 and not page["has_more"]


def test_priorities_honoured_when_worker_is_saturated(qc: ProcessCluster) -> None:
    register(qc, {0: ["echo"], 1: ["sleep"], 2: ["echo"], 3: ["echo"]}, max_concurrent=1)
    url = qc.nodes[0].mcp_url
    calls = [("task_submit", {"task_type": "sleep", "payload": {"seconds": 0.6}})]
    calls += [("task_submit", {"task_type": "sleep", "payload": {"seconds": 0.02}, "priority": 1}) for _ in range(4)]
    calls += [("task_submit", {"task_type": "sleep", "payload": {"seconds": 0.02}, "priority": 5}) for _ in range(4)]
    subs = many(url, calls)
    blocker, low, high = subs[0], subs[1:5], subs[5:]
    assert high[0]["queue_position"] == 0, "a higher priority goes to the head of the queue"
    boosted = call(url, "task_priority", {"task_id": low[-1]["task_id"], "boost": 10})
    assert boosted["old_priority"] == 1 and boosted["new_priority"] == 11 and boosted["queue_position"] == 0
    results = wait_final(qc.nodes[3].mcp_url, [s["task_id"] for s in subs])
    start = {s["task_id"]: r["history"][-1]["started_at"] for s, r in zip(subs, results)}
    order = sorted(start, key=start.get)  # type: ignore[arg-type]
    expected = [blocker["task_id"], low[-1]["task_id"], *(h["task_id"] for h in high), *(x["task_id"] for x in low[:-1])]
    assert order == expected


def test_pause_and_resume(qc: ProcessCluster) -> None:
    register(qc, {})
    url = qc.nodes[1].mcp_url
    p = call(url, "queue_pause", {"reason": "maintenance"})
    assert p["paused"] is True
    subs = many(url, [("task_submit", {"task_type": "echo", "payload": i}) for i in range(3)])
    time.sleep(0.5)
    assert {call(url, "task_status", {"task_id": s["task_id"]})["status"] for s in subs} == {"queued"}
    stats = call(url, "queue_stats", {"scope": "local"})
    assert stats["paused"] == {"*": "maintenance"} and stats["queued_count"] == 3
    call(url, "queue_resume", {})
    assert [r["status"] for r in wait_final(url, [s["task_id"] for s in subs], 10)] == ["completed"] * 3
    # one type only: sleep waits, echo runs
    call(url, "queue_pause", {"task_type": "sleep"})
    s_sleep, s_echo = many(url, [("task_submit", {"task_type": "sleep", "payload": {"seconds": 0}}),
                                 ("task_submit", {"task_type": "echo", "payload": 1})])
    assert wait_final(url, [s_echo["task_id"]], 10)[0]["status"] == "completed"
    assert call(url, "task_status", {"task_id": s_sleep["task_id"]})["status"] == "queued"
    call(url, "queue_resume", {"task_type": "sleep"})
    assert wait_final(url, [s_sleep["task_id"]], 10)[0]["status"] == "completed"


def test_cancel_queued_and_running(qc: ProcessCluster) -> None:
    register(qc, {0: ["echo"], 1: ["echo"], 2: ["sleep"], 3: ["echo"]}, max_concurrent=1)
    url = qc.nodes[0].mcp_url
    running, queued = many(url, [("task_submit", {"task_type": "sleep", "payload": {"seconds": 30}}),
                                 ("task_submit", {"task_type": "sleep", "payload": {"seconds": 30}})])
    wait_until(lambda: call(url, "task_status", {"task_id": running["task_id"]})["status"] == "running", 10)
    c = call(qc.nodes[3].mcp_url, "task_cancel", {"task_id": queued["task_id"], "reason": "not needed"})
    assert c["cancelled"] and c["status"] == "cancelled"
    c = call(qc.nodes[1].mcp_url, "task_cancel", {"task_id": running["task_id"]})
    assert c["cancelled"] and c["status"] == "running"  # asked to stop, grace period
    r = wait_final(url, [running["task_id"]], 10)[0]
    assert r["status"] == "cancelled" and r["history"][-1]["outcome"] == "cancelled"
    wait_until(lambda: call(qc.nodes[2].mcp_url, "worker_status", {"worker_id": qc.nodes[2].peer_id})
               ["workers"][0]["running"] == 0, 5)
    forced = call(url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 30}})
    wait_until(lambda: call(url, "task_status", {"task_id": forced["task_id"]})["status"] == "running", 10)
    c = call(url, "task_cancel", {"task_id": forced["task_id"], "force": True})
    assert c["status"] == "cancelled" and c["forced"]
    assert call(url, "task_status", {"task_id": forced["task_id"]})["status"] == "cancelled"
    again = call(url, "task_cancel", {"task_id": forced["task_id"]})
    assert again["cancelled"] is False


def test_fail_goes_to_dead_letters_with_backoff_and_retry_revives_it(qc: ProcessCluster) -> None:
    register(qc, {})
    url = qc.nodes[2].mcp_url
    s = call(url, "task_submit", {"task_type": "fail", "payload": {"message": "boom"}})
    r = wait_final(qc.nodes[0].mcp_url, [s["task_id"]], 20)[0]
    assert r["status"] == "dead_lettered" and r["attempts"] == 3 and "boom" in r["error"]
    h = r["history"]
    assert [x["outcome"] for x in h] == ["error"] * 3
    gaps = [h[i + 1]["started_at"] - h[i]["finished_at"] for i in range(2)]
    assert gaps[0] >= 0.45 and gaps[1] >= 0.95, f"backoff 0.5 s then 1 s, got {gaps}"
    dead = call(qc.nodes[1].mcp_url, "task_list", {"status": "dead_lettered", "limit": 1000})
    assert s["task_id"] in {t["task_id"] for t in dead["tasks"]}
    rt = call(qc.nodes[3].mcp_url, "task_retry", {"task_id": s["task_id"], "retry_policy": {"max_attempts": 1},
                                                   "priority": 3})
    assert rt["status"] == "queued" and rt["previous_status"] == "dead_lettered"
    r2 = wait_final(url, [s["task_id"]], 20)[0]
    assert r2["status"] == "dead_lettered" and len(r2["history"]) == 4, "earlier attempts stay in the history"
    assert call(url, "task_status", {"task_id": s["task_id"]})["priority"] == 3


def test_kill_worker_running_a_task_it_completes_elsewhere_once(qc: ProcessCluster) -> None:
    register(qc, {0: ["echo"], 1: ["echo"], 2: ["sleep"], 3: ["sleep"]})
    url = qc.nodes[0].mcp_url
    s = call(url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 2}})
    wait_until(lambda: call(url, "task_status", {"task_id": s["task_id"]})["status"] == "running", 10)
    victim = call(url, "task_status", {"task_id": s["task_id"]})["assigned_worker"]
    name = next(n.name for n in qc.nodes if n.peer_id == victim)
    qc.kill(name)
    try:
        r = wait_final(qc.nodes[1].mcp_url, [s["task_id"]], 30)[0]
        assert r["status"] == "completed" and r["worker"] != victim
        outcomes = [x["outcome"] for x in r["history"]]
        assert outcomes == ["lost", "ok"], outcomes
        assert r["history"][0]["worker"] == victim
    finally:
        qc.restart(name)
        qc.wait_formed(30)
    stats = call(url, "queue_stats", {"scope": "local"})
    assert stats["lease_expired"] >= 1


def test_owner_restart_with_100_queued_tasks(qc: ProcessCluster) -> None:
    register(qc, {1: ["echo"], 2: ["echo", "sleep"], 3: ["echo", "sleep"]})
    owner = qc.nodes[1]
    url = owner.mcp_url
    # two tasks running on other workers while the owner dies: re-leased after its restart
    running = many(url, [("task_submit", {"task_type": "sleep", "payload": {"seconds": 2}, "tags": ["restart-run"]})
                         for _ in range(2)])
    wait_until(lambda: all(call(url, "task_status", {"task_id": s["task_id"]})["status"] == "running"
                           for s in running), 10)
    call(url, "queue_pause", {"reason": "hold them"})
    subs = many(url, [("task_submit", {"task_type": "echo", "payload": i, "tags": ["restart"]}) for i in range(100)])
    assert {s["status"] for s in subs} == {"queued"}
    qc.kill(owner.name)
    qc.restart(owner.name)
    qc.wait_formed(30)
    ids = [s["task_id"] for s in subs]
    results = wait_final(qc.nodes[0].mcp_url, ids, 60)  # the pause is not kept across a restart
    assert [r["status"] for r in results] == ["completed"] * 100
    assert [r["result"] for r in results] == list(range(100))
    rr = wait_final(qc.nodes[0].mcp_url, [s["task_id"] for s in running], 30)
    assert [r["status"] for r in rr] == ["completed"] * 2
    assert all(r["attempts"] == 1 for r in rr), "running tasks were re-leased, not run again"


def test_idempotent_submit(qc: ProcessCluster) -> None:
    register(qc, {})
    a, b = qc.nodes[0].mcp_url, qc.nodes[2].mcp_url
    first = call(a, "task_submit", {"task_type": "echo", "payload": "once", "task_id": "job-idem-1"})
    again = call(b, "task_submit", {"task_type": "echo", "payload": "twice", "task_id": "job-idem-1"})
    assert again["task_id"] == "job-idem-1" and again["owner"] == first["owner"] and again["existing"]
    r = wait_final(b, ["job-idem-1"])[0]
    assert r["result"] == "once" and r["attempts"] == 1
    gen = call(a, "task_submit", {"task_type": "echo", "payload": 1})
    same = call(qc.nodes[3].mcp_url, "task_submit", {"task_type": "echo", "payload": 2, "task_id": gen["task_id"]})
    assert same["existing"] and same["owner"] == qc.nodes[0].peer_id
    rows = call(b, "task_list", {"limit": 1000})["tasks"]
    assert sum(1 for t in rows if t["task_id"] in ("job-idem-1", gen["task_id"])) == 2


def test_quota_per_tag(qc: ProcessCluster) -> None:
    register(qc, {})
    url = qc.nodes[3].mcp_url
    call(url, "queue_pause", {})
    try:
        subs = many(url, [("task_submit", {"task_type": "sleep", "payload": {"seconds": 0.2}, "tags": ["batch"]})
                          for _ in range(3)])
        msg = error_of(url, "task_submit", {"task_type": "echo", "tags": ["batch", "x"]})
        assert "quota[batch].max_queued" in msg and "max_queued=3" in msg
        assert call(url, "task_submit", {"task_type": "echo", "tags": ["other"]})["status"] == "queued"
    finally:
        call(url, "queue_resume", {})
    results = wait_final(url, [s["task_id"] for s in subs], 20)
    spans = sorted((r["history"][-1]["started_at"], r["history"][-1]["finished_at"]) for r in results)
    assert all(spans[i][1] <= spans[i + 1][0] + 0.01 for i in range(2)), f"max_running=1 overlapped: {spans}"


def test_result_cache(qc: ProcessCluster) -> None:
    register(qc, {})
    url = qc.nodes[0].mcp_url
    first = call(url, "task_submit", {"task_type": "sha256", "payload": {"data": "cache-me", "rounds": 1000}})
    r1 = wait_final(url, [first["task_id"]])[0]
    hit = call(url, "task_submit", {"task_type": "sha256", "payload": {"data": "cache-me", "rounds": 1000},
                                    "cache_ttl_s": 60})
    assert hit["status"] == "completed" and hit["cached_from"] == first["task_id"]
    r2 = call(qc.nodes[1].mcp_url, "task_result", {"task_id": hit["task_id"]})
    assert r2["result"] == r1["result"] and r2["cached_from"] == first["task_id"]
    miss = call(url, "task_submit", {"task_type": "sha256", "payload": {"data": "other", "rounds": 1000},
                                     "cache_ttl_s": 60})
    assert "cached_from" not in miss
    time.sleep(1.1)
    expired = call(url, "task_submit", {"task_type": "sha256", "payload": {"data": "cache-me", "rounds": 1000},
                                        "cache_ttl_s": 1})
    assert "cached_from" not in expired


def test_dependencies_across_owners(qc: ProcessCluster) -> None:
    register(qc, {})
    a, b = qc.nodes[0].mcp_url, qc.nodes[2].mcp_url
    dep = call(a, "task_submit", {"task_type": "sleep", "payload": {"seconds": 2}})  # still running when the child arrives, even on a busy machine
    child = call(b, "task_submit", {"task_type": "echo", "payload": "after", "depends_on": [dep["task_id"]]})
    assert child["status"] == "blocked"
    r = wait_final(b, [child["task_id"]], 20)[0]
    assert r["status"] == "completed"
    dep_r = call(a, "task_result", {"task_id": dep["task_id"]})
    assert r["history"][0]["started_at"] >= dep_r["history"][0]["finished_at"] if "history" in dep_r else True
    st = call(a, "task_status", {"task_id": dep["task_id"]})
    assert st["finished_at"] <= call(b, "task_status", {"task_id": child["task_id"]})["started_at"]
    bad = call(a, "task_submit", {"task_type": "fail", "retry_policy": {"max_attempts": 1}})
    doomed = call(b, "task_submit", {"task_type": "echo", "depends_on": [bad["task_id"]]})
    r = wait_final(a, [doomed["task_id"]], 20)[0]
    assert r["status"] == "failed" and bad["task_id"] in r["error"]


def test_custom_handlers_flag_and_entry_point(qc: ProcessCluster) -> None:
    register(qc, {})
    url = qc.nodes[1].mcp_url
    s = call(url, "task_submit", {"task_type": "upper", "payload": {"s": "mesh"}})
    r = wait_final(url, [s["task_id"]])[0]
    assert r["result"] == {"upper": "MESH", "thread": True}, "a sync --handler runs in a worker thread"
    s = call(url, "task_submit", {"task_type": "reverse", "payload": "abc"})
    r = call(url, "task_result", {"task_id": s["task_id"], "wait": True, "include_logs": True})
    assert r["result"] == "cba" and r["logs"] == ["reversing"]


def test_resources_limit_what_a_worker_runs_at_once(qc: ProcessCluster) -> None:
    register(qc, {0: ["echo"], 1: ["echo"], 2: ["echo"], 3: ["echo"]})
    call(qc.nodes[2].mcp_url, "worker_register", {"capabilities": ["sleep"], "max_concurrent": 8,
                                                  "resources": {"cpu": 2}})
    time.sleep(0.5)
    url = qc.nodes[0].mcp_url
    subs = many(url, [("task_submit", {"task_type": "sleep", "payload": {"seconds": 0.3},
                                       "metadata": {"resources": {"cpu": 1}}}) for _ in range(4)])
    too_big = call(url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 0},
                                        "metadata": {"resources": {"cpu": 4}}})
    results = wait_final(url, [s["task_id"] for s in subs], 20)
    spans = [(r["history"][-1]["started_at"], r["history"][-1]["finished_at"]) for r in results]
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most == 2, f"cpu=2 and tasks of cpu=1: two at a time, saw {most}"
    assert call(url, "task_status", {"task_id": too_big["task_id"]})["status"] == "queued", "fits no worker"
    call(url, "task_cancel", {"task_id": too_big["task_id"]})


def test_bad_input_names_the_argument_and_loses_nothing(qc: ProcessCluster) -> None:
    register(qc, {})
    url = qc.nodes[0].mcp_url
    kept = call(url, "task_submit", {"task_type": "echo", "payload": "kept"})
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("task_submit", {"task_type": "no-such-type"}, "task_type:"),
        ("task_status", {"task_id": "no-such-task"}, "task_id:"),
        ("task_result", {"task_id": "ffff@12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"}, "task_id"),
        ("task_submit", {"task_type": "echo", "depends_on": ["missing-dep"]}, "depends_on[0]:"),
        ("task_submit", {"task_type": "echo", "priority": "inf"}, "priority:"),
        ("task_submit", {"task_type": "echo", "payload": "x" * (1024 * 1024 + 10)}, "payload:"),
        ("task_submit", {"task_type": "echo", "retry_policy": {"max_attempts": 0}}, "retry_policy.max_attempts:"),
        ("task_submit", {"task_type": "echo", "timeout_s": -1}, "timeout_s:"),
        ("task_list", {"limit": 0}, "limit:"),
        ("task_list", {"limit": 1001}, "limit:"),
        ("task_list", {"status": "bogus"}, "status:"),
        ("task_priority", {"task_id": kept["task_id"]}, "priority:"),
        ("queue_clear", {"confirm": False}, "confirm:"),
        ("queue_stats", {"scope": "galaxy"}, "scope:"),
        ("worker_register", {"capabilities": ["nope"]}, "capabilities[0]:"),
        ("worker_register", {"capabilities": ["echo"], "max_concurrent": 0}, "max_concurrent:"),
        ("worker_unregister", {"worker_id": "nobody"}, "worker_id:"),
    ]
    for tool, args, field in cases:
        msg = error_of(url, tool, args)
        assert field in msg, f"{tool}({args}) -> {msg!r} should name {field!r}"
    assert "1048576" in error_of(url, "task_submit", {"task_type": "echo", "payload": "x" * (1024 * 1024 + 10)})
    r = wait_final(qc.nodes[3].mcp_url, [kept["task_id"]])[0]
    assert r["status"] == "completed" and r["result"] == "kept"


def test_queue_clear_and_unregister_without_drain(qc: ProcessCluster) -> None:
    register(qc, {0: ["echo"], 1: ["echo"], 2: ["sleep"], 3: ["echo"]}, max_concurrent=2)
    url = qc.nodes[0].mcp_url
    call(url, "queue_pause", {"task_type": "echo"})
    many(url, [("task_submit", {"task_type": "echo", "tags": ["clear-me"]}) for _ in range(5)])
    cleared = call(url, "queue_clear", {"confirm": True, "tag": "clear-me"})
    assert cleared["removed"] == 5
    call(url, "queue_resume", {})
    assert call(url, "task_list", {"tag": "clear-me"})["total"] == 0
    s = call(url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 1}})
    wait_until(lambda: call(url, "task_status", {"task_id": s["task_id"]})["status"] == "running", 10)
    w2 = qc.nodes[2].peer_id
    u = call(qc.nodes[3].mcp_url, "worker_unregister", {"worker_id": w2, "drain": False})
    assert u["requeued"] == 1 and u["active"] is False
    call(qc.nodes[1].mcp_url, "worker_register", {"capabilities": ["echo", "sleep"]})
    r = wait_final(url, [s["task_id"]], 20)[0]
    assert r["status"] == "completed" and r["worker"] == qc.nodes[1].peer_id
    assert r["attempts"] == 1, "a task stopped by its worker's unregister is not charged an attempt"


@pytest.mark.parametrize("response", ["default", "json"])
def test_progress_notifications_with_the_default_response_mode(tmp_path: Path, response: str) -> None:
    """The SDK client, on the 2026-07-28 revision and on 2025-11-25 (the initialize handshake),
    waits on task_result and workflow_result with a progress callback: with the node's default
    settings progress arrives during both waits; with --mcp-response json (an option) none does."""
    args = [] if response == "default" else ["--mcp-response", "json"]
    with ProcessCluster(2, tmp_path, node_args=args, formation_timeout_s=60, token=TOKEN) as c:
        url = c.nodes[0].mcp_url
        for mode in ("auto", "legacy"):
            s = call(url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 2.5}})
            seen: dict[str, list[tuple[float, float | None, str | None]]] = {"task": [], "workflow": []}

            async def go() -> tuple[Any, Any]:
                async with open_client(url, TOKEN, mode=mode) as cl:
                    async def on_task(p: float, total: float | None, message: str | None) -> None:
                        seen["task"].append((p, total, message))

                    async def on_wf(p: float, total: float | None, message: str | None) -> None:
                        seen["workflow"].append((p, total, message))

                    r = await cl.call_tool("task_result", {"task_id": s["task_id"], "wait": True, "timeout_s": 20},
                                           progress_callback=on_task)
                    w = structured(await cl.call_tool("workflow_submit", {"name": "p", "steps": [
                        {"id": "a", "task_type": "sleep", "payload": {"seconds": 1.5}},
                        {"id": "b", "task_type": "sleep", "payload": {"seconds": 1.5}, "depends_on": ["a"]}]}))
                    wr = await cl.call_tool("workflow_result", {"workflow_id": w["workflow_id"], "wait": True,
                                                                "timeout_s": 20}, progress_callback=on_wf)
                    return r, wr

            r, wr = trio.run(go)
            assert structured(r)["status"] == "completed" and structured(wr)["status"] == "completed"
            if response == "json":
                assert seen == {"task": [], "workflow": []}, f"JSON responses carry no notifications ({mode})"
                continue
            assert seen["task"] and all(0 <= p <= 1 and t == 1.0 and m for p, t, m in seen["task"]), (mode, seen)
            for kind in ("task", "workflow"):  # MCP: progress increases with each notification
                values = [p for p, _, _ in seen[kind]]
                assert all(x < y for x, y in zip(values, values[1:])), (mode, kind, values)
            assert seen["workflow"] and all(t == 2.0 and 0 <= p <= 2 for p, t, m in seen["workflow"]), (mode, seen)
            assert any("steps completed" in (m or "") for _, _, m in seen["workflow"])


def test_store_is_sqlite_wal(qc: ProcessCluster) -> None:
    path = qc.directory / "data" / "node-0" / "queue.sqlite3"
    assert path.exists()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_task_cli(qc: ProcessCluster) -> None:
    register(qc, {})
    url = qc.nodes[1].mcp_url
    mcpp = [sys.executable, "-m", "mcpp", "task", "--url", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPP_")} | {"MCPP_TOKEN": TOKEN}
    out = subprocess.run([*mcpp, "submit", "echo", "--payload", '{"cli": true}', "--wait"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [json.loads(x) for x in out.stdout.replace("}\n{", "}\n\x00{").split("\x00")]
    assert docs[1]["result"] == {"cli": True}
    tid = docs[0]["task_id"]
    st = subprocess.run([*mcpp, "status", tid], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(st.stdout)["status"] == "completed"
    ls = subprocess.run([*mcpp, "list", "--type", "echo", "--limit", "1"], env=env, capture_output=True, text=True,
                        timeout=60)
    assert json.loads(ls.stdout)["count"] == 1
    bad = subprocess.run([*mcpp, "status", "nope"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "task_id:" in bad.stderr
    no_token = {k: v for k, v in env.items() if k != "MCPP_TOKEN"}
    bad = subprocess.run([*mcpp, "status", tid], env=no_token, capture_output=True, text=True, timeout=60, cwd="/")
    assert bad.returncode == 2 and "HTTP 401" in bad.stderr and "MCPP_TOKEN" in bad.stderr


def test_node_stops_cleanly_while_dispatching_to_itself(tmp_path: Path) -> None:
    """Leaving open_services while the owner dispatches to its own worker: no task may be spawned
    into a closing nursery (that raised before), and the tasks not yet run stay in the store."""
    from mcpp.config import NodeConfig
    from mcpp.runner import open_services

    cfg = NodeConfig(role="bootstrap", data_dir=str(tmp_path / "d"), listen="/ip4/127.0.0.1/tcp/0",
                     log_level="warning")

    async def go() -> int:
        async with open_services(cfg) as app:
            for i in range(2000):
                await app.queue.submit("echo", i, None, 1.0, [], [], 300, None, {}, 0)
            return app.queue.broker.queued_count()

    left = trio.run(go)
    assert left > 0, "the node stopped with tasks still queued (the case under test)"
    db = sqlite3.connect(tmp_path / "d" / "queue.sqlite3")
    try:
        assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 2000
    finally:
        db.close()


def test_malformed_requests_from_a_peer_are_refused_and_the_node_keeps_working(qc: ProcessCluster) -> None:
    """A raw peer (an in-process node joined to the mesh) sends forwarded task_submits with bad
    fields, a worker advertisement with a nonsense max_concurrent, and a malformed completion that
    matches no lease: each is refused or ignored, and the target keeps dispatching."""
    from mcpp.config import NodeConfig
    from mcpp.errors import RemoteError
    from mcpp.runner import open_services

    register(qc, {})
    target = qc.nodes[1]
    good = {"task_type": "echo", "payload": 1, "task_id": None, "priority": 1.0, "depends_on": [], "tags": [],
            "timeout_s": 300, "retry_policy": None, "metadata": {}, "cache_ttl_s": 0}
    bad_cases = [({"timeout_s": "x"}, "timeout_s"), ({"priority": "high"}, "priority"),
                 ({"task_type": "teleport"}, "task_type"), ({"payload": {"a": [1] * 600_000}}, "payload")]

    async def go(tmp: Path) -> list[str]:
        cfg = NodeConfig(role="worker", bootstrap=(qc.nodes[0].multiaddrs[0],), data_dir=str(tmp),
                         capabilities=("none",), log_level="warning", swarm_key=qc.swarm_key)
        errors = []
        async with open_services(cfg) as app:
            node = app.node
            with trio.fail_after(20):
                while node.table.get(target.peer_id) is None or not node.table.get(target.peer_id).connected:  # type: ignore[union-attr]
                    await trio.sleep(0.05)
            for change, _ in bad_cases:
                try:
                    await node.rpc.call(target.peer_id, "q.submit", {**good, **change}, timeout_s=10)
                    errors.append("accepted")
                except RemoteError as e:
                    errors.append(e.remote_message)
            await node.rpc.call(target.peer_id, "w.update", {"active": True, "task_types": ["echo"],
                                                             "max_concurrent": "lots"}, timeout_s=10)
            answer = await node.rpc.call(target.peer_id, "q.done", {"free": "3", "results": [
                {"task_id": "ffff@" + target.peer_id, "attempt": 1, "outcome": "ok", "logs": 5, "error": {"x": 1}}]})
            assert answer == {"taken": 0, "ignored": 1}
        return errors

    import tempfile

    errors = trio.run(go, Path(tempfile.mkdtemp()))
    for (change, field), msg in zip(bad_cases, errors):
        assert msg.startswith(field), (change, msg)
    s = call(target.mcp_url, "task_submit", {"task_type": "echo", "payload": "still here"})
    assert wait_final(target.mcp_url, [s["task_id"]])[0]["result"] == "still here"


def test_clearing_a_dependency_fails_its_dependents(qc: ProcessCluster) -> None:
    register(qc, {})
    url = qc.nodes[2].mcp_url
    call(url, "queue_pause", {"task_type": "sleep"})
    try:
        dep = call(url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 0}, "tags": ["clear-dep"]})
        child = call(url, "task_submit", {"task_type": "echo", "depends_on": [dep["task_id"]]})
        assert child["status"] == "blocked"
        assert call(url, "queue_clear", {"confirm": True, "tag": "clear-dep"})["removed"] == 1
        r = wait_final(url, [child["task_id"]], 10)[0]
        assert r["status"] == "failed" and "cancelled" in r["error"]
    finally:
        call(url, "queue_resume", {})


@pytest.mark.parametrize("task_id", ["x@12D3KooW" + "0" * 44, "x@ééé"])
def test_a_task_id_whose_owner_cannot_be_a_peer_is_a_clear_error(qc: ProcessCluster, task_id: str) -> None:
    """The owner part of a task id is parsed as a peer id only when it is dialed: a bad one is
    an error that names task_id, not an internal error."""
    msg = error_of(qc.nodes[0].mcp_url, "task_status", {"task_id": task_id})
    assert msg.startswith("Error executing tool task_status: task_id: "), msg
    if task_id.startswith("x@12D3"):  # looks like a peer id, so it is dialed: and refused as one
        assert "not reachable" in msg and "not a valid peer id" in msg, msg
