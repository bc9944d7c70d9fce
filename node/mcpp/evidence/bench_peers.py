"""The peer systems of `mcpp bench`, measured in the same run on the same machine with the same
payloads and counts as mcpp: Celery (threads pool, Redis broker and result backend, Redis from
Debian's redis-server started and stopped here on loopback), Dask distributed (LocalCluster)
and Ray (`ray.init` local). Each has 3 worker processes, like mcpp's 3 worker nodes.

Every system returns, as far as it applies: task_rtt_p50_ms / task_rtt_p99_ms (submit one
no-op task through the system's own client API and wait for its result, one at a time),
noop_tasks_per_s (N no-op tasks submitted at once), cpu_tasks_per_s (sha256 tasks of the same
rounds as mcpp's), idle_rss_mb (RSS of every process the system runs, at idle) and startup_s
(from nothing to the first result). A system that cannot run here is marked skipped with why.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from mcpp.harness import free_ports
from mcpp.net.peers import percentile

__all__ = ["measure_celery", "measure_dask", "measure_ray", "sha256_rounds", "PeerCounts"]


class PeerCounts:
    def __init__(self, quick: bool) -> None:
        self.rtt = 200 if quick else 1000
        self.noop = 2000 if quick else 6000
        self.cpu = 150 if quick else 600
        self.rounds = 20_000  # ~10-20 ms of hashing per task here


def sha256_rounds(data: str, rounds: int) -> dict[str, Any]:
    """The same work as mcpp's built-in sha256 handler."""
    digest = data.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {"digest": digest.hex(), "rounds": rounds}


def _echo(x: Any) -> Any:
    return x


def _lat(ms: list[float]) -> dict[str, float]:
    return {"task_rtt_p50_ms": round(statistics.median(ms), 3), "task_rtt_p99_ms": round(percentile(ms, 99) or 0, 3)}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _tree_rss_mb(pids: list[int]) -> float:
    seen: set[int] = set()
    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            for q in [p, *p.children(recursive=True)]:
                if q.pid not in seen:
                    seen.add(q.pid)
                    total += q.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return round(total / 2**20, 1)


def _timed(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return round(n / (time.perf_counter() - t0), 1)


# ---- Celery -----------------------------------------------------------------------------
_CELERY_APP = '''
import os
from celery import Celery
from mcpp.evidence.bench_peers import sha256_rounds

app = Celery("mcppbench", broker=os.environ["MCPP_BENCH_REDIS"], backend=os.environ["MCPP_BENCH_REDIS"])
app.conf.update(result_expires=3600, broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                task_ignore_result=False, worker_prefetch_multiplier=4)


@app.task
def echo(x):
    return x


@app.task
def sha256(data, rounds):
    return sha256_rounds(data, rounds)
'''


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def measure_celery(tmp: Path, counts: PeerCounts) -> dict[str, Any]:
    redis = shutil.which("redis-server")
    if redis is None:
        return {"skipped": "redis-server is not installed (apt-get install redis-server; setup.sh does it)"}
    if _version("celery") == "not installed":
        return {"skipped": "celery is not installed (pip install -e '.[peers]')"}
    d = tmp / "celery"
    d.mkdir(parents=True, exist_ok=True)
    (d / "mcpp_celery_app.py").write_text(_CELERY_APP)
    port = free_ports(1)[0]
    url = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "MCPP_BENCH_REDIS": url, "PYTHONPATH": str(d)}
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.perf_counter()
    try:
        procs.append(subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL))
        _wait_port(port, 10)
        for i in range(3):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "mcpp_celery_app", "worker", "-P", "threads", "-c", "4",
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"w{i}@%h",
                 "--loglevel", "WARNING"], cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        sys.path.insert(0, str(d))
        os.environ["MCPP_BENCH_REDIS"] = url
        import mcpp_celery_app as capp  # noqa: I001 (written above)

        capp.echo.delay(0).get(timeout=60)
        startup = time.perf_counter() - t0
        time.sleep(2)
        idle = _tree_rss_mb([p.pid for p in procs])
        for i in range(50):
            capp.echo.delay(i).get(timeout=30)
        lat = []
        for i in range(counts.rtt):
            a = time.perf_counter()
            capp.echo.delay(i).get(timeout=30)
            lat.append((time.perf_counter() - a) * 1000)
        noop = _timed(lambda: [r.get(timeout=120) for r in [capp.echo.delay(i) for i in range(counts.noop)]],
                      counts.noop)
        cpu = _timed(lambda: [r.get(timeout=300) for r in
                              [capp.sha256.delay(f"t{i}", counts.rounds) for i in range(counts.cpu)]], counts.cpu)
        capp.app.close()
        return {**_lat(lat), "noop_tasks_per_s": noop, "cpu_tasks_per_s": cpu, "idle_rss_mb": idle,
                "startup_s": round(startup, 3), "version": _version("celery"), "redis": _redis_version(redis),
                "workers": "3 processes x 4 threads", "samples_ms": lat}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if str(d) in sys.path:
            sys.path.remove(str(d))
        sys.modules.pop("mcpp_celery_app", None)


