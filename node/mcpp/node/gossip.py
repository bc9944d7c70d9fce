"""Gossip membership and the bounded overlay, on the node's RPC endpoint (see membership.py for
the protocol and the rules).

This part of the node moves membership messages (`m.push`, `m.sync`, `m.probe`), turns broken
connections into probes and suspicions, and keeps the overlay's degree (GossipSub's hysteresis):
below `degree_low` neighbours it dials members up to `degree`; above `degree_high` it closes idle
links down to `degree` (connections opened for one call are not links: connections.py closes
them once idle). See core.py for how `Node`
is layered.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Any

import trio

from mcpp.config import NodeConfig
from mcpp.errors import MCPPError
from mcpp.log import kv
from mcpp.metrics import NodeMetrics
from mcpp.net.dht import Dht
from mcpp.net.p2p import ID, IHost
from mcpp.node.connections import Connections
from mcpp.node.membership import (
    GOSSIP_S,
    INDIRECT_PROBES,
    PROBE_TIMEOUT_S,
    RECONNECT_S,
    SYNC_S,
    Member,
    MemberView,
)

__all__ = ["Gossip"]

log = logging.getLogger("mcpp.node")

OVERLAY_S = 1.0
SELF_REFRESH_S = 0.5
IDLE_S = 10.0  # a link that carried no work (calls other than pings and gossip) this long is idle
JOIN_GRACE_S = 5.0
GOODBYE_TIMEOUT_S = 2.0  # x local health
RPC_TIMEOUT_S = 5.0  # pushes and syncs, x local health  # above degree_high, a link is not closed for the degree before this age  # below degree_high, a new link is not closed for the degree before this age
LEAVE_S = 0.5  # a clean stop waits this long at most for its `left` pushes
MAX_DIALS_PER_TICK = 4


class Gossip(Connections):
    """Membership and the overlay's degree."""

    def __init__(self, config: NodeConfig, host: IHost, dht: Dht, metrics: NodeMetrics) -> None:
        super().__init__(config, host, dht, metrics)
        # a restarted node is newer than anything said about its previous life
        self.view = MemberView(Member(self.peer_id, int(time.time() * 1000), "alive", tuple(self.multiaddrs),
                                      self.role, tuple(self.advertised_capabilities()), self.mcp_url, None))
        self._rng = random.Random()
        self._probing: set[str] = set()
        self._pushing: set[str] = set()  # neighbours with a push in flight
        self._closing: set[str] = set()  # neighbours closed for the degree, goodbye under way
        self._push_pending: dict[str, dict[str, dict[str, Any]]] = {}  # neighbour -> member id -> update
        self._last_reconnect = time.monotonic()
        self.rpc.register("m.push", self._on_push, background=True)
        self.rpc.register("m.sync", self._on_sync, background=True)
        self.rpc.register("m.probe", self._on_probe, background=True)
        self.peer_joined_hooks.append(self._neighbour_joined)
        self.peer_left_hooks.append(self._neighbour_left)

    # ---- facts -------------------------------------------------------------------------
    def neighbours(self) -> list[str]:
        return [r.peer_id for r in self.table.connected() if r.hello_done]

    def _overlay_full(self) -> bool:
        return len(self.neighbours()) >= self.config.degree_high

    def members(self) -> list[str]:
        """The live members this node knows (alive, not suspect), itself excluded."""
        return self.view.alive_ids()

    def status(self) -> dict[str, Any]:
        suspect = sorted(m.peer_id for m in self.view.live() if m.state == "suspect")
        return {**super().status(), "members": self.members(), "suspect": suspect, "degree": self.config.degree,
                "degree_low": self.config.degree_low, "loop_lag_ms": round(self.loop_lag_s * 1000, 1),
                "health": round(self.health(), 2)}

    def _addrs_hint(self, peer_id: str) -> list[str]:
        m = self.view.get(peer_id)
        return list(m.addrs) if m is not None else []

    def _self_info(self) -> dict[str, Any]:
        extra = {k: self.member_extra[k]() if k in self.member_extra else None for k in ("worker", "load")}
        return {"addrs": tuple(self.multiaddrs), "role": self.role, "capabilities": tuple(self.advertised_capabilities()),
                "mcp_url": self.mcp_url, **extra}

    # ---- rpc handlers ------------------------------------------------------------------
    async def _on_push(self, peer_id: str, params: Any) -> Any:
        n = self.view.receive_push(peer_id, params.get("updates") if isinstance(params, dict) else None)
        self.metrics.gossip_messages.labels("push_in").inc()
        return {"applied": n}

    async def _on_sync(self, peer_id: str, params: Any) -> Any:
        """Push-pull. `{"digest": d}` alone asks first whether the views differ at all."""
        self.metrics.gossip_messages.labels("sync_in").inc()
        if isinstance(params, dict) and "members" not in params:
            if params.get("digest") == self.view.digest():
                return {"same": True}
            return {"members": self.view.snapshot()}
        # the push half of a push-pull: the caller has this node's view from the digest's answer
        return {"applied": self.view.receive_sync(peer_id, params.get("members") if isinstance(params, dict) else None)}

    async def _on_probe(self, peer_id: str, params: Any) -> Any:
        target = params.get("target") if isinstance(params, dict) else None
        if not isinstance(target, str) or target == self.peer_id or self.view.get(target) is None:
            return {"ok": False}
        try:
            await self.rpc.call(target, "ping", None, timeout_s=PROBE_TIMEOUT_S * self.health())
            return {"ok": True}
        except MCPPError:
            return {"ok": False}

    # ---- hooks from connection management ----------------------------------------------
    def _neighbour_joined(self, peer_id: str) -> None:
        if peer_id in self._opened:  # one push-pull per new link, by the end that opened it
            self._spawn(self._sync_with, peer_id)

    def _neighbour_left(self, peer_id: str, unexpected: bool) -> None:
        if unexpected:
            self._spawn(self._check_unreachable, peer_id)

    async def _sync_with(self, peer_id: str) -> None:
        """Push-pull: both sides end with the union of their views. Digests first: a new link
        (every link, since news pushed before it existed never crossed it) or the periodic
        sync between views that agree costs two small messages, not two whole views."""
        try:
            answer = await self.rpc.call(peer_id, "m.sync", {"digest": self.view.digest()},
                                         timeout_s=RPC_TIMEOUT_S * self.health(), dial=False)
            self.metrics.gossip_messages.labels("sync_out").inc()
            if not isinstance(answer, dict) or answer.get("same") is True:
                return
            self.view.receive_sync(peer_id, answer.get("members"))
            await self.rpc.call(peer_id, "m.sync", {"members": self.view.snapshot()},
                                timeout_s=RPC_TIMEOUT_S * self.health(), dial=False)
        except MCPPError as e:
            log.debug("sync failed", extra=kv(peer=peer_id, error=str(e)))

    def _queue_push(self, peer_id: str, updates: list[dict[str, Any]]) -> None:
        """At most one push in flight per neighbour: what comes meanwhile waits and goes in the
        next one (the newest news of each member only). A slow neighbour gets fewer, bigger
        pushes instead of a pile of concurrent ones (which starved 50 nodes forming on 2 cores)."""
        pending = self._push_pending.setdefault(peer_id, {})
        for u in updates:
            pending[u["id"]] = u
        if peer_id not in self._pushing:
            self._pushing.add(peer_id)
            self._spawn(self._push, peer_id)

    async def _push(self, peer_id: str) -> None:
        try:
            while pending := self._push_pending.pop(peer_id, None):
                if not await self._send_push(peer_id, list(pending.values())):
                    self._push_pending.pop(peer_id, None)  # what it missed comes with the next sync
                    return
                await trio.sleep(GOSSIP_S)
        finally:
            self._pushing.discard(peer_id)

    async def _send_push(self, peer_id: str, updates: list[dict[str, Any]]) -> bool:
        try:
            await self.rpc.call(peer_id, "m.push", {"updates": updates}, timeout_s=RPC_TIMEOUT_S * self.health(), dial=False)
            self.metrics.gossip_messages.labels("push_out").inc()
            return True
        except MCPPError as e:
            log.debug("push failed", extra=kv(peer=peer_id, error=str(e)))
            return False

    async def _check_unreachable(self, peer_id: str) -> None:
        """A connection to a member broke: probe it directly, then through up to INDIRECT_PROBES
        neighbours; only if nobody reaches it is it suspected."""
        m = self.view.get(peer_id)
        if m is None or m.state != "alive" or peer_id in self._probing:
            return
        self._probing.add(peer_id)
        try:
            with contextlib.suppress(MCPPError):
                await self.rpc.call(peer_id, "ping", None, timeout_s=PROBE_TIMEOUT_S * self.health())
                return
            helpers = [p for p in self.neighbours() if p != peer_id]
            reached = False

            async def ask(helper: str) -> None:
                nonlocal reached
                with contextlib.suppress(MCPPError):
                    r = await self.rpc.call(helper, "m.probe", {"target": peer_id},
                                            timeout_s=2 * PROBE_TIMEOUT_S * self.health(), dial=False)
                    if isinstance(r, dict) and r.get("ok") is True:
                        reached = True

            async with trio.open_nursery() as n:
                for h in self._rng.sample(helpers, min(INDIRECT_PROBES, len(helpers))):
                    n.start_soon(ask, h)
            if not reached and self.view.suspect(peer_id):
                log.info("member suspected", extra=kv(peer=peer_id))
        finally:
            self._probing.discard(peer_id)

    # ---- the overlay -------------------------------------------------------------------
    def _overlay_tick(self) -> None:
        """GossipSub's hysteresis: below `degree_low` dial members up to `degree`; above
        `degree_high` close idle links down to `degree` (connections opened for one call are
        not links: connections.py closes them once idle)."""
        neighbours = self.neighbours()
        cfg = self.config
        if len(neighbours) < cfg.degree_low:
            busy = set(neighbours) | set(self._dialing)
            candidates = [m for m in self.view.live() if m.state == "alive" and m.peer_id not in busy
                          and m.addrs and self.peer_allowed(m.peer_id)]
            # not a peer in backoff or that said goodbye (a disconnect or a close for the degree)...
            pool = [m for m in candidates if not self._in_backoff(m.peer_id)]
            if not pool:  # ...unless only those are left: after both ends of several links pruned
                # at once, a node kept one neighbour, and an island misses every rumour
                pool = [m for m in candidates if m.peer_id in self._degree_closed
                        and not self._dial_failed_recently(m.peer_id)]
            # dials still in flight count: a dial takes up to 5 s (x local health) on a loaded
            # machine, and a tick each second that started up to 4 more whatever was under way
            # kept ~20 handshakes in flight per short node (1,700 dials timed out while 50 formed)
            want = cfg.degree - len(neighbours) - len(self._dialing)
            for m in self._rng.sample(pool, max(0, min(want, MAX_DIALS_PER_TICK, len(pool)))):
                self._spawn(self._background_dial, m.peer_id, list(m.addrs), "overlay")
        elif len(neighbours) > cfg.degree_high:
            self._prune(neighbours)
        now = time.monotonic()
        if now - self._last_reconnect >= RECONNECT_S:
            self._last_reconnect = now
            dead = [m for m in self.view.recently_dead() if m.addrs and m.peer_id not in self._dialing]
            if dead:  # a healed partition is found this way
                m = self._rng.choice(dead)
                self._blocked.pop(m.peer_id, None)
                self._backoff.pop(m.peer_id, None)
                self._spawn(self._background_dial, m.peer_id, list(m.addrs), "reconnect")

    def _prune(self, neighbours: list[str]) -> None:
        """Above `degree_high` (a bootstrap while a mesh forms, links admission did not see),
        close idle links, oldest first, down to `degree`, all the excess at once (the other ends
        may prune too; a node left short dials back: see _overlay_tick). Not a link younger than
        JOIN_GRACE_S: a joiner's first and only link, before it synced and dialed members of its
        own (closing it left the joiner alone for 30 s). Links that carry work (task dispatch,
        forwarded calls) are never closed for the degree."""
        cfg = self.config
        wall, mono = time.time(), time.monotonic()
        neighbours = [p for p in neighbours if p not in self._closing]  # (their goodbye is under way)
        young = wall - JOIN_GRACE_S * self.health()
        idle = []
        for p in neighbours:
            rec = self.table.get(p)
            if rec is None or rec.persistent or mono - self.rpc.traffic_of(p).last_work < IDLE_S:
                continue
            since = rec.connected_since or wall
            if since < young:
                idle.append((since, p))
        idle.sort()
        for _, p in idle[: max(0, len(neighbours) - cfg.degree)]:
            self._blocked[p] = time.monotonic() + 30.0  # do not dial it back at once
            self._degree_closed.add(p)
            self._spawn(self._close_for_degree, p)

    async def _close_for_degree(self, peer_id: str) -> None:
        """Goodbye, then close. A link whose goodbye gets no answer stays open (a later tick may
        try again): closed without one, the other end probed us and, on a loaded machine,
        suspected us, and every suspicion and refutation crossed the whole mesh."""
        self._closing.add(peer_id)
        self._farewell[peer_id] = time.monotonic()
        try:
            await self.rpc.call(peer_id, "goodbye", {"reason": "degree", "overlay": True},
                                timeout_s=GOODBYE_TIMEOUT_S * self.health(), dial=False)
        except MCPPError:
            self._farewell.pop(peer_id, None)
            self._closing.discard(peer_id)
            return
        try:
            with contextlib.suppress(Exception):
                with trio.move_on_after(2):
                    await self.host.disconnect(ID.from_base58(peer_id))
            self._lost(peer_id, "closed: above the degree bound", gone=False)
            self.metrics.gossip_messages.labels("prune").inc()
        finally:
            self._closing.discard(peer_id)

    # ---- loops -------------------------------------------------------------------------
    async def _gossip_loop(self) -> None:
        last_self = 0.0
        last_sync = time.monotonic()
        last_overlay = 0.0
        while True:
            now = time.monotonic()
            if now - last_self >= SELF_REFRESH_S:  # also the pace of the O(N) chores
                last_self = now
                self.view.update_self(**self._self_info())
                self.view.health = self.health()
                for pid in self.view.tick(now):
                    log.info("member dead", extra=kv(peer=pid))
                self._update_member_gauges()
            neighbours = self.neighbours()
            # pushes go to at most degree_high neighbours a tick: a bootstrap holding every
            # joiner's link for a moment pushed each piece of news to all of them and starved
            # (joiners get the view from their first sync; links above degree_high are pruned)
            targets = neighbours if len(neighbours) <= self.config.degree_high else self._rng.sample(
                neighbours, self.config.degree_high)
            for pid, updates in self.view.take_outbox(targets).items():
                self._queue_push(pid, updates)
            if neighbours and now - last_sync >= SYNC_S:
                last_sync = now
                self._spawn(self._sync_with, self._rng.choice(neighbours))
            if now - last_overlay >= OVERLAY_S:
                last_overlay = now
                self._overlay_tick()
            await trio.sleep(GOSSIP_S)

    def _update_member_gauges(self) -> None:
        st = self.view.statistics()
        self.metrics.members.labels("alive").set(st.alive)
        self.metrics.members.labels("suspect").set(st.suspect)
        self.metrics.members.labels("dead").set(st.dead)

    async def leave(self) -> None:
        """A clean stop: tell the neighbours this node leaves (they spread it), within LEAVE_S."""
        self.view.leave()
        outbox = self.view.take_outbox(self.neighbours())
        with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_S):
            async with trio.open_nursery() as n:
                for pid, updates in outbox.items():
                    n.start_soon(self._send_push, pid, updates)
