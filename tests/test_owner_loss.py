"""Nothing lost when a node dies for good (issue 19): finished tasks stay readable, a returning
owner is fenced (nothing runs twice), runs in flight are handed to the adopter, and tasks blocked
on a lost owner's tasks resolve. Real node processes; kill -9, data directories removed."""

from __future__ import annotations

import hashlib
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from conftest import TOKEN, call, wait_until
from mcpp.harness import NodeRecord, ProcessCluster

ARGS = ["--owner-timeout-s", "2", "--lease-s", "1.5"]


def _closest(owner: str, peers: list[str]) -> str:
    """The replica of `owner` among `peers`: the Kademlia metric (replica.py)."""
    def h(p: str) -> int:
        return int.from_bytes(hashlib.sha256(p.encode()).digest(), "big")
    return min(peers, key=lambda p: h(p) ^ h(owner))


def _worker(n: NodeRecord) -> dict[str, Any]:
    """The node's own worker, asked directly (counters that gossip does not carry)."""
    return dict(call(n.mcp_url, "worker_status", {"worker_id": n.peer_id})["workers"][0])


def _lose_for_good(c: ProcessCluster, name: str, tmp_path: Path) -> None:
    c.kill(name, signal.SIGKILL)
    shutil.rmtree(tmp_path / "data" / name)


def test_finished_tasks_of_an_owner_lost_for_good_stay_readable_and_its_dependents_resolve(tmp_path: Path) -> None:
    """Injected: node-1 owns 5 completed tasks, one that failed, and (on node-2) tasks blocked on
    node-1's queued task; node-1 is killed with -9 and its data removed. Checked: every result
    and error is read through node-3 from the adopter; the blocked task of another owner runs
    once the adopted dependency completes; a task that depended on the failed one had failed."""
    with ProcessCluster(4, tmp_path, node_args=ARGS, token=TOKEN) as c:
        a, b, r = c.record("node-1"), c.record("node-2"), c.record("node-3")
        done = [call(a.mcp_url, "task_submit", {"task_type": "echo", "payload": {"n": i}})["task_id"]
                for i in range(5)]
        bad = call(a.mcp_url, "task_submit", {"task_type": "fail", "payload": {"message": "boom"},
                                              "retry_policy": {"max_attempts": 1}})["task_id"]
        for tid in [*done, bad]:
            call(a.mcp_url, "task_result", {"task_id": tid, "wait": True, "timeout_s": 20})
        call(a.mcp_url, "queue_pause", {"reason": "hold the dependency at its owner"})
        dep = call(a.mcp_url, "task_submit", {"task_type": "echo", "payload": "dep"})
        assert dep["replicas"] == 1
        waiting = call(b.mcp_url, "task_submit", {"task_type": "echo", "payload": "after",
                                                  "depends_on": [dep["task_id"]]})
        assert waiting["status"] == "blocked"
        # final records reach the replica in batches (FINAL_FLUSH_S)
        wait_until(lambda: sum(call(n.mcp_url, "queue_stats", {"scope": "local"})["replicas_final"]
                               for n in c.nodes if n.name != "node-1") >= 6, 10)
        _lose_for_good(c, "node-1", tmp_path)
        for i, tid in enumerate(done):
            res = call(r.mcp_url, "task_result", {"task_id": tid, "wait": True, "timeout_s": 30})
            assert res["status"] == "completed" and res["result"] == {"n": i}, res
        res = call(r.mcp_url, "task_result", {"task_id": bad, "wait": True, "timeout_s": 30})
        assert res["status"] in ("failed", "dead_lettered") and "boom" in str(res["error"]), res
        res = call(r.mcp_url, "task_result", {"task_id": waiting["task_id"], "wait": True, "timeout_s": 40})
        assert res["status"] == "completed" and res["result"] == "after", res
        assert call(r.mcp_url, "task_status", {"task_id": dep["task_id"]})["owner"] != a.peer_id


def test_a_dependency_no_node_holds_fails_its_dependents_with_a_clear_error(tmp_path: Path) -> None:
    """Injected: with --replicas 0 node-1's queued task exists on node-1 alone; node-2 holds a task
    blocked on it; node-1 is lost for good. Checked: the blocked task fails, naming the lost
    dependency, instead of waiting forever."""
    with ProcessCluster(3, tmp_path, node_args=[*ARGS, "--replicas", "0"], token=TOKEN) as c:
        a, b = c.record("node-1"), c.record("node-2")
        call(a.mcp_url, "queue_pause", {})
        dep = call(a.mcp_url, "task_submit", {"task_type": "echo", "payload": 1})["task_id"]
        blocked = call(b.mcp_url, "task_submit", {"task_type": "echo", "payload": 2, "depends_on": [dep]})
        assert blocked["status"] == "blocked"
        _lose_for_good(c, "node-1", tmp_path)
        res = call(b.mcp_url, "task_result", {"task_id": blocked["task_id"], "wait": True, "timeout_s": 60})
        assert res["status"] == "failed", res
        assert dep in res["error"] and "lost" in res["error"], res


