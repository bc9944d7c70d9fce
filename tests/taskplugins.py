"""Task handlers loaded by test nodes through --handler NAME=taskplugins:function (not part of mcpp)."""

from __future__ import annotations

import threading
from typing import Any


def upper(payload: Any) -> Any:
    """A sync handler: runs in a worker thread of the node."""
    return {"upper": str(payload["s"]).upper(), "thread": threading.current_thread() is not threading.main_thread()}


async def reverse(payload: Any, ctx: Any) -> Any:
    """An async handler registered through the `mcpp.handlers` entry-point group."""
    ctx.log("reversing")
    return str(payload)[::-1]
