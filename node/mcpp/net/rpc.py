"""`/mcpp/rpc/1.0.0`: request/response RPC between nodes over reused libp2p streams.

Wire format: every message is a frame = 4-byte big-endian length + a UTF-8 JSON object.
- request:  {"i": <int id>, "m": "<method>", "p": <params>}
- response: {"i": <id>, "r": <result>}  or  {"i": <id>, "e": {"c": "<code>", "m": "<message>"}}

A caller keeps one stream per peer and multiplexes many requests on it by id; a
reader task per stream resolves the waiting calls. The server side runs each request
in its own task (bounded per stream), so a slow handler does not hold up the others.
A malformed or oversized frame resets the stream; the node keeps serving everyone else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:  # trio-typing's stubs (a py-libp2p dependency) shadow trio's own annotations
    from trio_typing import TaskStatus

from mcpp.errors import (
    ArgumentError,
    FrameError,
    MCPPError,
    PeerError,
    RemoteError,
    RPCTimeout,
    StreamBroken,
)
from mcpp.log import kv
from mcpp.net.p2p import ID, IHost, INetStream, TProtocol, stream_peer_id

__all__ = [
    "PROTOCOL",
    "Handler",
    "RpcEndpoint",
    "PeerTraffic",
    "encode_frame",
    "FrameReader",
]

PROTOCOL = TProtocol("/mcpp/rpc/1.0.0")
_HDR = struct.Struct(">I")
MAX_IN_FLIGHT_PER_STREAM = 64
log = logging.getLogger("mcpp.rpc")

Handler = Callable[[str, Any], Awaitable[Any]]


def encode_frame(msg: Any) -> bytes:
    body = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    return _HDR.pack(len(body)) + body


class FrameReader:
    """Buffers a byte stream and yields whole frames; knows nothing of libp2p."""

    def __init__(self, read: Callable[[], Awaitable[bytes]], max_bytes: int) -> None:
        self._read = read
        self._buf = bytearray()
        self._max = max_bytes

    async def next_frame(self) -> tuple[Any, int] | None:
        """The next decoded message and its size on the wire, or None at a clean EOF.

        Raises:
            FrameError: oversized, truncated or undecodable frame.
        """
        while True:
            if len(self._buf) >= _HDR.size:
                (n,) = _HDR.unpack_from(self._buf)
                if n > self._max:
                    raise FrameError(f"frame of {n} bytes exceeds the limit of {self._max}")
                if len(self._buf) >= _HDR.size + n:
                    body = bytes(self._buf[_HDR.size : _HDR.size + n])
                    del self._buf[: _HDR.size + n]
                    try:
                        return json.loads(body), _HDR.size + n
                    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, 5000-digit ints, deep nesting
                        raise FrameError(f"frame is not UTF-8 JSON: {type(e).__name__}: {str(e)[:200]}") from e
            chunk = await self._read()
            if not chunk:
                if self._buf:
                    raise FrameError(f"stream ended inside a frame ({len(self._buf)} bytes pending)")
                return None
            self._buf += chunk


@dataclass
class PeerTraffic:
    """Counters for one remote peer, as seen by this node's RPC layer."""

    bytes_in: int = 0
    bytes_out: int = 0
    calls_ok: int = 0
    calls_failed: int = 0
    served: int = 0
    last_in: float = 0.0  # wall clock of the last frame received from the peer (liveness)
    last_work: float = 0.0  # monotonic time of the last call either way of a method not `background`
    # (monotonic time, cumulative bytes_in, cumulative bytes_out), sampled by the node
    samples: list[tuple[float, int, int]] = field(default_factory=list)


@dataclass
class _Pending:
    event: trio.Event = field(default_factory=trio.Event)
    msg: dict[str, Any] | None = None
    error: Exception | None = None


class _Channel:
    """One outbound stream to one peer, shared by all calls to that peer."""

    def __init__(self, peer_id: str, stream: INetStream) -> None:
        self.peer_id = peer_id
        self.stream = stream
        self.pending: dict[int, _Pending] = {}
        self.write_lock = trio.Lock()
        self.closed = False

    def fail_all(self, err: Exception) -> None:
        self.closed = True
        for p in self.pending.values():
            p.error = err
            p.event.set()
        self.pending.clear()


