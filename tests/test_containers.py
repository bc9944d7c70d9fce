"""Containers: the node image (built here, nothing pulled), the Docker backend of the harness,
Compose, and faults injected with docker (kill, restart, network disconnect, pause).

Needs Docker Engine. Without it these tests skip on a developer machine and fail under CI.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from conftest import TOKEN, call, status_or_none, wait_until
from test_secrets import fresh_clone, secrets_init
from mcpp.harness import free_ports, read_cluster_file
from mcpp.harness.docker import DockerCluster, reap
from mcpp.harness.image import IMAGE_TAG, SOURCE_LABEL, ImageBuild, build_image, source_digest, stale_image_hint

REPO = Path(__file__).parent.parent
BUILTIN = ["echo", "sleep", "sha256", "fail"]


def _docker_ok() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def node_image() -> ImageBuild:
    if not _docker_ok():
        if os.environ.get("CI"):
            pytest.fail("Docker Engine is needed for the container tests")
        pytest.skip("no Docker Engine here")
    reap()  # containers and networks a crashed earlier run left behind
    return build_image(say=lambda m: None)


@pytest.fixture(scope="module")
def dc(node_image: ImageBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerCluster]:
    with DockerCluster(4, tmp_path_factory.mktemp("dc4"), env={"MCPP_LEASE_S": "1.5"}, token=TOKEN) as c:
        yield c


def register(c: DockerCluster, caps: dict[int, list[str]]) -> None:
    for i, n in enumerate(c.nodes):
        call(n.mcp_url, "worker_register", {"capabilities": caps.get(i, BUILTIN)})

    def seen() -> bool:
        ws = call(c.nodes[0].mcp_url, "worker_status", {})["workers"]
        want = {n.peer_id: caps.get(i, BUILTIN) for i, n in enumerate(c.nodes)}
        return len(ws) == len(c.nodes) and all(w["capabilities"] == want[w["peer_id"]] for w in ws)

    wait_until(seen, 15)
    time.sleep(0.3)


def result(url: str, task_id: str, timeout_s: float = 40) -> dict[str, Any]:
    return call(url, "task_result", {"task_id": task_id, "wait": True, "timeout_s": timeout_s, "include_history": True})


def running_on(url: str, task_id: str) -> str:
    wait_until(lambda: call(url, "task_status", {"task_id": task_id})["status"] == "running", 15)
    return str(call(url, "task_status", {"task_id": task_id})["assigned_worker"])


def name_of(c: DockerCluster, peer_id: str) -> str:
    return next(n.name for n in c.nodes if n.peer_id == peer_id)


UNHEALTHY_WITHIN_S = 45  # node/Dockerfile: 3 retries x (10 s interval + 3 s timeout) = 39 s, + Docker starting each probe


def health(c: Any) -> str:
    c.reload()
    return str(c.attrs["State"].get("Health", {}).get("Status"))


def test_image_runs_non_root_and_its_probe_reports_a_hung_node_unhealthy(node_image: ImageBuild) -> None:
    """The image's health probe needs no Python (bash's /dev/tcp to /healthz). Injected: SIGSTOP
    to the node process of a healthy container, so that its MCP server stops answering (the port
    still accepts connections: the probe has to time out). Checked: unhealthy within the
    documented 45 s, healthy again after SIGCONT."""
    client = docker.from_env()
    try:
        cfg = client.images.get(IMAGE_TAG).attrs["Config"]
        assert cfg["User"] == "10001:10001"
        assert {"4001/tcp", "8765/tcp"} <= set(cfg["ExposedPorts"])
        probe = cfg["Healthcheck"]["Test"]
        assert probe[:3] == ["CMD", "bash", "-c"] and "/dev/tcp/" in probe[3] and "python" not in probe[3], probe
        hc = cfg["Healthcheck"]
        assert hc["Retries"] * (hc["Interval"] + hc["Timeout"]) / 1e9 == 39 < UNHEALTHY_WITHIN_S
        # the image records which sources it holds: the harness refuses a stale one
        assert cfg["Labels"][SOURCE_LABEL] == source_digest(REPO) and stale_image_hint(IMAGE_TAG) is None
        c = client.containers.run(IMAGE_TAG, detach=True, environment={"MCPP_ROLE": "bootstrap"},
                                  labels={"mcpp.harness": "1"})
        try:
            wait_until(lambda: health(c) == "healthy", 40, 0.5)
            top = c.top(ps_args="-o pid,uid,args")["Processes"]
            assert any("mcpp node" in p[-1] for p in top), top
            assert {p[1] for p in top} == {"10001"}, f"every process runs as uid 10001: {top}"
            pid = int(c.attrs["State"]["Pid"])
            os.kill(pid, signal.SIGSTOP)
            try:
                took = wait_until(lambda: health(c) == "unhealthy", UNHEALTHY_WITHIN_S, 0.25)
            finally:
                os.kill(pid, signal.SIGCONT)
            print(f"unhealthy {took:.1f} s after the node stopped answering")
            wait_until(lambda: health(c) == "healthy", 15, 0.5)
        finally:
            c.remove(force=True, v=True)
    finally:
        client.close()


def test_docker_backend_forms_the_mesh_through_the_dht(dc: DockerCluster) -> None:
    ids = {n.peer_id for n in dc.nodes}
    for n in dc.nodes:
        st = httpx.get(n.base_url + "/status").json()
        assert set(st["connected"]) == ids - {n.peer_id}
    client = docker.from_env()
    try:
        boot_id = dc.nodes[0].peer_id
        for n in dc.nodes:
            attrs = client.containers.get(dc.container_name(n.name)).attrs
            env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
            if n.role == "worker":  # a worker knows only the bootstrap
                assert env["MCPP_BOOTSTRAP"] == f"/dns4/node-0/tcp/4001/p2p/{boot_id}"
            bindings = attrs["HostConfig"]["PortBindings"]["8765/tcp"]
            assert [b["HostIp"] for b in bindings] == ["127.0.0.1"], "MCP is published on loopback only"
        containers = [client.containers.get(dc.container_name(n.name)) for n in dc.nodes]
        wait_until(lambda: all(health(c) == "healthy" for c in containers), 30, 0.5)  # the image's probe
    finally:
        client.close()
    data = read_cluster_file(dc.directory)
    assert data["backend"] == "docker" and data["run_id"] == dc.run_id
    assert [set(x) for x in data["nodes"]] == [{"name", "role", "peer_id", "multiaddrs", "mcp_url", "pid"}] * 4
    register(dc, {0: ["sleep"]})
    s = call(dc.nodes[0].mcp_url, "task_submit", {"task_type": "sha256", "payload": {"data": "c", "rounds": 10}})
    r = result(dc.nodes[2].mcp_url, s["task_id"])
    assert r["status"] == "completed" and r["worker"] in ids - {dc.nodes[0].peer_id}


def test_fault_docker_kill_a_worker_mid_task(dc: DockerCluster) -> None:
    """Injected: docker kill (SIGKILL) of the worker running a 3 s sleep task.
    Checked: the task completes on another container, with one "ok" in its history."""
    register(dc, {0: ["echo"]})
    url = dc.nodes[0].mcp_url
    s = call(url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 3}})
    victim = name_of(dc, running_on(url, s["task_id"]))
    dc.kill(victim)
    try:
        r = result(dc.nodes[1 if victim != "node-1" else 2].mcp_url, s["task_id"])
        assert r["status"] == "completed" and name_of(dc, r["worker"]) != victim
        assert [h["outcome"] for h in r["history"]] == ["lost", "ok"]
    finally:
        dc.restart(victim)
        dc.wait_formed(60)


def test_fault_docker_restart_the_bootstrap(dc: DockerCluster) -> None:
    """Injected: docker restart of the bootstrap while it owns 20 queued tasks.
    Checked: the mesh re-forms (every node sees the 3 others) and all 20 tasks complete."""
    register(dc, {})
    url = dc.nodes[0].mcp_url
    call(url, "queue_pause", {"reason": "before restart"})
    ids = [call(url, "task_submit", {"task_type": "echo", "payload": i})["task_id"] for i in range(20)]
    dc.restart("node-0")
    dc.wait_formed(60)
    for i, tid in enumerate(ids):
        r = result(dc.nodes[3].mcp_url, tid)
        assert r["status"] == "completed" and r["result"] == i


def test_fault_network_disconnect_for_10s(dc: DockerCluster) -> None:
    """Injected: docker network disconnect of the worker running a 4 s task, for 10 s.
    Checked: the task ends completed with exactly one "ok"; the mesh heals after reconnect."""
    register(dc, {0: ["echo"]})
    url = dc.nodes[0].mcp_url
    s = call(url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 4}})
    victim = name_of(dc, running_on(url, s["task_id"]))
    owned = call(dc.record(victim).mcp_url, "task_submit", {"task_type": "echo", "payload": 1})["task_id"]
    ip = dc.ip(victim)
    dc.disconnect(victim)
    try:
        time.sleep(10)
    finally:
        dc.connect(victim)
    assert dc.ip(victim) == ip  # a partition cuts links; the node keeps the address it advertises
    r = result(url, s["task_id"])
    assert r["status"] == "completed"
    assert [h["outcome"] for h in r["history"]].count("ok") == 1
    # node-0 failed to reach the victim while it was cut off; reads through it work again at once
    took = wait_until(lambda: status_or_none(url, "task_status", {"task_id": owned}) == "completed", 15, interval_s=0.5)
    print(f"task owned by the healed node read through node-0 after {took:.1f} s")
    dc.wait_formed(90)


def test_fault_docker_pause_past_the_lease(dc: DockerCluster) -> None:
    """Injected: docker pause of the worker running a 2 s task for 3x the lease (4.5 s), then unpause.
    Checked: the task completes elsewhere; the paused worker's late completion is not recorded."""
    register(dc, {0: ["echo"]})
    url = dc.nodes[0].mcp_url
    s = call(url, "task_submit", {"task_type": "sleep", "payload": {"seconds": 2}})
    victim = running_on(url, s["task_id"])
    dc.pause(name_of(dc, victim))
    try:
        time.sleep(4.5)
    finally:
        dc.unpause(name_of(dc, victim))
    r = result(url, s["task_id"])
    assert r["status"] == "completed" and r["worker"] != victim
    outcomes = [h["outcome"] for h in r["history"]]
    assert outcomes[0] == "lost" and outcomes[-1] == "ok" and outcomes.count("ok") == 1, outcomes
    assert all(h["worker"] == victim for h in r["history"] if h["outcome"] == "lost")
    time.sleep(2)  # the paused worker wakes up and reports its stale attempt
    again = call(url, "task_result", {"task_id": s["task_id"], "include_history": True})
    assert again["history"] == r["history"] and again["worker"] == r["worker"], "no second completion recorded"
    dc.wait_formed(60)


