"""Dispatch: which ready task goes to which worker, and sending batches of them (`w.run`); a worker that does not take them
gives them back to the queue.

Placement is Sparrow's power of two choices: of the workers that can take a task (type,
resources, quotas, a free slot by the owner's count and the worker's own), two are drawn at
random and the better one by `_score` (free capacity, reputation, latency) gets it. Picking
the best of all instead filled the owner's own worker and its neighbours again and again
while far members stood idle (a 200-task burst on a 50-node mesh: 11 tasks on one worker,
3.4 s after the last submit; the cost of a choice stays O(1) in the size of the mesh).

See broker_state.py for how `Broker` is layered.
"""

from __future__ import annotations

import logging
import math
import time

import trio

from mcpp.errors import MCPPError
from mcpp.log import kv
from mcpp.queue.broker_state import BrokerState, Lease, WorkerView
from mcpp.queue.model import TaskRecord, json_size, now

__all__ = ["Dispatcher", "BUSY_BACKOFF_S", "UNREACHABLE_BACKOFF_S"]

log = logging.getLogger("mcpp.broker")
BUSY_BACKOFF_S = 0.05
UNREACHABLE_BACKOFF_S = 1.0
BATCH_BYTES = 1 << 20


class Dispatcher(BrokerState):
    """Selection and dispatch."""

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
            choices = self.rng.sample(fit, 2) if len(fit) > 2 else fit
            w = max(choices, key=lambda v: self._score(v, slots[v.peer_id]))
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
        msg = {"owner": self.me, "epoch": self.epoch, "tasks": [
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
        fence = answer.get("fence")
        if isinstance(fence, dict) and isinstance(fence.get("epoch"), int) and isinstance(fence.get("adopter"), str):
            for hook in self.fenced_hooks:
                hook(fence["epoch"], fence["adopter"])
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
