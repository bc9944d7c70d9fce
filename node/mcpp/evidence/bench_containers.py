"""Container figures for `mcpp bench`: image build time (cold and warm), image size, mesh
formation of N containers (Docker backend of the harness), RSS per container, and idle CPU per
container (its cgroup: the node, the health probes, everything) next to the node process's."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcpp.harness.docker import DockerCluster
from mcpp.harness.image import build_image

__all__ = ["measure_containers", "measure_idle_cpu", "cgroup_cpu_ns", "container_rows", "plot_idle_cpu"]

IDLE_WINDOW_S = 30.0


def _mem_mb(text: str) -> float:
    """`docker stats` MemUsage ("123.4MiB / 23.4GiB") -> MB."""
    used = text.split("/")[0].strip()
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "kB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}
    for u, f in units.items():
        if used.endswith(u):
            return round(float(used[: -len(u)]) * f / 1e6, 1)
    return 0.0


def _rss(c: DockerCluster) -> list[float]:
    names = [c.container_name(n.name) for n in c.nodes]
    out = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{json .}}", *names],
                         capture_output=True, text=True, timeout=60).stdout
    return [_mem_mb(json.loads(line)["MemUsage"]) for line in out.splitlines() if line.strip()]


def cgroup_cpu_ns(pid: int) -> int:
    """CPU time used so far by the cgroup of process `pid` (a container's: every process in it),
    in ns, from cgroup v2 (cpu.stat usage_usec) or v1 (cpuacct.usage)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # v2 only: one hierarchy, "0::/path"
        path = next(ln.split(":", 2)[2] for ln in lines if ln.startswith("0::"))
        stat = dict(ln.split() for ln in (root / path.lstrip("/") / "cpu.stat").read_text().splitlines())
        return int(stat["usage_usec"]) * 1000
    for ln in lines:  # v1: "N:cpu,cpuacct:/docker/<id>"
        _, controllers, path = ln.split(":", 2)
        if "cpuacct" in controllers.split(","):
            for mount in (controllers, "cpuacct", "cpu,cpuacct"):
                f = root / mount / path.lstrip("/") / "cpuacct.usage"
                if f.exists():
                    return int(f.read_text())
    raise RuntimeError(f"no cpuacct cgroup for pid {pid}")


def _process_cpu_ns(pid: int) -> int:
    """utime + stime of one process (not its children), in ns."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class _Sample:
    at: float
    container_ns: list[int]
    node_ns: list[int]


def _sample(pids: list[int]) -> _Sample:
    return _Sample(time.monotonic(), [cgroup_cpu_ns(p) for p in pids], [_process_cpu_ns(p) for p in pids])


def measure_idle_cpu(c: DockerCluster, window_s: float = IDLE_WINDOW_S) -> dict[str, Any]:
    """Idle CPU of each container of a formed mesh over `window_s`, in % of one core: the whole
    container (its cgroup: node, health probes, anything else) and the node process alone."""
    pids = [c._pid(n.name) for n in c.nodes]
    a = _sample(pids)
    time.sleep(window_s)
    b = _sample(pids)
    span = (b.at - a.at) * 1e9
    per_container = [round(100 * (y - x) / span, 2) for x, y in zip(a.container_ns, b.container_ns)]
    per_node = [round(100 * (y - x) / span, 2) for x, y in zip(a.node_ns, b.node_ns)]
    return {"containers": len(pids), "window_s": window_s,
            "cpu_percent_per_container": per_container, "node_cpu_percent_per_container": per_node,
            "cpu_percent_per_container_mean": round(statistics.mean(per_container), 2),
            "node_cpu_percent_mean": round(statistics.mean(per_node), 2),
            "cpu_percent_whole_mesh": round(sum(per_container), 1)}


def measure_idle_containers(tmp: Path, sizes: tuple[int, ...] = (4, 8), settle_s: float = 10.0,
                            window_s: float = IDLE_WINDOW_S) -> list[dict[str, Any]]:
    """`measure_idle_cpu` for a mesh of each size, `settle_s` after it formed."""
    out = []
    for n in sizes:
        with DockerCluster(n, tmp / f"idle{n}", formation_timeout_s=180) as c:
            time.sleep(settle_s)
            out.append({"formed_in_s": round(c.formed_in_s, 3), **measure_idle_cpu(c, window_s)})
    return out


def measure_containers(tmp: Path, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not quick:  # from nothing: base rootfs, wheels, every layer
        b = build_image(cold=True, say=lambda m: None)
        out["build_cold_s"] = b.total_s
        out["build_cold_parts_s"] = {"base": b.base_s, "wheels": b.wheels_s, "docker_build": b.docker_s}
    b = build_image(say=lambda m: None)  # what a code change costs: mcpp's wheel + its layer
    out["build_warm_s"] = b.total_s
    out["image_size_mb"] = b.size_mb
    out["formation"] = []
    for n in (4,) if quick else (4, 8):  # --quick: one mesh (its 3-minute budget)
        with DockerCluster(n, tmp / f"docker{n}", formation_timeout_s=180) as c:
            f: dict[str, Any] = {"nodes": n, "up_in_s": round(c.up_in_s, 3), "formed_in_s": round(c.formed_in_s, 3)}
            if n == 4:
                import time

                time.sleep(5)
                rss = _rss(c)
                f["rss_mb_per_container"] = rss
                out["idle_rss_mb_mean"] = round(sum(rss) / len(rss), 1) if rss else None
            out["formation"].append(f)
    # --quick: one mesh, a 10 s window (the full run: 4 and 8, 30 s each)
    out["idle_cpu"] = (measure_idle_containers(tmp, (4,), 5.0, 10.0) if quick else measure_idle_containers(tmp))
    return out


def container_rows(ct: dict[str, Any]) -> list[str]:
    """The markdown table rows of `measure_containers`' figures."""
    if "error" in ct:
        return [f"| container figures | failed: {ct['error']} | |"]
    lines = []
    if "build_cold_s" in ct:
        p = ct["build_cold_parts_s"]
        lines.append(f"| image build from nothing (mmdebstrap base, wheels, every layer) | {ct['build_cold_s']} s "
                     f"(base {p['base']} s, wheels {p['wheels']} s, docker build {p['docker_build']} s) | |")
    lines.append(f"| image rebuild after a code change | {ct['build_warm_s']} s | seconds |")
    lines.append(f"| image size | {ct['image_size_mb']} MB | < 300 MB |")
    for f in ct["formation"]:
        lines.append(f"| {f['nodes']} containers (Docker backend): all answering / formed | "
                     f"{f['up_in_s']} s / {f['formed_in_s']} s | |")
    lines.append(f"| idle RSS per container (docker stats, 4-container mesh) | {ct['idle_rss_mb_mean']} MB | |")
    for i in ct.get("idle_cpu", []):
        lines.append(f"| {i['containers']} idle containers, {i['window_s']:.0f} s: CPU per container (cgroup) mean / "
                     f"node process alone mean; whole mesh | {i['cpu_percent_per_container_mean']} / "
                     f"{i['node_cpu_percent_mean']} %; {i['cpu_percent_whole_mesh']} % of one core | "
                     f"<= 2.5 % per container |")
    return lines


def plot_idle_cpu(ax: Any, idle_cpu: list[dict[str, Any]]) -> None:
    """Bars: per container (cgroup) and the node process alone, mean over the containers."""
    xs = range(len(idle_cpu))
    ax.bar([x - 0.2 for x in xs], [i["cpu_percent_per_container_mean"] for i in idle_cpu], 0.4,
           label="whole container (cgroup: node + health probes)")
    ax.bar([x + 0.2 for x in xs], [i["node_cpu_percent_mean"] for i in idle_cpu], 0.4, label="node process alone")
    ax.axhline(2.5, color="tab:red", linestyle=":", label="target: 2.5 % per container")
    ax.set_xticks(list(xs), [str(i["containers"]) for i in idle_cpu])
