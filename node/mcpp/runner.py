"""The composition root: the one place that builds a node's services and owns their nursery.

`open_services(config)` builds the node (`mcpp.node`), the queue service on it (`mcpp.queue`),
the workflow engine on the queue (`mcpp.workflow`) and runs all three in one nursery;
`run_node(config)` adds the MCP server (`mcpp.mcp`) on them and runs one node as a program
(SIGINT/SIGTERM -> exit 0). Lower layers never reach up: the queue and the engine plug into the
node through its RPC endpoint and hooks, and nothing below this module imports it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from mcpp.config import NodeConfig, development_secrets
from mcpp.log import kv
from mcpp.mcp.server import build_server, serve_http, serve_stdio
from mcpp.node import Node, build_node
from mcpp.queue import QueueService
from mcpp.queue.model import parse_quotas
from mcpp.workflow import WorkflowEngine

__all__ = ["Services", "open_services", "run_node"]

log = logging.getLogger("mcpp.runner")
node_log = logging.getLogger("mcpp.node")  # "node started" keeps the logger it always had


@dataclass(frozen=True)
class Services:
    """What one node process runs: the node and the services built on it."""

    node: Node
    queue: QueueService
    workflows: WorkflowEngine


@contextlib.asynccontextmanager
async def open_services(config: NodeConfig) -> AsyncIterator[Services]:
    """Start a node with its queue and workflow engine; stop all three on exit.

    The queue and the engine register their RPC methods and hooks before the node's loops start,
    so the first peer to say hello already hears of this node's worker.

    Resource handling: the queue's store is closed and the host is closed on exit, also on error
    or cancellation.
    """
    parse_quotas(config.quotas)  # a bad quota fails before anything binds
    async with build_node(config) as node:
        queue = QueueService(node, config)
        try:
            workflows = WorkflowEngine(queue)
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                await nursery.start(queue.run)
                await nursery.start(workflows.run)
                node_log.info("node started", extra=kv(peer=node.peer_id, role=node.role, addrs=node.multiaddrs))
                if dev := development_secrets(config, node.peer_id):
                    node_log.warning("running with the DEVELOPMENT secrets committed to the public repository: "
                                     "for your own machine only (make real ones with `mcpp secrets init`)",
                                     extra=kv(secrets=dev))
                try:
                    yield Services(node, queue, workflows)
                finally:
                    await node.leave()  # members hear of a clean stop at once
                    nursery.cancel_scope.cancel()
        finally:
            queue.close()


async def _main(config: NodeConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_services(config) as services:
            node = services.node
            server = build_server(node, services.queue, services.workflows)
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
