"""Faults on real processes: kill -9, restart with the same identity, persistent links, SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from mcpp.harness import ProcessCluster, node_status

from conftest import TOKEN, call, error_of, status_or_none, wait_until


def _connected(url: str) -> set[str]:
    return {p["peer_id"] for p in call(url, "peer_list", {"status": "all"})["peers"]}


def test_kill9_leaves_tables_and_bootstrap_restart_reforms(tmp_path: Path) -> None:
    with ProcessCluster(5, tmp_path, token=TOKEN) as c:
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


def test_readyz_is_503_until_joined_and_sigterm_exits_0(tmp_path: Path) -> None:
    """A worker whose bootstrap is not up yet is alive but not ready; restarted on the same data
    dir it is the same peer."""
    import subprocess
    import sys

    from mcpp.net import identity
    from mcpp.harness import free_ports

    key = tmp_path / "boot.key"
    kp = identity.generate()
    identity.save(kp, key)
    p2p, mcp_w, mcp_b = free_ports(3)
    boot_addr = f"/ip4/127.0.0.1/tcp/{p2p}/p2p/{identity.peer_id_of(kp)}"
    base = [sys.executable, "-m", "mcpp", "node"]
    worker_argv = base + ["--data-dir", str(tmp_path / "w"), "--bootstrap", boot_addr, "--mcp-port", str(mcp_w)]
    worker = subprocess.Popen(worker_argv, stderr=subprocess.DEVNULL)
    boot = None
    try:
        import httpx

        url = f"http://127.0.0.1:{mcp_w}"
        wait_until(lambda: node_status(url) is not None, 20)
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/readyz").status_code == 503
        boot = subprocess.Popen(
            base + ["--data-dir", str(tmp_path / "b"), "--role", "bootstrap", "--identity", str(key),
                    "--listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--mcp-port", str(mcp_b)],
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 20)
        first_id = node_status(url)["peer_id"]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0
        # no --identity: the key was kept in the data dir, so the restarted worker is the same peer
        assert (tmp_path / "w" / "identity.key").exists()
        worker = subprocess.Popen(worker_argv, stderr=subprocess.DEVNULL)
        wait_until(lambda: (node_status(url) or {}).get("ready") is True, 20)
        assert node_status(url)["peer_id"] == first_id
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
    with ProcessCluster(3, tmp_path, fork_server=False, token=TOKEN) as c:
        ids = {n.peer_id for n in c.nodes}
        for n in c.nodes:
            assert set(node_status(n.base_url)["connected"]) == ids - {n.peer_id}
        assert all(n.pid == c._procs[n.name].popen.pid for n in c.nodes)  # type: ignore[union-attr]


def test_capabilities_are_advertised_in_the_dht_and_filtered(tmp_path: Path) -> None:
    with ProcessCluster(3, tmp_path, node_args=["--capabilities", "gpu", "sha256"], token=TOKEN) as c:
        w = c.record("node-2")
        others = {n.peer_id for n in c.nodes} - {w.peer_id}

        def found(f: list[str]) -> set[str]:
            return {p["peer_id"] for p in call(w.mcp_url, "peer_discover", {"capability_filter": f})["peers"]}

        wait_until(lambda: found(["gpu"]) == others, 15)
        peers = call(w.mcp_url, "peer_discover", {"capability_filter": ["gpu", "sha256"]})["peers"]
        assert all(set(p["capabilities"]) >= {"gpu", "sha256"} for p in peers) and len(peers) == 2
        assert found(["gpu", "tpu"]) == set()
        assert call(w.mcp_url, "peer_list", {"capability": "gpu"})["total"] == 2
        assert call(w.mcp_url, "peer_list", {"capability": "tpu"})["total"] == 0


def _outsider(tmp_path: Path, mesh_dir: Path) -> tuple[list[str], str, str, int]:
    """A node with no bootstrap list (it dials nobody by itself) that holds the mesh's swarm key
    and MCP token: argv, peer id, base url (/status; MCP at /mcp), p2p port."""
    import sys

    from mcpp.net import identity
    from mcpp.harness import free_ports

    key = tmp_path / "outsider.key"
    kp = identity.generate()
    identity.save(kp, key)
    p2p, mcp = free_ports(2)
    argv = [sys.executable, "-m", "mcpp", "node", "--role", "bootstrap", "--identity", str(key),
            "--listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--mcp-port", str(mcp), "--data-dir", str(tmp_path / "o"),
            "--swarm-key-file", str(mesh_dir / "secrets" / "swarm.key"),
            "--token-file", str(mesh_dir / "secrets" / "token")]
    return argv, identity.peer_id_of(kp), f"http://127.0.0.1:{mcp}", p2p


def test_persistent_link_to_a_node_outside_the_mesh_is_redialed(tmp_path: Path) -> None:
    """The outsider has no bootstrap list, so only `persistent` can bring the link back."""
    import subprocess

    with ProcessCluster(2, tmp_path / "mesh", token=TOKEN) as c:
        a = c.record("node-1")
        # outside the mesh's membership, but inside its private network: it holds the swarm key
        argv, outsider_id, outsider_url, p2p = _outsider(tmp_path, tmp_path / "mesh")
        out = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: node_status(outsider_url) is not None, 20)
            res = call(a.mcp_url, "peer_connect", {"multiaddr": f"/ip4/127.0.0.1/tcp/{p2p}/p2p/{outsider_id}",
                                                    "persistent": True})
            assert res["persistent"] is True
            out.kill()
            out.wait(10)
            known = lambda: {p["peer_id"]: p for p in call(a.mcp_url, "peer_list", {"status": "all"})["peers"]}  # noqa: E731
            wait_until(lambda: outsider_id in known() and known()[outsider_id]["connected"] is False, 5)
            out = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
            wait_until(lambda: known().get(outsider_id, {}).get("connected") is True, 20)
            assert a.peer_id in node_status(outsider_url)["connected"]  # it was dialed, it did not dial
            call(a.mcp_url, "peer_disconnect", {"peer_id": outsider_id})
            assert outsider_id not in known()
        finally:
            out.kill()
            out.wait(10)


def test_a_peer_that_failed_a_dial_is_reachable_again_as_soon_as_it_is_back(tmp_path: Path) -> None:
    """libp2p refuses to dial a peer for 60 s after one failed dial (its negative cache); an rpc
    call (here: reading a workflow through a node that does not own it) must reach the owner as
    soon as it is back, e.g. after a healed partition, without waiting for it to dial in."""
    import subprocess

    with ProcessCluster(2, tmp_path / "mesh", token=TOKEN) as c:
        a = c.record("node-1")
        argv, owner_id, owner_base, p2p = _outsider(tmp_path, tmp_path / "mesh")
        owner_url = owner_base + "/mcp"
        out = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: node_status(owner_base) is not None, 20)
            wid = call(owner_url, "workflow_submit", {"name": "w", "template": "diamond", "params": {"text": "x"}})["workflow_id"]
            assert call(owner_url, "workflow_result", {"workflow_id": wid, "wait": True, "timeout_s": 30})["status"] == "completed"
            call(a.mcp_url, "peer_connect", {"multiaddr": f"/ip4/127.0.0.1/tcp/{p2p}/p2p/{owner_id}"})
            assert call(a.mcp_url, "workflow_status", {"workflow_id": wid})["status"] == "completed"
            out.kill()
            out.wait(10)
            # the owner is down: the read fails with a clear error, and libp2p's dial fails
            wait_until(lambda: owner_id not in node_status(a.base_url)["connected"], 5)
            msg = error_of(a.mcp_url, "workflow_status", {"workflow_id": wid})
            assert "not reachable" in msg and "workflow_id" in msg, msg
            out = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
            wait_until(lambda: node_status(owner_base) is not None, 20)
            # it dials nobody and node-1 gave up on it (a gone peer is redialed every 30 s): the
            # read itself dials, at most DEMAND_REDIAL_S after the last failure
            took = wait_until(lambda: status_or_none(a.mcp_url, "workflow_status", {"workflow_id": wid}) == "completed", 4, interval_s=0.25)
            print(f"read again after {took:.2f} s")
            wait_until(lambda: a.peer_id in node_status(owner_base)["connected"], 5)  # and it is a peer again
        finally:
            out.kill()
            out.wait(10)