def test_a_returning_owner_is_fenced_and_no_adopted_task_runs_twice(tmp_path: Path) -> None:
    """Injected: the owner has 3 sleep tasks running on 3 workers (one slot each) and 3 queued
    when it is killed with -9; its replica adopts them; the owner restarts with its data but
    cannot reach the adopter (allowlist), so it cannot learn what was adopted, and its leases
    run out. Checked: the runs in flight report to the adopter (no second run); the owner's
    dispatches are refused by the fenced workers; every task completes exactly once (the
    workers' completion counters sum to 7, one successful attempt each)."""
    with ProcessCluster(5, tmp_path, node_args=ARGS, token=TOKEN) as c:
        ids = {n.name: n.peer_id for n in c.nodes}
        # an owner whose replica is not the bootstrap (the restarted owner must reach node-0)
        owner = next(n for n in ("node-1", "node-2", "node-3", "node-4")
                     if _closest(ids[n], [p for m, p in ids.items() if m != n]) != ids["node-0"])
        adopter = next(m for m, p in ids.items() if p == _closest(ids[owner], [q for k, q in ids.items() if k != owner]))
        a = c.record(owner)
        workers = [n for n in c.nodes if n.name != owner]
        call(a.mcp_url, "worker_register", {"capabilities": ["echo"], "max_concurrent": 1})
        for n in workers:
            call(n.mcp_url, "worker_register", {"capabilities": ["sleep"], "max_concurrent": 1})
        base = {n.name: _worker(n)["completed"] for n in workers}
        tids = [call(a.mcp_url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 4}})["task_id"]
                for _ in range(7)]
        wait_until(lambda: call(a.mcp_url, "queue_stats", {"scope": "local"})["running_count"] >= 3, 10)
        c.kill(owner, signal.SIGKILL)
        ad = c.record(adopter)
        wait_until(lambda: call(ad.mcp_url, "queue_stats", {"scope": "local"})["adopted"] >= 7, 20)
        c.restart(owner, extra_args=["--allow-peers", *[p for m, p in ids.items() if m not in (owner, adopter)]])
        for tid in tids:  # read at the adopter: the fenced owner, cut off from it, still holds stale records
            res = call(ad.mcp_url, "task_result", {"task_id": tid, "wait": True, "timeout_s": 60,
                                                       "include_history": True})
            assert res["status"] == "completed", res
            assert sum(1 for h in res["history"] if h["outcome"] == "ok") == 1, res
        wait_until(lambda: sum(_worker(n)["completed"] - base[n.name]
                               for n in workers) >= 7, 10)
        # the returning owner's leases ran out meanwhile and it tried to dispatch again
        wait_until(lambda: sum(_worker(n)["fenced"] for n in workers) >= 1, 15)
        time.sleep(2)
        ran = sum(_worker(n)["completed"] - base[n.name] for n in workers)
        assert ran == 7, f"{ran} runs of 7 tasks: an adopted task ran twice"
        assert call(a.mcp_url, "task_list", {"scope": "local", "status": "completed"})["total"] == 0


DIAMOND = [
    {"id": "a", "task_type": "echo", "payload": {"x": 7}},
    {"id": "b", "task_type": "sleep", "payload": {"seconds": 3}, "depends_on": ["a"]},
    {"id": "c", "task_type": "echo", "payload": {"c": {"$ref": "steps.a.result.x"}}, "depends_on": ["a"]},
    {"id": "d", "task_type": "echo", "depends_on": ["b", "c"],
     "payload": {"b": {"$ref": "steps.b.result.slept_s"}, "c": {"$ref": "steps.c.result"}}},
]


