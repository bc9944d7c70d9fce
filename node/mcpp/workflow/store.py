"""Workflow records in the node's queue database (same SQLite file, WAL, same connection)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from mcpp.workflow.model import Step

__all__ = ["WorkflowRecord", "StepState", "WorkflowStore", "wf_pack", "wf_unpack"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workflows (
  workflow_id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL,
  name TEXT NOT NULL,
  status TEXT NOT NULL,
  failure_policy TEXT NOT NULL,
  priority REAL NOT NULL,
  tags TEXT NOT NULL,
  metadata TEXT NOT NULL,
  steps TEXT NOT NULL,
  state TEXT NOT NULL,
  created_at REAL NOT NULL,
  finished_at REAL,
  cancel_reason TEXT
);
CREATE INDEX IF NOT EXISTS workflows_status ON workflows(status);
"""
_COLS = ["workflow_id", "seq", "name", "status", "failure_policy", "priority", "tags", "metadata", "steps", "state",
         "created_at", "finished_at", "cancel_reason"]


@dataclass
class StepState:
    status: str = "pending"  # pending | submitted | completed | failed | cancelled | skipped
    task_id: str | None = None
    error: str | None = None


@dataclass
class WorkflowRecord:
    """One workflow as its coordinator keeps it; only the engine (one trio loop) changes it."""

    workflow_id: str
    name: str
    seq: int
    steps: list[Step]
    failure_policy: str = "fail_fast"
    priority: float = 1.0
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    state: dict[str, StepState] = field(default_factory=dict)
    created_at: float = 0.0
    finished_at: float | None = None
    cancel_reason: str | None = None

    @property
    def final(self) -> bool:
        return self.status != "running"

    def step(self, sid: str) -> Step:
        return next(s for s in self.steps if s.id == sid)


def _row(wf: WorkflowRecord) -> tuple[Any, ...]:
    return (wf.workflow_id, wf.seq, wf.name, wf.status, wf.failure_policy, wf.priority, json.dumps(wf.tags),
            json.dumps(wf.metadata), json.dumps([s.as_dict() for s in wf.steps]),
            json.dumps({k: [v.status, v.task_id, v.error] for k, v in wf.state.items()}),
            wf.created_at, wf.finished_at, wf.cancel_reason)


def _from(row: Any) -> WorkflowRecord:
    d = dict(zip(_COLS, row))
    return WorkflowRecord(
        workflow_id=d["workflow_id"], name=d["name"], seq=d["seq"],
        steps=[Step.from_dict(x) for x in json.loads(d["steps"])], failure_policy=d["failure_policy"],
        priority=d["priority"], tags=json.loads(d["tags"]), metadata=json.loads(d["metadata"]), status=d["status"],
        state={k: StepState(*v) for k, v in json.loads(d["state"]).items()}, created_at=d["created_at"],
        finished_at=d["finished_at"], cancel_reason=d["cancel_reason"],
    )


def wf_pack(wf: WorkflowRecord) -> dict[str, Any]:
    """A workflow record as sent to its coordinator's replicas (the stored columns)."""
    return dict(zip(_COLS, _row(wf)))


def wf_unpack(d: Any) -> WorkflowRecord:
    """A replicated workflow record, checked (a peer's data is not trusted)."""
    if not isinstance(d, dict) or set(d) != set(_COLS) or not isinstance(d["workflow_id"], str):
        raise ValueError("a workflow record must have exactly the stored columns")
    try:
        return _from(tuple(d[c] for c in _COLS))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"not a workflow record: {e}") from None


class WorkflowStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._db.executescript(_SCHEMA)
        self._upsert = f"INSERT OR REPLACE INTO workflows ({','.join(_COLS)}) VALUES ({','.join('?' * len(_COLS))})"

    def save(self, wf: WorkflowRecord) -> None:
        self._db.execute(self._upsert, _row(wf))

    def delete(self, workflow_ids: list[str]) -> None:
        self._db.executemany("DELETE FROM workflows WHERE workflow_id = ?", [(w,) for w in workflow_ids])

    def all(self) -> list[WorkflowRecord]:
        return [_from(r) for r in self._db.execute(f"SELECT {','.join(_COLS)} FROM workflows ORDER BY seq")]

    def get(self, workflow_id: str) -> WorkflowRecord | None:
        row = self._db.execute(f"SELECT {','.join(_COLS)} FROM workflows WHERE workflow_id = ?",
                               (workflow_id,)).fetchone()
        return _from(row) if row else None

    def exists(self, workflow_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM workflows WHERE workflow_id = ?", (workflow_id,)).fetchone() is not None

    def running(self) -> list[WorkflowRecord]:
        rows = self._db.execute(f"SELECT {','.join(_COLS)} FROM workflows WHERE status = 'running' ORDER BY seq")
        return [_from(r) for r in rows.fetchall()]

    def select(self, status: str | None, tag: str | None, limit: int, offset: int) -> tuple[list[WorkflowRecord], int]:
        clauses, args = [], []
        if status is not None:
            clauses.append("status = ?")
            args.append(status)
        if tag is not None:
            clauses.append("EXISTS (SELECT 1 FROM json_each(workflows.tags) WHERE value = ?)")
            args.append(tag)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        total = int(self._db.execute(f"SELECT COUNT(*) FROM workflows{where}", args).fetchone()[0])
        rows = self._db.execute(f"SELECT {','.join(_COLS)} FROM workflows{where} ORDER BY created_at DESC, seq DESC "
                                "LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
        return [_from(r) for r in rows], total

    def max_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM workflows").fetchone()[0])
