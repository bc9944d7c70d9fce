"""Structured logging: one JSON object per line on stderr (stdout stays free for MCP stdio)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["setup_logging", "get_logger", "kv"]

_NOISY = ("libp2p", "multiaddr", "hypercorn", "mcp", "httpx", "httpcore", "asyncio", "uvicorn")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "kv", None)
        if extra:
            doc.update(extra)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "info") -> None:
    """Configure the root logger once per process; third-party loggers are quietened."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    quiet = level.lower() != "debug"

    def _third_party_filter(record: logging.LogRecord) -> bool:
        # libraries set levels on their own child loggers; only their errors get through
        if quiet and record.name.split(".")[0] in _NOISY:
            return record.levelno >= logging.ERROR
        return True

    handler.addFilter(_third_party_filter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _NOISY:
        lg = logging.getLogger(name)
        lg.setLevel(logging.CRITICAL if level.lower() != "debug" else logging.WARNING)
        lg.propagate = True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def kv(**fields: Any) -> dict[str, Any]:
    """`log.info("msg", extra=kv(peer=...))` attaches structured fields."""
    return {"kv": fields}
