"""The fault-injection checker: a short run of `mcpp chaos` on the process backend (what CI
runs; the full run is the documented command), and the checker's own verdict logic on records
that do lose and duplicate tasks (a checker that cannot fail proves nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mcpp.evidence.chaos import Chaos, ChaosConfig

CI_DURATION_S = 45


def test_mcpp_chaos_short_run_loses_nothing_and_completes_nothing_twice(tmp_path: Path) -> None:
    """Injected: kill -9 (+ restart), kill -9 for good (data removed), a fresh node joining,
    graceful restarts and SIGSTOP past the lease of random nodes of a 4-node mesh, every ~4 s
    for 45 s, under a steady load of tasks and diamond workflows.
    Checked: the verdict of `mcpp chaos` (every accepted task final, none completed twice,
    workflows consistent with their graph, no wedged node) and that faults really happened."""
    out = tmp_path / "chaos"
    res = subprocess.run([sys.executable, "-m", "mcpp", "chaos", "--nodes", "4", "--duration", str(CI_DURATION_S),
                          "--seed", "7", "--out", str(out)], capture_output=True, text=True, timeout=600)
    v = json.loads((out / "verdict.json").read_text())
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:], {k: v[k] for k in ("lost_ids", "duplicated_ids", "wedged", "workflows")})
    assert v["ok"] is True and v["lost"] == 0 and v["duplicated"] == 0 and v["wedged"] == []
    assert v["accepted"] >= 100 and v["completed"] >= 1
    assert v["workflows"]["submitted"] >= 5 and v["workflows"]["inconsistent"] == []
    kinds = [f["kind"] for f in v["faults"]]
    assert v["faults_injected"] >= 4 and "kill -9" in kinds and {"pause", "restart (SIGTERM)"} & set(kinds)
    # a node lost for good (its data removed, never restarted) and a fresh node joining
    assert v["lost_for_good"] >= 1 and v["fresh_joins"] >= 1, kinds
    gone = next(f for f in v["faults"] if f["kind"] == "kill -9 for good")
    assert gone["permanent"] is True and gone["node"] != "node-0"
    record = json.loads((out / "record.json").read_text())
    assert set(record["accepted"]) <= set(record["observations"])
    assert "0 lost, 0 duplicated" in " ".join(res.stdout.split())  # rich wraps lines (with a trailing space)


class _NoCluster:
    nodes: list[Any] = []


def test_the_checker_reports_lost_and_duplicated_tasks() -> None:
    """The verdict of a record where one accepted task never became final, one was completed
    by two attempts, and one was read with two different results: not ok, and each is named."""
    ch = Chaos(ChaosConfig(nodes=3), _NoCluster())
    for t in ("t-ok", "t-lost", "t-twice", "t-changed"):
        ch.rec.accepted[t] = {"node": "node-0"}
    done = {"status": "completed", "result": 1, "worker": "w", "via": "node-1", "ok_attempts": 1, "attempts": 1}
    ch.rec.observations = {
        "t-ok": [done, done],
        "t-lost": [{**done, "status": "running", "ok_attempts": 0}],
        "t-twice": [{**done, "ok_attempts": 2, "attempts": 2}],
        "t-changed": [done, {**done, "result": 2}],
    }
    final = {t: obs[-1] for t, obs in ch.rec.observations.items() if obs[-1]["status"] == "completed"}
    v = ch.verdict(final, {"submitted": 0, "by_status": {}, "inconsistent": []}, [])
    assert v["ok"] is False and v["lost"] == 1 and v["lost_ids"] == ["t-lost"]
    assert v["duplicated"] == 2 and sorted(v["duplicated_ids"]) == ["t-changed", "t-twice"]
    assert v["retried"] == 1
    v = ch.verdict({t: done for t in ch.rec.accepted}, {"submitted": 1, "by_status": {}, "inconsistent": [{"x": 1}]},
                   ["node-2"])
    assert v["ok"] is False and v["wedged"] == ["node-2"]
