"""mcpp: a peer-to-peer mesh of identical nodes, each an MCP server acting on the whole mesh.

Layers (dependencies run one way):
config, errors, log, metrics -> identity -> p2p -> rpc -> peers -> node -> mcp_server -> harness, bench, cli
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
