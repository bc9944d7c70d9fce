"""The libp2p layer: host construction (Noise + yamux/mplex), address parsing, error mapping.

This module and `dht` are the only ones that import libp2p.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import multiaddr
from libp2p import create_mplex_muxer_option, create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from mcpp.errors import ArgumentError, PeerUnreachable

__all__ = [
    "IHost",
    "INetStream",
    "ID",
    "PeerInfo",
    "TProtocol",
    "make_host",
    "parse_peer_multiaddr",
    "parse_peer_id",
    "parse_multiaddr",
    "stream_peer_id",
    "dial_errors",
    "peer_multiaddrs",
    "strip_p2p",
    "quiet_connection_manager",
    "remember_addrs",
]

logging.getLogger("libp2p").addHandler(logging.NullHandler())


def _complete_psk_conns() -> None:
    """py-libp2p 0.8's `PskConn` (the private-network wrapper) subclasses RawConnection without
    calling its __init__, so it lacks `is_initiator`, the connection type and the transport
    addresses. The swarm then cannot record a connection's real addresses and falls back to the
    peerstore (logging 'Error getting transport addresses'), and in our measurements a 20-node
    private mesh took 5x longer to form. Copy those attributes from the wrapped connection."""
    import libp2p.network.swarm as swarm_mod
    from libp2p.security.pnet import protector

    original = protector.new_protected_conn

    def new_protected_conn(conn: Any, psk: str) -> Any:
        wrapped = original(conn, psk)
        for attr in ("is_initiator", "_connection_type", "_actual_addresses"):
            if hasattr(conn, attr) and not hasattr(wrapped, attr):
                setattr(wrapped, attr, getattr(conn, attr))
        return wrapped

    if getattr(swarm_mod, "new_protected_conn", None) is original:  # once
        setattr(swarm_mod, "new_protected_conn", new_protected_conn)


_complete_psk_conns()

def _batch_yamux_window_updates() -> None:
    """py-libp2p 0.8's yamux answers *every* read of a stream with a WINDOW_UPDATE frame (its
    "partial slack" branch fires whenever the window is short of its target by less than half,
    i.e. after any small message), whatever PY_YAMUX_RELEASE_ON_READ says: one more encrypted
    frame and one more send() per message, 11 % of a 20-node mesh's CPU while it forms (py-spy).
    Use go-yamux's rule instead (`sendWindowUpdate`): an update only once half the window has
    been consumed, growing the window as the library's auto-tuning says."""
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    async def update_when_half_consumed(self: Any, *, bytes_read: int = 0) -> None:
        delta = 0
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            short = self.target_recv_window - (self.recv_window + buffered)
            if short > 0 and short >= self._grow_threshold():
                delta = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
                self._pending_recv_release = 0
        if delta > 0:
            await self.send_window_update(delta, skip_lock=True)

    if getattr(YamuxStream._auto_tune_and_send_window_update, "__name__", "") != update_when_half_consumed.__name__:
        setattr(YamuxStream, "_auto_tune_and_send_window_update", update_when_half_consumed)


_batch_yamux_window_updates()


def make_host(
    key_pair: KeyPair, muxer: str = "yamux", announce: tuple[str, ...] = (), psk: str | None = None,
    max_connections: int = 64,
) -> IHost:
    """A host that speaks only Noise, with one connection per peer.

    With `psk` (64 hex characters) the host is in a libp2p private network: every connection is
    first wrapped in XSalsa20 keyed by the PSK (pnet), so a peer without the key cannot complete
    even the Noise handshake.

    Nodes always use yamux. py-libp2p 0.8's mplex guards each stream with a read/write lock
    (a reader blocked in read() stalls every write on that stream, so full-duplex RPC deadlocks)
    and gives each stream a one-slot receive channel (one slow reader stalls the connection for
    5 s). `muxer="mplex"` exists only for the raw echo comparison in `mcpp bench`.
    """
    sec_opt: Any = {
        NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    }
    muxer_opt = create_mplex_muxer_option() if muxer == "mplex" else create_yamux_muxer_option()
    return new_host(
        key_pair=key_pair,
        sec_opt=sec_opt,
        muxer_opt=muxer_opt,
        # whom to connect to is mcpp's job (node/gossip.py): a hard cap, and the library's pruner
        # never fires below it (high watermark = cap); `quiet_connection_manager` stops its dialer
        connection_config=ConnectionConfig(
            max_connections_per_peer=1, dial_timeout=5.0, min_connections=0, low_watermark=0,
            max_connections=max_connections, high_watermark=max_connections,
        ),
        announce_addrs=[multiaddr.Multiaddr(a) for a in announce] or None,
        psk=psk,
    )


