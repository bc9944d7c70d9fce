"""RPC framing (pure) and the RPC protocol between two real libp2p hosts on loopback."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import pytest
import trio

from mcpp.net import identity
from mcpp.errors import ArgumentError, FrameError, RemoteError, RPCTimeout
from mcpp.net.p2p import PeerInfo, make_host
from mcpp.net.rpc import PROTOCOL, FrameReader, RpcEndpoint, encode_frame


def _reader(chunks: list[bytes], max_bytes: int = 1024) -> FrameReader:
    it = iter(chunks)

    async def read() -> bytes:
        return next(it, b"")

    return FrameReader(read, max_bytes)


def test_frames_roundtrip_across_arbitrary_chunking() -> None:
    msgs = [{"i": 1, "m": "ping", "p": None}, {"i": 2, "r": {"x": "ü" * 50}}, {"i": 3, "e": {"c": "x", "m": "y"}}]
    wire = b"".join(encode_frame(m) for m in msgs)

    async def go() -> None:
        for size in (1, 3, 7, len(wire)):
            r = _reader([wire[i : i + size] for i in range(0, len(wire), size)])
            got = []
            while (f := await r.next_frame()) is not None:
                got.append(f[0])
            assert got == msgs

    trio.run(go)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (struct.pack(">I", 10_000_000) + b"x", "exceeds the limit"),
        (struct.pack(">I", 10) + b"{}", "ended inside a frame"),
        (struct.pack(">I", 3) + b"\xff\xfe\xfd", "not UTF-8 JSON"),
        (struct.pack(">I", 5) + b"{oops", "not UTF-8 JSON"),
        (struct.pack(">I", 5000) + b"1" * 5000, "not UTF-8 JSON"),  # int too long: ValueError
        (struct.pack(">I", 6000) + b"[" * 6000, "not UTF-8 JSON"),  # too deep: RecursionError
    ],
)
def test_bad_frames_raise_frame_error(wire: bytes, match: str) -> None:
    async def go() -> None:
        with pytest.raises(FrameError, match=match):
            await _reader([wire], 1 << 20).next_frame()

    trio.run(go)


@asynccontextmanager
async def two_endpoints(timeout_s: float = 5.0) -> AsyncIterator[tuple[RpcEndpoint, RpcEndpoint, str, Any]]:
    """Two real hosts (Noise + yamux over TCP on 127.0.0.1), connected, each with an endpoint."""
    h1 = make_host(identity.generate(), "yamux")
    h2 = make_host(identity.generate(), "yamux")
    la = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with h1.run(la), h2.run(la), trio.open_nursery() as n:
        e1 = RpcEndpoint(h1, 64 * 1024, timeout_s)
        e2 = RpcEndpoint(h2, 64 * 1024, timeout_s)
        await n.start(e1.run)
        await n.start(e2.run)
        await h1.connect(PeerInfo(h2.get_id(), h2.get_addrs()))
        try:
            yield e1, e2, h2.get_id().to_base58(), h1
        finally:
            n.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await h1.close()
                await h2.close()


def test_many_calls_in_flight_share_one_stream() -> None:
    async def go() -> None:
        async with two_endpoints() as (client, server, server_id, _):
            seen = []

            async def echo(peer: str, params: Any) -> Any:
                await trio.sleep(0.01 * (params["n"] % 3))  # answers come back out of order
                seen.append(params["n"])
                return {"n": params["n"], "from": peer}

            server.register("echo", echo)
            results: dict[int, Any] = {}

            async def one(i: int) -> None:
                results[i] = await client.call(server_id, "echo", {"n": i})

            async with trio.open_nursery() as n:
                for i in range(200):
                    n.start_soon(one, i)
            assert all(results[i]["n"] == i for i in range(200))
            assert len(seen) == 200
            assert len(client._channels) == 1  # one reused stream for all 200 calls
            t = client.traffic_of(server_id)
            assert t.calls_ok == 200 and t.calls_failed == 0 and t.bytes_out > 0 and t.bytes_in > 0

    trio.run(go)


def test_timeout_remote_errors_and_unknown_method() -> None:
    async def go() -> None:
        async with two_endpoints() as (client, server, sid, _):

            async def slow(peer: str, params: Any) -> Any:
                await trio.sleep(5)

            async def bad(peer: str, params: Any) -> Any:
                raise ArgumentError("payload", "must be an object")

            async def crash(peer: str, params: Any) -> Any:
                raise ZeroDivisionError("boom")

            server.register("slow", slow)
            server.register("bad", bad)
            server.register("crash", crash)
            with pytest.raises(RPCTimeout, match="slow"):
                await client.call(sid, "slow", None, timeout_s=0.2)
            with pytest.raises(RemoteError) as e:
                await client.call(sid, "bad", None)
            assert e.value.code == "ArgumentError" and "payload: must be an object" in str(e.value)
            with pytest.raises(RemoteError) as e:
                await client.call(sid, "crash", None)
            assert e.value.code == "internal" and "boom" in str(e.value)
            with pytest.raises(RemoteError) as e:
                await client.call(sid, "nope", None)
            assert e.value.code == "unknown_method"
            with pytest.raises(ArgumentError, match="params"):
                await client.call(sid, "bad", {"x": float("nan")})
            # the channel still works after all of that
            server.register("ok", lambda peer, p: _const(p))
            assert await client.call(sid, "ok", 7) == 7

    trio.run(go)


async def _const(x: Any) -> Any:
    return x


def test_garbage_from_a_raw_stream_resets_only_that_stream() -> None:
    async def go() -> None:
        async with two_endpoints() as (client, server, sid, h1):
            server.register("ok", lambda peer, p: _const(p))
            raw = await h1.new_stream(server._host.get_id(), [PROTOCOL])
            await raw.write(struct.pack(">I", 10_000_000))  # oversized frame header
            with trio.fail_after(5):
                with pytest.raises(Exception):
                    while True:  # the server resets the stream: reads fail or hit EOF
                        if not await raw.read(100):
                            raise EOFError
            deep = await h1.new_stream(server._host.get_id(), [PROTOCOL])
            await deep.write(struct.pack(">I", 20_000) + b"[" * 20_000)  # RecursionError in json
            with trio.fail_after(5):
                with pytest.raises(Exception):
                    while True:
                        if not await deep.read(100):
                            raise EOFError
            # a frame that is JSON but not a request gets an error answer
            raw2 = await h1.new_stream(server._host.get_id(), [PROTOCOL])
            await raw2.write(encode_frame(["not", "a", "request"]))
            got = await FrameReader(lambda: raw2.read(65536), 1 << 20).next_frame()
            assert got is not None and got[0]["e"]["c"] == "bad_request"
            assert await client.call(sid, "ok", "still serving") == "still serving"

    trio.run(go)


def test_inline_and_spawned_handlers_interleave_on_one_stream() -> None:
    async def go() -> None:
        async with two_endpoints() as (client, server, sid, _):
            release = trio.Event()

            async def slow(peer: str, params: Any) -> Any:
                await release.wait()
                return "slow"

            server.register("slow", slow)
            server.register("fast", lambda peer, p: _const(p), inline=True)
            got: list[Any] = []
            async with trio.open_nursery() as n:
                n.start_soon(lambda: _append(got, client.call(sid, "slow")))
                await trio.sleep(0.1)
                # an inline call is answered while a spawned one on the same stream still waits
                assert await client.call(sid, "fast", 1) == 1
                assert got == []
                release.set()
            assert got == ["slow"]

    trio.run(go)


async def _append(out: list[Any], aw: Any) -> None:
    out.append(await aw)
