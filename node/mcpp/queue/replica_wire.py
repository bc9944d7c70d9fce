"""The wire form of the copies an owner sends its replicas (replica.py): task records packed
and checked (a peer's data is not trusted), batched under the RPC frame limit, and the
Kademlia metric that orders the replica candidates of an owner."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypeGuard

from mcpp.errors import ArgumentError
from mcpp.queue.model import RetryPolicy, TaskRecord

__all__ = ["MAX_EPOCH", "PUT_BYTES", "PUT_MAX", "batches", "distance", "is_epoch", "pack", "unpack", "FIELDS"]

PUT_MAX = 1000  # records read from one r.put
PUT_BYTES = 1 << 20  # a batch of final records stays well under the RPC frame limit

FIELDS = {f.name for f in dataclasses.fields(TaskRecord)}


def pack(rec: TaskRecord) -> dict[str, Any]:
    d = {f: getattr(rec, f) for f in FIELDS}
    d["retry_policy"] = rec.retry_policy.as_dict()
    return d


def unpack(d: Any) -> TaskRecord:
    """A record sent by a peer: checked field by field (a peer's data is not trusted)."""
    if not isinstance(d, dict) or set(d) != FIELDS:
        raise ArgumentError("records", "each record must have exactly the task record's fields")
    if not isinstance(d["task_id"], str) or not isinstance(d["task_type"], str) or not isinstance(d["owner"], str):
        raise ArgumentError("records", "task_id, task_type and owner must be strings")
    try:
        rp = RetryPolicy.parse(d["retry_policy"])
        vals = {**d, "retry_policy": rp}
        for k in ("depends_on", "tags", "logs", "history"):
            vals[k] = tuple(d[k] or ())
        return TaskRecord(**vals)
    except (TypeError, ValueError) as e:
        raise ArgumentError("records", f"not a task record: {e}") from None


MAX_EPOCH = 2**53


def is_epoch(x: Any) -> TypeGuard[int]:
    """A peer's epoch: bounded, so that SQLite stores it (a peer's data is not trusted)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_EPOCH


def distance(a: str, b: str) -> int:
    ha = int.from_bytes(hashlib.sha256(a.encode()).digest(), "big")
    hb = int.from_bytes(hashlib.sha256(b.encode()).digest(), "big")
    return ha ^ hb


def batches(recs: list[dict[str, Any]], most: int = PUT_MAX) -> list[list[dict[str, Any]]]:
    """At most `most` records and about PUT_BYTES of payloads and results a batch."""
    out: list[list[dict[str, Any]]] = [[]]
    size = 0
    for d in recs:
        sz = len(json.dumps([d.get("payload"), d.get("result")], separators=(",", ":")))
        if out[-1] and (len(out[-1]) >= most or size + sz > PUT_BYTES):
            out.append([])
            size = 0
        out[-1].append(d)
        size += sz
    return out if out[0] else []
