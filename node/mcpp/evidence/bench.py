"""`mcpp bench`: start-up, idle RSS, mesh formation, RPC latency and the task queue's figures,
measured on real processes.

Writes OUT/results.json, OUT/results.md and OUT/*.png. Every figure comes from this run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import trio
from rich.console import Console
from rich.table import Table

from mcpp.net import identity
from mcpp.config import NodeConfig
from mcpp.evidence.bench_containers import container_rows, measure_containers, plot_idle_cpu
from mcpp.evidence.bench_mcp import measure_response_modes, response_mode_rows
from mcpp.harness import ProcessCluster, free_ports, node_status
from mcpp.net.peers import percentile
from mcpp.net.rpc import encode_frame
from mcpp.runner import open_services

__all__ = ["run"]

console = Console()
_HDR = struct.Struct(">I")
SCALE_SERIES = (5, 10, 20, 50, 100)  # mesh sizes for formation and idle CPU (quick: 5 and 20)


def _guard(fn: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement; a failure is recorded (with its reason), not fatal to the run."""
    try:
        return dict(fn())
    except Exception as e:
        console.print(f"[red]measurement failed: {str(e).splitlines()[0]}[/]")
        return {**base, "error": str(e).splitlines()[0]}


def _keep_failed_logs(results: dict[str, Any], tmp: Path, out: Path) -> dict[str, Any]:
    """A failed measurement names the logs to check, in the scratch dir that the run removes:
    copy those logs to OUT/failed-logs/ and point the results there."""
    text = json.dumps(results)
    for m in sorted(set(re.findall(re.escape(str(tmp)) + r"/[\w./-]*logs", text))):
        src = Path(m)
        dst = out / "failed-logs" / src.relative_to(tmp)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
            text = text.replace(m, str(dst))
    return dict(json.loads(text))


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "nogit"
    except OSError:
        return "nogit"


def _node_argv(tmp: Path, name: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "mcpp", "node", "--data-dir", str(tmp / name), *extra]