def test_a_workflow_whose_coordinator_is_lost_for_good_is_adopted_and_completes(tmp_path: Path) -> None:
    """Injected: node-1 coordinates a diamond (it serves no step itself) and a finished chain;
    when step b runs, node-1 is killed with -9 and its data removed. Checked: the workflow was
    acknowledged as held by a replica; the adopter coordinates the rest: d runs with the $ref
    inputs of b and c (c finished before the loss, b while it was being adopted); the workflow's
    result, its status and the finished chain are read through a third node; b ran once."""
    with ProcessCluster(4, tmp_path, node_args=ARGS, token=TOKEN) as c:
        a, r = c.record("node-1"), c.record("node-3")
        call(a.mcp_url, "worker_register", {"capabilities": ["fail"], "max_concurrent": 1})
        chain = call(a.mcp_url, "workflow_submit", {"name": "done-before", "steps": DIAMOND[:1]})
        assert chain["replicas"] == 1
        call(a.mcp_url, "workflow_result", {"workflow_id": chain["workflow_id"], "wait": True, "timeout_s": 20})
        wf = call(a.mcp_url, "workflow_submit", {"name": "diamond", "steps": DIAMOND})
        assert wf["replicas"] == 1, wf
        wid = wf["workflow_id"]
        wait_until(lambda: call(a.mcp_url, "workflow_status", {"workflow_id": wid})["current_steps"] == ["b"], 10)
        time.sleep(1.0)  # the record that says c completed reaches the replica (batched)
        _lose_for_good(c, "node-1", tmp_path)
        res = call(r.mcp_url, "workflow_result", {"workflow_id": wid, "wait": True, "timeout_s": 60,
                                                  "include_steps": True})
        assert res["status"] == "completed", res
        assert res["results"]["d"] == {"b": 3, "c": {"c": 7}}, res["results"]
        st = call(r.mcp_url, "workflow_status", {"workflow_id": wid, "include_steps": True})
        assert st["status"] == "completed" and st["coordinator"] != a.peer_id
        b = next(s for s in st["steps"] if s["id"] == "b")
        hist = call(r.mcp_url, "task_result", {"task_id": b["task_id"], "include_history": True})["history"]
        assert sum(1 for h in hist if h["outcome"] == "ok") == 1, hist
        done = call(r.mcp_url, "workflow_result", {"workflow_id": chain["workflow_id"]})
        assert done["status"] == "completed" and done["results"]["a"] == {"x": 7}, done


def test_an_acknowledgement_names_a_holder_even_when_the_replica_does_not_answer(tmp_path: Path) -> None:
    """Injected: the owner's replica is stopped (SIGSTOP). Checked: task_submit still answers
    `replicas: 1` (within the 1 s put timeout and the retry), because the next closest peer took
    the copy; the stopped replica holds nothing new."""
    with ProcessCluster(4, tmp_path, node_args=ARGS, token=TOKEN) as c:
        ids = {n.name: n.peer_id for n in c.nodes}
        replica = next(m for m, p in ids.items() if p == _closest(ids["node-1"], [q for k, q in ids.items()
                                                                                if k != "node-1"]))
        a = c.record("node-1")
        call(a.mcp_url, "queue_pause", {})
        c.kill(replica, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            ack = call(a.mcp_url, "task_submit", {"task_type": "echo", "payload": 1})
            took = time.monotonic() - t0
            assert ack["replicas"] == 1, ack
            assert took < 3.0, took
            held = {n.name: call(n.mcp_url, "queue_stats", {"scope": "local"})["replicas_held"]
                    for n in c.nodes if n.name not in ("node-1", replica)}
            assert sum(held.values()) >= 1, held
        finally:
            c.kill(replica, signal.SIGCONT)


def test_a_node_back_with_its_identity_but_an_empty_disk_takes_its_records_back(tmp_path: Path) -> None:
    """Injected: node-1 owns 5 queued tasks (dispatch paused) and a finished one; it is killed
    with -9, its data directory removed, and restarted at once with the same identity (a pod
    whose volume was lost). Nobody adopts (the owner is alive again). Checked: it takes its
    records back from the peers that hold copies: the queued tasks complete, the finished one
    is readable, all through another node."""
    with ProcessCluster(3, tmp_path, node_args=ARGS, token=TOKEN) as c:
        a, r = c.record("node-1"), c.record("node-2")
        done = call(a.mcp_url, "task_submit", {"task_type": "echo", "payload": "early"})["task_id"]
        call(a.mcp_url, "task_result", {"task_id": done, "wait": True, "timeout_s": 20})
        call(a.mcp_url, "queue_pause", {})
        ids = [call(a.mcp_url, "task_submit", {"task_type": "echo", "payload": i})["task_id"] for i in range(5)]
        wait_until(lambda: sum(call(n.mcp_url, "queue_stats", {"scope": "local"})["replicas_final"]
                               for n in c.nodes if n.name != "node-1") >= 1, 10)
        c.kill("node-1", signal.SIGKILL)
        shutil.rmtree(tmp_path / "data" / "node-1")
        c.restart("node-1")
        # it takes them back as it meets its peers (until then, reads of its tasks say "no task")
        wait_until(lambda: call(a.mcp_url, "task_list", {"scope": "local"})["total"] == 6, 15)
        for i, tid in enumerate(ids):
            res = call(r.mcp_url, "task_result", {"task_id": tid, "wait": True, "timeout_s": 30})
            assert res["status"] == "completed" and res["result"] == i, res
        assert call(r.mcp_url, "task_result", {"task_id": done})["result"] == "early"
        assert call(a.mcp_url, "queue_stats", {"scope": "local"})["adopted"] == 0
