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

import contextlib
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from sortedcontainers import SortedList

if TYPE_CHECKING:
    from trio_typing import TaskStatus

from mcpp.errors import ArgumentError, MCPPError, PayloadTooLarge, QueueError, QuotaExceeded, TaskNotFound
from mcpp.log import kv
from mcpp.queue.model import (
    FINAL,
    RETRYABLE,
    STATUSES,
    RetryPolicy,
    TaskRecord,
    cache_key,
    check_number,
    check_str_list,
    check_task_id,
    json_size,
    new_task_id,
    now,
    owner_of,
    Quota,
)
from mcpp.queue.store import TaskFilter, TaskStore

__all__ = ["Broker", "BrokerSettings", "WorkerView", "check_submit"]

log = logging.getLogger("mcpp.broker")
Call = Callable[[str, str, Any], Awaitable[Any]]
TICK_S = 0.1
DEP_POLL_S = 0.5
BUSY_BACKOFF_S = 0.05
UNREACHABLE_BACKOFF_S = 1.0
CANCEL_GRACE_S = 2.0
RATE_WINDOW_S = 60.0
BATCH_BYTES = 1 << 20
COUNTS_TTL_S = 0.25


@dataclass(frozen=True)
class BrokerSettings:
    lease_s: float = 5.0
    max_payload_bytes: int = 1 << 20
    max_queued_tasks: int = 100_000
    quotas: tuple[Quota, ...] = ()


@dataclass(frozen=True)
class WorkerView:
    """What an owner knows of a worker when it dispatches."""

    peer_id: str
    worker_id: str
    task_types: frozenset[str]
    max_concurrent: int
    resources: dict[str, float]
    rtt_ms: float


@dataclass
class Lease:
    task_id: str
    worker: str
    attempt: int
    task_type: str
    tags: tuple[str, ...]
    started: float  # monotonic
    expires: float  # monotonic
    timeout_s: float
    progress: float = 0.0
    cancel_at: float | None = None  # monotonic: give up waiting for the worker to stop
    cancel_reason: str | None = None


@dataclass
class _Stats:
    done_times: deque[float] = field(default_factory=deque)
    wait_s_total: float = 0.0
    run_s_total: float = 0.0
    n_timed: int = 0
    duplicates_ignored: int = 0
    retries: int = 0
    lease_expired: int = 0


