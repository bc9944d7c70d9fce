"""The node: `open_node(config)` starts a libp2p host, the DHT, the RPC endpoint and the node's
loops; `Node` adds to connection management and discovery the peer operations behind the 6
peer tools (peer_discover, peer_connect, peer_disconnect, peer_list, peer_metrics,
bootstrap_network).

Lifecycle: `open_node(config)` is an async context manager owning one nursery in which the
RPC endpoint, the connection watcher, the pinger, the discovery loop and the traffic sampler
run. Leaving it cancels them and closes the host (peers see the disconnect at once).
`build_node(config)` gives the node before its loops start, for the composition root
(`mcpp.runner`) to build services on it first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import multiaddr
import psutil
import trio

if TYPE_CHECKING:  # trio-typing's stubs (a py-libp2p dependency) shadow trio's own annotations
    from trio_typing import TaskStatus

from mcpp.config import NodeConfig
from mcpp.errors import ArgumentError, MCPPError, PeerNotFound, PeerUnreachable, RPCError
from mcpp.log import kv
from mcpp.metrics import NodeMetrics
from mcpp.net import identity
from mcpp.net.dht import MESH_KEY, capability_key, open_dht
from mcpp.net.p2p import ID, make_host, parse_peer_id, parse_peer_multiaddr, peer_multiaddrs, quiet_connection_manager
from mcpp.net.peers import PeerRecord, percentile, quality
from mcpp.node.connections import REDIAL_BLOCK_S
from mcpp.node.core import parse_bootstrap
from mcpp.node.discovery import Discovery

__all__ = ["Node", "build_node", "open_node", "PEER_STATUSES", "SORT_KEYS"]

log = logging.getLogger("mcpp.node")

BOOTSTRAP_CONNECTIONS_FACTOR = 4  # a bootstrap's libp2p connection cap is this x max_connections
PEER_STATUSES = ("connected", "known", "all", "members")
SORT_KEYS = ("latency", "last_seen", "peer_id", "reputation")
IDENTITY_FILE = "identity.key"  # in data_dir, when no identity is configured
MAX_BOOTSTRAP_PEERS = 100


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ArgumentError(name, f"must be a number between {lo:g} and {hi:g}")
    if not lo <= value <= hi:
        raise ArgumentError(name, f"must be between {lo:g} and {hi:g}, got {value!r}")


class Node(Discovery):
    """One mesh node: its loops and the peer operations. Only the node's trio loop touches it."""

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.rpc.run)
            nursery.start_soon(self._watch_loop)
            nursery.start_soon(self._ping_loop)
            nursery.start_soon(self._discovery_loop)
            nursery.start_soon(self._sample_traffic)
            nursery.start_soon(self._gossip_loop)
            task_status.started()

    # ---- operations (the peer tools) ---------------------------------------------------
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
        self._degree_closed.discard(pid)
        self._farewell[pid] = time.monotonic()
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
        if status == "members":
            entries = self._member_entries()
        else:
            recs = self.table.all()
            if status == "connected":
                recs = [r for r in recs if r.connected]
            elif status == "known":
                recs = [r for r in recs if not r.connected]
            entries = [r.summary() for r in recs]
        if capability is not None:
            entries = [e for e in entries if capability in e["capabilities"]]
        if sort_by == "latency":
            entries.sort(key=lambda e: (e["latency_ms"] is None, e["latency_ms"] or 0.0, e["peer_id"]))
        elif sort_by == "last_seen":
            entries.sort(key=lambda e: (-(e["last_seen"] or 0.0), e["peer_id"]))
        elif sort_by == "reputation":
            entries.sort(key=lambda e: (-e["reputation"], e["peer_id"]))
        else:
            entries.sort(key=lambda e: e["peer_id"])
        page = entries[offset : offset + limit]
        return {
            "peers": page,
            "count": len(page),
            "total": len(entries),
            "has_more": offset + len(page) < len(entries),
        }

    def _member_entries(self) -> list[dict[str, Any]]:
        """Every live member (alive or suspect) as gossip knows it, with what the table adds for
        neighbours (latency, reputation): the same fields as the other statuses, plus state and
        incarnation."""
        out = []
        for m in self.view.live():
            rec = self.table.get(m.peer_id)
            base = rec.summary() if rec is not None else {
                "peer_id": m.peer_id, "role": m.role, "multiaddrs": list(m.addrs), "connected": False,
                "latency_ms": None, "last_seen": None, "capabilities": list(m.capabilities), "reputation": 0.5}
            out.append({**base, "capabilities": list(m.capabilities), "state": m.state, "incarnation": m.incarnation})
        return out

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


def _wildcard_announce(listen: str) -> tuple[str, ...]:
    """A node listening on 0.0.0.0 (a container) advertises its interfaces' IPv4 addresses
    instead, so that peers can dial what they learn. Loopback is left out unless it is all."""
    parts = listen.split("/")
    if len(parts) < 5 or parts[1] != "ip4" or parts[2] != "0.0.0.0" or parts[3] != "tcp" or parts[4] == "0":
        return ()
    ips = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family.name == "AF_INET" and not a.address.startswith("127.")]
    return tuple(f"/ip4/{ip}/tcp/{parts[4]}" for ip in (ips or ["127.0.0.1"]))


def _bandwidth(samples: list[tuple[float, int, int]]) -> tuple[float, float]:
    if len(samples) < 2:
        return 0.0, 0.0
    (t0, i0, o0), (t1, i1, o1) = samples[0], samples[-1]
    dt = t1 - t0
    if dt <= 0:
        return 0.0, 0.0
    return round((i1 - i0) / dt, 1), round((o1 - o0) / dt, 1)


@contextlib.asynccontextmanager
async def build_node(config: NodeConfig) -> AsyncIterator[Node]:
    """A node whose host listens and whose DHT runs, but whose own loops are not started yet:
    services register their RPC methods and hooks on it, then the caller runs `node.run` in
    its nursery (see `mcpp.runner.open_services`). Most callers want `open_node`.

    Resource handling: the host is closed on exit, also on error or cancellation.
    """
    parse_bootstrap(config)  # fail before binding anything
    os.makedirs(config.data_dir, exist_ok=True)
    # without --identity the key lives with the data: a restarted node is the same peer, and
    # still owns the tasks and workflows its database holds
    kp = identity.load_or_generate(config.identity or os.path.join(config.data_dir, IDENTITY_FILE))
    # a bootstrap takes every joiner's first connection (100 joiners at once: 48 were refused at
    # a cap of 64 and never got in); they are pruned within seconds of the joiner's first sync
    cap = config.max_connections * (BOOTSTRAP_CONNECTIONS_FACTOR if config.role == "bootstrap" else 1)
    host = make_host(kp, announce=config.announce or _wildcard_announce(config.listen_addr), psk=config.swarm_key,
                     max_connections=cap)
    metrics = NodeMetrics()
    try:
        async with host.run([multiaddr.Multiaddr(config.listen_addr)]):
            await quiet_connection_manager(host)
            async with open_dht(host) as dht:
                yield Node(config, host, dht, metrics)
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(3):
                with contextlib.suppress(Exception):
                    await host.close()


@contextlib.asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[Node]:
    """Start a node (host listening, DHT and loops running) and stop it on exit: the node alone,
    with no queue or workflows (`mcpp.runner.open_services` builds those on it)."""
    async with build_node(config) as node, trio.open_nursery() as nursery:
        await nursery.start(node.run)
        log.info("node started", extra=kv(peer=node.peer_id, role=node.role, addrs=node.multiaddrs))
        try:
            yield node
        finally:
            await node.leave()
            nursery.cancel_scope.cancel()
