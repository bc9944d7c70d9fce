"""mcpp: a peer-to-peer mesh of identical nodes, each an MCP server acting on the whole mesh.

Layers, lowest first (a module imports only its own layer and lower ones; tests/test_layout.py):
config, errors, log, metrics -> net (identity, p2p, dht, rpc, peers) -> node -> queue -> workflow
-> mcp (server, client, task/workflow CLIs) -> runner (the composition root) -> harness ->
evidence (bench, loadtest, chaos, demo) -> cli.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
