"""Container figures for `mcpp bench`: image build time (cold and warm), image size, mesh
formation of N containers (Docker backend of the harness) and RSS per container."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from mcpp.harness.docker import DockerCluster
from mcpp.harness.image import build_image

__all__ = ["measure_containers"]


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
    return out
