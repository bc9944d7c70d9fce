"""Membership by gossip over a bounded overlay (issue 16): the rules of the view, then real node
processes with a small degree, so that members are known beyond the neighbours."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpp.harness import ProcessCluster, node_status
from mcpp.node.membership import Member, MemberView, parse_member

# ---- the rules (pure: no I/O in MemberView) -------------------------------------------


def _view(me: str = "me") -> MemberView:
    return MemberView(Member(me, 100, "alive", ("/ip4/127.0.0.1/tcp/1",)))


def test_newer_incarnation_wins_and_at_the_same_one_dead_beats_suspect_beats_alive() -> None:
    v = _view()
    assert v.apply(Member("a", 5), "x")
    assert not v.apply(Member("a", 4), "x"), "an older incarnation is stale"
    assert not v.apply(Member("a", 5), "x"), "the same news twice changes nothing"
    assert v.apply(Member("a", 5, "suspect"), "x")
    assert not v.apply(Member("a", 5, "alive"), "x"), "alive does not refute at the same incarnation"
    assert v.apply(Member("a", 5, "dead"), "x")
    assert v.members["a"].state == "dead" and "a" not in v.alive_ids()
    assert v.apply(Member("a", 6, "alive"), "x"), "a newer incarnation (a refutation or a restart) revives"
    assert v.alive_ids() == ["a"]


def test_a_node_refutes_its_own_suspicion_with_a_newer_incarnation() -> None:
    v = _view()
    assert v.apply(Member("me", 100, "suspect"), "x")
    assert v.me.state == "alive" and v.me.incarnation == 101 and v.refutes == 1
    out = v.take_outbox(["x", "y"])
    assert {"id": "me", "inc": 101, "state": "alive"}.items() <= out["y"][0].items()


def test_a_node_that_left_is_not_revived_by_its_own_refresh() -> None:
    """Between leave() and the end of the process the gossip loop still refreshes this node's own
    record: that refresh must not announce it alive again (it did: a newer 'alive' beat 'left')."""
    v = _view()
    v.take_outbox(["x"])
    v.leave()
    assert v.take_outbox(["x"])["x"][0]["state"] == "left"
    assert not v.update_self(mcp_url="http://127.0.0.1:1/mcp")
    assert v.me.state == "left" and v.take_outbox(["x"]) == {}


def test_a_new_load_summary_alone_reaches_the_neighbours_but_is_not_forwarded() -> None:
    v = _view()
    assert v.apply(Member("a", 1, load={"q": {}}), "x")
    v.take_outbox(["x", "y"])
    assert v.apply(Member("a", 2, load={"q": {"queued_count": 3}}), "x"), "the newer summary is kept"
    assert v.members["a"].load == {"q": {"queued_count": 3}} and v.take_outbox(["x", "y"]) == {}
    assert v.apply(Member("a", 3, "suspect", load={"q": {"queued_count": 3}}), "x")
    assert sorted(v.take_outbox(["x", "y"])) == ["y"], "any other change is forwarded"
    assert v.update_self(load={"q": {"running_count": 1}})
    assert sorted(v.take_outbox(["x", "y"])) == ["x", "y"], "a node pushes its own summary to its neighbours"


def test_suspicion_runs_out_into_death_unless_refuted() -> None:
    v = _view()
    v.apply(Member("a", 1), "x")
    assert v.suspect("a")
    until = v.members["a"].suspect_until
    assert until is not None
    assert v.tick(until - 0.01) == []
    assert v.tick(until + 0.01) == ["a"] and v.members["a"].state == "dead"


def test_news_is_forwarded_to_every_neighbour_but_its_source_and_strangers_deaths_are_ignored() -> None:
    v = _view()
    v.take_outbox(["x", "y", "z"])  # this node's own announcement
    v.apply(Member("a", 1), "x")
    out = v.take_outbox(["x", "y", "z"])
    assert sorted(out) == ["y", "z"]
    assert not v.apply(Member("b", 1, "dead"), "x")
    assert v.take_outbox(["x", "y"]) == {}


def test_a_load_summary_changes_only_with_the_load_and_bad_ones_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle node's summary stays the same object (so gossip sends nothing for it); a change
    shows after LOAD_GOSSIP_S; it rides in the member record; a malformed one reads as absent."""
    from mcpp.queue import summary

    stats = {k: 0 for k in summary.STAT_KEYS} | {"by_type": {}, "completed_per_s": 0.0, "timed": 0, "paused": {},
                                                   "mean_wait_s": None, "mean_run_s": None}
    worker = {"running": 0, "free": 4, "completed": 0, "failed": 0, "rejected": 0, "active": True}
    clock = [1000.0]
    monkeypatch.setattr(summary.time, "monotonic", lambda: clock[0])
    load = summary.LoadSummary(lambda: dict(stats), lambda: dict(worker))
    first = load()
    # an idle node's summary is small (it rides in every member record) and reads as zeros
    assert first is not None and len(json.dumps(first)) < 80, first
    assert summary.stats_of(first) == {**dict.fromkeys(summary.STAT_KEYS, 0), "by_type": {}, "completed_per_s": 0.0,
                                       "mean_wait_s": None, "mean_run_s": None, "timed": 0, "paused": {},
                                       "as_of": first["at"]}
    clock[0] += 10 * summary.LOAD_GOSSIP_S
    assert load() is first, "an unchanged load is not a new summary"
    stats["completed_count"], worker["completed"] = 5, 5
    clock[0] += summary.LOAD_GOSSIP_S / 2
    assert load() is first, "re-read at most every LOAD_GOSSIP_S"
    clock[0] += summary.LOAD_GOSSIP_S
    second = load()
    assert second is not first and second is not None and second["q"]["completed_count"] == 5
    m = parse_member(Member("p", 1, "alive", load=second).wire())
    assert m is not None and summary.stats_of(m.load)["completed_count"] == 5  # type: ignore[index]
    w = summary.worker_of("p", {"worker_id": "w", "task_types": ["echo"], "max_concurrent": 4}, m.load)
    assert w is not None and w["completed"] == 5 and w["capabilities"] == ["echo"]
    for bad in (None, "x", {"q": {"completed_count": -1}, "by_type": {}}, {"q": {}, "by_type": {"echo": {"completed": "9"}}}):
        assert summary.stats_of(bad) is None