def _compose() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("neither `docker compose` nor `docker-compose` is installed")
    return [exe]


def test_compose_up_scale_3_runs_a_task_on_a_worker(node_image: ImageBuild, tmp_path: Path) -> None:
    """A fresh clone, `mcpp secrets init`, `compose up --scale worker=3`: the mesh runs on the
    generated token, swarm key and bootstrap identity (mode 0600 files read by the containers)."""
    port = free_ports(1)[0]
    project = f"mcpptest{os.getpid()}"
    clone = fresh_clone(tmp_path / "clone")
    init = secrets_init(clone)
    assert init.returncode == 0, init.stderr
    generated = clone / "bootstrap" / "secrets"
    token = (generated / "mcp-token").read_text()
    cmd = [*_compose(), "-f", "compose/docker-compose.yml", "-p", project]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MCPP_")}, "MCPP_MCP_PORT": str(port)}
    run = functools.partial(subprocess.run, cwd=clone, env=env, capture_output=True, text=True)
    up = run([*cmd, "up", "-d", "--scale", "worker=3"], timeout=180)
    try:
        assert up.returncode == 0, up.stderr
        url = f"http://127.0.0.1:{port}/mcp"

        def formed() -> bool:
            try:
                return len(httpx.get(f"http://127.0.0.1:{port}/status", timeout=2).json()["connected"]) == 3
            except (httpx.HTTPError, ValueError):
                return False

        wait_until(formed, 60, 0.5)
        refused = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                             headers={"accept": "application/json, text/event-stream"})
        assert refused.status_code == 401, "the compose mesh takes its token from the secret"
        boot = httpx.get(f"http://127.0.0.1:{port}/status").json()
        assert boot["peer_id"] == (generated / "bootstrap.peer-id").read_text(), "the generated identity"
        call(url, "worker_register", {"capabilities": ["sleep"]}, token=token)
        workers = set(boot["connected"])
        s = call(url, "task_submit", {"task_type": "echo", "payload": "compose"}, token=token)
        r = call(url, "task_result", {"task_id": s["task_id"], "wait": True, "timeout_s": 30}, token=token)
        assert r["status"] == "completed" and r["result"] == "compose" and r["worker"] in workers
        def all_healthy() -> bool:
            ps = run([*cmd, "ps"], timeout=60).stdout
            return ps.count("(healthy)") == 4

        wait_until(all_healthy, 30, 1)
        logs = run([*cmd, "logs", "--no-color"], timeout=60).stdout
        assert "node started" in logs and "DEVELOPMENT" not in logs
    finally:
        down = run([*cmd, "down", "-v"], timeout=120)
        assert down.returncode == 0, down.stderr
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                          capture_output=True, text=True).stdout.split()
    assert left == []


