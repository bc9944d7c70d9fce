"""The MCP surface: the server (26 tools and the HTTP probes), the client helpers, and the
`mcpp task` / `mcpp workflow` CLIs. The only layer that imports the `mcp` SDK.

May import: the base modules, `mcpp.net`, `mcpp.node`, `mcpp.queue` and `mcpp.workflow`.
"""
