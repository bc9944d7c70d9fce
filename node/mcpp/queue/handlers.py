"""Task handlers: the only code a worker runs. Nothing executable arrives over the network:
a task names a registered type, and its payload is JSON data for that type's handler.

A handler is `fn(payload)` or `fn(payload, ctx)`; a coroutine function runs in the node's trio
loop (cancellable at once), a plain function in a worker thread (a cancel abandons the thread).
It returns JSON. `ctx.log(line)` adds to the task's log, `ctx.progress(x)` reports 0..1.

Sources, later ones override: the built-ins, the entry-point group `mcpp.handlers`, then
`--handler NAME=module:function` (config `handlers`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import trio

from mcpp.errors import ArgumentError, ConfigError
from mcpp.log import kv

__all__ = ["TaskContext", "Handler", "HandlerRegistry", "BUILTINS", "TaskFailed"]

log = logging.getLogger("mcpp.handlers")
ENTRY_POINT_GROUP = "mcpp.handlers"
MAX_LOG_LINES = 200


class TaskFailed(Exception):
    """A handler may raise this (or any exception) to fail the attempt with a message."""


@dataclass
class TaskContext:
    task_id: str
    attempt: int
    logs: list[str] = field(default_factory=list)
    progress_value: float = 0.0

    def log(self, line: str) -> None:
        if len(self.logs) < MAX_LOG_LINES:
            self.logs.append(str(line)[:1000])

    def progress(self, fraction: float) -> None:
        self.progress_value = max(0.0, min(1.0, float(fraction)))


@dataclass(frozen=True)
class Handler:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    takes_ctx: bool
    source: str

    @classmethod
    def of(cls, name: str, fn: Callable[..., Any], source: str) -> Handler:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes_ctx = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
        return cls(name, fn, inspect.iscoroutinefunction(fn), takes_ctx, source)

    async def run(self, payload: Any, ctx: TaskContext) -> Any:
        args = (payload, ctx) if self.takes_ctx else (payload,)
        if self.is_async:
            return await self.fn(*args)
        # trio-typing's stub predates abandon_on_cancel (trio >= 0.23)
        return await trio.to_thread.run_sync(lambda: self.fn(*args), abandon_on_cancel=True)  # type: ignore[call-arg]


# ---- built-ins ------------------------------------------------------------------------
async def _echo(payload: Any) -> Any:
    return payload


async def _sleep(payload: Any, ctx: TaskContext) -> Any:
    seconds = payload.get("seconds", 0) if isinstance(payload, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 86400:
        raise TaskFailed("payload.seconds: must be a number between 0 and 86400")
    ctx.log(f"sleeping {seconds} s")
    steps = max(1, min(20, int(seconds * 4)))
    for i in range(steps):
        await trio.sleep(seconds / steps)
        ctx.progress((i + 1) / steps)
    return {"slept_s": seconds}


def _sha256(payload: Any, ctx: TaskContext) -> Any:
    if not isinstance(payload, dict) or not isinstance(payload.get("data", ""), str):
        raise TaskFailed("payload.data: must be a string")
    rounds = payload.get("rounds", 1)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 10_000_000:
        raise TaskFailed("payload.rounds: must be an integer between 1 and 10000000")
    digest = str(payload.get("data", "")).encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {"digest": digest.hex(), "rounds": rounds}


async def _fail(payload: Any, ctx: TaskContext) -> Any:
    message = payload.get("message") if isinstance(payload, dict) else None
    ctx.log("failing on purpose")
    raise TaskFailed(str(message or "the fail task type always fails"))


BUILTINS: dict[str, Callable[..., Any]] = {"echo": _echo, "sleep": _sleep, "sha256": _sha256, "fail": _fail}


def _load_ref(ref: str, where: str) -> Callable[..., Any]:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(where, ref, "expected module:function")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(where, ref, f"cannot load: {e}") from None
    if not callable(obj):
        raise ConfigError(where, ref, "is not callable")
    return obj  # type: ignore[no-any-return]


class HandlerRegistry:
    """Task type -> handler, fixed at start."""

    def __init__(self, extra: tuple[str, ...] = (), use_entry_points: bool = True) -> None:
        self._handlers: dict[str, Handler] = {n: Handler.of(n, f, "builtin") for n, f in BUILTINS.items()}
        if use_entry_points:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    self._handlers[ep.name] = Handler.of(ep.name, ep.load(), f"entry point {ep.value}")
                except Exception as e:  # a broken plugin must not stop the node
                    log.error("handler entry point failed", extra=kv(name=ep.name, error=str(e)))
        for spec in extra:
            name, sep, ref = spec.partition("=")
            if not sep or not name.strip():
                raise ConfigError("handlers", spec, "expected NAME=module:function")
            self._handlers[name.strip()] = Handler.of(name.strip(), _load_ref(ref.strip(), "handlers"), ref.strip())

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def check(self, name: str, argument: str = "task_type") -> None:
        if name not in self._handlers:
            raise ArgumentError(argument, f"unknown task type {name!r} (registered: {', '.join(self.names())})")