def test_cluster_up_backend_docker_cli(node_image: ImageBuild, tmp_path: Path) -> None:
    d = tmp_path / "c"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPP_")}
    up = subprocess.Popen([sys.executable, "-m", "mcpp", "cluster", "up", "--backend", "docker", "--nodes", "2",
                           "--dir", str(d)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: (d / "cluster.json").exists() or up.poll() is not None, 120, 0.5)
        assert up.poll() is None, up.stdout.read() if up.stdout else ""
        data = json.loads((d / "cluster.json").read_text())
        assert data["backend"] == "docker" and len(data["nodes"]) == 2
        assert call(data["nodes"][1]["mcp_url"], "peer_list", {}, token=data["token"])["total"] == 1
        down = subprocess.run([sys.executable, "-m", "mcpp", "cluster", "down", "--dir", str(d)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        up.wait(60)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(60)
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=mcpp.run={data['run_id']}"],
                          capture_output=True, text=True).stdout.split()
    assert left == []


def test_the_source_digest_follows_every_file_that_goes_into_the_image(tmp_path: Path) -> None:
    (tmp_path / "node" / "mcpp" / "queue").mkdir(parents=True)
    (tmp_path / "node" / "mcpp" / "workflow" / "templates").mkdir(parents=True)
    files = [tmp_path / "pyproject.toml", tmp_path / "node" / "Dockerfile", tmp_path / "node" / "mcpp" / "queue" / "x.py",
             tmp_path / "node" / "mcpp" / "workflow" / "templates" / "t.yaml"]
    for f in files:
        f.write_text("v1")
    seen = {source_digest(tmp_path)}
    for f in files:
        f.write_text(f.read_text() + "+")
        seen.add(source_digest(tmp_path))
    (tmp_path / "node" / "mcpp" / "notes.txt").write_text("not code")
    seen.add(source_digest(tmp_path))
    assert len(seen) == 5  # each change to what is built moved it; a non-source file did not
