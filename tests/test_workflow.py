"""Workflows on a real 4-node mesh: DAGs of queue tasks, coordinated by the accepting node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TOKEN, call, error_of, wait_until
from mcpp.harness import ProcessCluster
from mcpp.mcp.client import ToolCallError
from test_queue import many
from test_queue import register as register_all

BUILTIN = ["echo", "sleep", "sha256", "fail"]


def register(c: ProcessCluster, caps: dict[int, list[str]]) -> None:
    register_all(c, caps, all_types=BUILTIN)

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def wc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    with ProcessCluster(4, tmp_path_factory.mktemp("wf4"), node_args=["--lease-s", "1.5"],
                        formation_timeout_s=60, token=TOKEN) as c:
        yield c


def wf_result(url: str, wf_id: str, timeout_s: float = 30) -> dict[str, Any]:
    return call(url, "workflow_result", {"workflow_id": wf_id, "wait": True, "timeout_s": timeout_s})


DIAMOND = [
    {"id": "a", "task_type": "echo", "payload": {"x": 7}},
    {"id": "b", "task_type": "sleep", "payload": {"seconds": 0.3}, "depends_on": ["a"]},
    {"id": "c", "task_type": "sleep", "payload": {"seconds": 0.8}, "depends_on": ["a"]},
    {"id": "d", "task_type": "echo", "depends_on": ["b", "c"],
     "payload": {"b": {"$ref": "steps.b.result.slept_s"}, "c": {"$ref": "steps.c.result"}}},
]


def test_diamond_runs_branches_in_parallel_on_different_nodes(wc: ProcessCluster) -> None:
    caps = {0: ["echo"], 1: ["echo", "sleep"], 2: ["echo", "sleep"], 3: ["echo", "sleep"]}
    for i, n in enumerate(wc.nodes):
        call(n.mcp_url, "worker_register", {"capabilities": caps[i], "max_concurrent": 1})
    time.sleep(0.5)
    url = wc.nodes[0].mcp_url
    sub = call(url, "workflow_submit", {"name": "diamond", "steps": DIAMOND})
    assert sub["levels"] == [["a"], ["b", "c"], ["d"]] and sub["coordinator"] == wc.nodes[0].peer_id
    r = wf_result(wc.nodes[2].mcp_url, sub["workflow_id"])
    assert r["status"] == "completed"
    assert r["results"]["d"] == {"b": 0.3, "c": {"slept_s": 0.8}}
    steps = {s["id"]: s for s in r["steps"]}
    assert steps["b"]["worker"] != steps["c"]["worker"], "b and c ran on different nodes"
    assert steps["b"]["started_at"] < steps["c"]["finished_at"] and steps["c"]["started_at"] < steps["b"]["finished_at"]
    assert steps["d"]["started_at"] >= max(steps["b"]["finished_at"], steps["c"]["finished_at"])
    # the critical path, weighted by measured durations: a -> c (0.8 s) -> d
    g = call(wc.nodes[3].mcp_url, "workflow_dependencies", {"workflow_id": sub["workflow_id"], "format": "mermaid"})
    assert g["critical_path"] == ["a", "c", "d"] and g["weighted_by"] == "duration_ms"
    assert 800 <= g["critical_path_length"] < 2000
    assert g["graph"].startswith("graph TD")
    for edge in ("s_a --> s_b", "s_a --> s_c", "s_b --> s_d", "s_c --> s_d"):
        assert edge in g["graph"]
    dot = call(url, "workflow_dependencies", {"workflow_id": sub["workflow_id"], "format": "dot"})["graph"]
    for edge in ('"a" -> "b";', '"a" -> "c";', '"b" -> "d";', '"c" -> "d";'):
        assert edge in dot
    js = call(url, "workflow_dependencies", {"steps": DIAMOND, "format": "json"})
    assert js["weighted_by"] == "steps" and js["critical_path_length"] == 3 and js["workflow_id"] is None
    assert {(e["from"], e["to"]) for e in js["graph"]["edges"]} == {("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")}
    st = call(wc.nodes[1].mcp_url, "workflow_status", {"workflow_id": sub["workflow_id"], "include_metrics": True})
    assert st["progress"] == {"completed": 4, "running": 0, "pending": 0, "failed": 0, "skipped": 0, "total": 4,
                              "percent": 100.0}
    assert all(s["run_s"] is not None for s in st["steps"])


def test_refused_before_anything_runs(wc: ProcessCluster) -> None:
    url = wc.nodes[1].mcp_url
    before_wf = call(url, "workflow_list", {})["total"]
    before_tasks = call(url, "task_list", {"limit": 1})["total"]
    cases: list[tuple[list[dict[str, Any]] | None, dict[str, Any], str]] = [
        ([{"id": "a", "task_type": "echo", "depends_on": ["b"]}, {"id": "b", "task_type": "echo", "depends_on": ["c"]},
          {"id": "c", "task_type": "echo", "depends_on": ["a"]}], {}, "cycle: a -> b -> c -> a"),
        ([{"id": "a", "task_type": "echo", "depends_on": ["ghost"]}], {}, "unknown step 'ghost'"),
        ([{"id": "a", "task_type": "echo"}, {"id": "a", "task_type": "echo"}], {}, "duplicate step id 'a'"),
        ([{"id": "a", "task_type": "echo"}, {"id": "b", "task_type": "echo", "payload": {"$ref": "steps.a.result"}}],
         {}, "not a declared dependency"),
        ([{"id": "a", "task_type": "teleport"}], {}, "steps[0].task_type: unknown task type 'teleport'"),
        (None, {"template": "name: t\nparams: {n: 1}\nsteps: [{id: a, task_type: echo, payload: '${params.n}'}]",
                "params": {"m": 2}}, "params: unknown template parameter(s): m"),
        (None, {"template": "name: t\nparams: {}\nsteps: [{id: a, task_type: echo, payload: '${params.zz}'}]"},
         "undeclared parameter(s): zz"),
        (None, {"template": "diamond", "steps": [{"id": "a", "task_type": "echo"}]}, "exactly one of steps or template"),
    ]
    for steps, extra, expect in cases:
        args = {"name": "bad", **extra}
        if steps is not None:
            args["steps"] = steps
        msg = error_of(url, "workflow_submit", args)
        assert expect in msg, (expect, msg)
    assert "steps" in error_of(url, "workflow_dependencies", {"steps": [{"id": "x", "task_type": "echo",
                                                                         "depends_on": ["x"]}]})
    assert "limit:" in error_of(url, "workflow_list", {"limit": 0})
    assert "workflow_id:" in error_of(url, "workflow_status", {"workflow_id": "nope"})
    assert "format:" in error_of(url, "workflow_dependencies", {"steps": DIAMOND, "format": "png"})
    assert call(url, "workflow_list", {})["total"] == before_wf
    assert call(url, "task_list", {"limit": 1})["total"] == before_tasks, "nothing was submitted"


FAILING = [
    {"id": "f", "task_type": "fail", "retry_policy": {"max_attempts": 1}},
    {"id": "s", "task_type": "sleep", "payload": {"seconds": 1.5}},
    {"id": "x", "task_type": "echo", "depends_on": ["f"]},
    {"id": "y", "task_type": "echo", "depends_on": ["s"], "payload": {"$ref": "steps.s.result"}},
]


def test_fail_fast_and_continue(wc: ProcessCluster) -> None:
    register(wc, {})
    url = wc.nodes[2].mcp_url
    ff = call(url, "workflow_submit", {"name": "ff", "steps": FAILING})
    r = wf_result(url, ff["workflow_id"])
    assert r["status"] == "failed"
    st = {s["id"]: s["status"] for s in r["steps"]}
    assert st == {"f": "failed", "s": "cancelled", "x": "cancelled", "y": "cancelled"}, st
    assert "always fails" in r["errors"]["f"]
    co = call(url, "workflow_submit", {"name": "co", "steps": FAILING, "failure_policy": "continue"})
    r = wf_result(wc.nodes[0].mcp_url, co["workflow_id"])
    assert r["status"] == "failed"
    st = {s["id"]: s["status"] for s in r["steps"]}
    assert st == {"f": "failed", "s": "completed", "x": "skipped", "y": "completed"}, st
    assert r["results"]["y"] == {"slept_s": 1.5}


def test_cancel_mid_run(wc: ProcessCluster) -> None:
    register(wc, {})
    chain = [{"id": "one", "task_type": "sleep", "payload": {"seconds": 10}},
             {"id": "two", "task_type": "echo", "depends_on": ["one"]}]
    sub = call(wc.nodes[3].mcp_url, "workflow_submit", {"name": "long", "steps": chain})
    wait_until(lambda: call(wc.nodes[0].mcp_url, "workflow_status", {"workflow_id": sub["workflow_id"]})
               ["current_steps"] == ["one"], 10)
    c = call(wc.nodes[0].mcp_url, "workflow_cancel", {"workflow_id": sub["workflow_id"], "reason": "enough"})
    assert c["cancelled_steps"] == ["one", "two"]
    r = wf_result(wc.nodes[1].mcp_url, sub["workflow_id"], 10)
    assert r["status"] == "cancelled"
    assert {s["id"]: s["status"] for s in r["steps"]} == {"one": "cancelled", "two": "cancelled"}
    lst = call(wc.nodes[1].mcp_url, "workflow_list", {"status": "cancelled"})
    assert sub["workflow_id"] in {w["workflow_id"] for w in lst["workflows"]}


def test_coordinator_restart_mid_workflow(wc: ProcessCluster) -> None:
    register(wc, {1: ["echo"]})
    coord = wc.nodes[1]
    chain = [{"id": "a", "task_type": "sleep", "payload": {"seconds": 1.5}},
             {"id": "b", "task_type": "sleep", "payload": {"seconds": 0.2}, "depends_on": ["a"]},
             {"id": "c", "task_type": "echo", "depends_on": ["b"], "payload": {"$ref": "steps.b.result.slept_s"}}]
    sub = call(coord.mcp_url, "workflow_submit", {"name": "survivor", "steps": chain, "workflow_id": "wf-restart-1"})
    wait_until(lambda: call(coord.mcp_url, "workflow_status", {"workflow_id": "wf-restart-1"})["current_steps"] == ["a"], 10)
    wc.kill(coord.name)
    wc.restart(coord.name)
    wc.wait_formed(30)
    r = wf_result(wc.nodes[0].mcp_url, sub["workflow_id"], 30)
    assert r["status"] == "completed" and r["results"]["c"] == 0.2
    assert [s["attempts"] for s in r["steps"]] == [1, 1, 1]


def test_50_concurrent_workflows_on_different_nodes(wc: ProcessCluster) -> None:
    register(wc, {})
    subs = []
    for k, n in enumerate(wc.nodes):
        subs += [(n.mcp_url, s) for s in many(n.mcp_url, [
            ("workflow_submit", {"name": f"d{k}-{i}", "template": "diamond", "tags": ["fifty"],
                                 "params": {"text": f"t{k}-{i}", "rounds": 10}}) for i in range(13 if k < 2 else 12)])]
    assert len(subs) == 50
    listed = call(wc.nodes[0].mcp_url, "workflow_list", {"tag": "fifty", "limit": 1000})
    assert listed["total"] == 50
    import hashlib

    for url, s in subs:
        r = call(url, "workflow_result", {"workflow_id": s["workflow_id"], "wait": True, "timeout_s": 60})
        assert r["status"] == "completed", r
        text = r["results"]["fetch"]["text"]
        digest = text.encode()
        for _ in range(10):
            digest = hashlib.sha256(digest).digest()
        assert r["results"]["join"]["left"] == digest.hex()
    assert call(wc.nodes[3].mcp_url, "workflow_list", {"tag": "fifty", "status": "completed"})["total"] == 50


def test_map_reduce_template_step_spelling_and_idempotency(wc: ProcessCluster) -> None:
    register(wc, {})
    url = wc.nodes[0].mcp_url
    sub = call(url, "workflow_submit", {"name": "mr", "template": "map-reduce", "params": {"rounds": 100},
                                        "workflow_id": "mr-once"})
    assert sub["levels"][1] == [f"map-{i}" for i in range(8)]
    again = call(wc.nodes[2].mcp_url, "workflow_submit", {"name": "mr", "template": "map-reduce",
                                                          "workflow_id": "mr-once"})
    assert again["existing"] and again["coordinator"] == wc.nodes[0].peer_id
    r = wf_result(url, "mr-once")
    assert r["status"] == "completed" and len(r["results"]["reduce"]["digests"]) == 8
    alt = call(url, "workflow_submit", {"name": "alt", "steps": [
        {"step_id": "p", "action": "echo", "params": {"v": 1}},
        {"step_id": "q", "action": "echo", "depends_on": ["p"], "params": {"$ref": "steps.p.result.v"}}]})
    assert wf_result(url, alt["workflow_id"])["results"] == {"p": {"v": 1}, "q": 1}


def test_workflow_cli_runs_a_yaml_file(wc: ProcessCluster) -> None:
    register(wc, {})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPP_")} | {"MCPP_TOKEN": TOKEN}
    res = subprocess.run([sys.executable, "-m", "mcpp", "workflow", "--url", wc.nodes[3].mcp_url, "run",
                          str(REPO / "node/mcpp/workflow/templates/diamond.yaml"), "--param", "text=cli",
                          "--param", "rounds=3"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["status"] == "completed" and out["results"]["fetch"] == {"text": "cli"}
    bad = subprocess.run([sys.executable, "-m", "mcpp", "workflow", "--url", wc.nodes[3].mcp_url, "run",
                          str(REPO / "node/mcpp/workflow/templates/diamond.yaml"), "--param", "nope=1"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "params: unknown template parameter(s): nope" in bad.stderr





def test_caller_ids_that_share_a_prefix_are_separate_workflows(wc: ProcessCluster) -> None:
    register(wc, {})
    url = wc.nodes[1].mcp_url
    steps = [{"id": "only", "task_type": "echo", "payload": "monday"}]
    a = call(url, "workflow_submit", {"name": "etl", "steps": steps, "workflow_id": "etl@mon"})
    steps2 = [{"id": "only", "task_type": "echo", "payload": "tuesday"}]
    b = call(url, "workflow_submit", {"name": "etl", "steps": steps2, "workflow_id": "etl@tue"})
    assert not b["existing"]
    assert wf_result(url, a["workflow_id"])["results"] == {"only": "monday"}
    assert wf_result(url, b["workflow_id"])["results"] == {"only": "tuesday"}