class Broker:
    """Only the node's trio loop touches it. `run()` runs the dispatch and lease loops."""

    def __init__(self, me: str, store: TaskStore, settings: BrokerSettings, call: Call,
                 workers: Callable[[], list[WorkerView]], known_type: Callable[[str], bool]) -> None:
        self.me = me
        self.store = store
        self.settings = settings
        self._call = call
        self._workers = workers
        self._known_type = known_type
        self._ready: dict[str, SortedList] = {}
        self._qentry: dict[str, tuple[tuple[float, int, str], str, tuple[str, ...]]] = {}
        self._delayed: list[tuple[float, str]] = []  # (wall eta, task id)
        self._delayed_ids: set[str] = set()
        self.leases: dict[str, Lease] = {}
        self._inflight: dict[str, int] = {}
        self._busy_until: dict[str, float] = {}
        self._worker_free: dict[str, tuple[int, float]] = {}
        self.reputation: dict[str, float] = {}
        self._blocked: dict[str, set[str]] = {}
        self._dependents: dict[str, set[str]] = {}
        self._waiters: dict[str, trio.Event] = {}
        self.paused: dict[str, str] = {}  # task type ("*" = all) -> reason
        self.stats = _Stats()
        self.final_hooks: list[Callable[[TaskRecord], None]] = []
        self._seq = store.max_seq()
        self._counts_cache: tuple[float, dict[tuple[str, str], int]] | None = None
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._resume()

    # ---- restart -----------------------------------------------------------------------
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
                assert rec.worker is not None
                self.leases[rec.task_id] = Lease(rec.task_id, rec.worker, rec.attempts, rec.task_type, rec.tags,
                                                 mono, mono + self.settings.lease_s, rec.timeout_s)
                self._inflight[rec.worker] = self._inflight.get(rec.worker, 0) + 1
            else:
                self._block(rec)
        if any(n.values()):
            log.info("queue resumed from store", extra=kv(**n))

    # ---- ordering ----------------------------------------------------------------------
    def _enqueue(self, rec: TaskRecord) -> None:
        if rec.not_before is not None and rec.not_before > now():
            heapq.heappush(self._delayed, (rec.not_before, rec.task_id))
            self._delayed_ids.add(rec.task_id)
            return
        key = (-rec.priority, rec.seq, rec.task_id)
        self._ready.setdefault(rec.task_type, SortedList()).add(key)
        self._qentry[rec.task_id] = (key, rec.task_type, rec.tags)
        self._wake.set()

    def _dequeue(self, task_id: str) -> None:
        entry = self._qentry.pop(task_id, None)
        if entry is not None:
            self._ready[entry[1]].discard(entry[0])
        self._delayed_ids.discard(task_id)  # the heap entry is skipped when it surfaces

    def queue_position(self, task_id: str) -> int | None:
        entry = self._qentry.get(task_id)
        if entry is None:
            return None
        return int(sum(lst.bisect_left(entry[0]) for lst in self._ready.values()))

    def queued_count(self) -> int:
        return len(self._qentry) + len(self._delayed_ids) + len(self._blocked)

    def _block(self, rec: TaskRecord) -> None:
        deps = set(rec.depends_on)
        local_ids = [d for d in deps if owner_of(d) == self.me or self.store.exists(d)]
        local = self.store.get_many(local_ids)
        for d in local_ids:
            r = local.get(d)
            if r is None or (r.final and r.status != "completed"):
                # it ended (or was cleared) before this task was indexed: no event will come
                self._finish(rec, "failed", error=f"depends_on: {d} ended {r.status if r else 'removed'}")
                return
            if r.status == "completed":
                deps.discard(d)
        self._blocked[rec.task_id] = deps
        for d in deps:
            self._dependents.setdefault(d, set()).add(rec.task_id)
        if not deps:
            self._unblock(rec.task_id)

    def _is_local(self, task_id: str) -> bool:
        o = owner_of(task_id)
        return o == self.me or self.store.exists(task_id)  # (adopted tasks keep their first owner's id)

    # ---- submit ------------------------------------------------------------------------
    def submit(self, task_type: str, payload: Any, task_id: str | None, priority: float,
               depends_on: list[str], tags: list[str], timeout_s: float, retry_policy: Any,
               metadata: dict[str, Any], cache_ttl_s: float, dep_status: dict[str, str]) -> dict[str, Any]:
        """Accept a task (arguments already checked by `check_submit`); `dep_status` holds the
        current status of every dependency (looked up by the service, across the mesh)."""
        if task_id is not None:
            existing = self.store.get(task_id)
            if existing is not None:
                return self._submitted(existing, existed=True)
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
                return self._submitted(rec)
        failed_deps = [d for d in depends_on if dep_status.get(d) in FINAL - {"completed"}]
        if failed_deps:
            d = failed_deps[0]
            rec = rec.replace(status="failed", finished_at=t, error=f"depends_on: {d} ended {dep_status[d]}")
            self.store.insert(rec)
            self._finished(rec)
            return self._submitted(rec)
        if any(dep_status.get(d) != "completed" for d in depends_on):
            rec = rec.replace(status="blocked")
            self.store.insert(rec)
            self._block(rec)
            return self._submitted(self.store.get(rec.task_id) or rec)
        self.store.insert(rec)
        self._enqueue(rec)
        return self._submitted(rec)

    def _submitted(self, rec: TaskRecord, existed: bool = False) -> dict[str, Any]:
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

    # ---- reads -------------------------------------------------------------------------
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

    # ---- changes -----------------------------------------------------------------------
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

    async def _tell_cancel(self, worker: str, task_id: str, attempt: int, reason: str) -> None:
        try:
            await self._call(worker, "w.cancel", {"task_id": task_id, "attempt": attempt, "reason": reason})
        except MCPPError as e:
            log.debug("cancel not delivered", extra=kv(task=task_id, worker=worker, error=str(e)))

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

    # ---- dispatch ----------------------------------------------------------------------
    def _dispatchable(self, ttype: str) -> bool:
        return "*" not in self.paused and ttype not in self.paused

    def _running_by_tag(self, tag: str) -> int:
        return sum(1 for le in self.leases.values() if tag in le.tags)

    def _quota_ok(self, tags: tuple[str, ...], extra: dict[str, int]) -> bool:
        for q in self.settings.quotas:
            if q.max_running is not None and q.tag in tags:
                if self._running_by_tag(q.tag) + extra.get(q.tag, 0) >= q.max_running:
                    return False
        return True

    def _score(self, w: WorkerView, slots: int) -> float:
        """Free capacity first, then reputation (task outcomes), then latency."""
        free_ratio = slots / max(1, w.max_concurrent)
        rep = self.reputation.get(w.peer_id, 0.5)
        return free_ratio + 0.5 * rep - min(w.rtt_ms, 100.0) / 100.0

    def _select(self) -> dict[str, list[tuple[TaskRecord, WorkerView]]]:
        mono = time.monotonic()
        slots: dict[str, int] = {}
        views: dict[str, WorkerView] = {}
        for w in self._workers():
            if self._busy_until.get(w.peer_id, 0.0) > mono:
                continue
            n = w.max_concurrent - self._inflight.get(w.peer_id, 0)
            reported = self._worker_free.get(w.peer_id)
            if reported is not None and mono - reported[1] < 0.5:
                n = min(n, reported[0] + 0)  # the worker's own count covers other owners' tasks
            if n > 0:
                slots[w.peer_id] = n
                views[w.peer_id] = w
        if not slots:
            return {}
        picked: dict[str, list[tuple[TaskRecord, WorkerView]]] = {}
        tag_extra: dict[str, int] = {}
        skip_types: set[str] = set()
        positions: dict[str, int] = {}
        budget = sum(slots.values())
        while budget > 0:
            best: tuple[tuple[float, int, str], str] | None = None
            for ttype, lst in self._ready.items():
                if ttype in skip_types or not lst or not self._dispatchable(ttype):
                    continue
                i = positions.get(ttype, 0)
                if i >= len(lst) or i > 200:
                    continue
                key = lst[i]
                if best is None or key < best[0]:
                    best = (key, ttype)
            if best is None:
                break
            key, ttype = best
            tid = key[2]
            tags = self._qentry[tid][2]
            eligible = [views[p] for p in slots if ttype in views[p].task_types]
            if not eligible:
                skip_types.add(ttype)
                continue
            if not self._quota_ok(tags, tag_extra):
                positions[ttype] = positions.get(ttype, 0) + 1
                continue
            rec = self.store.get(tid)
            if rec is None:  # cleared meanwhile
                self._dequeue(tid)
                continue
            needs = rec.needs()
            fit = [w for w in eligible if all(v <= w.resources.get(k, math.inf) for k, v in needs.items())]
            if not fit:
                positions[ttype] = positions.get(ttype, 0) + 1
                continue
            w = max(fit, key=lambda v: self._score(v, slots[v.peer_id]))
            self._dequeue(tid)
            picked.setdefault(w.peer_id, []).append((rec, w))
            for tg in tags:
                tag_extra[tg] = tag_extra.get(tg, 0) + 1
            slots[w.peer_id] -= 1
            if slots[w.peer_id] == 0:
                del slots[w.peer_id]
            budget -= 1
        return picked

    def _dispatch_round(self) -> None:
        picked = self._select()
        mono = time.monotonic()
        t = now()
        for peer, items in picked.items():
            batch: list[TaskRecord] = []
            for rec, _ in items:
                new = rec.replace(status="running", attempts=rec.attempts + 1, worker=peer, started_at=t)
                self.leases[rec.task_id] = Lease(rec.task_id, peer, new.attempts, rec.task_type, rec.tags,
                                                 mono, mono + self.settings.lease_s, rec.timeout_s)
                batch.append(new)
            self._inflight[peer] = self._inflight.get(peer, 0) + len(batch)
            self.store.save(batch)
            # keep a dispatch message well under the RPC frame limit
            chunk: list[TaskRecord] = []
            size = 0
            for new in batch:
                sz = json_size("payload", new.payload)
                if chunk and size + sz > BATCH_BYTES:
                    self._spawn(self._send_run, peer, chunk)
                    chunk, size = [], 0
                chunk.append(new)
                size += sz
            if chunk:
                self._spawn(self._send_run, peer, chunk)

    async def _send_run(self, peer: str, batch: list[TaskRecord]) -> None:
        msg = {"owner": self.me, "tasks": [
            {"task_id": r.task_id, "attempt": r.attempts, "task_type": r.task_type, "payload": r.payload,
             "timeout_s": r.timeout_s, "needs": r.needs()} for r in batch]}
        try:
            answer = await self._call(peer, "w.run", msg)
        except MCPPError as e:
            log.info("dispatch failed", extra=kv(worker=peer, n=len(batch), error=str(e)))
            self._busy_until[peer] = time.monotonic() + UNREACHABLE_BACKOFF_S
            self._feed(peer, False)
            self._undo_dispatch(batch)
            return
        free = answer.get("free") if isinstance(answer, dict) else None
        rejected = answer.get("rejected") if isinstance(answer, dict) else None
        if not isinstance(free, int) or isinstance(free, bool) or not isinstance(rejected, dict):
            log.warning("malformed dispatch answer", extra=kv(worker=peer))
            self._busy_until[peer] = time.monotonic() + UNREACHABLE_BACKOFF_S
            self._undo_dispatch(batch)
            return
        self._worker_free[peer] = (free, time.monotonic())
        if rejected:
            self._busy_until[peer] = time.monotonic() + BUSY_BACKOFF_S
            self._undo_dispatch([r for r in batch if r.task_id in rejected])

    def _undo_dispatch(self, batch: list[TaskRecord]) -> None:
        """The worker did not take these: back to the queue, the attempt not counted."""
        back = []
        for r in batch:
            lease = self.leases.get(r.task_id)
            if lease is None or lease.attempt != r.attempts or lease.worker != r.worker:
                continue  # finished (or re-leased) meanwhile
            self._end_lease(lease)
            cur = self.store.get(r.task_id)
            if cur is None or cur.status != "running":
                continue
            back.append(cur.replace(status="queued", attempts=cur.attempts - 1, worker=None, started_at=None))
        self.store.save(back)
        for r in back:
            self._enqueue(r)

    def _end_lease(self, lease: Lease) -> None:
        self.leases.pop(lease.task_id, None)
        n = self._inflight.get(lease.worker, 0) - 1
        if n > 0:
            self._inflight[lease.worker] = n
        else:
            self._inflight.pop(lease.worker, None)

    def _feed(self, worker: str, ok: bool) -> None:
        rep = self.reputation.get(worker, 0.5)
        self.reputation[worker] = 0.9 * rep + 0.1 * (1.0 if ok else 0.0)

    # ---- worker reports ----------------------------------------------------------------
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

    # ---- owner loss (see replica.py) ---------------------------------------------------
    def adopt(self, recs: list[TaskRecord]) -> list[TaskRecord]:
        """Take over tasks of a lost owner: stored as this node's, same ids, queued again
        (or blocked on their dependencies). Final or already known ones are skipped."""
        t = now()
        taken: list[TaskRecord] = []
        for rec in recs:
            if rec.final or self.store.exists(rec.task_id):
                continue
            self._seq += 1
            status = "blocked" if rec.depends_on else "queued"
            taken.append(rec.replace(owner=self.me, seq=self._seq, status=status, worker=None, started_at=None,
                                     queued_at=t, not_before=None))
        self.store.save(taken)
        for rec in taken:
            if rec.status == "blocked":
                self._block(rec)
            else:
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

    # ---- dependencies ------------------------------------------------------------------
    def dependency_final(self, dep_id: str, status: str) -> None:
        for tid in list(self._dependents.get(dep_id, ())):
            deps = self._blocked.get(tid)
            if deps is None:
                continue
            if status == "completed":
                deps.discard(dep_id)
                self._dependents[dep_id].discard(tid)
                if not deps:
                    self._unblock(tid)
            else:
                rec = self.store.get(tid)
                self._drop_blocked(tid)
                if rec is not None and not rec.final:
                    self._finish(rec, "failed", error=f"depends_on: {dep_id} ended {status}")
        if not self._dependents.get(dep_id):
            self._dependents.pop(dep_id, None)

    def _unblock(self, task_id: str) -> None:
        self._drop_blocked(task_id)
        rec = self.store.get(task_id)
        if rec is not None and rec.status == "blocked":
            rec = rec.replace(status="queued", queued_at=now())
            self.store.save([rec])
            self._enqueue(rec)

    def _drop_blocked(self, task_id: str) -> None:
        deps = self._blocked.pop(task_id, None) or set()
        for d in deps:
            s = self._dependents.get(d)
            if s is not None:
                s.discard(task_id)
                if not s:
                    del self._dependents[d]

    def remote_dependencies(self) -> list[str]:
        return [d for d in self._dependents if not self._is_local(d)]

    # ---- statistics --------------------------------------------------------------------
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

    # ---- loops -------------------------------------------------------------------------
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
        for lease in list(self.leases.values()):
            rec = None
            if lease.cancel_at is not None and mono >= lease.cancel_at:
                rec = self.store.get(lease.task_id)
                self._end_lease(lease)
                if rec is not None:
                    why = f"{lease.cancel_reason} (worker did not stop within {CANCEL_GRACE_S:g} s)"
                    self._finish(rec, "cancelled", error=why,
                                 history=self._attempt_entry(rec, lease, "cancelled", why))
            elif mono >= lease.expires or mono - lease.started > lease.timeout_s + self.settings.lease_s:
                expired = mono >= lease.expires
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

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._dispatch_round()
            # a worker that refused or a quota that holds a task back: look again shortly
            if self._qentry:
                with trio.move_on_after(BUSY_BACKOFF_S):
                    await self._wake.wait()
                self._wake.set()

    def kick(self) -> None:
        """Something changed outside (a worker joined or changed): try to dispatch."""
        self._wake.set()

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is not None:
            with contextlib.suppress(RuntimeError):  # closed: the node is shutting down
                self._nursery.start_soon(fn, *args)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._tick_loop)
            nursery.start_soon(self._dispatch_loop)
            task_status.started()


