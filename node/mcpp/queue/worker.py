"""The worker side of the queue: runs tasks that owners dispatch to this node.

Admission is by credits: a worker accepts a dispatched task only while it runs fewer than
`max_concurrent` tasks and the task's resource needs fit its limits; otherwise it refuses and
the owner keeps the task queued. Every running task holds a lease at its owner, renewed by
heartbeats (`q.beat`, every lease_s / 3); completions go back in batches (`q.done`) and are
retried until the owner takes them, so a restarted owner still learns the outcome.

Resource handling: `run()` owns the nursery of running tasks; cancelling it cancels them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from trio_typing import TaskStatus

from mcpp.errors import MCPPError
from mcpp.log import kv
from mcpp.queue.handlers import HandlerRegistry, TaskContext

__all__ = ["Worker", "WorkerSettings"]

log = logging.getLogger("mcpp.worker")
Send = Callable[[str, str, Any], Awaitable[Any]]
DELIVERY_GIVE_UP_S = 600.0
BATCH_BYTES = 1 << 20


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str
    task_types: tuple[str, ...]
    max_concurrent: int = 4
    resources: dict[str, float] = field(default_factory=dict)
    active: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "task_types": list(self.task_types),
            "max_concurrent": self.max_concurrent,
            "resources": dict(self.resources),
            "active": self.active,
        }


@dataclass
class _Run:
    task_id: str
    owner: str
    attempt: int
    task_type: str
    timeout_s: float
    needs: dict[str, float]
    ctx: TaskContext
    started_at: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cancel_reason: str | None = None
    requeue: bool = False


@dataclass
class _Pending:
    owner: str
    completion: dict[str, Any]
    since: float
    size: int = 0  # the result's JSON size, measured when it was checked against the limit


class Worker:
    def __init__(self, peer_id: str, registry: HandlerRegistry, settings: WorkerSettings, send: Send,
                 lease_s: float, max_result_bytes: int) -> None:
        self.peer_id = peer_id
        self.registry = registry
        self.settings = settings
        self._send = send
        self._lease_s = lease_s
        self._max_result = max_result_bytes
        self.running: dict[str, _Run] = {}
        self.completed = 0
        self.failed = 0
        self.rejected = 0
        self.fenced = 0  # dispatches refused because their owner was fenced
        self._outbox: list[_Pending] = []
        self._flushing: set[str] = set()
        self._wake_flush = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.on_change: Callable[[], None] = lambda: None
        # owner -> (epoch, adopter): dispatches of an owner below its fence are refused (replica.py)
        self.fence_of: Callable[[str], tuple[int, str] | None] = lambda owner: None

    # ---- facts -------------------------------------------------------------------------
    def free(self) -> int:
        if not self.settings.active:
            return 0
        return max(0, self.settings.max_concurrent - len(self.running))

    def info(self) -> dict[str, Any]:
        return {**self.settings.as_dict(), "running": len(self.running), "free": self.free()}

    def _used(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for r in self.running.values():
            for k, v in r.needs.items():
                used[k] = used.get(k, 0.0) + v
        return used

    def _fits(self, needs: dict[str, float]) -> bool:
        limits = self.settings.resources
        used = self._used()
        return all(used.get(k, 0.0) + v <= limits[k] for k, v in needs.items() if k in limits)

    def configure(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.on_change()

    # ---- rpc handlers ------------------------------------------------------------------
    async def on_run(self, peer_id: str, params: Any) -> Any:
        """Dispatch from an owner: {"owner", "tasks": [{task_id, attempt, task_type, payload,
        timeout_s, needs}]} -> {"accepted": [...], "rejected": {id: reason}, "free": n}."""
        owner = str(params["owner"])
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        fence = self.fence_of(owner)
        if fence is not None and int(params.get("epoch") or 0) < fence[0]:
            # the owner's tasks were adopted while it was away: it must learn which before it
            # dispatches again (else an adopted task would run twice)
            why = f"fenced: the tasks of {owner} below epoch {fence[0]} were adopted by {fence[1]}"
            self.rejected += len(params["tasks"])
            self.fenced += len(params["tasks"])
            return {"accepted": [], "rejected": {str(t["task_id"]): why for t in params["tasks"]},
                    "free": self.free(), "fence": {"epoch": fence[0], "adopter": fence[1]}}
        for t in params["tasks"]:
            tid = str(t["task_id"])
            reason = None
            if not self.settings.active:
                reason = "worker is not taking tasks"
            elif t["task_type"] not in self.settings.task_types or self.registry.get(t["task_type"]) is None:
                reason = f"task type {t['task_type']!r} not served here"
            elif len(self.running) >= self.settings.max_concurrent:
                reason = "busy"
            elif not self._fits(dict(t.get("needs") or {})):
                reason = "resources"
            elif tid in self.running:
                reason = "already running here"
            if reason:
                rejected[tid] = reason
                self.rejected += 1
                continue
            run = _Run(tid, owner, int(t["attempt"]), t["task_type"], float(t["timeout_s"]),
                       dict(t.get("needs") or {}), TaskContext(tid, int(t["attempt"])), time.time())
            try:
                assert self._nursery is not None
                self._nursery.start_soon(self._execute, run, t.get("payload"))
            except RuntimeError:  # the node is shutting down: the owner keeps the task queued
                rejected[tid] = "worker stopping"
                continue
            self.running[tid] = run
            accepted.append(tid)
        return {"accepted": accepted, "rejected": rejected, "free": self.free()}

    def rehome(self, owner: str, adopter: str, ids: set[str]) -> dict[str, int]:
        """`owner`'s tasks `ids` were adopted by `adopter`: their runs here (and completions not
        yet delivered) now report to it. Returns {task id: attempt} of those."""
        moved: dict[str, int] = {}
        for run in self.running.values():
            if run.owner == owner and run.task_id in ids:
                run.owner = adopter
                moved[run.task_id] = run.attempt
        for p in self._outbox:
            if p.owner == owner and p.completion["task_id"] in ids:
                p.owner = adopter
                moved[p.completion["task_id"]] = int(p.completion["attempt"])
        if moved:
            self._wake_flush.set()
        return moved

    async def on_cancel(self, peer_id: str, params: Any) -> Any:
        run = self.running.get(str(params["task_id"]))
        if run is None or run.attempt != int(params.get("attempt", run.attempt)):
            return {"cancelled": False}
        run.cancel_reason = str(params.get("reason") or "cancelled")
        run.scope.cancel()
        return {"cancelled": True}

    def stop_all(self, requeue: bool, reason: str) -> int:
        """Cancel every running task; with requeue the owners queue them again (no attempt used)."""
        for run in self.running.values():
            run.requeue = requeue
            run.cancel_reason = reason
            run.scope.cancel()
        return len(self.running)

    # ---- running -----------------------------------------------------------------------
    async def _execute(self, run: _Run, payload: Any) -> None:
        handler = self.registry.get(run.task_type)
        outcome, result, error = "error", None, None
        size = 0
        with run.scope:
            try:
                assert handler is not None
                with trio.fail_after(run.timeout_s):
                    result = await handler.run(payload, run.ctx)
                size = len(json.dumps(result, separators=(",", ":"), allow_nan=False).encode())
                if size > self._max_result:
                    outcome, result = "error", None
                    error = f"result: {size} bytes is over the limit of {self._max_result} (max_payload_bytes)"
                else:
                    outcome = "ok"
            except trio.TooSlowError:
                outcome, error = "timeout", f"timeout_s: ran longer than {run.timeout_s:g} s"
            except (TypeError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        if run.scope.cancelled_caught:
            outcome = "requeue" if run.requeue else "cancelled"
            result, error = None, run.cancel_reason or "cancelled"
        self.running.pop(run.task_id, None)
        if outcome == "ok":
            self.completed += 1
        elif outcome in ("error", "timeout"):
            self.failed += 1
        completion = {
            "task_id": run.task_id, "attempt": run.attempt, "outcome": outcome, "result": result,
            "error": error, "logs": run.ctx.logs, "started_at": run.started_at, "finished_at": time.time(),
        }
        self._outbox.append(_Pending(run.owner, completion, time.monotonic(), size if outcome == "ok" else 0))
        self._wake_flush.set()

    async def _deliver(self, owner: str, items: list[_Pending]) -> None:
        try:
            await self._send(owner, "q.done", {"worker": self.peer_id, "free": self.free(),
                                               "results": [p.completion for p in items]})
        except MCPPError as e:
            keep = [p for p in items if time.monotonic() - p.since < DELIVERY_GIVE_UP_S]
            if len(keep) < len(items):
                log.warning("completions dropped: owner unreachable", extra=kv(owner=owner, n=len(items) - len(keep)))
            self._outbox.extend(keep)
            log.debug("completion delivery failed", extra=kv(owner=owner, error=str(e)))
            await trio.sleep(0.5)
        finally:
            self._flushing.discard(owner)
            if self._outbox:
                self._wake_flush.set()

    async def _flush_loop(self) -> None:
        """One delivery in flight per owner; completions that arrive meanwhile form the next batch."""
        while True:
            await self._wake_flush.wait()
            self._wake_flush = trio.Event()
            by_owner: dict[str, list[_Pending]] = {}
            rest: list[_Pending] = []
            for p in self._outbox:
                if p.owner in self._flushing:
                    rest.append(p)
                else:
                    by_owner.setdefault(p.owner, []).append(p)
            self._outbox = rest
            assert self._nursery is not None
            for owner, items in by_owner.items():
                # one q.done at most ~BATCH_BYTES: results may be up to max_payload_bytes each
                self._flushing.add(owner)
                first: list[_Pending] = []
                size = 0
                for p in items:
                    if first and size + p.size > BATCH_BYTES:
                        self._outbox.append(p)  # the next round takes the rest
                        continue
                    first.append(p)
                    size += p.size
                self._nursery.start_soon(self._deliver, owner, first)

    async def _beat_owner(self, owner: str, runs: list[_Run]) -> None:
        tasks = [{"task_id": r.task_id, "attempt": r.attempt, "progress": r.ctx.progress_value} for r in runs]
        try:
            with trio.move_on_after(self._lease_s):
                answer = await self._send(owner, "q.beat", {"worker": self.peer_id, "tasks": tasks})
                for tid in answer.get("lost", []):
                    run = self.running.get(tid)
                    if run is not None:
                        run.cancel_reason = "lease lost: the owner gave the task to another worker"
                        run.scope.cancel()
        except MCPPError as e:
            log.debug("heartbeat failed", extra=kv(owner=owner, error=str(e)))

    async def _beat_loop(self) -> None:
        while True:
            await trio.sleep(self._lease_s / 3)
            by_owner: dict[str, list[_Run]] = {}
            for r in self.running.values():
                by_owner.setdefault(r.owner, []).append(r)
            assert self._nursery is not None
            for owner, runs in by_owner.items():
                self._nursery.start_soon(self._beat_owner, owner, runs)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._flush_loop)
            nursery.start_soon(self._beat_loop)
            task_status.started()
