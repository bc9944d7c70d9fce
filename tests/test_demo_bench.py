"""The README's main job (`mcpp demo`) and the benchmark command, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MCPP = [sys.executable, "-m", "mcpp"]


def test_demo_runs_a_mesh_calls_tools_and_stops_cleanly(tmp_path: Path) -> None:
    res = subprocess.run(MCPP + ["demo", "--dir", str(tmp_path / "demo")], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for tool in ("peer_discover", "peer_list", "peer_metrics", "peer_disconnect", "peer_connect", "bootstrap_network"):
        assert tool in out
    assert "exit codes: {'node-0': 0, 'node-1': 0, 'node-2': 0, 'node-3': 0, 'node-4': 0}" in out
    assert "demo finished: clean stop" in out
    for tool in ("task_submit", "task_result", "task_list", "queue_stats", "worker_register"):
        assert tool in out
    assert "status=dead_lettered after 2 attempts" in out
    assert "sha256" in out and "completed" in out
    assert "workflow completed in" in out and "critical path fetch ->" in out


@pytest.mark.timeout(600)
def test_bench_quick_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = subprocess.run(MCPP + ["bench", "--quick", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["startup"]["startup_s_median"] > 0 and data["idle"]["idle_rss_mb_mean"] > 0
    assert [f["nodes"] for f in data["formation"]] == [5, 20]
    assert all(f["links_per_node_max"] <= 12 and "idle_cpu_percent_mean" in f for f in data["formation"])
    assert all(f.get("formed_in_s", 0) > 0 for f in data["formation"]), data["formation"]
    rpc = data["rpc"]["mcpp rpc echo (task per request), node to node process"]
    floor = data["rpc"]["trio TCP echo, same framing (floor)"]
    assert 0 < floor["p50_ms"] < rpc["p50_ms"] <= rpc["p99_ms"]
    assert (out / "results.md").read_text().startswith("# mcpp benchmark")
    assert (out / "rpc_latency_cdf.png").stat().st_size > 1000 and (out / "formation_vs_n.png").stat().st_size > 1000
    q = data["queue"]
    assert "error" not in q, q
    assert 0 < q["api_task_rtt"]["p50_ms"] <= q["api_task_rtt"]["p99_ms"]
    assert 0 < q["p2p_tool_call"]["p50_ms"] and 0 < q["mcp_task_rtt"]["p50_ms"]
    assert [t["worker_nodes"] for t in q["throughput"]] == [1, 2, 3]
    assert all(t["tasks_per_s"] > 0 and sum(t["per_worker"]) == t["tasks"] for t in q["throughput"])
    assert len(q["throughput"][2]["per_worker"]) == 3, "3 worker nodes all took tasks"
    assert q["queued_rss"]["queued"] == 10_000
    cost = {x["setting"]: x for x in q["replication_cost"]}
    assert list(cost) == ["replicas 0", "replicas 1, sync (default)", "replicas 1, async"]
    assert all(0 < x["rtt_p50_ms"] <= x["rtt_p99_ms"] and x["noop_tasks_per_s"] > 0 for x in cost.values())
    assert "acknowledgement with replicas 1, sync (default)" in (out / "results.md").read_text()
    assert (out / "throughput_vs_workers.png").stat().st_size > 1000
    assert q["step_overhead"]["chain_steps"] == 20 and q["step_overhead"]["chain_ms_median"] > 0
    assert q["diamonds"]["workflows"] == 200 and q["diamonds"]["workflows_per_s"] > 0
    assert q["diamonds_in_process"]["workflows"] == 200
    dask = data["dask_diamonds"]
    assert "error" not in dask, dask
    assert dask["workflows"] == 200 and dask["workflows_per_s"] > 0
    assert "x Dask" in (out / "results.md").read_text()
    modes = {(m["response"], m["revision"]): m for m in data["mcp_modes"]}
    assert set(modes) == {(r, v) for r in ("sse", "json") for v in ("2026-07-28", "2025-11-25")}
    assert all(0 < m["p50_ms"] <= m["p99_ms"] for m in modes.values())
    assert (out / "mcp_response_modes.png").stat().st_size > 1000
    ct = data["containers"]
    assert "error" not in ct, ct
    assert ct["image_size_mb"] > 0 and [f["nodes"] for f in ct["formation"]] == [4]
    assert len(ct["formation"][0]["rss_mb_per_container"]) == 4
    (idle,) = ct["idle_cpu"]  # from each container's cgroup, and the node process alone
    assert idle["containers"] == 4 and len(idle["cpu_percent_per_container"]) == 4
    # the node is part of its container: its /proc time (10 ms ticks, read a moment apart from the
    # cgroup's ns) is at most the container's, give or take the ticks of a 10 s window
    assert all(0 < n <= c + 0.3 for n, c in zip(idle["node_cpu_percent_per_container"],
                                                   idle["cpu_percent_per_container"])), idle
    assert (out / "container_idle_cpu.png").stat().st_size > 1000
    systems = data["systems"]
    assert sorted(systems) == ["celery", "dask", "mcpp", "ray"]
    for name in ("mcpp", "celery", "dask"):
        s = systems[name]
        assert "skipped" not in s, (name, s)
        assert 0 < s["task_rtt_p50_ms"] <= s["task_rtt_p99_ms"] and s["noop_tasks_per_s"] > 0 and s["idle_rss_mb"] > 0
    assert "skipped" in systems["ray"] or systems["ray"]["noop_tasks_per_s"] > 0
    assert "## mcpp and its peers" in (out / "results.md").read_text()
    assert (out / "rss_per_system.png").stat().st_size > 1000


def test_bench_only_containers_writes_its_own_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = subprocess.run(MCPP + ["bench", "--quick", "--only", "containers", "--out", str(out)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert set(data) >= {"containers", "command", "git_sha"} and "queue" not in data and "startup" not in data
    assert data["command"].startswith("mcpp bench --quick --only containers")
    (idle,) = data["containers"]["idle_cpu"]
    assert idle["cpu_percent_per_container_mean"] > 0 and idle["node_cpu_percent_mean"] > 0
    md = (out / "results.md").read_text()
    assert "4 idle containers" in md and "<= 2.5 % per container" in md
    assert data["plots"] == ["container_idle_cpu.png"] and sorted(p.name for p in out.glob("*.png")) == data["plots"]


def test_bench_only_replication_compares_the_settings_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = subprocess.run(MCPP + ["bench", "--quick", "--only", "replication", "--out", str(out)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    cost = {x["setting"]: x for x in data["queue"]["replication_cost"]}
    assert list(cost) == ["replicas 0", "replicas 1, sync (default)", "replicas 1, async"]
    assert all(x["noop_tasks_per_s"] > 0 and x["noop_tasks_per_s_8_loops"] > 0 for x in cost.values())
    assert "acknowledgement with replicas 1, sync (default)" in (out / "results.md").read_text()
    assert data["plots"] == ["replication_cost.png"] and (out / "replication_cost.png").stat().st_size > 1000


def test_loadtest_smoke_writes_summary(tmp_path: Path) -> None:
    out = tmp_path / "lt"
    res = subprocess.run(MCPP + ["loadtest", "--nodes", "2", "--users", "2", "--duration", "4s", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["errors"] == 0 and s["calls"] > 0 and s["calls_per_s"] > 0
    assert s["mcp_response"] == "sse", "the nodes' default: Locust reads the SSE responses"
    assert set(s["per_tool"]) == {"task_submit", "task_result", "peer_list", "queue_stats", "workflow_submit"}
    assert (out / "locust_stats.csv").exists()


def test_a_failed_measurement_keeps_the_logs_it_names(tmp_path: Path) -> None:
    """The scratch dir is removed after a run; the logs a failure points at are copied out."""
    from mcpp.evidence.bench import _keep_failed_logs

    scratch, out = tmp_path / "scratch", tmp_path / "out"
    logs = scratch / "cluster50-fork-open" / "logs"
    logs.mkdir(parents=True)
    (logs / "node-6.log").write_text("node-6 never joined")
    results = {"formation": [{"nodes": 50, "error": f"mesh not formed (Hint: check the logs in {logs})"}],
               "startup": {"startup_s_median": 1.3}}
    kept = _keep_failed_logs(results, scratch, out)
    copy = out / "failed-logs" / "cluster50-fork-open" / "logs"
    assert (copy / "node-6.log").read_text() == "node-6 never joined"
    assert kept["formation"][0]["error"] == f"mesh not formed (Hint: check the logs in {copy})"
    assert kept["startup"] == results["startup"]
