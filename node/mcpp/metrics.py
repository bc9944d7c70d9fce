"""Prometheus metrics of one node, in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["NodeMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LAT_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.peers = Gauge("mcpp_peers", "Peers in this node's table", ["state"], registry=r)
        self.rpc_calls = Counter("mcpp_rpc_calls", "Outbound RPC calls", ["method", "outcome"], registry=r)
        self.rpc_latency = Histogram(
            "mcpp_rpc_latency_seconds", "Outbound RPC latency", ["method"], buckets=_LAT_BUCKETS, registry=r
        )
        self.tool_calls = Counter("mcpp_tool_calls", "MCP tool calls", ["tool", "outcome"], registry=r)
        self.tool_latency = Histogram(
            "mcpp_tool_latency_seconds", "MCP tool call latency", ["tool"], buckets=_LAT_BUCKETS, registry=r
        )
        self.ready = Gauge("mcpp_ready", "1 once the node has joined the mesh", registry=r)
        self.limit_hits = Counter(
            "mcpp_limit_hits", "Requests refused by a configured limit (the label names it)", ["limit"], registry=r
        )
        self.auth_failures = Counter(
            "mcpp_auth_failures", "HTTP requests refused for a missing or wrong bearer token", ["path"], registry=r
        )
        self.members = Gauge("mcpp_members", "Members of the mesh this node knows, by state", ["state"], registry=r)
        self.gossip_messages = Counter(
            "mcpp_gossip_messages", "Membership messages (push, sync) sent and received, and closes for the degree",
            ["kind"], registry=r,
        )
        self.loop_lag = Gauge(
            "mcpp_loop_lag_seconds", "Event-loop lag (a decaying peak): what the local health multiplier follows",
            registry=r,
        )
        self.peers_refused = Counter(
            "mcpp_peers_refused", "Connections or streams refused: peer not in allow_peers", registry=r
        )

    def observe_rpc(self, peer_id: str, method: str, outcome: str, seconds: float) -> None:
        self.rpc_calls.labels(method, outcome).inc()
        self.rpc_latency.labels(method).observe(seconds)

    def observe_tool(self, tool: str, outcome: str, seconds: float) -> None:
        self.tool_calls.labels(tool, outcome).inc()
        self.tool_latency.labels(tool).observe(seconds)

    def limit_hit(self, limit: str) -> None:
        self.limit_hits.labels(limit).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
