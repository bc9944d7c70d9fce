"""The tools that produce evidence: `mcpp bench` and its parts (peers, queue, workflows,
containers), `mcpp loadtest` (Locust), `mcpp chaos` (a Jepsen-style checker) and `mcpp demo`.

May import any layer below the CLI: they drive real nodes through the harness and MCP.
"""
