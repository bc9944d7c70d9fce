"""Connection management: dials (background, on demand, re-checks) with backoffs, the hello
exchange, the connection watcher, pings (RTT and liveness) and peers that leave.

See core.py for how `Node` is layered.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio

from mcpp.config import NodeConfig
from mcpp.errors import MCPPError, PeerUnreachable
from mcpp.log import kv
from mcpp.metrics import NodeMetrics
from mcpp.net.dht import Dht
from mcpp.net.p2p import ID, IHost, PeerInfo, dial_errors, peer_multiaddrs, remember_addrs, strip_p2p
from mcpp.net.peers import PeerRecord
from mcpp.node.core import NodeCore, valid_addrs

__all__ = ["Connections", "REDIAL_BLOCK_S", "HISTORY_WINDOW"]

log = logging.getLogger("mcpp.node")

GONE_MEMORY_S = 48 * 3600.0  # as long as py-libp2p keeps a stale provider record
GONE_REDIAL_S = 30.0  # a peer seen leaving is re-dialed this rarely (a healed partition)
REDIAL_BLOCK_S = 30.0
HISTORY_WINDOW = 11
MAX_BACKOFF_S = 4.0
DIAL_GRACE_S = 2.0
DEMAND_REDIAL_S = 2.0  # an rpc call re-dials a peer it could not reach at most this often
DEMAND_DIAL_TIMEOUT_S = 5.0
MAX_PINGS_PER_S = 1.0  # a ping costs ~1 ms of CPU at each end: at degree 8, 2 % of a core at 4/s
WATCH_S = 0.25
HELLO_TIMEOUT_S = 5.0
LAG_UNIT_S = 0.1  # each 0.1 s of event-loop lag adds one to the local health multiplier...
MAX_HEALTH = 8.0  # ...up to this (Lifeguard's LHM: a slow node is slow to accuse others)
LAG_DECAY = 0.9  # per watch tick: a lag peak fades to a tenth in ~5 s
FAREWELL_S = 10.0
MAX_HELLO_FAILURES = 2  # hellos in a row without an answer on one connection: it is closed
# a connection this node did not open and that got no hello this long (x local health) is
# libp2p's own (a DHT lookup or provide from the other side): closed, never made a link
UNNAMED_CLOSE_S = 15.0
ADMITTED_SOURCES = frozenset({"overlay", "dht"})


class OverlayFull(PeerUnreachable):
    """The dialed peer holds degree_high links already and declined one more for the overlay."""


@dataclass
class _Backoff:
    until: float
    delay_s: float


class Connections(NodeCore):
    """Who this node is connected to, and keeping it so."""

    def __init__(self, config: NodeConfig, host: IHost, dht: Dht, metrics: NodeMetrics) -> None:
        super().__init__(config, host, dht, metrics)
        self._refusing: set[str] = set()
        self._dialing: set[str] = set()
        self._hello_inflight: dict[str, trio.Event] = {}
        self._ping_inflight: set[str] = set()
        self._backoff: dict[str, _Backoff] = {}
        self._gone: dict[str, float] = {}
        self._blocked: dict[str, float] = {}
        self._demand_failed: dict[str, float] = {}
        self._first_seen: dict[str, float] = {}
        self._farewell: dict[str, float] = {}  # peer id -> when a goodbye was said (by either side)
        self._hello_failures: dict[str, int] = {}
        self.loop_lag_s = 0.0
        self._degree_closed: set[str] = set()  # blocked links closed for the overlay's degree (not by a user)
        # Who says hello: the node that opened a connection (our dials and on-demand calls: these
        # ids), never the other end, and nobody on the connections the DHT opens for a lookup or
        # a provide (a forming 50-node mesh opens thousands: each hello'd, synced, pinged and
        # pruned again took the whole machine)
        self._opened: set[str] = set()
        self._unnamed_since: dict[str, float] = {}
        self.rpc.register("hello", self._on_hello, background=True)
        self.rpc.register("goodbye", self._on_goodbye, background=True)

    async def _on_hello(self, peer_id: str, params: Any) -> Any:
        if isinstance(params, dict):
            if params.get("overlay") is True and self._overlay_full():
                # HyParView's admission: a node at degree_high declines overlay links (the dialer
                # closes the connection and tries another member) instead of taking them and
                # pruning others, which left those short and set off a cascade of dials
                return {"full": True}
            via = params.get("via")
            await self._apply_hello(peer_id, params, source=f"in:{via}" if isinstance(via, str) else "inbound")
        return self.info()

    def _overlay_full(self) -> bool:
        """Whether this node declines more overlay links (see gossip.py)."""
        return False

    async def _on_goodbye(self, peer_id: str, params: Any) -> Any:
        self._blocked[peer_id] = time.monotonic() + REDIAL_BLOCK_S
        if isinstance(params, dict) and params.get("overlay") is True:
            self._degree_closed.add(peer_id)  # the overlay may dial it back if it runs short
        else:
            self._degree_closed.discard(peer_id)
        self._farewell[peer_id] = time.monotonic()
        rec = self.table.get(peer_id)
        if rec is not None:
            rec.persistent = False
        return {"ok": True}

    async def _apply_hello(self, peer_id: str, info: dict[str, Any], source: str) -> None:
        if peer_id not in self._live_peer_ids():
            return
        caps = info.get("capabilities")
        addrs = valid_addrs(info.get("multiaddrs"))
        remember_addrs(self.host, peer_id, addrs)
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
        # in the background: with a full k-bucket py-libp2p pings the bucket's oldest peer (maybe a
        # dial) under the bucket's lock, and a hello that waited on it went unanswered for seconds
        self._spawn(self.dht.add_peer, peer_id)
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
        # the connection closes after a goodbye (either way): not a failure to look into
        said_goodbye = time.monotonic() - self._farewell.pop(peer_id, -1e9) < FAREWELL_S
        for hook in self.peer_left_hooks:
            hook(peer_id, gone and not said_goodbye)
        if gone and not (rec is not None and rec.persistent):  # persistent ones: _watch_loop redials
            self._gone[peer_id] = time.monotonic()
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

    def _dial_failed_recently(self, peer_id: str) -> bool:
        b = self._backoff.get(peer_id)
        return b is not None and time.monotonic() < b.until

    def _fail_backoff(self, peer_id: str) -> None:
        b = self._backoff.get(peer_id)
        cap = GONE_REDIAL_S if peer_id in self._gone else MAX_BACKOFF_S
        delay = 0.25 if b is None else min(b.delay_s * 2, cap)
        self._backoff[peer_id] = _Backoff(time.monotonic() + delay, delay)

    async def _hello(self, peer_id: str, source: str, timeout_s: float | None = None) -> None:
        """Exchange hello; if one is already running for this peer, wait for that one."""
        if timeout_s is None:
            timeout_s = HELLO_TIMEOUT_S * self.health()
        running = self._hello_inflight.get(peer_id)
        if running is not None:
            with trio.move_on_after(timeout_s):
                await running.wait()
            return
        done = self._hello_inflight[peer_id] = trio.Event()
        asked_at = time.time()
        try:
            # links the overlay or the DHT asks for are subject to the other end's admission; a
            # bootstrap dial, a user's, a re-check or a partition's reconnect are not
            params = {**self.info(), "via": source, **({"overlay": True} if source in ADMITTED_SOURCES else {})}
            info = await self.rpc.call(peer_id, "hello", params, timeout_s=timeout_s, dial=False)
            if isinstance(info, dict) and info.get("full") is True:
                self._blocked[peer_id] = time.monotonic() + REDIAL_BLOCK_S
                self._degree_closed.add(peer_id)
                self._spawn(self._drop_connection, peer_id, "declined: full")
                raise OverlayFull(peer_id, "it holds degree_high links already")
            if isinstance(info, dict):
                await self._apply_hello(peer_id, info, source)
            self._hello_failures.pop(peer_id, None)
        except OverlayFull:
            raise
        except MCPPError as e:
            log.debug("hello failed", extra=kv(peer=peer_id, error=str(e)))
            rec = self.table.get(peer_id)
            if rec is not None and rec.hello_done:
                return  # the other direction's hello worked meanwhile: a slow link, not a broken one
            if self.rpc.traffic_of(peer_id).last_in > asked_at:
                return  # frames arrived meanwhile: a busy peer (a mesh forming on few cores), not a dead link
            n = self._hello_failures[peer_id] = self._hello_failures.get(peer_id, 0) + 1
            if n >= MAX_HELLO_FAILURES:
                # a connection that carries no hello is broken (seen under load: a yamux session
                # that stalls): close it, so that the next dial starts afresh
                self._hello_failures.pop(peer_id, None)
                log.info("closing a connection that does not answer hello", extra=kv(peer=peer_id))
                self._spawn(self._drop_connection, peer_id, "no hello")
        finally:
            del self._hello_inflight[peer_id]
            done.set()

    async def _drop_connection(self, peer_id: str, why: str) -> None:
        log.debug("closing a connection", extra=kv(peer=peer_id, why=why))
        with contextlib.suppress(Exception):
            with trio.move_on_after(2):
                await self.host.disconnect(ID.from_base58(peer_id))

    async def dial(self, peer_id: str, addrs: list[str], source: str, timeout_s: float = 5.0,
                   hello_timeout_s: float | None = None) -> None:
        """Connect and say hello, all within timeout_s (or the connection within timeout_s and the
        hello within hello_timeout_s). Raises PeerUnreachable."""
        deadline = trio.current_time() + timeout_s
        with dial_errors(peer_id):
            pid = ID.from_base58(peer_id)
        await self._connect(pid, addrs, timeout_s)
        self._opened.add(peer_id)
        if hello_timeout_s is None:
            hello_timeout_s = max(0.1, deadline - trio.current_time())
        await self._hello(peer_id, source, hello_timeout_s)

    async def _connect(self, pid: ID, addrs: list[str], timeout_s: float) -> None:
        """A libp2p connection to pid at addrs within timeout_s, whatever libp2p's negative cache
        says (our own backoffs decide when to retry; else a restarted bootstrap stays unreachable
        for a minute). Raises PeerUnreachable."""
        peer_id = pid.to_base58()
        try:
            with trio.fail_after(timeout_s), dial_errors(peer_id):
                mas = [multiaddr.Multiaddr(strip_p2p(a)) for a in addrs]
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
        addrs = list(dict.fromkeys([*(rec.multiaddrs if rec is not None else []), *peer_multiaddrs(self.host, pid),
                                    *self._addrs_hint(peer_id)]))
        if not addrs:
            raise PeerUnreachable(peer_id, "not connected and no address known")
        try:
            await self._connect(pid, addrs, DEMAND_DIAL_TIMEOUT_S)
        except BaseException:  # failed, or cut short by the caller's own timeout: throttle either way
            self._demand_failed[peer_id] = time.monotonic()
            raise
        self._demand_failed.pop(peer_id, None)

    def _addrs_hint(self, peer_id: str) -> list[str]:
        """Addresses known for a peer beyond the table and the peerstore (members: see gossip.py)."""
        return []

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
            # the hello gets its own time: a handshake that took 4 s of a loaded machine left the
            # hello 1 s, and 300 of 800 hellos of a forming 30-node mesh timed out
            # (3x for the way in: a bootstrap answers every joiner of a mesh that starts at once)
            patience = 3.0 if source == "bootstrap" else 1.0
            await self.dial(peer_id, addrs, source, hello_timeout_s=patience * HELLO_TIMEOUT_S * self.health())
        except (PeerUnreachable, trio.TooSlowError, MCPPError) as e:
            self._fail_backoff(peer_id)
            rec = self.table.get(peer_id)
            if rec is not None and not rec.connected and not rec.persistent:
                self.table.remove(peer_id)
            log.debug("dial failed", extra=kv(peer=peer_id, error=str(e)))
        finally:
            self._dialing.discard(peer_id)

    def _consider(self, peer_id: str, addrs: list[str], source: str) -> None:
        """A peer found through the DHT: remember it and dial it unless known-dead or backed off."""
        if peer_id == self.peer_id or peer_id in self._dialing or self._in_backoff(peer_id):
            return
        if not self.peer_allowed(peer_id):
            return
        rec = self.table.get(peer_id)
        if rec is not None and rec.connected:
            return
        if len(self.table.connected()) + len(self._dialing) >= self.config.degree:
            return  # the overlay is full: members are learned by gossip, not by connecting
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
            self._opened &= live | self._dialing
            now = time.monotonic()
            for pid in live:
                rec = self.table.get(pid)
                if rec is not None and rec.hello_done or pid in self._hello_inflight or pid in self._dialing:
                    self._unnamed_since.pop(pid, None)
                elif pid in self._opened:  # ours: hello it (again, if the one in dial() failed)
                    self._spawn(self._hello, pid, "inbound")
                else:  # theirs: wait for their hello; libp2p's own or a call's: closed once idle
                    since = self._unnamed_since.setdefault(pid, now)
                    traffic = self.rpc.traffic.get(pid)
                    if traffic is not None:  # (last_in is wall-clock time, last_work monotonic)
                        since = max(since, traffic.last_work, now - (time.time() - traffic.last_in))
                    if now - since > UNNAMED_CLOSE_S * self.health():
                        del self._unnamed_since[pid]
                        self.rpc.traffic.pop(pid, None)
                        self._spawn(self._drop_connection, pid, "unnamed")
            for pid in [p for p in self._unnamed_since if p not in live]:
                del self._unnamed_since[pid]
            for rec in self.table.connected():
                if rec.peer_id not in live:
                    self._lost(rec.peer_id, "connection closed")
            for rec in self.table.all():
                if rec.persistent and not rec.connected and not self._in_backoff(rec.peer_id):
                    self._spawn(self._background_dial, rec.peer_id, rec.multiaddrs, "persistent")
            for pid, t in list(self._gone.items()):
                if now - t > GONE_MEMORY_S:
                    del self._gone[pid]
            for pid, until in list(self._blocked.items()):
                if until < now:
                    del self._blocked[pid]
                    self._degree_closed.discard(pid)
            for pid, t in list(self._demand_failed.items()):
                if now - t > DEMAND_REDIAL_S:
                    del self._demand_failed[pid]
            t = trio.current_time()
            await trio.sleep(WATCH_S)
            self._note_lag(trio.current_time() - t - WATCH_S)

    def _note_lag(self, lag_s: float) -> None:
        self.loop_lag_s = max(lag_s, self.loop_lag_s * LAG_DECAY)
        self.metrics.loop_lag.set(self.loop_lag_s)

    def health(self) -> float:
        """Lifeguard's local health multiplier, from this node's own loop lag: 1 when the loop is
        prompt, up to MAX_HEALTH on a starved node (50 nodes forming on 2 cores). Every timeout
        after which this node would judge a peer (hello, ping, probe, suspicion) is scaled by it,
        so that its own slowness is not taken for theirs."""
        return min(MAX_HEALTH, 1.0 + self.loop_lag_s / LAG_UNIT_S)

    def _ping_every_s(self) -> float:
        """Each peer is pinged every ping_interval_s, slower with many links so that a node sends
        at most MAX_PINGS_PER_S pings in all: its ~degree neighbours together still ping it about
        once a second (SWIM's probe rate), whatever the mesh's size."""
        return max(self.config.ping_interval_s, len(self.table.connected()) / MAX_PINGS_PER_S)

    async def _ping_one(self, rec: PeerRecord) -> None:
        pid = rec.peer_id
        self._ping_inflight.add(pid)
        rec.last_ping_sent = time.monotonic()
        try:
            rtt = await self.ping(pid, timeout_s=self.config.peer_timeout_s * self.health(), dial=False)
            rec.add_rtt(rtt)
        except MCPPError:
            rec.ping_failures += 1
            rec.feed_reputation(False)
            # any frame from the peer (its own pings, answers, requests) proves it is alive
            heard = max(rec.last_seen or 0.0, self.rpc.traffic_of(pid).last_in)
            silent_s = time.time() - heard
            if silent_s >= self.config.peer_timeout_s * self.health() and rec.connected:
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

    async def _sample_traffic(self) -> None:
        while True:
            now = time.monotonic()
            for t in self.rpc.traffic.values():
                t.samples.append((now, t.bytes_in, t.bytes_out))
                del t.samples[:-HISTORY_WINDOW]
            await trio.sleep(1)
