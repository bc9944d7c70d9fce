"""Owner loss: every accepted task is copied to a replica peer, which takes the tasks over when
their owner dies for good (kill -9, no restart)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TOKEN, call, wait_until
from mcpp.harness import ProcessCluster


@pytest.fixture()
def rc(tmp_path: Path) -> Iterator[ProcessCluster]:
    with ProcessCluster(3, tmp_path, node_args=["--owner-timeout-s", "3", "--lease-s", "1.5", "--replication", "sync"],
                        token=TOKEN) as c:
        yield c


def test_owner_killed_for_good_its_queued_tasks_complete_elsewhere(rc: ProcessCluster) -> None:
    """Injected: node-1 owns 20 queued tasks (its dispatch paused), then kill -9, no restart.
    Checked (replication=sync): each submit said a replica held it, and one did
    as soon as the submits returned; after owner_timeout_s (3 s) it adopts
    them; every one completes exactly once (one successful attempt) on a surviving worker, and is
    read through node-2; then node-1 comes back and drops what was adopted (one record survives)."""
    a, c = rc.record("node-1"), rc.record("node-2")
    call(a.mcp_url, "queue_pause", {"reason": "hold the tasks at their owner"})
    acks = [call(a.mcp_url, "task_submit", {"task_type": "echo", "payload": {"n": i}}) for i in range(20)]
    assert [s["replicas"] for s in acks] == [1] * 20, "acknowledged means held by the owner and one replica"
    ids = [s["task_id"] for s in acks]
    assert all(t.endswith("@" + a.peer_id) for t in ids)
    local = call(a.mcp_url, "task_list", {"scope": "local", "status": "queued"})
    assert local["total"] == 20
    held = sum(call(n.mcp_url, "queue_stats", {"scope": "local"})["replicas_held"] for n in rc.nodes if n.name != a.name)
    assert held >= 20, "every accepted task is on a replica before task_submit returns"
    rc.kill("node-1", signal.SIGKILL)
    for i, tid in enumerate(ids):
        r = call(c.mcp_url, "task_result", {"task_id": tid, "wait": True, "timeout_s": 30, "include_history": True})
        assert r["status"] == "completed" and r["result"] == {"n": i}, r
        assert r["worker"] != a.peer_id
        assert sum(1 for h in r["history"] if h["outcome"] == "ok") == 1
    # read from the gossiped summaries: the adopter's arrives within LOAD_GOSSIP_S and a crossing
    wait_until(lambda: call(c.mcp_url, "queue_stats", {"scope": "mesh"})["adopted"] == 20, 10)
    # the owner comes back: it learns what was adopted and drops it; the adopter's record stays
    rc.restart("node-1")
    rc.wait_formed(30)
    wait_until(lambda: call(a.mcp_url, "task_list", {"scope": "local"})["total"] == 0, 20)
    for tid in ids[:3]:
        st = call(a.mcp_url, "task_status", {"task_id": tid})
        assert st["status"] == "completed" and st["owner"] != a.peer_id


def test_async_replication_copies_within_moments(tmp_path: Path) -> None:
    """--replication async: task_submit does not wait (and does not say how many replicas hold
    the task), and the copies reach a replica within a second."""
    with ProcessCluster(3, tmp_path, node_args=["--replication", "async"], token=TOKEN) as c:
        a, b = c.record("node-1"), c.record("node-2")
        call(a.mcp_url, "queue_pause", {})
        for i in range(30):
            assert "replicas" not in call(a.mcp_url, "task_submit", {"task_type": "echo", "payload": i})
        wait_until(lambda: call(b.mcp_url, "queue_stats", {"scope": "mesh"})["replicas_held"] >= 30, 5)
        call(a.mcp_url, "queue_resume", {})
        # finished tasks are forgotten by the replica (final states follow in batches)
        wait_until(lambda: call(b.mcp_url, "queue_stats", {"scope": "mesh"})["replicas_held"] == 0, 15)


def test_an_owner_alone_or_with_replicas_0_says_no_replica_holds_the_task(tmp_path: Path) -> None:
    """With --replication sync the acknowledgement is honest about where the task is: a node
    alone in its mesh, and one configured with --replicas 0, answer replicas: 0 (the owner's
    disk only)."""
    with ProcessCluster(1, tmp_path / "alone", node_args=["--replication", "sync"], token=TOKEN) as c:
        assert call(c.nodes[0].mcp_url, "task_submit", {"task_type": "echo", "payload": 1})["replicas"] == 0
    with ProcessCluster(2, tmp_path / "zero", node_args=["--replicas", "0", "--replication", "sync"],
                        token=TOKEN) as c:
        assert call(c.nodes[1].mcp_url, "task_submit", {"task_type": "echo", "payload": 1})["replicas"] == 0


def test_a_replica_cut_off_from_a_live_owner_does_not_adopt(tmp_path: Path) -> None:
    """Injected: the node holding node-1's replicas is restarted with an allowlist that leaves
    node-1 out: the link between those two alone is broken, node-1 is alive and connected to the
    others. Checked: after owner_timeout_s the holder probes node-1 through the other nodes and
    declines to adopt; node-1 keeps its queued tasks (nothing runs twice)."""
    args = ["--owner-timeout-s", "2", "--replication", "sync"]
    with ProcessCluster(4, tmp_path, node_args=args, token=TOKEN) as c:
        owner = c.record("node-1")
        call(owner.mcp_url, "queue_pause", {})
        for i in range(5):
            call(owner.mcp_url, "task_submit", {"task_type": "echo", "payload": i})
        held = {n.name: call(n.mcp_url, "queue_stats", {"scope": "local"})["replicas_held"] for n in c.nodes}
        holder = next(name for name, n in held.items() if n >= 5 and name != "node-1")
        c.kill(holder, signal.SIGTERM)
        others = [n.peer_id for n in c.nodes if n.name != "node-1"]
        h = c.restart(holder, extra_args=["--allow-peers", *others])
        assert call(h.mcp_url, "queue_stats", {"scope": "local"})["replicas_held"] >= 5  # on its disk
        wait_until(lambda: call(h.mcp_url, "queue_stats", {"scope": "local"})["adoptions_declined"] >= 1, 15)
        local = call(h.mcp_url, "queue_stats", {"scope": "local"})
        assert local["adopted"] == 0, local
        assert call(owner.mcp_url, "task_list", {"scope": "local", "status": "queued"})["total"] == 5
        assert owner.peer_id not in {p["peer_id"] for p in call(h.mcp_url, "peer_list", {"status": "all"})["peers"]}


def test_copies_of_tasks_that_finished_while_the_replica_was_away_are_dropped(tmp_path: Path) -> None:
    """Injected: the replica holder is stopped (SIGSTOP) until the owner drops it, the owner's 10
    tasks finish meanwhile (their final batch cannot reach it), then SIGCONT. Checked: when the
    two meet again the replica asks the owner and drops the 10 stale copies (else it would hold
    them, and adopt finished tasks if the owner died later)."""
    with ProcessCluster(3, tmp_path, node_args=["--replication", "sync"], token=TOKEN) as c:
        owner = c.record("node-1")
        call(owner.mcp_url, "queue_pause", {})
        ids = [call(owner.mcp_url, "task_submit", {"task_type": "echo", "payload": i})["task_id"] for i in range(10)]
        held = {n.name: call(n.mcp_url, "queue_stats", {"scope": "local"})["replicas_held"] for n in c.nodes}
        holder = c.record(next(name for name, n in held.items() if n >= 10 and name != "node-1"))
        c.kill(holder.name, signal.SIGSTOP)
        try:
            wait_until(lambda: holder.peer_id not in _peers(owner.mcp_url), 20)
            call(owner.mcp_url, "queue_resume", {})
            for tid in ids:
                assert call(owner.mcp_url, "task_result", {"task_id": tid, "wait": True, "timeout_s": 20})["status"] == "completed"
        finally:
            c.kill(holder.name, signal.SIGCONT)
        wait_until(lambda: holder.peer_id in _peers(owner.mcp_url), 30)
        took = wait_until(lambda: call(holder.mcp_url, "queue_stats", {"scope": "local"})["replicas_held"] == 0, 25)
        print(f"stale copies dropped {took:.1f} s after the owner saw the replica again")


def _peers(url: str) -> set[str]:
    return {p["peer_id"] for p in call(url, "peer_list", {})["peers"]}
