"""Run one node as a program: the node, its MCP server, and signal handling (SIGINT/SIGTERM -> exit 0)."""

from __future__ import annotations

import logging
import signal

import trio

from mcpp.config import NodeConfig
from mcpp.log import kv
from mcpp.mcp.server import build_server, serve_http, serve_stdio
from mcpp.node import open_node

__all__ = ["run_node"]

log = logging.getLogger("mcpp.runner")


async def _main(config: NodeConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config) as node:
            server = build_server(node)
            async with trio.open_nursery() as nursery:

                async def stdio_then_stop() -> None:
                    await serve_stdio(server)
                    log.info("stdin closed; stopping")
                    nursery.cancel_scope.cancel()

                if config.mcp_transport == "stdio":
                    nursery.start_soon(stdio_then_stop)
                else:
                    await nursery.start(serve_http, node, server)
                log.info("node ready to serve", extra=kv(peer=node.peer_id, mcp=node.mcp_url or "stdio"))
                async for signum in signals:
                    log.info("stopping on signal", extra=kv(signal=signal.Signals(signum).name))
                    break
                nursery.cancel_scope.cancel()
    log.info("node stopped", extra=kv(peer=node.peer_id))


def run_node(config: NodeConfig) -> int:
    trio.run(_main, config)
    return 0
