"""Security on real node processes: the MCP bearer token, loopback-only MCP without one, the
private network (swarm key), the peer allowlist, and a hand-made raw libp2p client that sends
malformed, truncated, oversized and unknown RPC messages to a node."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import multiaddr
import psutil
import pytest
import trio

from conftest import TOKEN, call, wait_until
from mcpp.net import identity
from mcpp.config import parse_swarm_key
from mcpp.harness import ProcessCluster, free_ports, node_status
from mcpp.mcp.client import ToolCallError
from mcpp.net.p2p import make_host, parse_peer_multiaddr
from mcpp.net.rpc import PROTOCOL, FrameReader, encode_frame

MCP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


def metric(base_url: str, name: str, labels: str = "", headers: dict[str, str] | None = None) -> float:
    """A counter's value from /metrics (0 if absent)."""
    text = httpx.get(base_url + "/metrics", headers=headers).text
    pat = re.compile(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", re.M)
    m = pat.search(text)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def sc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 2-node mesh with a token, a swarm key, an allowlist of its own peer ids (plus one
    'friend' key that holds the swarm key but is not listed) and protected metrics."""
    d = tmp_path_factory.mktemp("sec")
    (d / "keys").mkdir()
    ids = []
    for i in range(2):
        kp = identity.generate()
        identity.save(kp, d / "keys" / f"node-{i}.key")
        ids.append(identity.peer_id_of(kp))
    args = ["--allow-peers", *ids, "--protect-metrics", "--max-payload-bytes", "2048"]
    with ProcessCluster(2, d, node_args=args, token=TOKEN) as c:
        yield c


def _post(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(url, json=LIST_TOOLS, headers={**MCP_HEADERS, **headers}, timeout=5)


def test_mcp_needs_the_bearer_token_and_probes_stay_open(sc: ProcessCluster) -> None:
    """Injected: MCP requests with no token, a wrong token, the right token. Checked: 401 with a
    message that says what is missing, then a working session; probes open; failures counted."""
    n = sc.nodes[0]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = _post(n.mcp_url, {})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert "missing bearer token" in r.json()["message"]
    r = _post(n.mcp_url, {"Authorization": "Bearer " + "x" * 43})
    assert r.status_code == 401 and "wrong bearer token" in r.json()["message"]
    assert _post(n.mcp_url, {"Authorization": TOKEN}).status_code == 401  # no "Bearer " scheme
    with pytest.raises(Exception):
        call(n.mcp_url, "peer_list", {}, token="not-the-token-0123456789")
    assert call(n.mcp_url, "peer_list", {})["total"] == 1  # the conftest helper sends TOKEN
    for path in ("/healthz", "/readyz"):
        assert httpx.get(n.base_url + path).status_code == 200
    # --protect-metrics: /metrics and /status need the token too
    assert httpx.get(n.base_url + "/metrics").status_code == 401
    assert httpx.get(n.base_url + "/status").status_code == 401
    assert node_status(n.base_url, 2.0, auth) is not None
    assert metric(n.base_url, "mcpp_auth_failures_total", '{path="mcp"}', auth) >= 4
    assert metric(n.base_url, "mcpp_auth_failures_total", '{path="metrics"}', auth) >= 1


def test_without_a_token_mcp_binds_to_loopback_only(tmp_path: Path) -> None:
    """Injected: a node asked to serve MCP on 0.0.0.0 with no token. Checked: it says so at start
    and listens on 127.0.0.1 only (a non-loopback address of this machine is refused)."""
    p2p, port = free_ports(2)
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcpp", "node", "--role", "bootstrap", "--listen", f"/ip4/127.0.0.1/tcp/{p2p}",
             "--mcp-host", "0.0.0.0", "--mcp-port", str(port), "--data-dir", str(tmp_path / "d")],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: node_status(f"http://127.0.0.1:{port}") is not None, 30)
        assert "MCP bound to loopback only" in log.read_text()
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}
        others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for ip in others[:1]:
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://{ip}:{port}/healthz", timeout=2)
        # and with no token, a local client needs none
        assert call(f"http://127.0.0.1:{port}/mcp", "peer_list", {}, token=None)["total"] == 0
    finally:
        proc.terminate()
        proc.wait(15)


def _stranger(tmp_path: Path, boot_addr: str, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    p2p, port = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcpp", "node", "--role", "worker", "--listen", f"/ip4/127.0.0.1/tcp/{p2p}",
         "--mcp-port", str(port), "--data-dir", str(tmp_path / f"s{p2p}"), "--bootstrap", boot_addr,
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def test_a_stranger_without_the_swarm_key_cannot_join_discover_or_call(sc: ProcessCluster, tmp_path: Path) -> None:
    """Injected: a node with no swarm key, then one with a different key, both given the
    bootstrap's address. Checked for 6 s: neither connects, discovers or reaches a node by RPC
    (peer_connect fails), and no mesh node ever lists them."""
    boot = sc.nodes[0]
    other_key = tmp_path / "other.key"
    other_key.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 32 + "\n")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    strangers = [_stranger(tmp_path, boot.multiaddrs[0]), _stranger(tmp_path, boot.multiaddrs[0],
                                                                    "--swarm-key-file", str(other_key))]
    try:
        for _, url in strangers:
            wait_until(lambda: node_status(url) is not None, 30)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for _, url in strangers:
                st = node_status(url)
                assert st is not None and st["connected"] == [] and not st["ready"]
            for n in sc.nodes:
                st = node_status(n.base_url, 2.0, auth)
                assert st is not None and len(st["connected"]) == 1
            time.sleep(0.5)
        for _, url in strangers:
            with pytest.raises(ToolCallError, match="multiaddr|unreachable|connect"):
                call(url + "/mcp", "peer_connect", {"multiaddr": boot.multiaddrs[0], "retries": 0, "timeout_s": 3})
            assert call(url + "/mcp", "peer_discover", {"timeout_s": 2})["peers"] == []
    finally:
        for p, _ in strangers:
            p.terminate()
            p.wait(15)


def test_a_peer_with_the_key_but_not_in_allow_peers_is_refused(sc: ProcessCluster, tmp_path: Path) -> None:
    """Injected: a node that holds the swarm key but whose id is not in allow_peers. Checked: the
    mesh closes its connection, never lists it, and counts the refusal."""
    boot = sc.nodes[0]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = metric(boot.base_url, "mcpp_peers_refused_total", "", auth)
    proc, url = _stranger(tmp_path, boot.multiaddrs[0], "--swarm-key-file", str(sc.directory / "secrets" / "swarm.key"))
    try:
        wait_until(lambda: metric(boot.base_url, "mcpp_peers_refused_total", "", auth) > before, 30)
        for _ in range(10):
            for n in sc.nodes:
                st = node_status(n.base_url, 2.0, auth)
                assert st is not None and len(st["connected"]) == 1
            assert node_status(url) is not None and not node_status(url)["ready"]  # type: ignore[index]
            time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(15)


def test_raw_rpc_malformed_truncated_oversized_unknown(tmp_path: Path) -> None:
    """Injected, from a raw libp2p client holding the swarm key, on streams of the RPC protocol:
    an oversized frame header, a truncated frame, invalid JSON, JSON that is not a request, an
    unknown method, and 200 requests at once (over max_inflight_per_peer=8). Checked: error
    answers or stream resets as fitting; the node keeps serving (a ping on a fresh stream, an
    MCP call); limit hits counted in /metrics."""
    with ProcessCluster(1, tmp_path, token=TOKEN,
                        node_args=["--max-message-bytes", "65536", "--max-inflight-per-peer", "8"]) as c:
        n = c.nodes[0]
        assert c.swarm_key is not None
        results: dict[str, Any] = {}

        async def read_reply(stream: Any) -> Any:
            got = await FrameReader(lambda: stream.read(65536), 1 << 20).next_frame()
            return None if got is None else got[0]

        async def expect_reset(stream: Any) -> bool:
            with trio.fail_after(5):
                try:
                    while await stream.read(100):
                        pass
                except Exception:
                    return True
            return True  # EOF: closed by the node

        async def go() -> None:
            host = make_host(identity.generate(), psk=parse_swarm_key(c.swarm_key or ""))
            async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                info = parse_peer_multiaddr(n.multiaddrs[0])
                await host.connect(info)
                pid = info.peer_id

                async def fresh() -> Any:
                    return await host.new_stream(pid, [PROTOCOL])

                s = await fresh()
                await s.write(struct.pack(">I", 10_000_000))  # oversized
                results["oversized_reset"] = await expect_reset(s)
                s = await fresh()
                await s.write(struct.pack(">I", 100) + b'{"i": 1')  # truncated, then close our side
                await s.close()
                results["truncated_reset"] = await expect_reset(s)
                s = await fresh()
                await s.write(struct.pack(">I", 5) + b"{oops")  # not JSON
                results["bad_json_reset"] = await expect_reset(s)
                s = await fresh()
                await s.write(encode_frame(["not", "a", "request"]))
                results["not_request"] = await read_reply(s)
                await s.write(encode_frame({"i": 7, "m": "no_such_method", "p": None}))
                results["unknown"] = await read_reply(s)
                await s.write(encode_frame({"i": 8, "m": "q.submit", "p": {"garbage": True}}))
                results["bad_params"] = await read_reply(s)
                # 200 requests at once on 4 streams: served, but never more than 8 at a time
                streams = [await fresh() for _ in range(4)]
                for k, st in enumerate(streams):
                    await st.write(b"".join(encode_frame({"i": 1000 * k + j, "m": "echo", "p": j}) for j in range(50)))
                answered = 0
                for st in streams:
                    reader = FrameReader(lambda st=st: st.read(65536), 1 << 20)
                    for _ in range(50):
                        got = await reader.next_frame()
                        assert got is not None and "r" in got[0]
                        answered += 1
                results["answered"] = answered
                s = await fresh()
                await s.write(encode_frame({"i": 9, "m": "ping", "p": None}))
                results["ping_after"] = await read_reply(s)
                await host.close()

        trio.run(go)
        assert results["oversized_reset"] and results["truncated_reset"] and results["bad_json_reset"]
        assert results["not_request"]["e"]["c"] == "bad_request"
        assert results["unknown"] == {"i": 7, "e": {"c": "unknown_method", "m": "no rpc method 'no_such_method'"}}
        assert "e" in results["bad_params"] and results["bad_params"]["i"] == 8
        assert results["answered"] == 200
        assert results["ping_after"]["i"] == 9 and "r" in results["ping_after"]
        assert call(n.mcp_url, "peer_metrics", {})["peer_id"] == n.peer_id  # still serving MCP
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert metric(n.base_url, "mcpp_limit_hits_total", '{limit="rpc_frame"}', auth) >= 3
        assert metric(n.base_url, "mcpp_limit_hits_total", '{limit="max_inflight_per_peer"}', auth) >= 1


def test_payload_limit_is_an_argument_error_and_counted(sc: ProcessCluster) -> None:
    """Injected: a task payload over max_payload_bytes (2048 here). Checked: a tool error that
    names `payload` and the setting; counted as mcpp_limit_hits_total{limit="max_payload_bytes"}."""
    n = sc.nodes[1]
    with pytest.raises(ToolCallError, match=r"payload: \d+ bytes is over the limit of 2048 \(max_payload_bytes\)"):
        call(n.mcp_url, "task_submit", {"task_type": "echo", "payload": {"x": "y" * 5000}})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert metric(n.base_url, "mcpp_limit_hits_total", '{limit="max_payload_bytes"}', auth) >= 1
