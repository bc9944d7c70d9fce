"""A real 5-node mesh (processes on loopback) driven through a real MCP client over HTTP."""

from __future__ import annotations

import re

import httpx
import pytest

from mcpp.harness import ProcessCluster, node_status
from mcpp.mcp.client import ToolCallError

from conftest import TOKEN, call, call_raw, wait_until

TOOLS = {"peer_discover", "peer_connect", "peer_disconnect", "peer_list", "peer_metrics", "bootstrap_network"}


def test_mesh_forms_through_the_dht(cluster: ProcessCluster) -> None:
    ids = {n.peer_id for n in cluster.nodes}
    boot = cluster.nodes[0]
    for n in cluster.nodes:
        listed = call(n.mcp_url, "peer_list", {"status": "connected"})
        assert {p["peer_id"] for p in listed["peers"]} == ids - {n.peer_id}
    # workers were told only the bootstrap's address, yet know each other
    w1, w2 = cluster.nodes[1], cluster.nodes[2]
    argv = " ".join(cluster._procs["node-1"].argv)
    assert w2.peer_id not in argv and boot.peer_id in argv
    peers = {p["peer_id"]: p for p in call(w1.mcp_url, "peer_list", {"status": "all"})["peers"]}
    assert peers[w2.peer_id]["connected"] and peers[w2.peer_id]["role"] == "worker"
    assert peers[boot.peer_id]["role"] == "bootstrap"


def test_every_node_serves_the_peer_tools_and_probes(cluster: ProcessCluster) -> None:
    import trio
    from mcpp.mcp.client import open_client

    async def names(url: str) -> set[str]:
        async with open_client(url, TOKEN) as c:
            return {t.name for t in (await c.list_tools()).tools}

    call(cluster.nodes[1].mcp_url, "peer_list")
    for n in cluster.nodes:
        assert TOOLS <= trio.run(names, n.mcp_url)
        assert httpx.get(n.base_url + "/healthz").status_code == 200
        assert httpx.get(n.base_url + "/readyz").status_code == 200
    metrics = httpx.get(cluster.nodes[1].base_url + "/metrics").text
    assert 'mcpp_peers{state="connected"} 4.0' in metrics
    assert "mcpp_rpc_latency_seconds_bucket" in metrics
    assert 'mcpp_tool_calls_total{outcome="ok",tool="peer_list"}' in metrics


def test_peer_list_has_measured_latency_sorting_and_paging(cluster: ProcessCluster) -> None:
    url = cluster.nodes[3].mcp_url
    wait_until(lambda: all(p["latency_ms"] for p in call(url, "peer_list")["peers"]), 10)
    # latency is the median of the samples: the first one may come from a loaded moment of the
    # mesh's forming (207 ms once in CI), so the check waits for a few more (one ping per peer/2 s)
    lats: list[float] = []

    def measured() -> bool:
        lats[:] = [p["latency_ms"] for p in call(url, "peer_list", {"sort_by": "latency"})["peers"]]
        return lats == sorted(lats) and all(0 < x < 100 for x in lats)

    wait_until(measured, 15)
    assert any(x != round(x) for x in lats)  # sub-millisecond resolution, not whole ms
    page = call(url, "peer_list", {"limit": 2, "offset": 1})
    assert page["count"] == 2 and page["total"] == 4 and page["has_more"] is True
    last = call(url, "peer_list", {"limit": 2, "offset": 3})
    assert last["count"] == 1 and last["has_more"] is False
    assert call(url, "peer_list", {"capability": "no-such-cap"})["total"] == 0
    rep = call(url, "peer_list", {"sort_by": "reputation"})["peers"]
    assert all(0 <= p["reputation"] <= 1 for p in rep)


def test_peer_discover_finds_peers_now_with_metrics(cluster: ProcessCluster) -> None:
    w = cluster.nodes[4]
    res = call(w.mcp_url, "peer_discover", {"include_metrics": True, "max_peers": 20})
    found = {p["peer_id"]: p for p in res["peers"]}
    assert set(found) == {n.peer_id for n in cluster.nodes} - {w.peer_id}
    for p in found.values():
        assert p["multiaddrs"] and p["metrics"]["rtt_ms"] > 0
        assert 0 < p["metrics"]["quality"] <= 1
    assert call(w.mcp_url, "peer_discover", {"max_peers": 2})["count"] == 2
    assert call(w.mcp_url, "peer_discover", {"capability_filter": ["gpu-nope"]})["count"] == 0


def test_peer_metrics_per_peer_and_totals(cluster: ProcessCluster) -> None:
    a, b = cluster.nodes[1], cluster.nodes[2]
    m = call(a.mcp_url, "peer_metrics", {"peer_id": b.peer_id, "include_history": True})
    assert m["connected"] and m["rtt_samples"] >= 1 and len(m["history"]) == m["rtt_samples"]
    assert 0 < m["rtt_p50_ms"] <= m["rtt_p99_ms"] < 1000
    assert m["bytes_in"] > 0 and m["bytes_out"] > 0 and m["reliability"] > 0.9
    assert m["connected_since"] > 0 and 0 < m["quality"] <= 1
    own = call(a.mcp_url, "peer_metrics")
    assert own["peer_id"] == a.peer_id and own["peers_connected"] == 4
    assert 20 < own["rss_mb"] < 1000 and own["uptime_s"] > 0 and own["cpu_seconds"] > 0


