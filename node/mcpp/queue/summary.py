"""Load summaries: what every member knows of each node's queue and worker, by gossip.

Each node publishes, in its member record (node/membership.py, field `load`), the counts of
the tasks it owns by status and type, its completion rate and mean times, and its worker's
running / free / completed / failed counts. The summary is re-read at most every
LOAD_GOSSIP_S and sent only when it changed: pushed to this node's neighbours, which do not
forward a change of load alone (flooded, 50 busy nodes' summaries saturated 2 cores); the
periodic push-pull syncs carry it further. `queue_stats(scope=mesh)` and `worker_status` read
these summaries instead of calling every node: a neighbour's figures are at most about
LOAD_GOSSIP_S old, a far member's a few sync rounds (SYNC_S each); `summaries_as_of` says how
old each one is. This node's own figures are exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["LOAD_GOSSIP_S", "STAT_KEYS", "LoadSummary", "stats_of", "worker_of"]

LOAD_GOSSIP_S = 5.0
STAT_KEYS = ("queued_count", "blocked_count", "running_count", "completed_count", "failed_count",
             "cancelled_count", "dead_lettered_count", "retries", "lease_expired", "duplicate_completions_ignored",
             "replicas_held", "replicas_final", "adopted", "adoptions_declined")
_EXTRA = ("completed_per_s", "mean_wait_s", "mean_run_s", "timed", "paused", "by_type")
_WORKER_KEYS = ("running", "free", "completed", "failed", "rejected")


class LoadSummary:
    """This node's summary, re-read from `stats` and `worker` at most every LOAD_GOSSIP_S."""

    def __init__(self, stats: Callable[[], dict[str, Any]], worker: Callable[[], dict[str, int]]) -> None:
        self._stats = stats
        self._worker = worker
        self._read_at = -LOAD_GOSSIP_S
        self._summary: dict[str, Any] | None = None

    def __call__(self) -> dict[str, Any] | None:
        mono = time.monotonic()
        if self._summary is not None and mono - self._read_at < LOAD_GOSSIP_S:
            return self._summary
        self._read_at = mono
        st = self._stats()
        # zeros, empty maps and nulls are left out (readers default them): every member record
        # carries this, and an idle node's full summary was most of its record's bytes
        body = {"q": {k: int(st.get(k) or 0) for k in STAT_KEYS if st.get(k)},
                **{k: st.get(k) for k in _EXTRA if st.get(k)},
                "w": {k: int(v) for k, v in self._worker().items() if k in _WORKER_KEYS and v}}
        if self._summary is None or {k: v for k, v in self._summary.items() if k != "at"} != body:
            self._summary = {**body, "at": round(time.time(), 3)}  # wall time of the last change
        return self._summary


def _counts(d: Any, keys: tuple[str, ...]) -> dict[str, int] | None:
    if not isinstance(d, dict):
        return None
    out = {k: d.get(k, 0) for k in keys}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out.values()):
        return None
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def stats_of(load: Any) -> dict[str, Any] | None:
    """A member's gossiped summary as one node's `q.stats` answer (None: absent or malformed)."""
    if not isinstance(load, dict):
        return None
    q = _counts(load.get("q"), STAT_KEYS)
    by_type = load.get("by_type", {})
    if q is None or not isinstance(by_type, dict) or not all(
            isinstance(t, str) and _counts(c, tuple(c) if isinstance(c, dict) else ()) is not None
            for t, c in by_type.items()):
        return None
    timed = load.get("timed", 0)
    paused = load.get("paused", {})
    return {**q, "by_type": by_type, "completed_per_s": _num(load.get("completed_per_s")) or 0.0,
            "mean_wait_s": _num(load.get("mean_wait_s")), "mean_run_s": _num(load.get("mean_run_s")),
            "timed": timed if isinstance(timed, int) and not isinstance(timed, bool) and timed >= 0 else 0,
            "paused": paused if isinstance(paused, dict) else {}, "as_of": _num(load.get("at"))}


def worker_of(peer_id: str, worker: Any, load: Any) -> dict[str, Any] | None:
    """A member's worker as `worker_status` shows it, from its gossiped settings and summary
    (RSS and CPU are not gossiped: they change all the time; ask that worker by id for them)."""
    if not isinstance(worker, dict) or not isinstance(worker.get("max_concurrent"), int):
        return None
    w = _counts(load.get("w") if isinstance(load, dict) else None, _WORKER_KEYS) or dict.fromkeys(_WORKER_KEYS, 0)
    types = worker.get("task_types")
    done = w["completed"] + w["failed"]
    return {**{k: worker.get(k) for k in ("worker_id", "task_types", "max_concurrent", "resources", "active")}, **w,
            "peer_id": peer_id, "capabilities": list(types) if isinstance(types, list) else [],
            "load": round(w["running"] / max(1, int(worker["max_concurrent"])), 4),
            "rss_mb": None, "cpu_percent": None,
            "success_rate": None if done == 0 else round(w["completed"] / done, 4),
            "as_of": _num(load.get("at")) if isinstance(load, dict) else None}
