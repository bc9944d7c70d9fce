"""Task records, retry policies, task ids and argument checks: the queue's data types.

A task id names its owner: `<16 hex>@<owner peer id>` for generated ids, so any node can
route a call on a task to the node that owns it with no lookup. A caller may choose its own
id (the idempotency key); such ids are found by asking the mesh (`q.where`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from mcpp.errors import ArgumentError, ConfigError, PayloadTooLarge

__all__ = [
    "STATUSES",
    "FINAL",
    "RetryPolicy",
    "TaskRecord",
    "new_task_id",
    "owner_of",
    "check_task_id",
    "check_number",
    "check_limit",
    "check_str_list",
    "json_size",
    "cache_key",
    "now",
    "Quota",
    "parse_quotas",
    "check_submit",
]

STATUSES = ("blocked", "queued", "running", "completed", "failed", "cancelled", "dead_lettered")
FINAL = frozenset({"completed", "failed", "cancelled", "dead_lettered"})
RETRYABLE = frozenset({"failed", "cancelled", "dead_lettered"})
MAX_TASK_ID = 200
PEER_ID_PREFIXES = ("12D3Koo", "Qm")


def now() -> float:
    import time

    return time.time()


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_s: float = 0.5
    backoff_factor: float = 2.0

    def delay_s(self, attempts_done: int) -> float:
        """The wait before attempt `attempts_done + 1`."""
        return float(self.backoff_s * self.backoff_factor ** max(0, attempts_done - 1))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, value: Any, argument: str = "retry_policy") -> RetryPolicy:
        if value is None:
            return cls()
        if isinstance(value, RetryPolicy):
            return value
        if not isinstance(value, dict):
            raise ArgumentError(argument, "must be an object {max_attempts, backoff_s, backoff_factor}")
        unknown = set(value) - {"max_attempts", "backoff_s", "backoff_factor"}
        if unknown:
            raise ArgumentError(f"{argument}.{sorted(unknown)[0]}", "unknown field (known: max_attempts, backoff_s, backoff_factor)")
        d = cls()
        m = value.get("max_attempts", d.max_attempts)
        check_number(f"{argument}.max_attempts", m, 1, 100, integer=True)
        b = value.get("backoff_s", d.backoff_s)
        check_number(f"{argument}.backoff_s", b, 0, 3600)
        f = value.get("backoff_factor", d.backoff_factor)
        check_number(f"{argument}.backoff_factor", f, 1, 10)
        return cls(int(m), float(b), float(f))


@dataclass(frozen=True)
class TaskRecord:
    """One task as its owner stores it. Changed only through `replace` (and the store)."""

    task_id: str
    task_type: str
    owner: str
    seq: int = 0
    payload: Any = field(default_factory=dict)
    priority: float = 1.0
    status: str = "queued"
    depends_on: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    timeout_s: float = 300.0
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    metadata: dict[str, Any] = field(default_factory=dict)
    cache_key: str | None = None
    created_at: float = 0.0
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    not_before: float | None = None
    attempts: int = 0
    worker: str | None = None
    result: Any = None
    error: str | None = None
    logs: tuple[str, ...] = ()
    history: tuple[dict[str, Any], ...] = ()
    cached_from: str | None = None

    def replace(self, **changes: Any) -> TaskRecord:
        return dataclasses.replace(self, **changes)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def needs(self) -> dict[str, float]:
        """Resources the task asks for (metadata.resources), e.g. {"cpu": 1, "memory_mb": 256}."""
        r = self.metadata.get("resources") if isinstance(self.metadata, dict) else None
        if not isinstance(r, dict):
            return {}
        return {str(k): float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def summary(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "status": self.status,
            "owner": self.owner,
            "priority": self.priority,
            "tags": list(self.tags),
            "attempts": self.attempts,
            "worker": self.worker,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }

    def duration_ms(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at) * 1000, 3)


def new_task_id(owner: str) -> str:
    return f"{secrets.token_hex(8)}@{owner}"


def owner_of(task_id: str) -> str | None:
    """The owner peer id encoded in a task id, or None for a caller-chosen id."""
    _, sep, tail = task_id.rpartition("@")
    if sep and tail.startswith(PEER_ID_PREFIXES) and 40 <= len(tail) <= 60 and tail.isalnum():
        return tail
    return None


def check_task_id(value: Any, argument: str = "task_id") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ArgumentError(argument, "must be a non-empty string")
    if len(value) > MAX_TASK_ID:
        raise ArgumentError(argument, f"at most {MAX_TASK_ID} characters, got {len(value)}")
    if any(ord(c) < 32 for c in value):
        raise ArgumentError(argument, "must not contain control characters")
    return value


def check_number(
    argument: str, value: Any, lo: float, hi: float, *, integer: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise ArgumentError(argument, f"must be {kind} between {lo:g} and {hi:g}, got {value!r}")
    if integer and value != int(value):
        raise ArgumentError(argument, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ArgumentError(argument, f"must be between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def check_limit(limit: Any, offset: Any) -> tuple[int, int]:
    check_number("limit", limit, 1, 1000, integer=True)
    check_number("offset", offset, 0, 10**9, integer=True)
    return int(limit), int(offset)


def check_str_list(argument: str, value: Any, max_items: int = 100, max_len: int = 200) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ArgumentError(argument, "must be a list of strings")
    if len(value) > max_items:
        raise ArgumentError(argument, f"at most {max_items} items, got {len(value)}")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v or len(v) > max_len:
            raise ArgumentError(f"{argument}[{i}]", f"must be a non-empty string of at most {max_len} characters")
    return tuple(value)


def json_size(argument: str, value: Any) -> int:
    try:
        return len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError) as e:
        raise ArgumentError(argument, f"must be JSON (no NaN/Infinity): {e}") from None


def cache_key(task_type: str, payload: Any) -> str:
    body = json.dumps([task_type, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Quota:
    tag: str
    max_queued: int | None = None
    max_running: int | None = None


def parse_quotas(specs: tuple[str, ...]) -> tuple[Quota, ...]:
    """`TAG=MAX_QUEUED/MAX_RUNNING` (either may be empty or '-'): e.g. `batch=100/4`, `gpu=-/1`."""
    out = []
    for spec in specs:
        tag, sep, rest = spec.partition("=")
        q, _, r = rest.partition("/")
        try:
            if not sep or not tag:
                raise ValueError
            mq = int(q) if q not in ("", "-") else None
            mr = int(r) if r not in ("", "-") else None
            if (mq is not None and mq < 0) or (mr is not None and mr < 0):
                raise ValueError
        except ValueError:
            raise ConfigError("quotas", spec, "expected TAG=MAX_QUEUED/MAX_RUNNING, e.g. batch=100/4") from None
        out.append(Quota(tag, mq, mr))
    return tuple(out)


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