async def quiet_connection_manager(host: IHost) -> None:
    """Stop libp2p's auto-connector (it dials every peer of the peerstore towards (low + high) / 2
    connections, whatever the config says) and its pruner: mcpp chooses its connections itself.
    Call it once the host runs."""
    net: Any = host.get_network()
    for part in ("auto_connector", "connection_pruner"):
        svc = getattr(net, part, None)
        if svc is not None:
            await svc.stop()
    # py-libp2p runs identify both ways on every new connection, only to learn the peer's
    # listen addresses and to cache its ping/identify protocols (never ours); mcpp's hello
    # carries the addresses (`remember_addrs`). It was a tenth of the CPU while 50 nodes formed.
    if hasattr(host, "_schedule_identify"):
        host._schedule_identify = _no_identify


def _no_identify(peer_id: ID, *, reason: str) -> None:
    return None


def remember_addrs(host: IHost, peer_id: str, addrs: list[str], ttl_s: int = 3600) -> None:
    """Put a peer's listen addresses (from its hello) in the peerstore, where the DHT reads them."""
    with contextlib.suppress(Exception):
        host.get_peerstore().add_addrs(ID.from_base58(peer_id), [multiaddr.Multiaddr(strip_p2p(a)) for a in addrs],
                                       ttl_s)


def strip_p2p(addr: str) -> str:
    """A multiaddr's transport part: `/ip4/1.2.3.4/tcp/4001/p2p/<id>` -> `/ip4/1.2.3.4/tcp/4001`."""
    return addr.split("/p2p/")[0]


def parse_multiaddr(text: str, argument: str = "multiaddr") -> multiaddr.Multiaddr:
    if not isinstance(text, str) or not text.startswith("/"):
        raise ArgumentError(argument, f"{text!r} is not a multiaddr (it must start with '/')")
    try:
        return multiaddr.Multiaddr(text)
    except Exception as e:
        raise ArgumentError(argument, f"{text!r} is not a valid multiaddr ({e})") from e


def parse_peer_multiaddr(text: str, argument: str = "multiaddr") -> PeerInfo:
    """`/ip4/1.2.3.4/tcp/4001/p2p/<peer id>` -> PeerInfo; ArgumentError names `argument`."""
    ma = parse_multiaddr(text, argument)
    try:
        return info_from_p2p_addr(ma)
    except Exception as e:
        raise ArgumentError(
            argument, f"{text!r} must end with /p2p/<peer id> ({e})"
        ) from e


def parse_peer_id(text: str, argument: str = "peer_id") -> ID:
    if not isinstance(text, str) or not text:
        raise ArgumentError(argument, "must be a non-empty peer id string")
    try:
        pid = ID.from_base58(text)
    except Exception as e:
        raise ArgumentError(argument, f"{text!r} is not a valid peer id ({e})") from e
    if pid.to_base58() != text:
        raise ArgumentError(argument, f"{text!r} is not a valid peer id")
    return pid


def stream_peer_id(stream: INetStream) -> str:
    return str(stream.muxed_conn.peer_id.to_base58())


def peer_multiaddrs(host: IHost, pid: ID) -> list[str]:
    try:
        return [str(a) for a in host.get_peerstore().addrs(pid)]
    except Exception:
        return []


@contextlib.contextmanager
def dial_errors(peer_id: str) -> Iterator[None]:
    """Translate whatever libp2p raises while dialing into PeerUnreachable."""
    try:
        yield
    except PeerUnreachable:
        raise
    except Exception as e:  # libp2p has no common root for dial failures
        detail = f"{type(e).__name__}: {e}".strip()
        if e.__cause__ is not None:  # e.g. SwarmDialAllFailedError from a MultiError of each address's error
            detail += f" [{type(e.__cause__).__name__}: {e.__cause__}]"
        raise PeerUnreachable(peer_id, detail[:1000]) from e
