"""The node's core: its identity and facts, the peer table and RPC endpoint, the hello/ping
handlers, and the state the other parts of the node share.

`Node` is built in layers, one module each: core (this) -> connections (dials, liveness, lost
peers) -> discovery (DHT provide/find) -> node (the loops and the peer operations). Only the
node's trio loop touches it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import multiaddr
import psutil
import trio

from mcpp.config import NodeConfig
from mcpp.errors import ArgumentError, ConfigError
from mcpp.metrics import NodeMetrics
from mcpp.net.dht import Dht
from mcpp.net.p2p import IHost, parse_peer_multiaddr, strip_p2p
from mcpp.net.peers import PeerTable
from mcpp.net.rpc import RpcEndpoint

__all__ = ["NodeCore", "parse_bootstrap", "valid_addrs"]


class NodeCore:
    """What every part of the node shares. Only the node's trio loop touches it."""

    def __init__(self, config: NodeConfig, host: IHost, dht: Dht, metrics: NodeMetrics) -> None:
        self.config = config
        self.host = host
        self.dht = dht
        self.metrics = metrics
        self.peer_id: str = host.get_id().to_base58()
        self.role = config.role
        self.table = PeerTable()
        self._allowed = frozenset(config.allow_peers) | {self.peer_id} if config.allow_peers else None
        self.rpc = RpcEndpoint(
            host, config.max_message_bytes, config.rpc_timeout_s, metrics.observe_rpc,
            max_inflight_per_peer=config.max_inflight_per_peer,
            allow=self.peer_allowed if self._allowed is not None else None,
            on_limit=metrics.limit_hit,
            connect=self.connect_for_rpc,
        )
        # ping runs inline in the stream's read loop: cheaper (pings are O(N^2) mesh-wide) and
        # a truer RTT; echo is the same work through the normal task-per-request path
        self.rpc.register("ping", self._on_ping, inline=True, background=True)
        self.rpc.register("echo", self._on_echo)
        self.mcp_url: str | None = None
        # services built on the node (the queue) add to what hello says and to what is provided,
        # and hear of peers joining, through these; the node never imports them
        self.info_extra: dict[str, Callable[[], Any]] = {}
        self.capability_sources: list[Callable[[], Iterable[str]]] = []
        self.peer_joined_hooks: list[Callable[[str], None]] = []
        # (peer id, unexpected): called when a connection ends; unexpected = not a goodbye
        self.peer_left_hooks: list[Callable[[str, bool], None]] = []
        # what members learn of this node by gossip (stable settings only: a change is news)
        self.member_extra: dict[str, Callable[[], Any]] = {}
        self.joined = trio.Event()
        self.started_monotonic = time.monotonic()
        self.started_wall = time.time()
        self._nursery: trio.Nursery | None = None
        self._addrs_cache: list[str] | None = None
        self._kick = trio.Event()  # set on joining: discovery looks for the others at once
        self._joined_at: float | None = None
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        if config.role == "bootstrap" and not config.bootstrap:
            # the first node of a mesh has joined as soon as it listens
            self.joined.set()
            metrics.ready.set(1)

    async def connect_for_rpc(self, peer_id: str) -> None:
        """Dial a peer the RPC endpoint has no connection to (see `Connections`)."""
        raise NotImplementedError

    @property
    def multiaddrs(self) -> list[str]:
        # host.get_addrs() costs ~1 ms (multiaddr objects); the listen addresses do not change
        if self._addrs_cache is None:
            self._addrs_cache = [str(a) for a in self.host.get_addrs()]
        return list(self._addrs_cache)

    def info(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "role": self.role,
            "multiaddrs": self.multiaddrs,
            "capabilities": self.advertised_capabilities(),
            "mcp_url": self.mcp_url,
            **{k: fn() for k, fn in self.info_extra.items()},
        }

    def advertised_capabilities(self) -> list[str]:
        caps = dict.fromkeys(self.config.capabilities)
        for src in self.capability_sources:
            caps.update(dict.fromkeys(src()))
        return list(caps)

    def status(self) -> dict[str, Any]:
        return {
            **self.info(),
            "ready": self.joined.is_set(),
            "connected": sorted(p.peer_id for p in self.table.connected()),
            "routing_table_size": self.dht.routing_table_size(),
            "pid": os.getpid(),
        }

    def _live_peer_ids(self) -> set[str]:
        return {p.to_base58() for p in self.host.get_connected_peers()}

    def _update_peer_gauges(self) -> None:
        conn = len(self.table.connected())
        self.metrics.peers.labels("connected").set(conn)
        self.metrics.peers.labels("known").set(len(self.table) - conn)

    # ---- rpc handlers ------------------------------------------------------------------
    async def _on_ping(self, peer_id: str, params: Any) -> Any:
        return {"pong": True}

    async def _on_echo(self, peer_id: str, params: Any) -> Any:
        return params

    def peer_allowed(self, peer_id: str) -> bool:
        """allow_peers unset: everyone who holds the swarm key (if any); set: only those ids."""
        return self._allowed is None or peer_id in self._allowed

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def ping(self, peer_id: str, timeout_s: float | None = None, dial: bool = True) -> float:
        """RTT in ms of one RPC ping, timed with perf_counter_ns."""
        t0 = time.perf_counter_ns()
        await self.rpc.call(peer_id, "ping", None, timeout_s=timeout_s, dial=dial)
        return (time.perf_counter_ns() - t0) / 1e6

    async def wait_peers(self, n: int) -> None:
        while len(self.table.connected()) < n:
            await trio.sleep(0.05)


def valid_addrs(value: object) -> list[str]:
    """The multiaddr strings of a peer's hello that parse (anything else from the network is dropped)."""
    if not isinstance(value, list):
        return []
    out = []
    for a in value[:32]:
        if isinstance(a, str) and len(a) < 512:
            try:
                multiaddr.Multiaddr(strip_p2p(a))
            except Exception:
                continue
            out.append(a)
    return out


def parse_bootstrap(config: NodeConfig) -> list[tuple[str, str]]:
    """(multiaddr, peer id) of each configured bootstrap; ConfigError names the bad one."""
    out = []
    for addr in config.bootstrap:
        try:
            out.append((addr, parse_peer_multiaddr(addr, "bootstrap").peer_id.to_base58()))
        except ArgumentError as e:
            raise ConfigError("bootstrap", addr, e.reason) from None
    return out
