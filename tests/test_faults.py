"""Faults on real processes: kill -9, restart with the same identity, persistent links, SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from mcpp.harness import ProcessCluster, node_status

from conftest import call, wait_until


def _connected(url: str) -> set[str]:
    return {p["peer_id"] for p in call(url, "peer_list", {"status": "all"})["peers"]}


def test_kill9_leaves_tables_and_bootstrap_restart_reforms(tmp_path: Path) -> None:
    with ProcessCluster(5, tmp_path) as c:
        victim = c.record("node-4")
        others = [n for n in c.nodes if n.name != "node-4"]
        c.kill("node-4", signal.SIGKILL)
        t0 = time.monotonic()
        for n in others:
            wait_until(lambda n=n: victim.peer_id not in _connected(n.mcp_url), 5 - (time.monotonic() - t0))
        took = time.monotonic() - t0
        assert took < 5, took

        # bootstrap: clean stop (exit 0), then restart with the same identity
        boot = c.record("node-0")
        c.kill("node-0", signal.SIGTERM)
        assert c.exit_code("node-0") == 0
        for n in others[1:]:
            wait_until(lambda n=n: boot.peer_id not in _connected(n.mcp_url), 5)
        again = c.restart("node-0")
        assert again.peer_id == boot.peer_id  # stable identity across restarts
        workers = {n.peer_id for n in others[1:]}
        wait_until(lambda: workers <= _connected(again.mcp_url), 15)
        for n in others[1:]:
            wait_until(lambda n=n: boot.peer_id in _connected(n.mcp_url), 15)

        # a restarted worker comes back under its own identity and the mesh re-forms
        c.restart("node-4")
        c.wait_formed(20)


def test_persistent_peer_is_kept_and_redialed(tmp_path: Path) -> None:
    with ProcessCluster(3, tmp_path) as c:
        a, b = c.record("node-1"), c.record("node-2")
        res = call(a.mcp_url, "peer_connect", {"peer_id": b.peer_id, "persistent": True})
        assert res["persistent"] is True
        c.kill("node-2", signal.SIGKILL)

        def b_known_not_connected() -> bool:
            peers = {p["peer_id"]: p for p in call(a.mcp_url, "peer_list", {"status": "known"})["peers"]}
            return b.peer_id in peers and peers[b.peer_id]["connected"] is False

        wait_until(b_known_not_connected, 5)
        c.restart("node-2")
        wait_until(lambda: b.peer_id in {p["peer_id"] for p in call(a.mcp_url, "peer_list")["peers"]}, 15)
        # a graceful disconnect clears persistent: the peer leaves the table entirely
        call(a.mcp_url, "peer_disconnect", {"peer_id": b.peer_id})
        assert b.peer_id not in _connected(a.mcp_url)


def test_readyz_is_503_until_joined_and_sigterm_exits_0(tmp_path: Path) -> None:
    """A worker whose bootstrap is not up yet is alive but not ready."""
    import subprocess
    import sys

    from mcpp import identity
    from mcpp.harness import free_ports

    key = tmp_path / "boot.key"
    kp = identity.generate()
    identity.save(kp, key)
    p2p, mcp_w, mcp_b = free_ports(3)
    boot_addr = f"/ip4/127.0.0.1/tcp/{p2p}/p2p/{identity.peer_id_of(kp)}"
    base = [sys.executable, "-m", "mcpp", "node", "--data-dir", str(tmp_path / "d")]
    worker = subprocess.Popen(base + ["--bootstrap", boot_addr, "--mcp-port", str(mcp_w)], stderr=subprocess.DEVNULL)
    boot = None
    try:
        import httpx

        url = f"http://127.0.0.1:{mcp_w}"
        wait_until(lambda: node_status(url) is not None, 20)
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/readyz").status_code == 503
        boot = subprocess.Popen(
            base + ["--role", "bootstrap", "--identity", str(key), "--listen", f"/ip4/127.0.0.1/tcp/{p2p}",
                    "--mcp-port", str(mcp_b)],
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 20)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0
        boot.send_signal(signal.SIGINT)
        assert boot.wait(10) == 0
    finally:
        for p in (worker, boot):
            if p is not None and p.poll() is None:
                p.kill()


def test_cold_exec_nodes_form_a_mesh_too(tmp_path: Path) -> None:
    """Without the fork server every node is a fresh `python -m mcpp node` (as in containers)."""
    with ProcessCluster(3, tmp_path, fork_server=False) as c:
        ids = {n.peer_id for n in c.nodes}
        for n in c.nodes:
            assert set(node_status(n.base_url)["connected"]) == ids - {n.peer_id}
        assert all(n.pid == c._procs[n.name].popen.pid for n in c.nodes)  # type: ignore[union-attr]
