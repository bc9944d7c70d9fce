"""The owner side's state (see broker.py): settings and records, the in-memory ordering of
ready and delayed tasks, leases and per-worker counters.

`Broker` is built in layers, one module each: state (this) -> dispatch (selection, sending)
-> attempts (worker reports, lease expiry, final states) -> dependencies -> broker (submit,
reads, changes, owner loss, statistics, loops). Only the node's trio loop touches it.
"""

from __future__ import annotations

import contextlib
import heapq
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from sortedcontainers import SortedList

from mcpp.queue.model import Quota, TaskRecord, now, owner_of
from mcpp.queue.store import TaskStore

__all__ = ["BrokerState", "BrokerSettings", "WorkerView", "Lease", "Stats", "Call"]

Call = Callable[[str, str, Any], Awaitable[Any]]


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
class Stats:
    done_times: deque[float] = field(default_factory=deque)
    wait_s_total: float = 0.0
    run_s_total: float = 0.0
    n_timed: int = 0
    duplicates_ignored: int = 0
    retries: int = 0
    lease_expired: int = 0


class BrokerState:
    """What every part of the broker shares."""

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
        self.rng = random.Random()  # placement's two random choices (dispatch.py)
        # Lifeguard's local health multiplier of this node (1 when its loop is prompt): a lease
        # expires lease_s x health after its last renewal, so that an owner too busy to read its
        # workers' renewals (200 MCP submits at once) does not take its own lag for theirs
        self.health: Callable[[], float] = lambda: 1.0
        self._blocked: dict[str, set[str]] = {}
        self._dependents: dict[str, set[str]] = {}
        self._waiters: dict[str, trio.Event] = {}
        self.paused: dict[str, str] = {}  # task type ("*" = all) -> reason
        self.stats = Stats()
        self.final_hooks: list[Callable[[TaskRecord], None]] = []
        self.removed_hooks: list[Callable[[list[str]], None]] = []  # task ids deleted (queue_clear)
        self.requeued_hooks: list[Callable[[TaskRecord], Any]] = []  # a final task queued again (task_retry)
        # this owner's epoch, sent with every dispatch; a worker refuses one below the owner's
        # fence and says so, and the fenced hooks learn which tasks were adopted (replica.py)
        self.epoch = 0
        self.fenced_hooks: list[Callable[[int, str], None]] = []
        self._seq = store.max_seq()
        self._counts_cache: tuple[float, dict[tuple[str, str], int]] | None = None
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

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

    def _is_local(self, task_id: str) -> bool:
        o = owner_of(task_id)
        return o == self.me or self.store.exists(task_id)  # (adopted tasks keep their first owner's id)

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

    def kick(self) -> None:
        """Something changed outside (a worker joined or changed): try to dispatch."""
        self._wake.set()

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is not None:
            with contextlib.suppress(RuntimeError):  # closed: the node is shutting down
                self._nursery.start_soon(fn, *args)

    def dependency_final(self, dep_id: str, status: str) -> None:
        """A task reached a final state: its dependents move on (see `Dependencies`)."""
        raise NotImplementedError
