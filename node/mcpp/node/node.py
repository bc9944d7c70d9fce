"""The node: libp2p host + DHT + RPC + peer table, and the peer operations the MCP tools expose.

Lifecycle: `open_node(config)` is an async context manager owning one nursery in which the
RPC endpoint, the connection watcher, the pinger, the discovery loop and the traffic sampler
run. Leaving it cancels them and closes the host (peers see the disconnect at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import multiaddr
import psutil
import trio

if TYPE_CHECKING:  # trio-typing's stubs (a py-libp2p dependency) shadow trio's own annotations
    from trio_typing import TaskStatus

    from mcpp.queue.service import QueueService
    from mcpp.workflow.engine import WorkflowEngine

from mcpp.net import identity
from mcpp.config import NodeConfig
from mcpp.net.dht import MESH_KEY, Dht, capability_key, open_dht
from mcpp.errors import ArgumentError, ConfigError, MCPPError, PeerNotFound, PeerUnreachable, RPCError
from mcpp.log import kv
from mcpp.metrics import NodeMetrics
from mcpp.net.p2p import (
    ID,
    IHost,
    PeerInfo,
    dial_errors,
    make_host,
    parse_peer_id,
    parse_peer_multiaddr,
    peer_multiaddrs,
)
from mcpp.net.peers import PeerRecord, PeerTable, percentile, quality
from mcpp.net.rpc import RpcEndpoint

__all__ = ["Node", "open_node", "PEER_STATUSES", "SORT_KEYS"]

log = logging.getLogger("mcpp.node")

PEER_STATUSES = ("connected", "known", "all")
SORT_KEYS = ("latency", "last_seen", "peer_id", "reputation")
REPROVIDE_S = 20.0
EARLY_REPROVIDE_S = 1.5
NETWORK_FIND_S = 15.0
EARLY_NETWORK_FIND_S = 3.0
FORMING_S = 15.0  # after joining, the mesh is still being found: look 4x as often
WATCH_S = 0.25
RANDOM_WALK_S = 30.0
GONE_MEMORY_S = 48 * 3600.0  # as long as py-libp2p keeps a stale provider record
GONE_REDIAL_S = 30.0  # a peer seen leaving is re-dialed this rarely (a healed partition)
REDIAL_BLOCK_S = 30.0
HISTORY_WINDOW = 11
MAX_BACKOFF_S = 4.0
DIAL_GRACE_S = 2.0
IDENTITY_FILE = "identity.key"  # in data_dir, when no identity is configured
DEMAND_REDIAL_S = 2.0  # an rpc call re-dials a peer it could not reach at most this often
DEMAND_DIAL_TIMEOUT_S = 5.0
MAX_PINGS_PER_S = 10.0
MAX_BOOTSTRAP_PEERS = 100


def _strip_p2p(addr: str) -> str:
    return addr.split("/p2p/")[0]


@dataclass
class _Backoff:
    until: float
    delay_s: float


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ArgumentError(name, f"must be a number between {lo:g} and {hi:g}")
    if not lo <= value <= hi:
        raise ArgumentError(name, f"must be between {lo:g} and {hi:g}, got {value!r}")


class Node:
    """One mesh node. Only the node's trio loop touches it."""

    def __init__(self, config: NodeConfig, host: IHost, dht: Dht, metrics: NodeMetrics) -> None:
        self.config = config
        self.host = host
        self.dht = dht
        self.metrics = metrics
        self.peer_id: str = host.get_id().to_base58()
        self.role = config.role
        self.table = PeerTable()
        self._allowed = frozenset(config.allow_peers) | {self.peer_id} if config.allow_peers else None
        self._refusing: set[str] = set()
        self.rpc = RpcEndpoint(
            host, config.max_message_bytes, config.rpc_timeout_s, metrics.observe_rpc,
            max_inflight_per_peer=config.max_inflight_per_peer,
            allow=self.peer_allowed if self._allowed is not None else None,
            on_limit=metrics.limit_hit,
            connect=self.connect_for_rpc,
        )
        # ping runs inline in the stream's read loop: cheaper (pings are O(N^2) mesh-wide) and
        # a truer RTT; echo is the same work through the normal task-per-request path
        self.rpc.register("ping", self._on_ping, inline=True)
        self.rpc.register("echo", self._on_echo)
        self.rpc.register("hello", self._on_hello)
        self.rpc.register("goodbye", self._on_goodbye)
        self.mcp_url: str | None = None
        # layers above the runtime (the queue) add to what hello says and to what is provided
        self.info_extra: dict[str, Callable[[], Any]] = {}
        self.capability_sources: list[Callable[[], Iterable[str]]] = []
        self.peer_joined_hooks: list[Callable[[str], None]] = []
        self.queue: QueueService | None = None
        self.workflows: WorkflowEngine | None = None
        self.joined = trio.Event()
        self.started_monotonic = time.monotonic()
        self.started_wall = time.time()
        self._nursery: trio.Nursery | None = None
        self._dialing: set[str] = set()
        self._hello_inflight: dict[str, trio.Event] = {}
        self._ping_inflight: set[str] = set()
        self._backoff: dict[str, _Backoff] = {}
        self._gone: dict[str, float] = {}
        self._blocked: dict[str, float] = {}
        self._demand_failed: dict[str, float] = {}
        self._providing = False
        self._finding = False
        self._last_provide = 0.0
        self._last_network_find = -1e9
        self._first_seen: dict[str, float] = {}
        self._addrs_cache: list[str] | None = None
        # parsed once: multiaddr parsing costs ~1 ms and the list is fixed
        self._bootstrap_peers = _parse_bootstrap(config)
        self._last_walk = -1e9
        self._kick = trio.Event()
        self._joined_at: float | None = None
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        if config.role == "bootstrap" and not config.bootstrap:
            # the first node of a mesh has joined as soon as it listens
            self.joined.set()
            metrics.ready.set(1)

    # ---- facts -------------------------------------------------------------------------
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

    def reprovide_soon(self) -> None:
        """Capabilities changed: provide them in the DHT at the next discovery tick."""
        self._last_provide = 0.0

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

    async def _on_hello(self, peer_id: str, params: Any) -> Any:
        if isinstance(params, dict):
            await self._apply_hello(peer_id, params, source="inbound")
        return self.info()

    async def _on_goodbye(self, peer_id: str, params: Any) -> Any:
        self._blocked[peer_id] = time.monotonic() + REDIAL_BLOCK_S
        rec = self.table.get(peer_id)
        if rec is not None:
            rec.persistent = False
        return {"ok": True}

    async def _apply_hello(self, peer_id: str, info: dict[str, Any], source: str) -> None:
        if peer_id not in self._live_peer_ids():
            return
        caps = info.get("capabilities")
        addrs = _valid_addrs(info.get("multiaddrs"))
        rec = self.table.upsert(
            peer_id,
            role=info.get("role") if isinstance(info.get("role"), str) else None,
            multiaddrs=addrs or None,
            capabilities=[str(c) for c in caps] if isinstance(caps, list) else None,
            mcp_url=info.get("mcp_url") if isinstance(info.get("mcp_url"), str) else None,
            worker=info.get("worker") if isinstance(info.get("worker"), dict) else None,
        )
        if rec.source == "dht" and source != "dht":
            rec.source = source
        now = time.time()
        if not rec.connected:
            rec.connected = True
            rec.connected_since = now
            log.info("peer joined", extra=kv(peer=peer_id, role=rec.role, source=source))
            for hook in self.peer_joined_hooks:
                hook(peer_id)
        rec.hello_done = True
        rec.last_seen = now
        self._gone.pop(peer_id, None)
        self._backoff.pop(peer_id, None)
        self._first_seen.pop(peer_id, None)
        await self.dht.add_peer(peer_id)
        self._update_peer_gauges()
        if self._joined_at is None:
            self._joined_at = time.monotonic()
            self._kick.set()  # first peer: advertise and look for the others at once
        if not self.joined.is_set():
            self.joined.set()
            self.metrics.ready.set(1)
            log.info("joined the mesh", extra=kv(peer=self.peer_id, via=peer_id))

    # ---- membership --------------------------------------------------------------------
    def _lost(self, peer_id: str, reason: str, gone: bool = True) -> None:
        """The connection to a peer ended. `gone`: it died or hung (its stale DHT records are
        then ignored and it is re-dialed only every GONE_REDIAL_S); False for a requested
        disconnect."""
        rec = self.table.get(peer_id)
        self.rpc.forget(peer_id)
        self.dht.remove_peer(peer_id)
        self._first_seen.pop(peer_id, None)
        if gone and not (rec is not None and rec.persistent):  # persistent ones: _watch_loop redials
            self._gone[peer_id] = time.monotonic()
            said_goodbye = self._blocked.get(peer_id, 0.0) > time.monotonic()
            if rec is not None and rec.multiaddrs and self._nursery is not None and not said_goodbye:
                # a connection can also close under a live peer (e.g. a duplicate connection
                # dropped during formation): dial back once; only if that fails is it gone
                self._nursery.start_soon(self._recheck, peer_id, list(rec.multiaddrs))
        if rec is None:
            return
        if rec.persistent:
            rec.connected = False
            rec.hello_done = False
        else:
            self.table.remove(peer_id)
            self.rpc.traffic.pop(peer_id, None)  # its counters go with its record
        log.info("peer left", extra=kv(peer=peer_id, reason=reason))
        self._update_peer_gauges()

    async def _recheck(self, peer_id: str, addrs: list[str]) -> None:
        if peer_id in self._dialing:
            return
        self._dialing.add(peer_id)
        try:
            await self.dial(peer_id, addrs, "recheck", timeout_s=2.0)
        except (PeerUnreachable, trio.TooSlowError, MCPPError):
            self._backoff[peer_id] = _Backoff(time.monotonic() + GONE_REDIAL_S, GONE_REDIAL_S)
        finally:
            self._dialing.discard(peer_id)

    def _in_backoff(self, peer_id: str) -> bool:
        b = self._backoff.get(peer_id)
        if b is not None and time.monotonic() < b.until:
            return True
        until = self._blocked.get(peer_id)
        return until is not None and time.monotonic() < until

    def _fail_backoff(self, peer_id: str) -> None:
        b = self._backoff.get(peer_id)
        cap = GONE_REDIAL_S if peer_id in self._gone else MAX_BACKOFF_S
        delay = 0.25 if b is None else min(b.delay_s * 2, cap)
        self._backoff[peer_id] = _Backoff(time.monotonic() + delay, delay)

    async def _hello(self, peer_id: str, source: str, timeout_s: float = 5.0) -> None:
        """Exchange hello; if one is already running for this peer, wait for that one."""
        running = self._hello_inflight.get(peer_id)
        if running is not None:
            with trio.move_on_after(timeout_s):
                await running.wait()
            return
        done = self._hello_inflight[peer_id] = trio.Event()
        try:
            info = await self.rpc.call(peer_id, "hello", self.info(), timeout_s=timeout_s)
            if isinstance(info, dict):
                await self._apply_hello(peer_id, info, source)
        except MCPPError as e:
            log.debug("hello failed", extra=kv(peer=peer_id, error=str(e)))
        finally:
            del self._hello_inflight[peer_id]
            done.set()

    async def dial(self, peer_id: str, addrs: list[str], source: str, timeout_s: float = 5.0) -> None:
        """Connect and say hello, all within timeout_s. Raises PeerUnreachable."""
        deadline = trio.current_time() + timeout_s
        with dial_errors(peer_id):
            pid = ID.from_base58(peer_id)
        await self._connect(pid, addrs, timeout_s)
        await self._hello(peer_id, source, max(0.1, deadline - trio.current_time()))

    async def _connect(self, pid: ID, addrs: list[str], timeout_s: float) -> None:
        """A libp2p connection to pid at addrs within timeout_s, whatever libp2p's negative cache
        says (our own backoffs decide when to retry; else a restarted bootstrap stays unreachable
        for a minute). Raises PeerUnreachable."""
        peer_id = pid.to_base58()
        try:
            with trio.fail_after(timeout_s), dial_errors(peer_id):
                mas = [multiaddr.Multiaddr(_strip_p2p(a)) for a in addrs]
                self._unblock(pid)
                await self.host.connect(PeerInfo(pid, mas))
        except trio.TooSlowError:
            raise PeerUnreachable(peer_id, f"dial timed out after {timeout_s:g} s") from None

    async def connect_for_rpc(self, peer_id: str) -> None:
        """An rpc call to a peer without a connection dials it now, at the addresses known for it.

        This replaces libp2p's own dial-on-new_stream, whose negative cache refuses a peer for
        60 s after one failed dial (a healed partition would stay cut off for a minute). A failed
        dial here is remembered for DEMAND_REDIAL_S only; hello follows from the watch loop.
        Raises PeerUnreachable."""
        try:
            pid = ID.from_base58(peer_id)
        except Exception as e:  # e.g. an owner id taken from a malformed task id
            raise PeerUnreachable(peer_id, f"not a valid peer id ({type(e).__name__})") from None
        if self.host.get_network().get_connections(pid):
            return
        failed = self._demand_failed.get(peer_id)
        if failed is not None and time.monotonic() - failed < DEMAND_REDIAL_S:
            raise PeerUnreachable(peer_id, f"not connected; a dial {time.monotonic() - failed:.1f} s ago failed")
        rec = self.table.get(peer_id)
        addrs = list(dict.fromkeys([*(rec.multiaddrs if rec is not None else []), *peer_multiaddrs(self.host, pid)]))
        if not addrs:
            raise PeerUnreachable(peer_id, "not connected and no address known")
        try:
            await self._connect(pid, addrs, DEMAND_DIAL_TIMEOUT_S)
        except BaseException:  # failed, or cut short by the caller's own timeout: throttle either way
            self._demand_failed[peer_id] = time.monotonic()
            raise
        self._demand_failed.pop(peer_id, None)

    def _unblock(self, pid: ID) -> None:
        """Our own backoff decides when to retry: lift libp2p's 60 s negative cache."""
        unblock = getattr(self.host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(pid)

    async def _background_dial(self, peer_id: str, addrs: list[str], source: str) -> None:
        if peer_id in self._dialing or peer_id == self.peer_id:
            return
        self._dialing.add(peer_id)
        try:
            await self.dial(peer_id, addrs, source)
        except (PeerUnreachable, trio.TooSlowError, MCPPError) as e:
            self._fail_backoff(peer_id)
            rec = self.table.get(peer_id)
            if rec is not None and not rec.connected and not rec.persistent:
                self.table.remove(peer_id)
            log.debug("dial failed", extra=kv(peer=peer_id, error=str(e)))
        finally:
            self._dialing.discard(peer_id)

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def _consider(self, peer_id: str, addrs: list[str], source: str) -> None:
        """A peer found through the DHT: remember it and dial it unless known-dead or backed off."""
        if peer_id == self.peer_id or peer_id in self._dialing or self._in_backoff(peer_id):
            return
        if not self.peer_allowed(peer_id):
            return
        rec = self.table.get(peer_id)
        if rec is not None and rec.connected:
            return
        # Tie-break: of two peers that find each other, the smaller id dials; the other waits
        # DIAL_GRACE_S for it. Simultaneous dials make libp2p drop one of the two connections.
        first = self._first_seen.setdefault(peer_id, time.monotonic())
        if self.peer_id > peer_id and time.monotonic() - first < DIAL_GRACE_S:
            return
        if not addrs:
            addrs = peer_multiaddrs(self.host, ID.from_base58(peer_id))
        if not addrs:
            return
        if peer_id not in self._gone and rec is None:
            self.table.upsert(peer_id, multiaddrs=addrs, source=source)
        # (a gone peer is re-dialed quietly, at most every GONE_REDIAL_S: see _lost)
        self._spawn(self._background_dial, peer_id, addrs, source)

    def peer_allowed(self, peer_id: str) -> bool:
        """allow_peers unset: everyone who holds the swarm key (if any); set: only those ids."""
        return self._allowed is None or peer_id in self._allowed

    async def _refuse(self, peer_id: str) -> None:
        self.metrics.peers_refused.inc()
        log.warning("connection refused: peer not in allow_peers", extra=kv(peer=peer_id))
        self._refusing.add(peer_id)
        try:
            with trio.move_on_after(2), contextlib.suppress(Exception):
                await self.host.get_network().close_peer(ID.from_base58(peer_id))
        finally:
            self._refusing.discard(peer_id)

    # ---- loops -------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        """Connection changes -> table, within ~0.1 s of libp2p noticing them."""
        while True:
            live = self._live_peer_ids()
            if self._allowed is not None:
                for pid in [p for p in live if not self.peer_allowed(p)]:
                    live.discard(pid)
                    if pid not in self._refusing:
                        self._spawn(self._refuse, pid)
            for pid in live:
                rec = self.table.get(pid)
                if (rec is None or not rec.hello_done) and pid not in self._hello_inflight:
                    self._spawn(self._hello, pid, "inbound")
            for rec in self.table.connected():
                if rec.peer_id not in live:
                    self._lost(rec.peer_id, "connection closed")
            for rec in self.table.all():
                if rec.persistent and not rec.connected and not self._in_backoff(rec.peer_id):
                    self._spawn(self._background_dial, rec.peer_id, rec.multiaddrs, "persistent")
            now = time.monotonic()
            for pid, t in list(self._gone.items()):
                if now - t > GONE_MEMORY_S:
                    del self._gone[pid]
            for pid, until in list(self._blocked.items()):
                if until < now:
                    del self._blocked[pid]
            for pid, t in list(self._demand_failed.items()):
                if now - t > DEMAND_REDIAL_S:
                    del self._demand_failed[pid]
            await trio.sleep(WATCH_S)

    def _ping_every_s(self) -> float:
        """Each peer is pinged every ping_interval_s, slower in big meshes so that a node sends
        at most MAX_PINGS_PER_S pings in all (pings are O(N^2) mesh-wide)."""
        return max(self.config.ping_interval_s, len(self.table.connected()) / MAX_PINGS_PER_S)

    def _peer_timeout_s(self) -> float:
        return max(self.config.peer_timeout_s, 2.5 * self._ping_every_s())

    async def _ping_one(self, rec: PeerRecord) -> None:
        pid = rec.peer_id
        self._ping_inflight.add(pid)
        rec.last_ping_sent = time.monotonic()
        try:
            rtt = await self.ping(pid, timeout_s=self._peer_timeout_s())
            rec.add_rtt(rtt)
        except MCPPError:
            rec.ping_failures += 1
            rec.feed_reputation(False)
            # any frame from the peer (its own pings, answers, requests) proves it is alive
            heard = max(rec.last_seen or 0.0, self.rpc.traffic_of(pid).last_in)
            silent_s = time.time() - heard
            if silent_s >= self._peer_timeout_s() and rec.connected:
                self._lost(pid, f"no answer to pings for {silent_s:.1f} s")
                with contextlib.suppress(Exception):
                    with trio.move_on_after(1):
                        await self.host.disconnect(ID.from_base58(pid))
        finally:
            self._ping_inflight.discard(pid)

    async def _ping_loop(self) -> None:
        """Ping every connected peer every ping_interval_s (RTT samples and liveness of peers that
        hang without closing the connection; a closed connection is noticed by _watch_loop)."""
        while True:
            every = self._ping_every_s()
            now = time.monotonic()
            for rec in self.table.connected():
                if rec.hello_done and rec.peer_id not in self._ping_inflight and now - rec.last_ping_sent >= every:
                    self._spawn(self._ping_one, rec)
            await trio.sleep(min(0.25, every))

    async def _provide(self) -> None:
        self._providing = True
        t0 = time.monotonic()
        try:
            with trio.move_on_after(10):
                await self.dht.provide(MESH_KEY)
                for cap in self.advertised_capabilities():
                    await self.dht.provide(capability_key(cap))
            self._last_provide = time.monotonic()
        except Exception as e:
            log.debug("provide failed", extra=kv(error=str(e)))
        finally:
            self._providing = False
            log.debug("provide done", extra=kv(took_s=round(time.monotonic() - t0, 3)))

    def _forming(self) -> bool:
        return self._joined_at is None or time.monotonic() - self._joined_at < FORMING_S

    def _reprovide_s(self) -> float:
        """A record provided at join reaches only the few peers known then (the K closest *found*):
        provide again EARLY_REPROVIDE_S later, when the routing table holds the mesh, then every
        REPROVIDE_S."""
        if self._joined_at is not None and time.monotonic() - self._joined_at < 4 * EARLY_REPROVIDE_S:
            return EARLY_REPROVIDE_S
        return REPROVIDE_S

    async def _find(self, network: bool, walk: bool) -> None:
        """Dial the mesh peers the DHT knows.

        network=False reads only this node's provider store (free; every node's provide() pushes
        its record to the K closest peers, i.e. to everyone in a mesh of <= 20); network=True also
        asks the closest peers (catches records we were not sent); walk adds a random-key lookup.
        """
        self._finding = True
        t0 = time.monotonic()
        found: dict[str, list[str]] = {}
        try:
            with trio.move_on_after(5):
                found = await self.dht.find_providers(MESH_KEY, network=network)
                for pid, addrs in found.items():
                    self._consider(pid, addrs, "dht")
                if walk:
                    for pid in await self.dht.random_walk():
                        self._consider(pid, [], "dht")
        except Exception as e:
            log.debug("discovery failed", extra=kv(error=str(e)))
        finally:
            self._finding = False
            if network or walk:
                log.debug("find done", extra=kv(network=network, walk=walk, found=len(found),
                                                took_s=round(time.monotonic() - t0, 3)))

    async def discovery_tick(self) -> None:
        for addr, pid in self._bootstrap_peers:
            rec = self.table.get(pid)
            if pid != self.peer_id and (rec is None or not rec.connected) and not self._in_backoff(pid):
                self._spawn(self._background_dial, pid, [addr], "bootstrap")
        if not self.table.connected():
            return
        now = time.monotonic()
        if not self._providing and (self._last_provide == 0.0 or now - self._last_provide > self._reprovide_s()):
            self._spawn(self._provide)
        if not self._finding:
            forming = self._forming()
            network = now - self._last_network_find > (EARLY_NETWORK_FIND_S if forming else NETWORK_FIND_S)
            walk = now - self._last_walk > RANDOM_WALK_S
            if network:
                self._last_network_find = now
            if walk:
                self._last_walk = now
            self._spawn(self._find, network, walk)

    async def _discovery_loop(self) -> None:
        """A cheap tick (local provider store, bootstrap redial) every discovery_interval_s, 4x as
        often while forming; network lookups every NETWORK_FIND_S (EARLY_NETWORK_FIND_S while
        forming, and at once on joining); random walks every RANDOM_WALK_S."""
        while True:
            await self.discovery_tick()
            interval = self.config.discovery_interval_s
            with trio.move_on_after(interval / 4 if self._forming() else interval):
                await self._kick.wait()
            if self._kick.is_set():
                # joined just now: ask the closest peers at once; the random walk (which dials
                # every peer it meets) waits, so that a whole mesh starting together does not
                # storm itself with duplicate connections
                self._last_network_find = -1e9
                self._last_walk = time.monotonic()
                self._kick = trio.Event()

    async def _sample_traffic(self) -> None:
        while True:
            now = time.monotonic()
            for t in self.rpc.traffic.values():
                t.samples.append((now, t.bytes_in, t.bytes_out))
                del t.samples[:-HISTORY_WINDOW]
            await trio.sleep(1)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.rpc.run)
            nursery.start_soon(self._watch_loop)
            nursery.start_soon(self._ping_loop)
            nursery.start_soon(self._discovery_loop)
            nursery.start_soon(self._sample_traffic)
            task_status.started()

    # ---- operations (the peer tools) ---------------------------------------------------
    async def ping(self, peer_id: str, timeout_s: float | None = None) -> float:
        """RTT in ms of one RPC ping, timed with perf_counter_ns."""
        t0 = time.perf_counter_ns()
        await self.rpc.call(peer_id, "ping", None, timeout_s=timeout_s)
        return (time.perf_counter_ns() - t0) / 1e6

    async def wait_peers(self, n: int) -> None:
        while len(self.table.connected()) < n:
            await trio.sleep(0.05)

    def _peer_metrics_brief(self, rec: PeerRecord) -> dict[str, Any]:
        t = self.rpc.traffic_of(rec.peer_id)
        total = t.calls_ok + t.calls_failed
        reliability = 1.0 if total == 0 else t.calls_ok / total
        p50 = rec.rtt_p50()
        return {
            "rtt_ms": None if rec.latest_rtt() is None else round(rec.latest_rtt() or 0, 3),
            "rtt_p50_ms": None if p50 is None else round(p50, 3),
            "reliability": round(reliability, 4),
            "quality": quality(reliability, p50),
            "reputation": round(rec.reputation, 4),
        }

    async def discover(
        self, capability_filter: list[str] | None, max_peers: int, include_metrics: bool, timeout_s: float
    ) -> dict[str, Any]:
        _check_range("max_peers", max_peers, 1, 1000)
        _check_range("timeout_s", timeout_s, 0.1, 300)
        if capability_filter is not None:
            for i, c in enumerate(capability_filter):
                if not isinstance(c, str) or not c.strip():
                    raise ArgumentError(f"capability_filter[{i}]", "must be a non-empty string")
        found: dict[str, list[str]] = {}
        caps_of: dict[str, set[str]] = {}
        with trio.move_on_after(timeout_s) as cs, _dht_errors("peer_discover"):
            found = await self.dht.find_providers(MESH_KEY, count=max(50, max_peers * 2))
            if capability_filter:
                for cap in capability_filter:
                    providers = await self.dht.find_providers(capability_key(cap), count=max(50, max_peers * 2))
                    for pid, addrs in providers.items():
                        caps_of.setdefault(pid, set()).add(cap)
                        found.setdefault(pid, addrs)
        found.pop(self.peer_id, None)
        peers = []
        for pid, addrs in found.items():
            if pid in self._gone and pid not in self._live_peer_ids():
                continue  # a stale provider record of a node we saw leave
            rec = self.table.get(pid)
            caps = set(rec.capabilities) if rec else set()
            caps |= caps_of.get(pid, set())
            if capability_filter and not set(capability_filter) <= caps:
                continue
            entry: dict[str, Any] = {
                "peer_id": pid,
                "multiaddrs": sorted(set(addrs) | set(rec.multiaddrs if rec else [])),
                "capabilities": sorted(caps),
                "connected": bool(rec and rec.connected),
            }
            peers.append(entry)
            self._consider(pid, addrs, "dht")
            if len(peers) >= max_peers:
                break
        if include_metrics:
            async with trio.open_nursery() as n:
                for entry in peers:
                    n.start_soon(self._measure_into, entry)
        return {"peers": peers, "count": len(peers), "timed_out": cs.cancelled_caught}

    async def _measure_into(self, entry: dict[str, Any]) -> None:
        rec = self.table.get(entry["peer_id"])
        if rec is not None and rec.connected:
            with contextlib.suppress(MCPPError):
                rec.add_rtt(await self.ping(rec.peer_id, timeout_s=2))
            entry["metrics"] = self._peer_metrics_brief(rec)
        else:
            entry["metrics"] = {"rtt_ms": None, "rtt_p50_ms": None, "reliability": None, "quality": None, "reputation": None}

    async def connect(
        self, peer_id: str | None, multiaddr_text: str | None, timeout_s: float, retries: int, persistent: bool
    ) -> dict[str, Any]:
        _check_range("timeout_s", timeout_s, 0.1, 300)
        _check_range("retries", retries, 0, 10)
        if peer_id is None and multiaddr_text is None:
            raise ArgumentError("peer_id", "give peer_id or multiaddr (neither was given)")
        arg = "multiaddr" if multiaddr_text is not None else "peer_id"
        deadline = trio.current_time() + timeout_s  # bounds the DHT lookup, dials and hellos
        if multiaddr_text is not None:
            info = parse_peer_multiaddr(multiaddr_text, "multiaddr")
            pid = info.peer_id.to_base58()
            if peer_id is not None and parse_peer_id(peer_id).to_base58() != pid:
                raise ArgumentError("multiaddr", f"its /p2p/ id {pid} does not match peer_id {peer_id}")
            addrs = [multiaddr_text]
        else:
            assert peer_id is not None
            pid = parse_peer_id(peer_id).to_base58()
            rec = self.table.get(pid)
            addrs = list(rec.multiaddrs) if rec else peer_multiaddrs(self.host, ID.from_base58(pid))
            if not addrs:
                with trio.move_on_at(deadline), _dht_errors("peer_id"):
                    addrs = await self.dht.find_peer(ID.from_base58(pid)) or []
                if not addrs:
                    raise PeerNotFound(pid, "peer_id: not found in the DHT (no known address)")
        if pid == self.peer_id:
            raise ArgumentError(arg, "that is this node's own peer id")
        self._blocked.pop(pid, None)
        attempts = 0
        last_error = ""
        while attempts <= retries:
            attempts += 1
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            try:
                await self.dial(pid, addrs, "manual", timeout_s=remaining)
                rec = self.table.get(pid)
                if rec is None or not rec.connected:
                    raise PeerUnreachable(pid, "connected but the peer did not answer hello")
                rtt = await self.ping(pid, timeout_s=max(0.1, deadline - trio.current_time()))
                rec.add_rtt(rtt)
                if persistent:
                    rec.persistent = True
                return {"peer_id": pid, "connected": True, "rtt_ms": round(rtt, 3), "attempts": attempts, "persistent": rec.persistent}
            except (PeerUnreachable, trio.TooSlowError, RPCError) as e:
                last_error = str(e) or "timed out"
                await trio.sleep(min(0.2 * attempts, max(0.0, deadline - trio.current_time())))
        raise PeerUnreachable(pid, f"{arg}: could not connect after {attempts} attempt(s): {last_error or 'timed out'}")

    async def disconnect(self, peer_id: str, reason: str | None) -> dict[str, Any]:
        pid = parse_peer_id(peer_id).to_base58()
        rec = self.table.get(pid)
        if rec is None and pid not in self._live_peer_ids():
            raise ArgumentError("peer_id", f"{pid} is not a peer of this node")
        if rec is not None:
            rec.persistent = False
        with contextlib.suppress(MCPPError):
            await self.rpc.call(pid, "goodbye", {"reason": reason}, timeout_s=1)
        self._blocked[pid] = time.monotonic() + REDIAL_BLOCK_S
        with contextlib.suppress(Exception):
            with trio.move_on_after(2):
                await self.host.disconnect(ID.from_base58(pid))
        self._lost(pid, f"disconnect requested: {reason or 'no reason given'}", gone=False)
        return {"peer_id": pid, "disconnected": True, "reason": reason}

    def list_peers(
        self, status: str, capability: str | None, sort_by: str, limit: int, offset: int
    ) -> dict[str, Any]:
        if status not in PEER_STATUSES:
            raise ArgumentError("status", f"must be one of {', '.join(PEER_STATUSES)}, got {status!r}")
        if sort_by not in SORT_KEYS:
            raise ArgumentError("sort_by", f"must be one of {', '.join(SORT_KEYS)}, got {sort_by!r}")
        _check_range("limit", limit, 1, 1000)
        _check_range("offset", offset, 0, 10**9)
        recs = self.table.all()
        if status == "connected":
            recs = [r for r in recs if r.connected]
        elif status == "known":
            recs = [r for r in recs if not r.connected]
        if capability is not None:
            recs = [r for r in recs if capability in r.capabilities]
        if sort_by == "latency":
            recs.sort(key=lambda r: (r.latest_rtt() is None, r.latest_rtt() or 0.0, r.peer_id))
        elif sort_by == "last_seen":
            recs.sort(key=lambda r: (-(r.last_seen or 0.0), r.peer_id))
        elif sort_by == "reputation":
            recs.sort(key=lambda r: (-r.reputation, r.peer_id))
        else:
            recs.sort(key=lambda r: r.peer_id)
        page = recs[offset : offset + limit]
        return {
            "peers": [r.summary() for r in page],
            "count": len(page),
            "total": len(recs),
            "has_more": offset + len(page) < len(recs),
        }

    def peer_metrics(self, peer_id: str | None, include_history: bool) -> dict[str, Any]:
        if peer_id is None:
            return self._own_metrics()
        pid = parse_peer_id(peer_id).to_base58()
        rec = self.table.get(pid)
        if rec is None:
            raise ArgumentError("peer_id", f"{pid} is not in this node's peer table")
        t = self.rpc.traffic_of(pid)
        rtts = [v for _, v in rec.rtt_ms]
        total = t.calls_ok + t.calls_failed
        reliability = 1.0 if total == 0 else t.calls_ok / total
        bw_in, bw_out = _bandwidth(t.samples)
        p50 = rec.rtt_p50()
        out: dict[str, Any] = {
            "peer_id": pid,
            "connected": rec.connected,
            "rtt_p50_ms": None if p50 is None else round(p50, 3),
            "rtt_p99_ms": None if not rtts else round(percentile(rtts, 99) or 0.0, 3),
            "rtt_samples": len(rtts),
            "bandwidth_in_bps": bw_in,
            "bandwidth_out_bps": bw_out,
            "bytes_in": t.bytes_in,
            "bytes_out": t.bytes_out,
            "reliability": round(reliability, 4),
            "rpc_calls_ok": t.calls_ok,
            "rpc_calls_failed": t.calls_failed,
            "connected_since": rec.connected_since,
            "quality": quality(reliability, p50),
            "reputation": round(rec.reputation, 4),
        }
        if include_history:
            out["history"] = [{"t": round(ts, 3), "rtt_ms": round(ms, 3)} for ts, ms in rec.rtt_ms]
        return out

    def _own_metrics(self) -> dict[str, Any]:
        traffic = list(self.rpc.traffic.values())
        ok = sum(t.calls_ok for t in traffic)
        failed = sum(t.calls_failed for t in traffic)
        bws = [_bandwidth(t.samples) for t in traffic]
        mem = self._process.memory_info()
        cpu = self._process.cpu_times()
        conn = self.table.connected()
        return {
            "peer_id": self.peer_id,
            "role": self.role,
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            "rss_mb": round(mem.rss / 2**20, 2),
            "cpu_percent": self._process.cpu_percent(None),
            "cpu_seconds": round(cpu.user + cpu.system, 3),
            "peers_connected": len(conn),
            "peers_known": len(self.table) - len(conn),
            "routing_table_size": self.dht.routing_table_size(),
            "rpc_calls_ok": ok,
            "rpc_calls_failed": failed,
            "reliability": round(1.0 if ok + failed == 0 else ok / (ok + failed), 4),
            "bytes_in": sum(t.bytes_in for t in traffic),
            "bytes_out": sum(t.bytes_out for t in traffic),
            "bandwidth_in_bps": round(sum(b[0] for b in bws), 1),
            "bandwidth_out_bps": round(sum(b[1] for b in bws), 1),
        }

    async def bootstrap_network(
        self, bootstrap_peers: list[str] | None, min_connections: int, timeout_s: float
    ) -> dict[str, Any]:
        _check_range("min_connections", min_connections, 0, 1000)
        _check_range("timeout_s", timeout_s, 0.1, 300)
        addrs = list(self.config.bootstrap) if bootstrap_peers is None else bootstrap_peers
        if len(addrs) > MAX_BOOTSTRAP_PEERS:
            raise ArgumentError("bootstrap_peers", f"at most {MAX_BOOTSTRAP_PEERS} addresses, got {len(addrs)}")
        infos = []
        for i, a in enumerate(addrs):
            argname = f"bootstrap_peers[{i}]"
            if not isinstance(a, str):
                raise ArgumentError(argname, "must be a multiaddr string")
            infos.append((a, parse_peer_multiaddr(a, argname).peer_id.to_base58()))
        connected: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        deadline = trio.current_time() + timeout_s

        async def one(addr: str, pid: str) -> None:
            if pid == self.peer_id:
                failed.append({"multiaddr": addr, "error": "that is this node's own address"})
                return
            self._blocked.pop(pid, None)
            self._backoff.pop(pid, None)
            try:
                await self.dial(pid, [addr], "bootstrap", timeout_s=timeout_s)
                rec = self.table.get(pid)
                if rec is None or not rec.connected:
                    raise PeerUnreachable(pid, "connected but the peer did not answer hello")
                connected.append({"multiaddr": addr, "peer_id": pid})
            except (PeerUnreachable, trio.TooSlowError, MCPPError) as e:
                failed.append({"multiaddr": addr, "error": str(e) or "timed out"})

        async with trio.open_nursery() as n:
            for addr, pid in infos:
                n.start_soon(one, addr, pid)
        if connected:
            # one discovery round at once, within what is left of timeout_s
            with trio.move_on_at(deadline):
                await self._find(network=True, walk=True)
        return {
            "connected": connected,
            "failed": failed,
            "routing_table_size": self.dht.routing_table_size(),
            "peers_connected": len(self.table.connected()),
            "satisfied": len(connected) >= min_connections,
        }


