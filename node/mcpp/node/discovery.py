"""Discovery through the DHT: this node provides the mesh key and its capabilities, reads the
providers of the mesh key (its own store every tick, the closest peers now and then, a random
walk rarely) and hands every peer it finds to connection management.

See core.py for how `Node` is layered.
"""

from __future__ import annotations

import logging
import time

import trio

from mcpp.config import NodeConfig
from mcpp.log import kv
from mcpp.metrics import NodeMetrics
from mcpp.net.dht import MESH_KEY, Dht, capability_key
from mcpp.net.p2p import IHost
from mcpp.node.gossip import Gossip
from mcpp.node.connections import MAX_BACKOFF_S
from mcpp.node.core import parse_bootstrap

__all__ = ["Discovery"]

log = logging.getLogger("mcpp.node")

REPROVIDE_S = 300.0  # provider records live 48 h; members are learned by gossip
EARLY_REPROVIDE_S = 1.5
NETWORK_FIND_S = 15.0
EARLY_NETWORK_FIND_S = 3.0
FORMING_S = 15.0  # after joining, the mesh is still being found: look 4x as often
RANDOM_WALK_S = 30.0
HEAL_FIND_S = 60.0  # with every known member connected, still look this often (two meshes that never met)


class Discovery(Gossip):
    """Finding the mesh's peers through the DHT."""

    def __init__(self, config: NodeConfig, host: IHost, dht: Dht, metrics: NodeMetrics) -> None:
        super().__init__(config, host, dht, metrics)
        self._providing = False
        self._finding = False
        self._last_provide = 0.0
        self._last_network_find = -1e9
        self._last_walk = -1e9
        # parsed once: multiaddr parsing costs ~1 ms and the list is fixed
        self._bootstrap_peers = parse_bootstrap(config)

    def reprovide_soon(self) -> None:
        """Capabilities changed: provide them in the DHT at the next discovery tick."""
        self._last_provide = 0.0

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
        if (self._joined_at is not None and time.monotonic() - self._joined_at < 4 * EARLY_REPROVIDE_S
                and not self.view.live()):  # (members known: gossip has the mesh, the DHT is not needed)
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
        lonely = not self.table.connected() or not self.view.live()
        for addr, pid in self._bootstrap_peers:
            # a bootstrap is the way in (and back in after a restart), not a neighbour for life:
            # dialed while this node knows no member, or while the bootstrap is not a live member
            rec = self.table.get(pid)
            member = self.view.get(pid)
            if pid == self.peer_id or (rec is not None and rec.connected) or pid in self._dialing:
                continue
            backoff = self._backoff.get(pid)
            now = time.monotonic()
            # (a goodbye's redial block does not apply: a lonely node needs the way in, and it
            # tries it at least every MAX_BACKOFF_S, whatever a failed re-check said)
            if backoff is not None and now < backoff.until and not (
                    lonely and now - (backoff.until - backoff.delay_s) >= MAX_BACKOFF_S):
                continue
            if lonely or member is None or not member.live:
                self._spawn(self._background_dial, pid, [addr], "bootstrap")
        if not self.table.connected():
            return
        now = time.monotonic()
        if not self._providing and (self._last_provide == 0.0 or now - self._last_provide > self._reprovide_s()):
            self._spawn(self._provide)
        # the DHT finds the first peers; then members come by gossip and the overlay dials them
        # (gossip.py): lookups (which open connections of their own, closed again once idle) only
        # while this node knows no member, and rarely otherwise (two meshes that never met)
        short = not self.view.live()
        if not self._finding:
            forming = self._forming()
            every = (EARLY_NETWORK_FIND_S if forming else NETWORK_FIND_S) if short else HEAL_FIND_S
            network = now - self._last_network_find > every
            if not short and not network:
                return
            walk = not self.view.live() and now - self._last_walk > RANDOM_WALK_S
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