def _redis_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else out.strip()


# ---- Dask -------------------------------------------------------------------------------
def measure_dask(tmp: Path, counts: PeerCounts) -> dict[str, Any]:
    if _version("distributed") == "not installed":
        return {"skipped": "dask distributed is not installed (pip install -e '.[bench]')"}
    import logging

    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    me = psutil.Process()
    base = me.memory_info().rss
    t0 = time.perf_counter()
    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=3, threads_per_worker=4, processes=True, dashboard_address=None, host="127.0.0.1",
        local_directory=str(tmp / "dask-peer"))
    with cluster, Client(cluster) as client:  # type: ignore[no-untyped-call]
        client.submit(_echo, 0, pure=False).result()
        startup = time.perf_counter() - t0
        time.sleep(2)
        idle = _tree_rss_mb([c.pid for c in me.children()]) + round((me.memory_info().rss - base) / 2**20, 1)
        for i in range(50):
            client.submit(_echo, i, pure=False).result()
        lat = []
        for i in range(counts.rtt):
            a = time.perf_counter()
            client.submit(_echo, i, pure=False).result()
            lat.append((time.perf_counter() - a) * 1000)
        noop = _timed(lambda: client.gather(client.map(_echo, range(counts.noop), pure=False)), counts.noop)
        cpu = _timed(lambda: client.gather(client.map(sha256_rounds, [f"t{i}" for i in range(counts.cpu)],
                                                      [counts.rounds] * counts.cpu, pure=False)), counts.cpu)
    return {**_lat(lat), "noop_tasks_per_s": noop, "cpu_tasks_per_s": cpu, "idle_rss_mb": idle,
            "startup_s": round(startup, 3), "version": _version("distributed"),
            "workers": "3 processes x 4 threads (scheduler in the client process, counted)", "samples_ms": lat}


# ---- Ray --------------------------------------------------------------------------------
def measure_ray(tmp: Path, counts: PeerCounts) -> dict[str, Any]:
    if _version("ray") == "not installed":
        return {"skipped": "ray is not installed (pip install -e '.[peers]')"}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except Exception as e:  # e.g. a wheel that does not load here
        return {"skipped": f"ray does not import here: {type(e).__name__}: {e}"}
    me = psutil.Process()
    base = me.memory_info().rss
    t0 = time.perf_counter()
    try:
        import logging

        ray.init(num_cpus=3, include_dashboard=False, _temp_dir="/tmp/mcpp-ray", logging_level=logging.ERROR,
                 log_to_driver=False)
    except Exception as e:
        return {"skipped": f"ray.init failed here: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    try:
        echo = ray.remote(_echo)
        sha = ray.remote(sha256_rounds)
        ray.get(echo.remote(0))
        startup = time.perf_counter() - t0
        time.sleep(2)
        idle = _tree_rss_mb([c.pid for c in me.children()]) + round((me.memory_info().rss - base) / 2**20, 1)
        for i in range(50):
            ray.get(echo.remote(i))
        lat = []
        for i in range(counts.rtt):
            a = time.perf_counter()
            ray.get(echo.remote(i))
            lat.append((time.perf_counter() - a) * 1000)
        noop = _timed(lambda: ray.get([echo.remote(i) for i in range(counts.noop)]), counts.noop)
        cpu = _timed(lambda: ray.get([sha.remote(f"t{i}", counts.rounds) for i in range(counts.cpu)]), counts.cpu)
        return {**_lat(lat), "noop_tasks_per_s": noop, "cpu_tasks_per_s": cpu, "idle_rss_mb": idle,
                "startup_s": round(startup, 3), "version": _version("ray"),
                "workers": "ray.init(num_cpus=3): up to 3 worker processes", "samples_ms": lat}
    finally:
        ray.shutdown()
