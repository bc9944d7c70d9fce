"""Kademlia DHT (py-libp2p KadDHT, server mode): mesh membership and capability adverts.

Keys: `mcpp/mesh/1` is provided by every node; `mcpp/cap/1/<name>` by every node that has
capability <name>. Provider records are re-provided periodically by the node and carry no
liveness: the node checks liveness itself (peer table + pings).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT, _encode_key
from libp2p.tools.anyio_service import background_trio_service

from mcpp.net.p2p import ID, IHost

__all__ = ["Dht", "MESH_KEY", "capability_key", "open_dht"]

MESH_KEY = "mcpp/mesh/1"
ALPHA = 3
ADD_PEER_TIMEOUT_S = 5.0
log = logging.getLogger("mcpp.dht")


def capability_key(name: str) -> str:
    return f"mcpp/cap/1/{name}"


def _no_dials_for_bucket_eviction() -> None:
    """py-libp2p 0.8's KBucket.add_peer, when a bucket holds 20 peers, pings the bucket's oldest
    peer with the libp2p ping protocol, which *dials* it when no connection is open; and every
    DHT message from a new peer lands in add_peer. From about 40 nodes on, when bucket 0 fills,
    DHT traffic became a stream of dials to peers the bounded overlay had closed (36 connections
    outside the overlay for each overlay dial, each with its handshake, hello and later prune).
    The oldest peer now counts as alive if a connection to it is open, as gone otherwise (it is
    replaced by the newcomer, which just reached us): no dial. Membership (node/gossip.py) is
    what tracks liveness; the routing table only needs peers worth asking."""
    from libp2p.kad_dht.routing_table import KBucket

    async def connected_means_alive(self: Any, peer_id: Any) -> bool:
        try:
            return bool(self.host.get_network().get_connections(peer_id))
        except Exception:
            return False

    if getattr(KBucket._ping_peer, "__name__", "") != connected_means_alive.__name__:
        setattr(KBucket, "_ping_peer", connected_means_alive)


_no_dials_for_bucket_eviction()


class Dht:
    def __init__(self, kad: KadDHT) -> None:
        self._kad = kad

    async def add_peer(self, peer_id: str) -> None:
        """Into the routing table; bounded, since a full bucket makes py-libp2p ping its oldest peer."""
        with contextlib.suppress(Exception), trio.move_on_after(ADD_PEER_TIMEOUT_S):
            await self._kad.add_peer(ID.from_base58(peer_id))

    def remove_peer(self, peer_id: str) -> None:
        with contextlib.suppress(Exception):
            self._kad.routing_table.remove_peer(ID.from_base58(peer_id))

    async def provide(self, key: str) -> bool:
        return bool(await self._kad.provide(key))

    async def find_providers(self, key: str, count: int = 50, network: bool = True) -> dict[str, list[str]]:
        """Peer id -> multiaddrs of the nodes that provide `key` (deduplicated).

        KadDHT.find_providers stops at the local store when that holds any record, so a node
        that got ADD_PROVIDER from a few peers would never see the rest. With network=True we
        also ask the ALPHA peers of our routing table closest to the key (records are stored on
        the K closest, so those hold them) and merge.
        """
        kb = _encode_key(key)
        infos = list(self._kad.provider_store.get_providers(kb))
        if network:
            closest = self._kad.routing_table.find_local_closest_peers(kb, ALPHA)

            async def ask(peer: ID) -> None:
                with trio.move_on_after(2):
                    # a private helper of py-libp2p 0.8: the one-peer GET_PROVIDERS query
                    provs, _ = await self._kad.provider_store._get_providers_from_peer_with_closers(peer, kb)
                    infos.extend(provs)

            async with trio.open_nursery() as n:
                for peer in closest:
                    n.start_soon(ask, peer)
        out: dict[str, list[str]] = {}
        for info in infos:
            pid = info.peer_id.to_base58()
            addrs = out.setdefault(pid, [])
            for a in info.addrs:
                if str(a) not in addrs:
                    addrs.append(str(a))
            if len(out) >= count:
                break
        return out

    async def random_walk(self) -> list[str]:
        """Peers closest to a random key, found by an iterative network lookup."""
        found = await self._kad.peer_routing.find_closest_peers_network(os.urandom(32))
        return [p.to_base58() for p in found]

    async def find_peer(self, peer_id: ID) -> list[str] | None:
        info = await self._kad.find_peer(peer_id)
        if info is None:
            return None
        return [str(a) for a in info.addrs]

    def routing_table_size(self) -> int:
        return int(self._kad.get_routing_table_size())

    def routing_table_peers(self) -> list[str]:
        return [p.to_base58() for p in self._kad.routing_table.get_peer_ids()]


@contextlib.asynccontextmanager
async def open_dht(host: IHost) -> AsyncIterator[Dht]:
    kad = KadDHT(host, DHTMode.SERVER)
    async with background_trio_service(kad):
        yield Dht(kad)
