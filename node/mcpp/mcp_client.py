"""A small MCP client for mcpp nodes (streamable HTTP), used by the demo, bench and tests."""

from __future__ import annotations

import json
import logging
from typing import Any

from mcp import Client

__all__ = ["call_tool", "ToolCallError", "open_client", "structured"]

logging.getLogger("httpx").setLevel(logging.WARNING)


class ToolCallError(Exception):
    """The tool answered with isError: true; the message is the tool's."""


def open_client(url: str) -> Client:
    return Client(url)


def structured(result: Any) -> dict[str, Any]:
    if result.is_error:
        text = " ".join(getattr(c, "text", "") for c in result.content)
        raise ToolCallError(text)
    if result.structured_content is not None:
        return dict(result.structured_content)
    return dict(json.loads(result.content[0].text))


async def call_tool(url: str, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """One call in a fresh session; raises ToolCallError for isError results."""
    async with Client(url) as c:
        result = await c.call_tool(name, arguments or {})
    return structured(result)