def test_malformed_updates_from_the_network_are_dropped() -> None:
    for bad in (None, [], {"id": 1}, {"id": "a", "inc": -1, "state": "alive"},
                {"id": "a", "inc": 1, "state": "zombie"}, {"id": "a", "inc": True, "state": "alive"}):
        assert parse_member(bad) is None
    m = parse_member({"id": "a", "inc": 1, "state": "alive", "addrs": ["x", 3], "caps": "nope"})
    assert m is not None and m.addrs == ("x",) and m.capabilities == ()


# ---- real nodes: degree 2, so that most members are not neighbours ---------------------

DEGREE = ["--degree-low", "2", "--degree", "3", "--degree-high", "4"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    with ProcessCluster(size=7, directory=tmp_path_factory.mktemp("members"), node_args=DEGREE,
                        formation_timeout_s=90) as c:
        yield c


def _statuses(c: ProcessCluster, names: list[str]) -> dict[str, dict]:  # type: ignore[type-arg]
    out = {}
    for r in c.nodes:
        if r.name in names:
            st = node_status(r.base_url, 2.0, c.headers())
            if st is not None:
                out[r.name] = st
    return out


def _wait(cond, timeout_s: float) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(0.1)
    return time.monotonic() - t0


def test_every_node_knows_every_member_with_at_most_degree_high_connections(small: ProcessCluster) -> None:
    names = [r.name for r in small.nodes]
    ids = {r.peer_id for r in small.nodes}

    def settled() -> bool:
        sts = _statuses(small, names)
        return len(sts) == len(names) and all(
            set(st["members"]) == ids - {st["peer_id"]} and len(st["connected"]) <= 4 for st in sts.values())

    _wait(settled, 60)
    sts = _statuses(small, names)
    # members are known beyond the neighbours: nobody holds a connection to all 6 others
    assert all(len(st["connected"]) < len(names) - 1 for st in sts.values()), {n: len(s["connected"]) for n, s in sts.items()}
    assert all(st["degree"] == 3 for st in sts.values())


def test_a_killed_member_leaves_every_view_and_a_restarted_one_comes_back(small: ProcessCluster) -> None:
    victim = small.nodes[4]
    others = [r.name for r in small.nodes if r.name != victim.name]
    small.kill(victim.name, signal.SIGKILL)
    took = _wait(lambda: all(victim.peer_id not in st["members"] for st in _statuses(small, others).values()), 15)
    print(f"kill -9: gone from {len(others)} views in {took:.2f} s")
    small.restart(victim.name)
    _wait(lambda: all(victim.peer_id in st["members"] for st in _statuses(small, others).values()), 30)


def test_a_clean_stop_is_known_at_once(small: ProcessCluster) -> None:
    victim = small.nodes[5]
    others = [r.name for r in small.nodes if r.name != victim.name]
    _wait(lambda: all(victim.peer_id in st["members"] for st in _statuses(small, others).values()), 30)
    small.kill(victim.name, signal.SIGTERM)
    took = _wait(lambda: all(victim.peer_id not in st["members"] for st in _statuses(small, others).values()), 5)
    print(f"SIGTERM: gone from {len(others)} views in {took:.2f} s")
    small.restart(victim.name)
    _wait(lambda: all(victim.peer_id in st["members"] for st in _statuses(small, others).values()), 30)


def test_a_paused_member_is_declared_dead_then_refutes_and_is_alive_again(small: ProcessCluster) -> None:
    """SIGSTOP past the ping timeout: its neighbours drop it, nobody reaches it, it is suspected and
    then dead; after SIGCONT it hears of its death, refutes with a newer incarnation, and every
    member lists it again (what a healed partition goes through)."""
    victim = small.nodes[6]
    others = [r.name for r in small.nodes if r.name != victim.name]
    _wait(lambda: all(victim.peer_id in st["members"] for st in _statuses(small, others).values()), 30)
    small.kill(victim.name, signal.SIGSTOP)
    try:
        _wait(lambda: all(victim.peer_id not in st["members"] for st in _statuses(small, others).values()), 30)
    finally:
        small.kill(victim.name, signal.SIGCONT)
    _wait(lambda: all(victim.peer_id in st["members"] for st in _statuses(small, others).values()), 40)
    log = Path(small.directory / "logs" / f"{victim.name}.log").read_text()
    assert "refuting" in log


def test_tasks_run_on_members_that_are_not_neighbours(small: ProcessCluster) -> None:
    """A task can run on any member: 60 one-second tasks submitted at once at node-0 (at most
    degree_high = 4 links, 7 workers of 4 slots) run on members it had no link to."""
    import trio
    from conftest import call

    from mcpp.mcp.client import open_client, structured

    url = small.nodes[0].mcp_url
    ids = [r.peer_id for r in small.nodes]

    def members() -> set[str]:
        return {p["peer_id"] for p in call(url, "peer_list", {"status": "members"}, small.token)["peers"]}

    _wait(lambda: members() == set(ids[1:]), 30)
    def links() -> set[str]:
        return set(node_status(small.nodes[0].base_url, 2.0, small.headers())["connected"])  # type: ignore[index]

    # (a connection opened for one call by an earlier test's restart or probe closes once idle)
    _wait(lambda: len(links()) <= 4, 30)
    before = links()

    async def run() -> list[dict]:  # type: ignore[type-arg]
        async with open_client(url, small.token) as s:
            subs = [structured(await s.call_tool("task_submit", {"task_type": "sleep", "payload": {"seconds": 1}}))
                    for _ in range(60)]
            return [structured(await s.call_tool("task_result", {"task_id": x["task_id"], "wait": True,
                                                                  "timeout_s": 60})) for x in subs]

    results = trio.run(run)
    assert all(r["status"] == "completed" for r in results)
    workers = {r["worker"] for r in results}
    assert workers - before - {ids[0]}, (workers, before)
    assert len(workers) >= 5, workers


def test_the_simulation_runs_the_membership_rules_at_scale() -> None:
    """The same MemberView on a simulated transport: a join and a failure reach every one of 500
    members, also with 5 % of messages lost."""
    from mcpp.evidence.membership_sim import simulate

    for event in ("join", "failure"):
        r = simulate(500, event, loss=0.05)
        assert r.reached >= 0.998 and r.t999_s is not None and r.t999_s < 2.0, r
        assert 0 < r.messages_per_node < 50, r
    assert simulate(500, "failure").dead_at_999_s is not None
