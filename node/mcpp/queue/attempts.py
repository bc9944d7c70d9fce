"""The lifecycle of an attempt: worker heartbeats and completions (only the current lease's
count), lease expiry and timeouts, retries with backoff, dead letters, and the final state of a
task with its hooks.

See broker_state.py for how `Broker` is layered.
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Any

import trio

from mcpp.errors import MCPPError
from mcpp.log import kv
from mcpp.queue.broker_state import Lease
from mcpp.queue.dispatch import UNREACHABLE_BACKOFF_S, Dispatcher
from mcpp.queue.model import TaskRecord, now

__all__ = ["Attempts", "CANCEL_GRACE_S"]

log = logging.getLogger("mcpp.broker")
TICK_S = 0.1
CANCEL_GRACE_S = 2.0


class Attempts(Dispatcher):
    """Worker reports, leases and final states."""

    def on_beat(self, worker: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        mono = time.monotonic()
        lost = []
        for t in tasks:
            if not isinstance(t, dict):
                continue
            lease = self.leases.get(str(t.get("task_id")))
            if lease is None or lease.worker != worker or lease.attempt != t.get("attempt"):
                lost.append(t.get("task_id"))
                continue
            lease.expires = mono + self.settings.lease_s
            p = t.get("progress")
            if isinstance(p, (int, float)) and 0 <= p <= 1:
                lease.progress = float(p)
        return {"lost": lost}

    def on_done(self, worker: str, free: int | None, results: list[dict[str, Any]]) -> dict[str, Any]:
        if free is not None:
            self._worker_free[worker] = (free, time.monotonic())
        taken = ignored = 0
        for c in results:
            tid = str(c.get("task_id"))
            lease = self.leases.get(tid)
            if lease is None or lease.worker != worker or lease.attempt != c.get("attempt"):
                ignored += 1
                self.stats.duplicates_ignored += 1
                continue
            rec = self.store.get(tid)
            if rec is None:
                self._end_lease(lease)
                continue
            self._end_lease(lease)
            self._complete_attempt(rec, lease, c)
            taken += 1
        self._wake.set()
        return {"taken": taken, "ignored": ignored}

    def _attempt_entry(self, rec: TaskRecord, lease: Lease, outcome: str, error: str | None,
                       started: float | None = None, finished: float | None = None) -> tuple[dict[str, Any], ...]:
        entry = {"attempt": lease.attempt, "worker": lease.worker, "outcome": outcome, "error": error,
                 "started_at": started if started is not None else rec.started_at,
                 "finished_at": finished if finished is not None else now()}
        return (*rec.history, entry)

    def _complete_attempt(self, rec: TaskRecord, lease: Lease, c: dict[str, Any]) -> None:
        outcome = str(c.get("outcome"))
        error = None if c.get("error") is None else str(c.get("error"))[:10_000]
        started, finished = c.get("started_at"), c.get("finished_at")
        started = started if isinstance(started, (int, float)) and not isinstance(started, bool) else None
        finished = finished if isinstance(finished, (int, float)) and not isinstance(finished, bool) else None
        history = self._attempt_entry(rec, lease, outcome, error, started, finished)
        raw_logs = c.get("logs")
        logs = tuple(str(x)[:1000] for x in (raw_logs[:500] if isinstance(raw_logs, list) else []))
        rec = rec.replace(logs=(*rec.logs, *logs)[-500:])
        if outcome == "ok":
            self._feed(lease.worker, True)
            self._finish(rec, "completed", result=c.get("result"), history=history,
                         started_at=started if isinstance(started, (int, float)) else rec.started_at)
        elif lease.cancel_at is not None:  # a cancel was accepted: whatever else happened, it stays cancelled
            self._finish(rec, "cancelled", error=lease.cancel_reason, history=history)
        elif outcome in ("requeue", "cancelled"):
            # the worker stopped it (unregistered without drain, or shut down): not the task's fault
            back = rec.replace(status="queued", attempts=rec.attempts - 1, worker=None, history=history)
            self.store.save([back])
            self._enqueue(back)
        else:
            if outcome == "timeout":
                self._feed(lease.worker, True)  # the worker did its job: it enforced the limit
            self._attempt_failed(rec, history, error or outcome)

    def _attempt_failed(self, rec: TaskRecord, history: tuple[dict[str, Any], ...], error: str) -> None:
        if rec.attempts >= rec.retry_policy.max_attempts:
            self._finish(rec, "dead_lettered", error=f"{error} (after {rec.attempts} attempts)", history=history)
            return
        self.stats.retries += 1
        eta = now() + rec.retry_policy.delay_s(rec.attempts)
        back = rec.replace(status="queued", worker=None, error=error, history=history, not_before=eta)
        self.store.save([back])
        self._enqueue(back)

    def _finish(self, rec: TaskRecord, status: str, *, result: Any = None, error: str | None = None,
                history: tuple[dict[str, Any], ...] | None = None, started_at: float | None = None) -> None:
        changes: dict[str, Any] = {"status": status, "finished_at": now(),
                                   "result": result if status == "completed" else None,
                                   "error": None if status == "completed" else error}
        if history is not None:
            changes["history"] = history
        if started_at is not None:
            changes["started_at"] = started_at
        new = rec.replace(**changes)
        self.store.save([new])
        self._finished(new)

    def _finished(self, rec: TaskRecord) -> None:
        if rec.status == "completed":
            self.stats.done_times.append(time.monotonic())
            if rec.started_at is not None and rec.finished_at is not None and rec.cached_from is None:
                self.stats.wait_s_total += max(0.0, rec.started_at - (rec.queued_at or rec.created_at))
                self.stats.run_s_total += max(0.0, rec.finished_at - rec.started_at)
                self.stats.n_timed += 1
        ev = self._waiters.pop(rec.task_id, None)
        if ev is not None:
            ev.set()
        self.dependency_final(rec.task_id, rec.status)
        for hook in self.final_hooks:
            try:
                hook(rec)
            except Exception:
                log.critical("final hook failed", exc_info=True, extra=kv(task=rec.task_id))

    async def _tell_cancel(self, worker: str, task_id: str, attempt: int, reason: str) -> None:
        try:
            await self._call(worker, "w.cancel", {"task_id": task_id, "attempt": attempt, "reason": reason})
        except MCPPError as e:
            log.debug("cancel not delivered", extra=kv(task=task_id, worker=worker, error=str(e)))

    def _tick(self) -> None:
        mono = time.monotonic()
        t = now()
        while self._delayed and self._delayed[0][0] <= t:
            _, tid = heapq.heappop(self._delayed)
            if tid in self._delayed_ids:
                self._delayed_ids.discard(tid)
                rec = self.store.get(tid)
                if rec is not None and rec.status == "queued":
                    self._enqueue(rec.replace(not_before=None))
        grace = (self.health() - 1.0) * self.settings.lease_s
        for lease in list(self.leases.values()):
            rec = None
            if lease.cancel_at is not None and mono >= lease.cancel_at:
                rec = self.store.get(lease.task_id)
                self._end_lease(lease)
                if rec is not None:
                    why = f"{lease.cancel_reason} (worker did not stop within {CANCEL_GRACE_S:g} s)"
                    self._finish(rec, "cancelled", error=why,
                                 history=self._attempt_entry(rec, lease, "cancelled", why))
            elif mono >= lease.expires + grace or mono - lease.started > lease.timeout_s + self.settings.lease_s:
                expired = mono >= lease.expires + grace
                self._end_lease(lease)
                self._feed(lease.worker, False)
                if expired:  # a worker that stopped renewing is suspect: give it nothing for a while
                    self._busy_until[lease.worker] = mono + max(UNREACHABLE_BACKOFF_S, 2 * self.settings.lease_s)
                rec = self.store.get(lease.task_id)
                why = (f"lease expired: worker {lease.worker} stopped renewing it" if expired
                       else f"timeout_s: ran longer than {lease.timeout_s:g} s")
                self.stats.lease_expired += 1
                log.info("lease expired", extra=kv(task=lease.task_id, worker=lease.worker, reason=why))
                self._spawn(self._tell_cancel, lease.worker, lease.task_id, lease.attempt, why)
                if rec is not None and rec.status == "running":
                    if lease.cancel_at is not None:  # a cancel was accepted: it is not retried
                        self._finish(rec, "cancelled", error=lease.cancel_reason,
                                     history=self._attempt_entry(rec, lease, "lost", why))
                    else:
                        self._attempt_failed(rec, self._attempt_entry(rec, lease, "lost", why), why)
                self._wake.set()

    async def _tick_loop(self) -> None:
        while True:
            self._tick()
            await trio.sleep(TICK_S)
