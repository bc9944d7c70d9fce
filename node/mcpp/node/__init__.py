"""The node: `open_node(config)` runs a libp2p host, the DHT and the RPC endpoint, keeps the peer
table (connections, discovery, liveness) and offers the peer operations behind the 6 peer tools.

May import: the base modules and `mcpp.net`. It knows nothing of the queue, workflows or MCP;
services above use its public surface (rpc, table, hooks, `spawn`-free callbacks).
"""

from mcpp.node.node import PEER_STATUSES, SORT_KEYS, Node, build_node, open_node

__all__ = ["Node", "build_node", "open_node", "PEER_STATUSES", "SORT_KEYS"]
