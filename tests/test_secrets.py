"""`mcpp secrets init` and what reads it: every deployment gets its own MCP token, swarm key and
bootstrap identity, generated into a git-ignored folder; no committed secret is deployed unless
development mode is asked for by name (and then the node says so)."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mcpp.config import DEV_PEER_ID
from mcpp.harness import free_ports, node_status
from conftest import wait_until

REPO = Path(__file__).parent.parent
DEV = REPO / "bootstrap" / "dev"


def fresh_clone(dest: Path) -> Path:
    """The deployment files as a fresh clone has them: tracked (or new, not ignored) files only."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z",
                            "k8s", "compose", "bootstrap"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def secrets_init(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mcpp", "secrets", "init", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def kustomize(root: Path) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render k8s/ (it is on this machine's image)")
    return subprocess.run([kubectl, "kustomize", str(root / "k8s")], capture_output=True, text=True, timeout=60)


def dev_values() -> list[str]:
    """The committed development secrets (and the dev peer id), as text."""
    token = (DEV / "mcp-token").read_text().strip()
    swarm = (DEV / "swarm-key").read_text().split()[-1]
    key = base64.b64encode((DEV / "bootstrap.key").read_bytes()).decode()
    return [token, swarm, key, DEV_PEER_ID]


def rendered_text(manifests: str) -> str:
    """The manifests with every Secret's data decoded beside them: what a reader could find."""
    decoded = [base64.b64decode(v).decode(errors="replace") for o in yaml.safe_load_all(manifests)
               if o and o["kind"] == "Secret" for v in o.get("data", {}).values()]
    return manifests + "\n".join(decoded)


def test_init_writes_0600_secrets_refuses_to_overwrite_and_rotates_the_token_alone(tmp_path: Path) -> None:
    first = secrets_init(tmp_path)
    assert first.returncode == 0, first.stderr
    d = tmp_path / "bootstrap" / "secrets"
    peer_id = (d / "bootstrap.peer-id").read_text()
    assert f"bootstrap peer id: {peer_id}" in first.stdout and peer_id.startswith("12D3KooW")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("mcp-token", "swarm-key", "bootstrap.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    before = {n: (d / n).read_bytes() for n in ("mcp-token", "swarm-key", "bootstrap.key")}

    again = secrets_init(tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr and "already holds" in again.stderr
    assert {n: (d / n).read_bytes() for n in before} == before, "refused means untouched"

    rotated = secrets_init(tmp_path, "--rotate-token")
    assert rotated.returncode == 0, rotated.stderr
    assert (d / "mcp-token").read_bytes() != before["mcp-token"]
    assert (d / "swarm-key").read_bytes() == before["swarm-key"]
    assert (d / "bootstrap.key").read_bytes() == before["bootstrap.key"]
    assert stat.S_IMODE((d / "mcp-token").stat().st_mode) == 0o600

    forced = secrets_init(tmp_path, "--force")
    assert forced.returncode == 0, forced.stderr
    assert all((d / n).read_bytes() != before[n] for n in before)
    assert (d / "bootstrap.peer-id").read_text() != peer_id

    nothing = secrets_init(tmp_path, "--dir", "elsewhere", "--rotate-token")
    assert nothing.returncode == 2 and "mcpp secrets init" in nothing.stderr


def test_the_generated_folder_and_compose_env_are_ignored_by_git() -> None:
    out = subprocess.run(["git", "check-ignore", "bootstrap/secrets/mcp-token", "compose/.env"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.stdout.split() == ["bootstrap/secrets/mcp-token", "compose/.env"]


def test_k8s_renders_only_after_secrets_init_and_each_clone_gets_its_own(tmp_path: Path) -> None:
    a, b = fresh_clone(tmp_path / "a"), fresh_clone(tmp_path / "b")
    before = kustomize(a)
    assert before.returncode != 0 and "mcpp secrets init" in before.stderr, before.stderr
    committed = "\n".join((a / "k8s" / f).read_text() for f in os.listdir(a / "k8s"))
    for value in dev_values():
        assert value not in committed, "no secret value is committed under k8s/"
    renders = []
    for clone in (a, b):
        init = secrets_init(clone)
        assert init.returncode == 0, init.stderr
        out = kustomize(clone)
        assert out.returncode == 0, out.stderr
        assert "PEER-ID-FROM" not in out.stdout
        for value in dev_values():
            assert value not in rendered_text(out.stdout)
        peer_id = (clone / "bootstrap" / "secrets" / "bootstrap.peer-id").read_text()
        assert f"/p2p/{peer_id}" in out.stdout
        renders.append(out.stdout)
    for name in ("mcp-token", "swarm-key", "bootstrap.key"):
        assert (a / "bootstrap" / "secrets" / name).read_bytes() != (b / "bootstrap" / "secrets" / name).read_bytes()
    assert renders[0] != renders[1]


def test_compose_refuses_to_start_without_secrets_and_dev_mode_is_by_name(tmp_path: Path) -> None:
    exe = shutil.which("docker-compose")
    cmd = [exe] if exe else ["docker", "compose"]
    clone = fresh_clone(tmp_path / "c")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPP_")}
    up = subprocess.run([*cmd, "-f", "compose/docker-compose.yml", "-p", f"nosecrets{os.getpid()}", "up", "-d"],
                        cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode != 0 and "mcpp secrets init" in up.stderr, up.stderr
    dev = subprocess.run([*cmd, "--env-file", "compose/dev.env", "-f", "compose/docker-compose.yml", "config"],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=60)
    assert dev.returncode == 0, dev.stderr
    assert str(clone / "bootstrap" / "dev" / "mcp-token") in dev.stdout and DEV_PEER_ID in dev.stdout
    assert secrets_init(clone).returncode == 0
    config = subprocess.run([*cmd, "-f", "compose/docker-compose.yml", "config"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stderr
    peer_id = (clone / "bootstrap" / "secrets" / "bootstrap.peer-id").read_text()
    assert str(clone / "bootstrap" / "secrets" / "mcp-token") in config.stdout and f"/p2p/{peer_id}" in config.stdout
    assert "bootstrap/dev" not in config.stdout


@pytest.mark.parametrize("dev", [True, False])
def test_a_node_with_the_development_secrets_says_so(tmp_path: Path, dev: bool) -> None:
    p2p, port = free_ports(2)
    if dev:
        secrets = ["--token-file", str(DEV / "mcp-token"), "--swarm-key-file", str(DEV / "swarm-key"),
                   "--identity", str(DEV / "bootstrap.key")]
    else:
        assert secrets_init(tmp_path, "--dir", "s").returncode == 0
        s = tmp_path / "s"
        secrets = ["--token-file", str(s / "mcp-token"), "--swarm-key-file", str(s / "swarm-key"),
                   "--identity", str(s / "bootstrap.key")]
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mcpp", "node", "--role", "bootstrap", "--listen",
                                 f"/ip4/127.0.0.1/tcp/{p2p}", "--mcp-port", str(port), "--data-dir",
                                 str(tmp_path / "d"), *secrets], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: node_status(f"http://127.0.0.1:{port}") is not None or proc.poll() is not None, 30)
        wait_until(lambda: "node started" in log.read_text(), 10)
        text = log.read_text()
        if dev:
            (line,) = [ln for ln in text.splitlines() if "DEVELOPMENT secrets" in ln]
            assert "WARNING" in line.upper() and all(w in line for w in ("token", "swarm_key", "identity")), line
        else:
            assert "DEVELOPMENT" not in text
    finally:
        proc.terminate()
        proc.wait(15)
