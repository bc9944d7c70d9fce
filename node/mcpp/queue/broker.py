"""The owner side of the queue: the node that accepted a task stores it, orders it and
dispatches it to workers, holds its lease, retries it and records its one completion.

Memory holds only the ordering: per task type a sorted list of (-priority, seq, id) of the
ready tasks, the backoff heap, the leases of running tasks and the dependency index. Every
task's record lives in the SQLite store (see store.py).

At-least-once: a dispatched task runs under a lease its worker renews every lease_s / 3;
a lease that expires (worker killed, hung or cut off) counts as a failed attempt and the task
is dispatched again. A completion counts only if it matches the current lease (task id,
attempt, worker): late or duplicate completions are ignored and counted.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from trio_typing import TaskStatus

from mcpp.errors import ArgumentError, QuotaExceeded, TaskNotFound
from mcpp.log import kv
from mcpp.queue.attempts import CANCEL_GRACE_S
from mcpp.queue.broker_state import BrokerSettings, Call, Lease, WorkerView
from mcpp.queue.dependencies import Dependencies
from mcpp.queue.model import (
    FINAL,
    RETRYABLE,
    STATUSES,
    RetryPolicy,
    TaskRecord,
    cache_key,
    check_number,
    new_task_id,
    now,
)
from mcpp.queue.store import TaskFilter, TaskStore

__all__ = ["Broker", "BrokerSettings", "WorkerView"]

log = logging.getLogger("mcpp.broker")
DEP_POLL_S = 0.5
RATE_WINDOW_S = 60.0
COUNTS_TTL_S = 0.25


class Broker(Dependencies):
    """The owner side of the queue. Only the node's trio loop touches it. `run()` runs the
    dispatch and lease loops."""

    def __init__(self, me: str, store: TaskStore, settings: BrokerSettings, call: Call,
                 workers: Callable[[], list[WorkerView]], known_type: Callable[[str], bool]) -> None:
        super().__init__(me, store, settings, call, workers, known_type)
        self._resume()

    def _resume(self) -> None:
        """Rebuild the in-memory state from the store: queued tasks resume, running ones are
        re-leased for lease_s (their workers' heartbeats or completions keep them), blocked ones
        wait for their dependencies again."""
        mono = time.monotonic()
        n = {"queued": 0, "running": 0, "blocked": 0}
        for rec in self.store.active():
            n[rec.status] += 1
            if rec.status == "queued":
                self._enqueue(rec)
            elif rec.status == "running":
                self._lease_again(rec, mono)
            else:
                self._block(rec)
        if any(n.values()):
            log.info("queue resumed from store", extra=kv(**n))

    def _lease_again(self, rec: TaskRecord, mono: float) -> None:
        """A task running on a worker (after a restart, or adopted): leased for lease_s; the
        worker's heartbeats or its completion keep it."""
        assert rec.worker is not None
        self.leases[rec.task_id] = Lease(rec.task_id, rec.worker, rec.attempts, rec.task_type, rec.tags,
                                         mono, mono + self.settings.lease_s, rec.timeout_s)
        self._inflight[rec.worker] = self._inflight.get(rec.worker, 0) + 1

    def submit(self, task_type: str, payload: Any, task_id: str | None, priority: float,
               depends_on: list[str], tags: list[str], timeout_s: float, retry_policy: Any,
               metadata: dict[str, Any], cache_ttl_s: float, dep_status: dict[str, str]) -> dict[str, Any]:
        """`accept`, answered as `task_submit` answers."""
        rec, existed = self.accept(task_type, payload, task_id, priority, depends_on, tags, timeout_s,
                                   retry_policy, metadata, cache_ttl_s, dep_status)
        return self.submitted(rec, existed)

    def accept(self, task_type: str, payload: Any, task_id: str | None, priority: float,
               depends_on: list[str], tags: list[str], timeout_s: float, retry_policy: Any,
               metadata: dict[str, Any], cache_ttl_s: float, dep_status: dict[str, str]) -> tuple[TaskRecord, bool]:
        """Accept a task (arguments already checked by `check_submit`); `dep_status` holds the
        current status of every dependency (looked up by the service, across the mesh). Returns
        the stored record and whether it existed already (a repeated task id)."""
        if task_id is not None:
            existing = self.store.get(task_id)
            if existing is not None:
                return existing, True
        total = self.queued_count()
        if total >= self.settings.max_queued_tasks:
            raise QuotaExceeded("max_queued_tasks", f"this node already holds {total} waiting tasks "
                                f"(max_queued_tasks={self.settings.max_queued_tasks})")
        for q in self.settings.quotas:
            if q.tag in tags and q.max_queued is not None:
                n = sum(1 for _, _, t in self._qentry.values() if q.tag in t)
                n += sum(1 for tid in self._blocked if q.tag in (self.store.get(tid) or _EMPTY).tags)
                if n >= q.max_queued:
                    raise QuotaExceeded(f"quota[{q.tag}].max_queued",
                                        f"tag {q.tag!r} already has {n} waiting tasks (max_queued={q.max_queued})")
        t = now()
        self._seq += 1
        rec = TaskRecord(
            task_id=task_id or new_task_id(self.me), task_type=task_type, owner=self.me, seq=self._seq,
            payload=payload, priority=priority, status="queued", depends_on=tuple(depends_on), tags=tuple(tags),
            timeout_s=timeout_s, retry_policy=RetryPolicy.parse(retry_policy), metadata=metadata,
            cache_key=cache_key(task_type, payload), created_at=t, queued_at=t,
        )
        if cache_ttl_s > 0:
            hit = self.store.cached(rec.cache_key or "", t - cache_ttl_s)
            if hit is not None:
                rec = rec.replace(status="completed", result=hit.result, started_at=t, finished_at=t,
                                  worker=hit.worker, cached_from=hit.task_id, attempts=0)
                self.store.insert(rec)
                self._finished(rec)
                return rec, False
        failed_deps = [d for d in depends_on if dep_status.get(d) in FINAL - {"completed"}]
        if failed_deps:
            d = failed_deps[0]
            rec = rec.replace(status="failed", finished_at=t, error=f"depends_on: {d} ended {dep_status[d]}")
            self.store.insert(rec)
            self._finished(rec)
            return rec, False
        if any(dep_status.get(d) != "completed" for d in depends_on):
            rec = rec.replace(status="blocked")
            self.store.insert(rec)
            self._block(rec)
            return self.store.get(rec.task_id) or rec, False
        self.store.insert(rec)
        self._enqueue(rec)
        return rec, False

    def submitted(self, rec: TaskRecord, existed: bool = False) -> dict[str, Any]:
        pos = self.queue_position(rec.task_id)
        out = {
            "task_id": rec.task_id,
            "status": rec.status,
            "owner": self.me,
            "queue_position": pos,
            "estimated_start_s": self._estimate_start(rec, pos),
            "existing": existed,
        }
        if rec.cached_from:
            out["cached_from"] = rec.cached_from
        return out

    def _estimate_start(self, rec: TaskRecord, pos: int | None) -> float | None:
        if rec.status != "queued":
            return 0.0 if rec.status in ("running", "completed") else None
        slots = sum(w.max_concurrent for w in self._workers() if rec.task_type in w.task_types)
        if slots == 0:
            return None
        mean_run = self.stats.run_s_total / self.stats.n_timed if self.stats.n_timed else 0.0
        busy = sum(1 for le in self.leases.values() if le.task_type == rec.task_type)
        ahead = (pos or 0) + busy
        return round(max(0.0, (ahead - slots + 1)) * mean_run / slots, 3)

    def get(self, task_id: str) -> TaskRecord:
        rec = self.store.get(task_id)
        if rec is None:
            raise TaskNotFound(task_id)
        return rec

    def status(self, task_id: str, include_metrics: bool) -> dict[str, Any]:
        rec = self.get(task_id)
        lease = self.leases.get(task_id)
        progress = 1.0 if rec.status == "completed" else (lease.progress if lease else 0.0)
        out: dict[str, Any] = {
            "task_id": rec.task_id,
            "task_type": rec.task_type,
            "status": rec.status,
            "owner": rec.owner,
            "assigned_worker": rec.worker,
            "attempts": rec.attempts,
            "priority": rec.priority,
            "progress": round(progress, 4),
            "created_at": rec.created_at,
            "started_at": rec.started_at,
            "finished_at": rec.finished_at,
            "error": rec.error,
            "tags": list(rec.tags),
            "depends_on": list(rec.depends_on),
            "queue_position": self.queue_position(task_id),
        }
        if rec.cached_from:
            out["cached_from"] = rec.cached_from
        if include_metrics:
            t = now()
            started = rec.started_at
            out["metrics"] = {
                "wait_s": None if started is None else round(started - (rec.queued_at or rec.created_at), 6),
                "run_s": None if started is None else round((rec.finished_at or t) - started, 6),
                "age_s": round(t - rec.created_at, 6),
            }
        return out

    def result(self, task_id: str, include_logs: bool, include_history: bool) -> dict[str, Any]:
        rec = self.get(task_id)
        out: dict[str, Any] = {
            "task_id": rec.task_id,
            "status": rec.status,
            "result": rec.result,
            "error": rec.error,
            "worker": rec.worker,
            "duration_ms": rec.duration_ms(),
            "attempts": rec.attempts,
        }
        if rec.cached_from:
            out["cached_from"] = rec.cached_from
        if include_logs:
            out["logs"] = list(rec.logs)
        if include_history:
            out["history"] = list(rec.history)
        return out

    async def wait_final(self, task_id: str) -> None:
        """Return once the task is in a final state (the caller bounds the wait)."""
        while not self.get(task_id).final:
            ev = self._waiters.setdefault(task_id, trio.Event())
            await ev.wait()

    def list_tasks(self, flt: TaskFilter, limit: int, offset: int) -> tuple[list[TaskRecord], int]:
        return self.store.select(flt, limit, offset)

    def cancel(self, task_id: str, reason: str | None, force: bool) -> dict[str, Any]:
        rec = self.get(task_id)
        why = reason or "cancelled by request"
        if rec.final:
            return {"task_id": task_id, "status": rec.status, "cancelled": False,
                    "reason": f"already {rec.status}"}
        lease = self.leases.get(task_id)
        if lease is None:
            self._dequeue(task_id)
            self._drop_blocked(task_id)
            self._finish(rec, "cancelled", error=why)
            return {"task_id": task_id, "status": "cancelled", "cancelled": True, "reason": why}
        self._spawn(self._tell_cancel, lease.worker, task_id, lease.attempt, why)
        if force:
            self._end_lease(lease)
            self._finish(rec, "cancelled", error=why, history=self._attempt_entry(rec, lease, "cancelled", why))
            return {"task_id": task_id, "status": "cancelled", "cancelled": True, "reason": why, "forced": True}
        lease.cancel_at = time.monotonic() + CANCEL_GRACE_S
        lease.cancel_reason = why
        return {"task_id": task_id, "status": "running", "cancelled": True, "reason": why,
                "grace_s": CANCEL_GRACE_S}

    def set_priority(self, task_id: str, priority: float | None, boost: float | None) -> dict[str, Any]:
        rec = self.get(task_id)
        if priority is None and boost is None:
            raise ArgumentError("priority", "give priority or boost")
        new = priority if priority is not None else rec.priority + (boost or 0.0)
        check_number("priority", new, -1e9, 1e9)
        if rec.status not in ("queued", "blocked"):
            raise ArgumentError("task_id", f"task {task_id} is {rec.status}; only a queued or blocked task can be re-prioritised")
        was_ready = task_id in self._qentry
        self._dequeue(task_id) if was_ready else None
        new_rec = rec.replace(priority=float(new))
        self.store.save([new_rec])
        if was_ready:
            self._enqueue(new_rec)
        return {"task_id": task_id, "old_priority": rec.priority, "new_priority": new_rec.priority,
                "queue_position": self.queue_position(task_id), "status": new_rec.status}

    def retry(self, task_id: str, priority: float | None, timeout_s: float | None, retry_policy: Any) -> dict[str, Any]:
        rec = self.get(task_id)
        if rec.status not in RETRYABLE:
            raise ArgumentError("task_id", f"task {task_id} is {rec.status}; only a failed, cancelled or dead-lettered task can be retried")
        changes: dict[str, Any] = {"status": "queued", "queued_at": now(), "finished_at": None, "not_before": None,
                                   "error": None, "result": None, "attempts": 0}
        if priority is not None:
            changes["priority"] = check_number("priority", priority, -1e9, 1e9)
        if timeout_s is not None:
            changes["timeout_s"] = check_number("timeout_s", timeout_s, 0.001, 86400 * 7)
        if retry_policy is not None:
            changes["retry_policy"] = RetryPolicy.parse(retry_policy)
        self._seq += 1
        changes["seq"] = self._seq
        new = rec.replace(**changes)
        self.store.save([new])
        self._enqueue(new)
        for hook in self.requeued_hooks:
            hook(new)
        return {"task_id": task_id, "status": "queued", "previous_status": rec.status,
                "queue_position": self.queue_position(task_id), "priority": new.priority,
                "attempts_before": len(rec.history)}

    def clear(self, status: str, task_type: str | None, tag: str | None) -> int:
        if status == "running":
            raise ArgumentError("status", "running tasks cannot be cleared; cancel them with task_cancel")
        ids = self.store.ids(TaskFilter(status=status, task_type=task_type, tag=tag))
        gone = []
        for tid in ids:
            self._dequeue(tid)
            self._drop_blocked(tid)
            rec = self.store.get(tid)
            if rec is not None and not rec.final:
                gone.append(rec.replace(status="cancelled", error="removed by queue_clear"))
        self.store.delete(ids)
        for rec in gone:  # dependents fail, workflows learn of it, waiters wake
            self._finished(rec)
        for hook in self.removed_hooks:
            hook(ids)
        for tid in ids:
            ev = self._waiters.pop(tid, None)
            if ev is not None:
                ev.set()
        return len(ids)

    def pause(self, task_type: str | None, reason: str | None) -> dict[str, Any]:
        self.paused[task_type or "*"] = reason or "paused"
        return {"paused": True, "task_type": task_type, "reason": self.paused[task_type or "*"],
                "queued": len(self._qentry)}

    def resume(self, task_type: str | None, reorder: bool) -> dict[str, Any]:
        if task_type is None:
            was = bool(self.paused)
            self.paused.clear()
        else:
            was = self.paused.pop(task_type, None) is not None
        moved = 0
        if reorder:  # tasks waiting out a retry backoff join the queue at once, in priority order
            for _, tid in self._delayed:
                if tid in self._delayed_ids:
                    rec = self.store.get(tid)
                    if rec is not None and rec.status == "queued":
                        self._delayed_ids.discard(tid)
                        self._enqueue(rec.replace(not_before=None))
                        moved += 1
            self._delayed = [(e, t) for e, t in self._delayed if t in self._delayed_ids]
            heapq.heapify(self._delayed)
        self._wake.set()
        return {"resumed": was, "task_type": task_type, "reordered": moved, "queued": len(self._qentry)}

    def adopt(self, recs: list[TaskRecord], running: dict[str, tuple[str, int]]) -> list[TaskRecord]:
        """Take over tasks of a lost owner, stored as this node's with the same ids: final ones
        stay readable here; a task still running on a worker that now reports here (`running`:
        task id -> (worker, attempt)) is leased to it; the others are queued again (or blocked
        on their dependencies). Ones already known here are skipped."""
        t = now()
        mono = time.monotonic()
        taken: list[TaskRecord] = []
        for rec in recs:
            if self.store.exists(rec.task_id):
                continue
            self._seq += 1
            if rec.final:
                taken.append(rec.replace(owner=self.me, seq=self._seq))
            elif rec.task_id in running:
                worker, attempt = running[rec.task_id]
                taken.append(rec.replace(owner=self.me, seq=self._seq, status="running", worker=worker,
                                         attempts=attempt, started_at=rec.started_at or t, not_before=None))
            else:
                status = "blocked" if rec.depends_on else "queued"
                taken.append(rec.replace(owner=self.me, seq=self._seq, status=status, worker=None,
                                         started_at=None, queued_at=t, not_before=None))
        self.store.save(taken)
        # blocked ones last: a dependency adopted in the same batch is then known here
        for rec in sorted(taken, key=lambda r: r.status == "blocked"):
            if rec.status == "running":
                self._lease_again(rec, mono)
            elif rec.status == "blocked":
                self._block(rec)
            elif rec.status == "queued":
                self._enqueue(rec)
        self._counts_cache = None
        self._wake.set()
        return taken

    def forget(self, task_ids: list[str]) -> int:
        """Drop tasks another node adopted while this one was away (no completion is recorded
        here; a late one from a worker is ignored as unknown)."""
        gone = [t for t in task_ids if self.store.exists(t)]
        for tid in gone:
            self._dequeue(tid)
            self._delayed_ids.discard(tid)
            self._drop_blocked(tid)
            lease = self.leases.get(tid)
            if lease is not None:
                self._end_lease(lease)
        self.store.delete(gone)
        self._counts_cache = None
        return len(gone)

    def _counts(self) -> dict[tuple[str, str], int]:
        """The store's counts by (status, type): a scan of the table, so cached for COUNTS_TTL_S."""
        mono = time.monotonic()
        if self._counts_cache is None or mono - self._counts_cache[0] > COUNTS_TTL_S:
            self._counts_cache = (mono, self.store.counts())
        return self._counts_cache[1]

    def local_stats(self) -> dict[str, Any]:
        counts = self._counts()
        by_status = {s: 0 for s in STATUSES}
        by_type: dict[str, dict[str, int]] = {}
        for (s, t), n in counts.items():
            by_status[s] = by_status.get(s, 0) + n
            by_type.setdefault(t, {})[s] = n
        mono = time.monotonic()
        dq = self.stats.done_times
        while dq and mono - dq[0] > RATE_WINDOW_S:
            dq.popleft()
        n = self.stats.n_timed
        return {
            "queued_count": by_status["queued"],
            "blocked_count": by_status["blocked"],
            "running_count": by_status["running"],
            "completed_count": by_status["completed"],
            "failed_count": by_status["failed"],
            "cancelled_count": by_status["cancelled"],
            "dead_lettered_count": by_status["dead_lettered"],
            "by_type": by_type,
            "completed_per_s": round(len(dq) / RATE_WINDOW_S, 3),
            "mean_wait_s": round(self.stats.wait_s_total / n, 6) if n else None,
            "mean_run_s": round(self.stats.run_s_total / n, 6) if n else None,
            "paused": dict(self.paused),
            "retries": self.stats.retries,
            "lease_expired": self.stats.lease_expired,
            "duplicate_completions_ignored": self.stats.duplicates_ignored,
        }

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._tick_loop)
            nursery.start_soon(self._dispatch_loop)
            task_status.started()


_EMPTY = TaskRecord(task_id="", task_type="", owner="")