def _wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout_s: float, poll_s: float) -> None:
    """Poll `url` until it answers 200; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client() as client:
        while True:
            try:
                if client.get(url, timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"node exited (code {proc.returncode}) before {url} answered")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g} s")
            time.sleep(poll_s)


def measure_startup(tmp: Path, runs: int) -> dict[str, Any]:
    """Seconds from exec to /readyz 200 for a bootstrap; RSS at that moment."""
    times, rss = [], []
    for i in range(runs):
        p2p, mcp = free_ports(2)
        argv = _node_argv(tmp, f"s{i}", ["--role", "bootstrap", "--listen", f"/ip4/127.0.0.1/tcp/{p2p}",
                                          "--mcp-port", str(mcp), "--log-level", "warning"])
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            _wait_http_ok(f"http://127.0.0.1:{mcp}/readyz", proc, 30, 0.005)
            times.append(time.perf_counter() - t0)
            rss.append(psutil.Process(proc.pid).memory_info().rss / 2**20)
        finally:
            proc.terminate()
            proc.wait(10)
    return {"startup_s_median": round(statistics.median(times), 3), "startup_s_all": [round(t, 3) for t in times],
            "rss_at_ready_mb_median": round(statistics.median(rss), 1)}


def measure_cluster(tmp: Path, n: int, idle_s: float, fork_server: bool = True, private: bool = False,
                    cpu_window_s: float = 5.0) -> dict[str, Any]:
    """An N-node mesh: formation, and after `idle_s` the idle figures (CPU over `cpu_window_s`,
    RSS, links per node). private=True gives it a swarm key (the harness's default)."""
    name = f"cluster{n}-{'fork' if fork_server else 'cold'}-{'private' if private else 'open'}"
    with ProcessCluster(n, tmp / name, formation_timeout_s=180, fork_server=fork_server, secure=private) as c:
        out: dict[str, Any] = {"nodes": n, "fork_server": fork_server, "private": private,
                               "up_in_s": round(c.up_in_s, 3),
                               "formed_in_s": round(c.formed_in_s, 3),
                               "formation_after_up_s": round(c.formed_in_s - c.up_in_s, 3)}
        if idle_s > 0:
            time.sleep(idle_s)
            procs = [psutil.Process(r.pid) for r in c.nodes]
            rss = [p.memory_info().rss / 2**20 for p in procs]
            uss = [p.memory_full_info().uss / 2**20 for p in procs]
            cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
            time.sleep(cpu_window_s)
            cpu1 = [sum(p.cpu_times()[:2]) for p in procs]
            cpu = [100 * (b - a) / cpu_window_s for a, b in zip(cpu0, cpu1)]
            links = [len((node_status(r.base_url, 2.0, c.headers()) or {}).get("connected", [])) for r in c.nodes]
            out |= {"idle_rss_mb_mean": round(statistics.mean(rss), 1), "idle_rss_mb_max": round(max(rss), 1),
                    "idle_uss_mb_mean": round(statistics.mean(uss), 1),
                    "idle_cpu_percent_mean": round(statistics.mean(cpu), 2),
                    "idle_cpu_percent_max": round(max(cpu), 2),
                    "idle_cpu_percent_whole_mesh": round(sum(cpu), 1),
                    "links_per_node_mean": round(statistics.mean(links), 1), "links_per_node_max": max(links)}
        return out


def measure_membership_sim() -> list[dict[str, Any]]:
    """The node's membership rules at 1,000 and 10,000 nodes (simulated transport, virtual clock)."""
    from dataclasses import asdict

    from mcpp.evidence.membership_sim import simulate

    return [asdict(simulate(n, event, loss=loss)) for n in (1000, 10_000) for event in ("join", "failure")
            for loss in (0.0, 0.01, 0.05)]


def _lat(samples_ns: list[int]) -> dict[str, float]:
    ms = [s / 1e6 for s in samples_ns]
    return {"p50_ms": round(statistics.median(ms), 4), "p99_ms": round(percentile(ms, 99) or 0, 4),
            "mean_ms": round(statistics.mean(ms), 4), "samples": len(ms)}


async def _rpc_against(boot_addr: str, boot_id: str, tmp: Path, calls: int, method: str, swarm_key: str) -> dict[str, Any]:
    cfg = NodeConfig(role="worker", bootstrap=(boot_addr,), data_dir=str(tmp / "rpc-client"),
                     log_level="warning", ping_interval_s=30, discovery_interval_s=30, swarm_key=swarm_key)
    async with open_services(cfg) as app:
        node = app.node
        with trio.fail_after(20):
            while (rec := node.table.get(boot_id)) is None or not rec.connected:
                await trio.sleep(0.01)
        for _ in range(200):  # warm-up
            await node.rpc.call(boot_id, method)
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            await node.rpc.call(boot_id, method)
            lat.append(time.perf_counter_ns() - t0)
        done = 0
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal done
            for _ in range(calls // 32):
                await node.rpc.call(boot_id, method)
                done += 1

        async with trio.open_nursery() as n:
            for _ in range(32):
                n.start_soon(worker)
        rate = done / (time.perf_counter() - started)
    return {**_lat(lat), "calls_per_s_32_in_flight": round(rate), "samples_ns": lat}


def measure_rpc(tmp: Path, calls: int, method: str) -> dict[str, Any]:
    """mcpp RPC `method` from an in-process node to a node process (yamux, Noise, loopback).
    `ping` is served inline; `echo` through the task-per-request path every other method uses.
    Both nodes hold a swarm key (private network), as every harness-started mesh does."""
    swarm_key = secrets.token_hex(32)
    key = tmp / "rpc-boot.key"
    kp = identity.generate()
    identity.save(kp, key, overwrite=True)
    p2p, mcp = free_ports(2)
    boot_id = identity.peer_id_of(kp)
    proc = subprocess.Popen(_node_argv(tmp, "rpc-boot", [
        "--role", "bootstrap", "--identity", str(key), "--listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--mcp-port", str(mcp),
        "--log-level", "warning"]), stderr=subprocess.DEVNULL, env={**os.environ, "MCPP_SWARM_KEY": swarm_key})
    try:
        _wait_http_ok(f"http://127.0.0.1:{mcp}/healthz", proc, 20, 0.02)
        return trio.run(_rpc_against, f"/ip4/127.0.0.1/tcp/{p2p}/p2p/{boot_id}", boot_id, tmp, calls, method,
                        swarm_key)
    finally:
        proc.terminate()
        proc.wait(10)


async def _raw_echo(muxer: str, calls: int) -> list[int]:
    """Write a small frame, read it back, on one libp2p stream between two in-process hosts."""
    import multiaddr

    from mcpp.net.p2p import PeerInfo, TProtocol, make_host

    proto = TProtocol("/mcpp/bench-echo/1")

    async def echo(stream: Any) -> None:
        try:
            while data := await stream.read(65536):
                await stream.write(data)
        except Exception:
            return

    la = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    h1, h2 = make_host(identity.generate(), muxer), make_host(identity.generate(), muxer)
    async with h1.run(la), h2.run(la):
        h1.set_stream_handler(proto, echo)
        await h2.connect(PeerInfo(h1.get_id(), h1.get_addrs()))
        s = await h2.new_stream(h1.get_id(), [proto])
        frame = encode_frame({"i": 1, "m": "ping", "p": None})
        lat = []
        for i in range(calls + 200):
            t0 = time.perf_counter_ns()
            await s.write(frame)
            got = b""
            while len(got) < len(frame):
                got += await s.read(65536)
            if i >= 200:
                lat.append(time.perf_counter_ns() - t0)
        with trio.CancelScope(shield=True):
            await h1.close()
            await h2.close()
    return lat


def measure_raw_echo(muxer: str, calls: int) -> dict[str, Any]:
    lat = trio.run(_raw_echo, muxer, calls)
    return {**_lat(lat), "samples_ns": lat}


_ECHO_SERVER = """
import sys, trio
async def handle(s):
    try:
        while True:
            d = await s.receive_some(65536)
            if not d: return
            await s.send_all(d)
    except trio.BrokenResourceError:
        pass
async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)
trio.run(main)
"""


async def _echo_client(port: int, calls: int) -> list[int]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    lat = []
    for i in range(calls + 200):
        frame = encode_frame({"i": i, "m": "ping", "p": None})
        t0 = time.perf_counter_ns()
        await stream.send_all(frame)
        while True:
            if len(buf) >= 4:
                (n,) = _HDR.unpack_from(buf)
                if len(buf) >= 4 + n:
                    json.loads(bytes(buf[4 : 4 + n]))
                    del buf[: 4 + n]
                    break
            buf += await stream.receive_some(65536)
        if i >= 200:
            lat.append(time.perf_counter_ns() - t0)
    await stream.aclose()
    return lat


def measure_tcp_floor(calls: int) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        lat = trio.run(_echo_client, port, calls)
        return {**_lat(lat), "samples_ns": lat}
    finally:
        proc.terminate()
        proc.wait(10)


def _plots(out: Path, results: dict[str, Any], rpc_samples: dict[str, list[int]],
           task_samples: dict[str, list[float]]) -> list[str]:
    try:
        import matplotlib  # noqa: F401 (a dependency of the bench extra)
    except ImportError:
        console.print("[yellow]matplotlib not installed: no plots[/]")
        return []

    def figure(name: str, title: str, xlabel: str, ylabel: str, draw: Callable[[Any], None]) -> str:
        return _figure(out, name, title, xlabel, ylabel, draw)

    def cdf(ax: Any) -> None:
        for label, samples in rpc_samples.items():
            ms = sorted(x / 1e6 for x in samples)
            ax.plot(ms, [i / len(ms) for i in range(len(ms))], label=label)
        ax.set_xscale("log")

    form = [f for f in results["formation"] if "error" not in f]

    def formation(ax: Any) -> None:
        ns = [f["nodes"] for f in form]
        ax.plot(ns, [f["formed_in_s"] for f in form], "o-", label="cluster up + formed (incl. process start)")
        ax.plot(ns, [f["formation_after_up_s"] for f in form], "s-", label="formation after all nodes answer")
        idle = [f for f in form if "idle_cpu_percent_mean" in f]
        if idle:
            ax2 = ax.twinx()
            ax2.plot([f["nodes"] for f in idle], [f["idle_cpu_percent_mean"] for f in idle], "^:", color="tab:red",
                     label="idle CPU per node (%, right axis)")
            ax2.set_ylabel("idle CPU per node (% of one core)")
            ax2.set_ylim(bottom=0)
            ax2.legend(fontsize=7, loc="upper center")

    sims = [s for s in results.get("membership_sim", []) if isinstance(s, dict) and s.get("t999_s") is not None]

    def simulation(ax: Any) -> None:
        for event in ("join", "failure"):
            for loss in sorted({s["loss"] for s in sims}):
                pts = [s for s in sims if s["event"] == event and s["loss"] == loss]
                ax.plot([s["nodes"] for s in pts], [s["t999_s"] for s in pts], "o-",
                        label=f"{event}, {loss:.0%} loss: 99.9 % know")
        ax.set_xscale("log")

    def task_cdf(ax: Any) -> None:
        for label, ms in task_samples.items():
            xs = sorted(ms)
            ax.plot(xs, [i / len(xs) for i in range(len(xs))], label=label)
        ax.set_xscale("log")

    tput = [t for t in results.get("queue", {}).get("throughput", [])]

    cput = results.get("queue", {}).get("cpu_throughput", [])
    systems = results.get("systems", {})

    def throughput(ax: Any) -> None:
        ax.plot([t["worker_nodes"] for t in tput], [t["tasks_per_s"] for t in tput], "o-", label="mcpp no-op (echo)")
        if cput:
            ax.plot([t["worker_nodes"] for t in cput], [t["tasks_per_s"] for t in cput], "s--",
                    label="mcpp sha256 (20,000 rounds)")
        for i, (name, v) in enumerate(x for x in systems.items() if x[0] != "mcpp"):
            if "noop_tasks_per_s" in v:
                ax.plot([3 + 0.05 * (i + 1)], [v["noop_tasks_per_s"]], "^", label=f"{name} no-op, 3 workers")
            if "cpu_tasks_per_s" in v:
                ax.plot([3 + 0.05 * (i + 1)], [v["cpu_tasks_per_s"]], "v", label=f"{name} sha256, 3 workers")
        ax.set_ylim(bottom=0)
        ax.set_xticks([t["worker_nodes"] for t in tput])

    def rss(ax: Any) -> None:
        names = [n for n, v in systems.items() if "idle_rss_mb" in v]
        ax.bar(names, [systems[n]["idle_rss_mb"] for n in names])
        for i, n in enumerate(names):
            ax.text(i, systems[n]["idle_rss_mb"], f"{systems[n]['idle_rss_mb']:.0f}", ha="center", va="bottom")

    extra = []
    if sims:
        extra.append(figure("membership_sim.png", "Membership news reaching 99.9 % of members (simulated)",
                            "nodes (log)", "seconds", simulation))
    if task_samples:
        extra.append(figure("task_latency_cdf.png", "Cross-peer task round trip (submit on A, run on B, result on A)",
                            "round trip (ms, log)", "fraction of tasks", task_cdf))
    if tput:
        extra.append(figure("throughput_vs_workers.png", "Task throughput (2 cores for everything)",
                            "worker nodes / processes", "tasks / s", throughput))
    if (modes := results.get("mcp_modes")):
        extra.append(figure("mcp_response_modes.png", "peer_list on a warm SDK session",
                            "node's response mode / protocol revision", "ms", lambda ax: _plot_modes(ax, modes)))
    if (idle_cpu := results.get("containers", {}).get("idle_cpu")):
        extra.append(figure("container_idle_cpu.png", "Idle CPU per container (cgroup) and per node process",
                            "containers in the mesh", "% of one core", lambda ax: plot_idle_cpu(ax, idle_cpu)))
    if any("idle_rss_mb" in v for v in systems.values()):
        extra.append(figure("rss_per_system.png", "Idle RSS of each system (3 workers, all processes)",
                            "system", "MB", rss))
    return extra + [
        figure("rpc_latency_cdf.png", "Small request round trip between two local processes",
               "round trip (ms, log)", "fraction of calls", cdf),
        figure("formation_vs_n.png", "Mesh formation and idle CPU vs N (2 cores, bounded overlay)", "nodes", "seconds",
               formation),
    ]


def _markdown(results: dict[str, Any], command: str) -> str:
    r = results
    lines = [
        f"# mcpp benchmark {r['date']} ({r['git_sha']})",
        "",
        f"Command: `{command}` on {r['machine']['cpus']} cores, Python {r['machine']['python']}.",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| node start-up to ready (median of {len(r['startup']['startup_s_all'])}) | {r['startup']['startup_s_median']} s | < 1 s |",
        f"| RSS at ready | {r['startup']['rss_at_ready_mb_median']} MB | |",
        f"| idle RSS per node (5-node mesh, mean / max) | {r['idle']['idle_rss_mb_mean']} / {r['idle']['idle_rss_mb_max']} MB | < 100 MB |",
        f"| idle unique memory (USS) per node | {r['idle']['idle_uss_mb_mean']} MB | |",
        f"| idle CPU per node (5-node mesh) | {r['idle']['idle_cpu_percent_mean']} % | |",
    ]
    for f in [*r["formation"], *([r["formation_cold_20"]] if "formation_cold_20" in r else []),
              *([r["formation_private"]] if "formation_private" in r else [])]:
        how = ("fork server" if f["fork_server"] else "cold exec") + (", swarm key" if f.get("private") else ", open")
        target = {50: "< 30 s", 100: "< 60 s"}.get(f["nodes"], "")
        if "error" in f:
            lines.append(f"| {f['nodes']} nodes ({how}) | failed: {f['error']} | {target} |")
            continue
        lines.append(f"| {f['nodes']} nodes ({how}): all answering / formed after that / total | "
                     f"{f['up_in_s']} s / {f['formation_after_up_s']} s / {f['formed_in_s']} s | {target} |")
        if "idle_cpu_percent_mean" in f:
            lines.append(f"| {f['nodes']} nodes idle: CPU per node mean / max, whole mesh; links per node mean / max | "
                         f"{f['idle_cpu_percent_mean']} / {f['idle_cpu_percent_max']} %, "
                         f"{f['idle_cpu_percent_whole_mesh']} % of one core; {f['links_per_node_mean']} / "
                         f"{f['links_per_node_max']} | <= 1.0 % per node, flat in N |")
    lm = r.get("large_mesh")
    if lm and "placement" in lm:
        pl = lm["placement"]
        lines += [
            f"| 50 nodes: {pl['tasks']} sleep tasks of 1 s from node-0 (MCP): submitted in / all finished after first "
            f"submit; distinct workers | {pl['submitted_in_s']} / {pl['all_finished_after_first_submit_s']} s; "
            f"{pl['distinct_workers']} | all within 6 s, >= 30 workers |",
            *(f"| 50 nodes: {label} gone from every view / rejoined known by all after ready (from the members' logs) | "
              f"{lm[k]['gone_from_every_view_s']} / {lm[k]['known_by_every_member_after_ready_s']} s | {target} |"
              for k, label, target in (("kill9", "kill -9", "< 5 s / < 3 s"), ("sigterm", "SIGTERM", "< 1 s / < 3 s"))
              if k in lm),
        ]
    for s in r.get("membership_sim", []):
        lines.append(f"| simulated {s['nodes']:,} nodes, {s['event']}, {s['loss']:.0%} loss: 50 % / 99.9 % know after; "
                     f"messages / bytes per node | {s['t50_s']} / {s['t999_s']} s"
                     + (f" (dead everywhere at {s['dead_at_999_s']} s)" if s.get("dead_at_999_s") else "")
                     + f"; {s['messages_per_node']} / {s['bytes_per_node']:.0f} B | |")
    for name, v in r["rpc"].items():
        extra = f", {v['calls_per_s_32_in_flight']} calls/s with 32 in flight" if "calls_per_s_32_in_flight" in v else ""
        lines.append(f"| {name}: p50 / p99 | {v['p50_ms']} / {v['p99_ms']} ms{extra} | p50 < 1 ms |")
    q = r.get("queue")
    if q and "error" not in q:
        lines += [
            f"| task round trip, in-process API (submit on A + result(wait) on A, run on B): p50 / p99 | "
            f"{q['api_task_rtt']['p50_ms']} / {q['api_task_rtt']['p99_ms']} ms | p50 < 2, p99 < 10 ms |",
            f"| task round trip through MCP (two tool calls): p50 / p99 | "
            f"{q['mcp_task_rtt']['p50_ms']} / {q['mcp_task_rtt']['p99_ms']} ms | p50 < 5 ms |",
            f"| P2P tool call (task_status on C, owner A): p50 / p99 | "
            f"{q['p2p_tool_call']['p50_ms']} / {q['p2p_tool_call']['p99_ms']} ms | p50 < 3, p99 < 15 ms |",
        ]
        for t in q["throughput"]:
            lines.append(f"| no-op (echo) throughput, {t['worker_nodes']} worker node(s), {t['tasks']} tasks | "
                         f"{t['tasks_per_s']} tasks/s (per worker {t['per_worker']}) | >= 2,000 tasks/s |")
        g = q["queued_rss"]
        lines.append(f"| RSS growth with {g['queued']:,} queued tasks | {g['rss_growth_mb']} MB | < 20 MB |")
        so = q["step_overhead"]
        lines.append(f"| workflow orchestration overhead per step ({so['chain_steps']}-step echo chain minus "
                     f"{so['chain_steps']} single round trips, median of {so['runs']}) | {so['overhead_ms_per_step']} ms "
                     f"({so['chain_ms_median']} vs {so['single_tasks_ms_median']} ms) | < 2 ms |")
        dd = r.get("dask_diamonds", {})
        for key, how in (("diamonds_in_process", "coordinated in the benchmark process, like Dask's scheduler"),
                         ("diamonds", "submitted through MCP to the 3 nodes")):
            dm = q[key]
            ratio = (f", {dm['workflows_per_s'] / dd['workflows_per_s']:.2f}x Dask" if dd.get("workflows_per_s") else "")
            lines.append(f"| 200 concurrent diamond workflows (4 no-op steps), 3 worker nodes, {how} | "
                         f"{dm['workflows_per_s']} workflows/s{ratio} | 2-3x peers |")
        if "error" in dd:
            lines.append(f"| the same on Dask distributed | failed: {dd['error']} | |")
        elif dd:
            lines.append(f"| the same on Dask distributed (LocalCluster, 3 worker processes) | "
                         f"{dd['workflows_per_s']} workflows/s | |")
    elif q:
        lines.append(f"| queue figures | failed: {q['error']} | |")
    lines += replication_rows((r.get("queue") or {}).get("replication_cost", []))
    lines += response_mode_rows(r.get("mcp_modes", []))
    if "containers" in r:
        lines += container_rows(r["containers"])
    if "systems" in r:
        lines += _systems_table(r["systems"])
    lines += ["", "Figures are from one run of the command above on this machine; rerun it to reproduce."]
    return "\n".join(lines) + "\n"


SYSTEM_KEYS = (
    ("task_rtt_p50_ms", "task round trip p50 (ms, lower is better)", False),
    ("task_rtt_p99_ms", "task round trip p99 (ms)", False),
    ("noop_tasks_per_s", "no-op tasks/s, 3 workers", True),
    ("cpu_tasks_per_s", "sha256 tasks/s (20,000 rounds), 3 workers", True),
    ("workflows_per_s", "diamond workflows/s (200 at once)", True),
    ("idle_rss_mb", "idle RSS of the whole system (MB)", False),
    ("startup_s", "start-up to first result (s)", False),
)


def _mcpp_system(r: dict[str, Any]) -> dict[str, Any]:
    q = r.get("queue", {})
    if "error" in q or not q:
        return {"skipped": f"queue figures failed: {q.get('error')}"}
    from mcpp import __version__

    echo: dict[str, Any] = next((v for k, v in r["rpc"].items() if k.startswith("mcpp rpc echo")), {})
    return {
        "task_rtt_p50_ms": q["api_task_rtt"]["p50_ms"], "task_rtt_p99_ms": q["api_task_rtt"]["p99_ms"],
        "noop_tasks_per_s": q["throughput"][-1]["tasks_per_s"],
        "cpu_tasks_per_s": q["cpu_throughput"][-1]["tasks_per_s"],
        "workflows_per_s": q["diamonds_in_process"]["workflows_per_s"],
        "idle_rss_mb": q["idle_rss_mb_3_nodes"], "startup_s": q["startup_s"],
        "mcp_task_rtt_p50_ms": q["mcp_task_rtt"]["p50_ms"], "p2p_call_p50_ms": echo.get("p50_ms"),
        "formation_s": {str(f["nodes"]): f.get("formed_in_s") for f in r["formation"]},
        "version": __version__, "workers": "3 node processes (worker nodes), owner in the benchmark process",
    }


def _systems_table(systems: dict[str, dict[str, Any]]) -> list[str]:
    names = list(systems)
    lines = ["", "## mcpp and its peers, same run, same machine", "",
             "| figure | " + " | ".join(names) + " | mcpp vs best peer |", "|---" * (len(names) + 2) + "|"]
    for key, label, higher_better in SYSTEM_KEYS:
        vals = {n: systems[n].get(key) for n in names}
        cells = [("skipped" if "skipped" in systems[n] else "-") if vals[n] is None else f"{vals[n]:g}"
                 for n in names]
        peer_vals = [v for n, v in vals.items() if n != "mcpp" and isinstance(v, (int, float)) and v > 0]
        m = vals.get("mcpp")
        ratio = "-"
        if isinstance(m, (int, float)) and m > 0 and peer_vals:
            best = max(peer_vals) if higher_better else min(peer_vals)
            x = m / best if higher_better else best / m  # > 1: mcpp is better
            ratio = f"{x:.2f}x ({'better' if x >= 1 else 'worse'})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    skipped = [f"{n}: {systems[n]['skipped']}" for n in names if "skipped" in systems[n]]
    lines += ["", "Versions: " + ", ".join(f"{n} {systems[n].get('version', '?')}" for n in names)]
    if skipped:
        lines.append("Skipped: " + "; ".join(skipped))
    return lines


def _print_table(md: str) -> None:
    t = Table("figure", "value", "target")
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| figure") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            t.add_row(*cells)
    console.print(t)


def _plot_modes(ax: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"{r['response']}\n{r['revision']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["p50_ms"] for r in rows], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [r["p99_ms"] for r in rows], 0.4, label="p99")
    ax.set_xticks(list(xs), labels)


def replication_rows(cost: list[dict[str, Any]]) -> list[str]:
    """The rows "acknowledgement with ...": each replication setting against replicas 0, same run."""
    rc = {x["setting"]: x for x in cost}
    if not rc:
        return []
    zero = rc["replicas 0"]
    lines = []
    for name, x in rc.items():
        extra = "" if x is zero else (f" ({x['rtt_p50_ms'] - zero['rtt_p50_ms']:+.3f} ms, "
                                      f"{100 * x['noop_tasks_per_s'] / zero['noop_tasks_per_s']:.0f} % of replicas 0)")
        loops = x.get("noop_tasks_per_s_8_loops")
        lines.append(f"| acknowledgement with {name}: task round trip p50 / p99; no-op tasks/s, 3 workers, "
                     f"all at once (8 closed submit loops) | {x['rtt_p50_ms']} / {x['rtt_p99_ms']} ms; "
                     f"{x['noop_tasks_per_s']}{extra} ({loops}) | "
                     f"{'default: <= +0.5 ms p50, >= 85 % tasks/s' if 'default' in name else ''} |")
    return lines


def _plot_replication(ax: Any, cost: list[dict[str, Any]]) -> None:
    names = [x["setting"] for x in cost]
    ax.bar(names, [x["noop_tasks_per_s"] for x in cost], label="all at once")
    ax.plot(names, [x.get("noop_tasks_per_s_8_loops") or 0 for x in cost], "o-", color="C1",
            label="8 closed submit loops")
    ax.tick_params(axis="x", labelsize=7)


def _only(out: Path, tmp: Path, results: dict[str, Any], section: str) -> int:
    """`mcpp bench --only SECTION`: one section's figures alone (JSON, markdown, plot)."""
    if section == "containers":
        with console.status("containers: image build, N-container formation, RSS and idle CPU per container"):
            results["containers"] = measure_containers(tmp, results["quick"])
        rows = container_rows(results["containers"])
        plots = _plots(out, {"formation": [], "containers": results["containers"]}, {}, {})
        results["plots"] = [p for p in plots if p == "container_idle_cpu.png"]
        for p in set(plots) - set(results["plots"]):
            (out / p).unlink(missing_ok=True)
    elif section == "replication":
        from mcpp.evidence.bench_queue import measure_replication

        with console.status("replication settings: round trips and no-op throughput, interleaved"):
            results["queue"] = {"replication_cost": measure_replication(tmp, results["quick"])}
        cost = results["queue"]["replication_cost"]
        rows = replication_rows(cost)
        results["plots"] = [_figure(out, "replication_cost.png", "no-op tasks/s by replication setting (3 workers)",
                                    "owner's setting", "tasks/s", lambda ax: _plot_replication(ax, cost))]
    else:  # mcp
        with console.status("MCP tool calls: SSE and JSON responses, both protocol revisions"):
            results["mcp_modes"] = measure_response_modes(tmp, 300 if results["quick"] else 1000)
        rows = response_mode_rows(results["mcp_modes"])
        results["plots"] = [_figure(out, "mcp_response_modes.png", "peer_list on a warm SDK session",
                                    "node's response mode / protocol revision", "ms",
                                    lambda ax: _plot_modes(ax, results["mcp_modes"]))]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    r = results
    md = "\n".join([f"# mcpp benchmark {r['date']} ({r['git_sha']}): {section}", "",
                     f"Command: `{r['command']}` on {r['machine']['cpus']} cores, Python {r['machine']['python']}.", "",
                     "| figure | value | target |", "|---|---|---|", *rows]) + "\n"
    (out / "results.md").write_text(md)
    _print_table(md)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(results['plots'])} plot(s)")
    return 0


def _figure(out: Path, name: str, title: str, xlabel: str, ylabel: str, draw: Callable[[Any], None]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def run(args: argparse.Namespace) -> int:
    quick = args.quick
    date = dt.date.today().isoformat()
    sha = _git_sha()
    out = Path(args.out)
    if out.name == "bench-results" or args.out == "bench-results":
        out = out / f"{date}-{sha}"
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="mcpp-bench-"))
    command = ("mcpp bench" + (" --quick" if quick else "") + (f" --only {args.only}" if args.only else "")
               + f" --out {args.out}")
    calls = 1000 if quick else 5000
    try:
        console.rule("mcpp bench" + (" (quick)" if quick else "") + (f" --only {args.only}" if args.only else ""))
        results: dict[str, Any] = {
            "date": date, "git_sha": sha, "quick": quick, "command": command,
            "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                        "mem_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        }
        if args.only:
            return _only(out, tmp, results, args.only)
        with console.status("start-up to ready"):
            results["startup"] = measure_startup(tmp, 3 if quick else 7)
        console.print(f"start-up to ready: {results['startup']}")
        with console.status("idle RSS in a 5-node mesh (each node exec'd cold)"):
            results["idle"] = measure_cluster(tmp, 5, 5.0, fork_server=False, private=True)
        console.print(f"idle: {results['idle']}")
        results["formation"] = []
        for n in (5, 20) if quick else SCALE_SERIES:
            with console.status(f"mesh formation and idle CPU, {n} nodes (fork server, swarm key)"):
                f = _guard(lambda n=n: measure_cluster(tmp, n, 5.0, private=True, cpu_window_s=10.0),
                           {"nodes": n, "fork_server": True, "private": True})
            results["formation"].append(f)
            console.print(f"formation: {f}")
        if not quick:
            with console.status("membership at 1,000 and 10,000 nodes (simulated transport, virtual clock)"):
                results["membership_sim"] = _guard(lambda: {"runs": measure_membership_sim()}, {}).get("runs", [])
            console.print(f"membership simulation: {len(results['membership_sim'])} runs")
        if not quick:
            from mcpp.evidence.bench_scale import measure_large_mesh

            with console.status("50 nodes at work: 200 tasks from one node, kill -9, SIGTERM, rejoin"):
                results["large_mesh"] = _guard(lambda: measure_large_mesh(tmp, 50), {"nodes": 50})
            console.print(f"large mesh: {results['large_mesh']}")
        if not quick:  # 20 cold execs take ~25 s on 2 cores
            with console.status("mesh formation, 20 nodes, each exec'd cold"):
                results["formation_cold_20"] = _guard(lambda: measure_cluster(tmp, 20, 0, fork_server=False),
                                                      {"nodes": 20, "fork_server": False})
            console.print(f"formation (cold exec): {results['formation_cold_20']}")
        samples: dict[str, list[int]] = {}
        results["rpc"] = {}
        measures: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (("mcpp rpc ping (inline handler), node to node process", lambda: measure_rpc(tmp, calls, "ping")),
            ("mcpp rpc echo (task per request), node to node process", lambda: measure_rpc(tmp, calls, "echo")),
                          ("raw libp2p stream echo, yamux (in-process)", lambda: measure_raw_echo("yamux", calls)),
                          ("raw libp2p stream echo, mplex (in-process)", lambda: measure_raw_echo("mplex", calls)),
                          ("trio TCP echo, same framing (floor)", lambda: measure_tcp_floor(calls)))
        for label, fn in measures:
            with console.status(label):
                v = fn()
            samples[label] = v.pop("samples_ns")
            results["rpc"][label] = v
            console.print(f"{label}: {v}")
        from mcpp.evidence.bench_queue import measure_queue

        task_samples: dict[str, list[float]] = {}
        with console.status("task queue: round trips, throughput with 1-3 workers, RSS with 10,000 queued"):
            results["queue"] = _guard(lambda: measure_queue(tmp, quick), {})
        with console.status("MCP tool calls: SSE and JSON responses, both protocol revisions"):
            results["mcp_modes"] = _guard(lambda: {"rows": measure_response_modes(tmp, 300 if quick else 1000)},
                                          {}).get("rows", [])
        console.print(f"MCP response modes: {results['mcp_modes']}")
        with console.status("containers: image build, N-container formation, RSS and idle CPU per container"):
            results["containers"] = _guard(lambda: measure_containers(tmp, quick), {})
        console.print(f"containers: {results['containers']}")
        from mcpp.evidence.bench_workflow import measure_dask_diamonds

        with console.status("Dask distributed: the same 200 diamonds"):
            results["dask_diamonds"] = _guard(lambda: measure_dask_diamonds(200, tmp), {})
        console.print(f"dask diamonds: {results['dask_diamonds']}")
        from mcpp.evidence.bench_peers import PeerCounts, measure_celery, measure_dask, measure_ray

        counts = PeerCounts(quick)
        results["params"] = {"rtt_tasks": counts.rtt, "noop_tasks": counts.noop, "cpu_tasks": counts.cpu,
                             "cpu_rounds": counts.rounds, "worker_processes": 3}
        peers: dict[str, dict[str, Any]] = {}
        for name, measure in (("celery", measure_celery), ("dask", measure_dask), ("ray", measure_ray)):
            with console.status(f"peer system: {name}"):
                peers[name] = _guard(lambda m=measure: m(tmp, counts), {"skipped": "failed"})
            console.print(f"{name}: { {k: v for k, v in peers[name].items() if k != 'samples_ms'} }")
        results["systems"] = {"mcpp": _mcpp_system(results), **peers}
        if "workflows_per_s" in results.get("dask_diamonds", {}):
            results["systems"]["dask"]["workflows_per_s"] = results["dask_diamonds"]["workflows_per_s"]
        for name, v in results["systems"].items():
            if "samples_ms" in v:
                task_samples[f"{name}: task round trip"] = v.pop("samples_ms")
        for key, label in (("api_task_rtt", "in-process API"), ("mcp_task_rtt", "through MCP (2 tool calls)"),
                           ("p2p_tool_call", "task_status on C, owner A (MCP + 1 hop)")):
            if key in results["queue"]:
                task_samples[label] = results["queue"][key].pop("samples_ms")
        console.print(f"queue: {results['queue']}")
        results["plots"] = _plots(out, results, samples, task_samples)
        results = _keep_failed_logs(results, tmp, out)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        md = _markdown(results, command)
        (out / "results.md").write_text(md)
        _print_table(md)
        console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(results['plots'])} plot(s)")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