@contextlib.contextmanager
def _dht_errors(argument: str) -> Iterator[None]:
    """A failed DHT lookup becomes an error that names the argument being resolved."""
    try:
        yield
    except MCPPError:
        raise
    except Exception as e:  # py-libp2p's DHT has no common error root
        raise ArgumentError(argument, f"DHT lookup failed: {type(e).__name__}: {e}") from e


def _valid_addrs(value: object) -> list[str]:
    """The multiaddr strings of a peer's hello that parse (anything else from the network is dropped)."""
    if not isinstance(value, list):
        return []
    out = []
    for a in value[:32]:
        if isinstance(a, str) and len(a) < 512:
            try:
                multiaddr.Multiaddr(_strip_p2p(a))
            except Exception:
                continue
            out.append(a)
    return out


def _wildcard_announce(listen: str) -> tuple[str, ...]:
    """A node listening on 0.0.0.0 (a container) advertises its interfaces' IPv4 addresses
    instead, so that peers can dial what they learn. Loopback is left out unless it is all."""
    parts = listen.split("/")
    if len(parts) < 5 or parts[1] != "ip4" or parts[2] != "0.0.0.0" or parts[3] != "tcp" or parts[4] == "0":
        return ()
    ips = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family.name == "AF_INET" and not a.address.startswith("127.")]
    return tuple(f"/ip4/{ip}/tcp/{parts[4]}" for ip in (ips or ["127.0.0.1"]))