def _read_fn(stream: INetStream) -> Callable[[], Awaitable[bytes]]:
    async def read() -> bytes:
        try:
            return await stream.read(65536)
        except Exception as e:  # libp2p: StreamEOF / StreamReset / muxer errors
            if type(e).__name__ in ("StreamEOF",):
                return b""
            raise StreamBroken(stream_peer_id(stream), f"{type(e).__name__}: {e}") from e

    return read


class RpcEndpoint:
    """Serves and calls `/mcpp/rpc/1.0.0` on one host.

    Resource handling: `run()` must be running (in the node's nursery) for calls to work;
    it owns the reader tasks of outbound streams. Streams close with the host.
    """

    def __init__(
        self,
        host: IHost,
        max_message_bytes: int,
        default_timeout_s: float,
        on_call: Callable[[str, str, str, float], None] | None = None,
        *,
        max_inflight_per_peer: int = MAX_IN_FLIGHT_PER_STREAM,
        allow: Callable[[str], bool] | None = None,
        on_limit: Callable[[str], None] | None = None,
        connect: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._host = host
        self._max = max_message_bytes
        self._default_timeout_s = default_timeout_s
        self._handlers: dict[str, Handler] = {}
        self._inline: set[str] = set()
        self._background: set[str] = set()
        self._channels: dict[str, _Channel] = {}
        self._open_locks: dict[str, trio.Lock] = {}
        self._next_id = 1
        self._nursery: trio.Nursery | None = None
        self._on_call = on_call
        self._allow = allow
        self._on_limit = on_limit or (lambda limit: None)
        self._connect = connect
        self._max_inflight_per_peer = max_inflight_per_peer
        self._peer_limits: dict[str, trio.Semaphore] = {}
        self.traffic: dict[str, PeerTraffic] = {}

    # ---- setup -------------------------------------------------------------------------
    def register(self, method: str, handler: Handler, inline: bool = False, background: bool = False) -> None:
        """Serve `method`. inline=True runs the handler in the stream's read loop (no task spawn):
        only for handlers that return without waiting on anything (e.g. ping). background=True:
        calls of it (either way) do not count as work on the link (`PeerTraffic.last_work`), so a
        link that carries only pings and gossip counts as idle."""
        self._handlers[method] = handler
        if inline:
            self._inline.add(method)
        if background:
            self._background.add(method)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._host.set_stream_handler(PROTOCOL, self._serve_stream)
            task_status.started()
            await trio.sleep_forever()

    def traffic_of(self, peer_id: str) -> PeerTraffic:
        t = self.traffic.get(peer_id)
        if t is None:
            t = self.traffic[peer_id] = PeerTraffic()
        return t

    def forget(self, peer_id: str) -> None:
        """Drop the channel to a peer that left (its pending calls fail as StreamBroken)."""
        ch = self._channels.pop(peer_id, None)
        if ch is not None:
            ch.fail_all(StreamBroken(peer_id, "peer left"))
            if self._nursery is not None:
                self._nursery.start_soon(_reset_quietly, ch.stream)
        self._open_locks.pop(peer_id, None)
        sem = self._peer_limits.get(peer_id)
        if sem is not None and sem.value == self._max_inflight_per_peer:  # idle: safe to drop
            del self._peer_limits[peer_id]

    # ---- client ------------------------------------------------------------------------
    async def call(self, peer_id: str, method: str, params: Any = None, timeout_s: float | None = None,
                   dial: bool = True) -> Any:
        """Call `method` on `peer_id` and return its result. dial=False: only over a connection that
        is open already (gossip and pings to a neighbour that just left must not dial it back).

        Raises:
            RPCTimeout: no answer within timeout_s (default: the endpoint's).
            StreamBroken / PeerError: the stream could not be opened or broke.
            RemoteError: the peer answered with an error.
        """
        timeout = self._default_timeout_s if timeout_s is None else timeout_s
        t0 = time.perf_counter()
        outcome = "error"
        if method not in self._background:
            self.traffic_of(peer_id).last_work = time.monotonic()
        try:
            with trio.fail_after(timeout):
                result = await self._call(peer_id, method, params, dial)
            outcome = "ok"
            self.traffic_of(peer_id).calls_ok += 1
            return result
        except trio.TooSlowError:
            outcome = "timeout"
            raise RPCTimeout(method, peer_id, timeout) from None
        except RemoteError:
            outcome = "remote_error"
            self.traffic_of(peer_id).calls_ok += 1  # the peer answered: the link worked
            raise
        finally:
            if outcome not in ("ok", "remote_error"):
                self.traffic_of(peer_id).calls_failed += 1
            if self._on_call is not None:
                self._on_call(peer_id, method, outcome, time.perf_counter() - t0)

    async def _channel(self, peer_id: str, dial: bool = True) -> _Channel:
        ch = self._channels.get(peer_id)
        if ch is not None and not ch.closed:
            return ch
        lock = self._open_locks.setdefault(peer_id, trio.Lock())
        async with lock:
            ch = self._channels.get(peer_id)
            if ch is not None and not ch.closed:
                return ch
            if self._nursery is None:
                raise StreamBroken(peer_id, "rpc endpoint is not running")
            if not dial and not self._host.get_network().get_connections(ID.from_base58(peer_id)):
                raise StreamBroken(peer_id, "not connected (and not to be dialed for this call)")
            if self._connect is not None:
                await self._connect(peer_id)  # the owner's dial policy, not libp2p's 60 s negative cache
            try:
                stream = await self._host.new_stream(ID.from_base58(peer_id), [PROTOCOL])
            except Exception as e:
                raise PeerError(peer_id, f"cannot open an rpc stream: {type(e).__name__}: {e}") from e
            ch = _Channel(peer_id, stream)
            self._channels[peer_id] = ch
            self._nursery.start_soon(self._read_responses, ch)
            return ch

    async def _call(self, peer_id: str, method: str, params: Any, dial: bool = True) -> Any:
        ch = await self._channel(peer_id, dial)
        rid = self._next_id
        self._next_id += 1
        try:
            frame = encode_frame({"i": rid, "m": method, "p": params})
        except (TypeError, ValueError) as e:
            raise ArgumentError("params", f"not JSON-serialisable: {e}") from e
        if len(frame) - _HDR.size > self._max:
            raise ArgumentError("params", f"request of {len(frame)} bytes exceeds the rpc limit of {self._max}")
        pending = _Pending()
        ch.pending[rid] = pending
        try:
            async with ch.write_lock:
                try:
                    await ch.stream.write(frame)
                except Exception as e:
                    err = StreamBroken(peer_id, f"write failed: {type(e).__name__}: {e}")
                    self._drop(ch, err)
                    raise err from e
                except BaseException:
                    # cancelled mid-write (a timeout): part of a frame may be on the wire, so this
                    # stream can no longer be framed; the next call opens a fresh one
                    self._drop(ch, StreamBroken(peer_id, "a write was interrupted"))
                    raise
            self.traffic_of(peer_id).bytes_out += len(frame)
            await pending.event.wait()
        finally:
            ch.pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        msg = pending.msg or {}
        if "e" in msg:
            body = msg["e"] if isinstance(msg["e"], dict) else {}
            raise RemoteError(str(body.get("c", "error")), method, str(body.get("m", "")))
        return msg.get("r")

    def _drop(self, ch: _Channel, err: Exception) -> None:
        if self._channels.get(ch.peer_id) is ch:
            del self._channels[ch.peer_id]
        ch.fail_all(err)

    async def _read_responses(self, ch: _Channel) -> None:
        reader = FrameReader(_read_fn(ch.stream), self._max)
        err: Exception = StreamBroken(ch.peer_id, "stream closed by peer")
        try:
            while True:
                got = await reader.next_frame()
                if got is None:
                    break
                msg, size = got
                t = self.traffic_of(ch.peer_id)
                t.bytes_in += size
                t.last_in = time.time()
                if not isinstance(msg, dict) or not isinstance(msg.get("i"), int):
                    raise FrameError("response without an integer id")
                p = ch.pending.get(msg["i"])
                if p is not None:  # else: the caller timed out and left
                    p.msg = msg
                    p.event.set()
        except (FrameError, StreamBroken) as e:
            err = e
        except Exception as e:  # never let one peer's stream kill the endpoint
            log.warning("rpc response stream failed", extra=kv(peer=ch.peer_id, error=repr(e)))
            err = StreamBroken(ch.peer_id, f"{type(e).__name__}: {e}")
        finally:
            self._drop(ch, err)
            with trio.move_on_after(1) as cs:
                cs.shield = True
                try:
                    await ch.stream.reset()
                except Exception:
                    pass

    # ---- server ------------------------------------------------------------------------
    async def _serve_stream(self, stream: INetStream) -> None:
        peer_id = stream_peer_id(stream)
        if self._allow is not None and not self._allow(peer_id):
            log.warning("rpc stream refused: peer not allowed", extra=kv(peer=peer_id))
            self._on_limit("allow_peers")
            await _reset_quietly(stream)
            return
        reader = FrameReader(_read_fn(stream), self._max)
        write_lock = trio.Lock()
        # one bound per peer, shared by all its streams: a peer cannot get around it by opening more
        limit = self._peer_limits.get(peer_id)
        if limit is None:
            limit = self._peer_limits[peer_id] = trio.Semaphore(self._max_inflight_per_peer)
        traffic = self.traffic_of(peer_id)
        bad = False
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        got = await reader.next_frame()
                    except (FrameError, StreamBroken) as e:
                        log.warning("rpc stream reset", extra=kv(peer=peer_id, reason=str(e)))
                        if isinstance(e, FrameError):
                            self._on_limit("rpc_frame")
                        bad = True
                        nursery.cancel_scope.cancel()  # a desynchronised stream: drop its requests
                        break
                    if got is None:
                        break
                    msg, size = got
                    traffic.bytes_in += size
                    traffic.last_in = time.time()
                    if isinstance(msg, dict) and msg.get("m") not in self._background:
                        traffic.last_work = time.monotonic()
                    if limit.value == 0:
                        self._on_limit("max_inflight_per_peer")  # back-pressure: stop reading
                    await limit.acquire()
                    if isinstance(msg, dict) and msg.get("m") in self._inline:
                        # never blocks (see register): answered without spawning a task
                        await self._serve_one(peer_id, stream, write_lock, limit, msg)
                    else:
                        nursery.start_soon(self._serve_one, peer_id, stream, write_lock, limit, msg)
                # EOF: let in-flight requests finish and answer
        except Exception as e:  # never let one peer's stream reach libp2p's connection task
            log.warning("rpc stream failed", extra=kv(peer=peer_id, error=repr(e)))
            bad = True
        finally:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                try:
                    await (stream.reset() if bad else stream.close())
                except Exception:
                    pass

    async def _serve_one(
        self, peer_id: str, stream: INetStream, write_lock: trio.Lock, limit: trio.Semaphore, msg: Any
    ) -> None:
        try:
            rid = msg.get("i") if isinstance(msg, dict) else None
            reply: dict[str, Any]
            if not isinstance(msg, dict) or not isinstance(rid, int) or not isinstance(msg.get("m"), str):
                reply = {"i": rid if isinstance(rid, int) else None, "e": {"c": "bad_request", "m": "a request needs an integer 'i' and a string 'm'"}}
            else:
                handler = self._handlers.get(msg["m"])
                if handler is None:
                    reply = {"i": rid, "e": {"c": "unknown_method", "m": f"no rpc method {msg['m']!r}"}}
                else:
                    try:
                        result = await handler(peer_id, msg.get("p"))
                        reply = {"i": rid, "r": result}
                    except MCPPError as e:
                        if isinstance(getattr(e, "limit", None), str):
                            self._on_limit(e.limit)  # type: ignore[attr-defined]
                        reply = {"i": rid, "e": {"c": type(e).__name__, "m": str(e)}}
                    except Exception as e:
                        log.exception("rpc handler failed", extra=kv(method=msg["m"], peer=peer_id))
                        reply = {"i": rid, "e": {"c": "internal", "m": f"{type(e).__name__}: {e}"}}
            try:
                frame = encode_frame(reply)
            except (TypeError, ValueError) as e:
                frame = encode_frame({"i": reply.get("i"), "e": {"c": "internal", "m": f"result not JSON: {e}"}})
            self.traffic_of(peer_id).served += 1
            async with write_lock:
                try:
                    await stream.write(frame)
                except Exception:
                    return  # the caller went away; nothing to answer
            self.traffic_of(peer_id).bytes_out += len(frame)
        finally:
            limit.release()


async def _reset_quietly(stream: INetStream) -> None:
    with trio.move_on_after(1), contextlib.suppress(Exception):
        await stream.reset()