_EMPTY = TaskRecord(task_id="", task_type="", owner="")


def check_submit(task_type: Any, payload: Any, task_id: Any, priority: Any, depends_on: Any, tags: Any,
                 timeout_s: Any, retry_policy: Any, metadata: Any, cache_ttl_s: Any,
                 max_payload_bytes: int) -> None:
    """Every argument check of task_submit; raises ArgumentError naming the argument."""
    if not isinstance(task_type, str) or not task_type:
        raise ArgumentError("task_type", "must be a non-empty string")
    size = json_size("payload", payload)
    if size > max_payload_bytes:
        raise PayloadTooLarge("payload", f"{size} bytes is over the limit of {max_payload_bytes} (max_payload_bytes)")
    if task_id is not None:
        check_task_id(task_id)
    check_number("priority", priority, -1e9, 1e9)
    deps = check_str_list("depends_on", depends_on, max_items=1000)
    for i, d in enumerate(deps):
        check_task_id(d, f"depends_on[{i}]")
    if task_id is not None and task_id in deps:
        raise ArgumentError("depends_on", "a task cannot depend on itself")
    check_str_list("tags", tags, max_items=50)
    check_number("timeout_s", timeout_s, 0.001, 86400 * 7)
    RetryPolicy.parse(retry_policy)
    if not isinstance(metadata, dict):
        raise ArgumentError("metadata", "must be an object")
    if json_size("metadata", metadata) > 64 * 1024:
        raise ArgumentError("metadata", "at most 64 KiB of JSON")
    check_number("cache_ttl_s", cache_ttl_s, 0, 86400 * 365)