def _parse_bootstrap(config: NodeConfig) -> list[tuple[str, str]]:
    """(multiaddr, peer id) of each configured bootstrap; ConfigError names the bad one."""
    out = []
    for addr in config.bootstrap:
        try:
            out.append((addr, parse_peer_multiaddr(addr, "bootstrap").peer_id.to_base58()))
        except ArgumentError as e:
            raise ConfigError("bootstrap", addr, e.reason) from None
    return out


def _bandwidth(samples: list[tuple[float, int, int]]) -> tuple[float, float]:
    if len(samples) < 2:
        return 0.0, 0.0
    (t0, i0, o0), (t1, i1, o1) = samples[0], samples[-1]
    dt = t1 - t0
    if dt <= 0:
        return 0.0, 0.0
    return round((i1 - i0) / dt, 1), round((o1 - o0) / dt, 1)


@contextlib.asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[Node]:
    """Start a node (host listening, DHT and loops running) and stop it on exit.

    Resource handling: the host is closed on exit, also on error or cancellation.
    """
    _parse_bootstrap(config)  # fail before binding anything
    from mcpp.queue.model import parse_quotas

    parse_quotas(config.quotas)
    os.makedirs(config.data_dir, exist_ok=True)
    # without --identity the key lives with the data: a restarted node is the same peer, and
    # still owns the tasks and workflows its database holds
    kp = identity.load_or_generate(config.identity or os.path.join(config.data_dir, IDENTITY_FILE))
    host = make_host(kp, announce=config.announce or _wildcard_announce(config.listen_addr), psk=config.swarm_key)
    metrics = NodeMetrics()
    try:
        async with host.run([multiaddr.Multiaddr(config.listen_addr)]):
            async with open_dht(host) as dht:
                node = Node(config, host, dht, metrics)
                from mcpp.queue.service import QueueService  # the queue is built on the node
                from mcpp.workflow.engine import WorkflowEngine  # and workflows on the queue

                queue = node.queue = QueueService(node, config)
                try:
                    engine = node.workflows = WorkflowEngine(queue)
                    async with trio.open_nursery() as nursery:
                        await nursery.start(node.run)
                        await nursery.start(queue.run)
                        await nursery.start(engine.run)
                        log.info("node started", extra=kv(peer=node.peer_id, role=node.role, addrs=node.multiaddrs))
                        try:
                            yield node
                        finally:
                            nursery.cancel_scope.cancel()
                finally:
                    queue.close()
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(3):
                with contextlib.suppress(Exception):
                    await host.close()


