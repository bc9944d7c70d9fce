"""The README's "Using mcpp from an MCP client" examples, run as written against a real mesh
(only the placeholders change: paths, bootstrap address, URL, token)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import trio
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from conftest import TOKEN
from mcpp.harness import ProcessCluster
from mcpp.mcp.client import structured

REPO = Path(__file__).parent.parent


def example(name: str) -> str:
    """The code block that follows `<!-- example: NAME -->` in the README."""
    m = re.search(rf"<!-- example: {name} -->\n```\w+\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    assert m is not None, f"README has no example {name!r}"
    return m.group(1)


def test_the_desktop_stdio_config_starts_a_node_that_joins_the_mesh(cluster: ProcessCluster) -> None:
    text = (example("stdio-config").replace("/path/to/mcpp/.cluster", str(cluster.directory))
            .replace("/path/to/mcpp", str(REPO))
            .replace("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...", cluster.nodes[0].multiaddrs[0]))
    server = json.loads(text)["mcpServers"]["mcpp"]
    params = StdioServerParameters(command=server["command"], args=server["args"])

    async def go() -> dict[str, Any]:
        async with Client(params) as c:
            with trio.fail_after(30):
                while True:  # it finds the other nodes through the DHT
                    listed = structured(await c.call_tool("peer_list", {}))
                    if listed["total"] >= len(cluster.nodes):
                        return listed
                    await trio.sleep(0.5)

    assert trio.run(go)["total"] >= len(cluster.nodes)


def test_the_http_config_reaches_a_node_with_its_token(cluster: ProcessCluster) -> None:
    text = example("http-config").replace("http://127.0.0.1:8765/mcp", cluster.nodes[1].mcp_url)
    server = json.loads(text.replace("YOUR-TOKEN", TOKEN))["mcpServers"]["mcpp"]
    assert server["type"] == "http"

    async def go() -> dict[str, Any]:
        async with httpx2.AsyncClient(headers=server["headers"]) as http:
            async with Client(streamable_http_client(server["url"], http_client=http)) as c:
                return structured(await c.call_tool("peer_list", {}))

    assert trio.run(go)["total"] == len(cluster.nodes) - 1


def test_the_python_example_shows_progress_and_drives_an_mcp_task(cluster: ProcessCluster, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(example("python-client"))
    env = {**os.environ, "MCPP_URL": cluster.nodes[2].mcp_url, "MCPP_TOKEN": TOKEN}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(ln.startswith("progress ") and "running" in ln for ln in lines), out.stdout
    assert "result: {'slept_s': 3}" in lines
    assert any(ln.startswith("task: running") for ln in lines), out.stdout
    assert lines[-1] == "task completed {'slept_s': 2}"