def test_disconnect_then_connect_by_multiaddr_and_by_peer_id(cluster: ProcessCluster) -> None:
    a, b = cluster.nodes[3], cluster.nodes[4]
    res = call(a.mcp_url, "peer_disconnect", {"peer_id": b.peer_id, "reason": "test"})
    assert res == {"peer_id": b.peer_id, "disconnected": True, "reason": "test"}
    connected = lambda: {p["peer_id"] for p in call(a.mcp_url, "peer_list")["peers"]}  # noqa: E731
    assert b.peer_id not in connected()
    res = call(a.mcp_url, "peer_connect", {"multiaddr": b.multiaddrs[0]})
    assert res["connected"] is True and res["peer_id"] == b.peer_id and res["attempts"] == 1
    assert 0 < res["rtt_ms"] < 100
    assert b.peer_id in connected()
    call(a.mcp_url, "peer_disconnect", {"peer_id": b.peer_id})
    res = call(a.mcp_url, "peer_connect", {"peer_id": b.peer_id})  # resolved without a multiaddr
    assert res["connected"] is True
    wait_until(lambda: len(node_status(a.base_url)["connected"]) == 4, 10)


def test_bootstrap_network(cluster: ProcessCluster) -> None:
    w, boot = cluster.nodes[2], cluster.nodes[0]
    res = call(w.mcp_url, "bootstrap_network", {})
    assert res["connected"][0]["peer_id"] == boot.peer_id and res["satisfied"] is True
    assert res["routing_table_size"] >= 1 and res["failed"] == []
    # an unknown id at a dead address fails, with the reason
    other = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDthUNWqLdZyD5RBNCLtEBc838v3kGDrbov6wHv5VjkvW"
    res = call(w.mcp_url, "bootstrap_network", {"bootstrap_peers": [other], "min_connections": 1, "timeout_s": 3})
    assert res["satisfied"] is False and res["failed"][0]["multiaddr"] == other and res["failed"][0]["error"]


@pytest.mark.parametrize(
    ("tool", "args", "argument"),
    [
        ("peer_connect", {}, "peer_id"),
        ("peer_connect", {"multiaddr": "not-a-multiaddr"}, "multiaddr"),
        ("peer_connect", {"multiaddr": "/ip4/127.0.0.1/tcp/1"}, "multiaddr"),
        ("peer_connect", {"peer_id": "Qm-nope"}, "peer_id"),
        ("peer_connect", {"peer_id": "12D3KooWDthUNWqLdZyD5RBNCLtEBc838v3kGDrbov6wHv5VjkvW", "timeout_s": 1}, "peer_id"),
        ("peer_connect", {"multiaddr": "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDthUNWqLdZyD5RBNCLtEBc838v3kGDrbov6wHv5VjkvW", "timeout_s": 1, "retries": 1}, "multiaddr"),
        ("peer_connect", {"peer_id": "12D3KooWDthUNWqLdZyD5RBNCLtEBc838v3kGDrbov6wHv5VjkvW", "retries": -1}, "retries"),
        ("peer_disconnect", {"peer_id": "12D3KooWDthUNWqLdZyD5RBNCLtEBc838v3kGDrbov6wHv5VjkvW"}, "peer_id"),
        ("peer_list", {"limit": 0}, "limit"),
        ("peer_list", {"limit": 1001}, "limit"),
        ("peer_list", {"sort_by": "age"}, "sort_by"),
        ("peer_list", {"status": "zombie"}, "status"),
        ("peer_list", {"limit": "ten"}, "limit"),
        ("peer_metrics", {"peer_id": "12D3KooWDthUNWqLdZyD5RBNCLtEBc838v3kGDrbov6wHv5VjkvW"}, "peer_id"),
        ("peer_discover", {"max_peers": 0}, "max_peers"),
        ("peer_discover", {"capability_filter": [""]}, "capability_filter[0]"),
        ("bootstrap_network", {"bootstrap_peers": ["/ip4/1.2.3.4/tcp/1"]}, "bootstrap_peers[0]"),
        ("bootstrap_network", {"min_connections": -1}, "min_connections"),
        ("bootstrap_network", {"bootstrap_peers": ["/ip4/127.0.0.1/tcp/1/p2p/x"] * 101}, "bootstrap_peers"),
        ("peer_connect", {"peer_id": "12D3KooWDthUNWqLdZyD5RBNCLtEBc838v3kGDrbov6wHv5VjkvW", "timeout_s": 1e308}, "timeout_s"),
        ("peer_list", {"offset": -1}, "offset"),
        ("peer_discover", {"max_peers": 10**9}, "max_peers"),
        ("peer_discover", {"timeout_s": 0}, "timeout_s"),
        ("peer_discover", {"capability_filter": "gpu"}, "capability_filter"),
        ("peer_list", {"status": ["connected"]}, "status"),
    ],
)
def test_bad_input_is_a_tool_error_naming_the_argument(
    cluster: ProcessCluster, tool: str, args: dict, argument: str
) -> None:
    url = cluster.nodes[1].mcp_url
    res = call_raw(url, tool, args)
    assert res.is_error
    text = res.content[0].text
    # the message names the argument first ("...: limit: must be ..."), or pydantic's
    # "validation error ...\nlimit\n  Input should be ..."; never an internal error
    assert re.search(rf"(: |\n){re.escape(argument)}(: |\n)", text), text
    assert "internal error" not in text
    with pytest.raises(ToolCallError):
        call(url, tool, args)
    assert call(url, "peer_list")["total"] >= 1  # and the node keeps serving
