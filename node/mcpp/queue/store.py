"""The durable task store of one node: SQLite in WAL mode under the node's data dir.

The store is the source of truth for every task this node owns; the broker keeps only the
ordering (priority queues, leases) in memory, so 10,000 queued tasks cost little RAM.
Calls are synchronous and short (WAL, synchronous=NORMAL: a commit is a page write, the
fsync happens at checkpoints), made from the node's trio loop.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcpp.queue.model import RetryPolicy, TaskRecord

__all__ = ["TaskStore", "TaskFilter"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
  task_id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL,
  task_type TEXT NOT NULL,
  owner TEXT NOT NULL,
  payload TEXT NOT NULL,
  priority REAL NOT NULL,
  status TEXT NOT NULL,
  depends_on TEXT NOT NULL,
  tags TEXT NOT NULL,
  timeout_s REAL NOT NULL,
  retry_policy TEXT NOT NULL,
  metadata TEXT NOT NULL,
  cache_key TEXT,
  created_at REAL NOT NULL,
  queued_at REAL,
  started_at REAL,
  finished_at REAL,
  not_before REAL,
  attempts INTEGER NOT NULL,
  worker TEXT,
  result TEXT,
  error TEXT,
  logs TEXT NOT NULL,
  history TEXT NOT NULL,
  cached_from TEXT
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks(created_at);
CREATE INDEX IF NOT EXISTS tasks_cache ON tasks(cache_key, finished_at) WHERE status = 'completed';
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = [
    "task_id", "seq", "task_type", "owner", "payload", "priority", "status", "depends_on", "tags",
    "timeout_s", "retry_policy", "metadata", "cache_key", "created_at", "queued_at", "started_at",
    "finished_at", "not_before", "attempts", "worker", "result", "error", "logs", "history", "cached_from",
]
_JSON = {"payload", "depends_on", "tags", "metadata", "result", "logs", "history"}


def _dump(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))


def _to_row(rec: TaskRecord) -> tuple[Any, ...]:
    out: list[Any] = []
    for c in _COLUMNS:
        v = getattr(rec, c)
        if c == "retry_policy":
            v = _dump(v.as_dict())
        elif c in _JSON:
            v = _dump(list(v) if isinstance(v, tuple) else v)
        out.append(v)
    return tuple(out)


def _from_row(row: sqlite3.Row) -> TaskRecord:
    d = dict(zip(_COLUMNS, row))
    for c in _JSON:
        d[c] = json.loads(d[c]) if d[c] is not None else None
    d["depends_on"] = tuple(d["depends_on"])
    d["tags"] = tuple(d["tags"])
    d["logs"] = tuple(d["logs"])
    d["history"] = tuple(d["history"])
    d["retry_policy"] = RetryPolicy(**json.loads(d["retry_policy"]))
    return TaskRecord(**d)


@dataclass(frozen=True)
class TaskFilter:
    status: str | None = None
    task_type: str | None = None
    tag: str | None = None
    worker: str | None = None
    min_priority: float | None = None
    max_priority: float | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for col in ("status", "task_type", "worker"):
            v = getattr(self, col)
            if v is not None:
                clauses.append(f"{col} = ?")
                args.append(v)
        if self.tag is not None:
            clauses.append("EXISTS (SELECT 1 FROM json_each(tasks.tags) WHERE value = ?)")
            args.append(self.tag)
        if self.min_priority is not None:
            clauses.append("priority >= ?")
            args.append(self.min_priority)
        if self.max_priority is not None:
            clauses.append("priority <= ?")
            args.append(self.max_priority)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class TaskStore:
    """One SQLite file; `close()` closes it (the broker owns the store)."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # checkpoints (the only fsyncs) run off the event loop: see checkpoint()
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        self._insert = f"INSERT INTO tasks ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"

    def close(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (fsync included) through a second connection.
        Blocking: call it in a worker thread; the event loop's writes go on meanwhile."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The one connection (the workflow store shares the file and the connection)."""
        return self._db

    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    # ---- writes ------------------------------------------------------------------------
    def insert(self, rec: TaskRecord) -> None:
        self._db.execute(self._insert, _to_row(rec))

    def save(self, recs: Iterable[TaskRecord]) -> None:
        """Write whole records (insert or replace) in one transaction."""
        rows = [_to_row(r) for r in recs]
        if not rows:
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany(self._insert.replace("INSERT", "INSERT OR REPLACE", 1), rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def delete(self, task_ids: list[str]) -> None:
        self._db.execute("BEGIN")
        try:
            self._db.executemany("DELETE FROM tasks WHERE task_id = ?", [(t,) for t in task_ids])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # ---- reads -------------------------------------------------------------------------
    def get(self, task_id: str) -> TaskRecord | None:
        row = self._db.execute(f"SELECT {','.join(_COLUMNS)} FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return _from_row(row) if row else None

    def get_many(self, task_ids: list[str]) -> dict[str, TaskRecord]:
        out: dict[str, TaskRecord] = {}
        for i in range(0, len(task_ids), 500):
            chunk = task_ids[i : i + 500]
            q = f"SELECT {','.join(_COLUMNS)} FROM tasks WHERE task_id IN ({','.join('?' * len(chunk))})"
            for row in self._db.execute(q, chunk):
                rec = _from_row(row)
                out[rec.task_id] = rec
        return out

    def exists(self, task_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone() is not None

    def active(self) -> Iterator[TaskRecord]:
        """Every blocked, queued or running task, oldest first (for resuming after a restart)."""
        q = f"SELECT {','.join(_COLUMNS)} FROM tasks WHERE status IN ('blocked','queued','running') ORDER BY seq"
        for row in self._db.execute(q).fetchall():
            yield _from_row(row)

    def is_empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM tasks LIMIT 1").fetchone() is None

    def select(self, flt: TaskFilter, limit: int, offset: int) -> tuple[list[TaskRecord], int]:
        where, args = flt.where()
        total = int(self._db.execute(f"SELECT COUNT(*) FROM tasks{where}", args).fetchone()[0])
        q = f"SELECT {','.join(_COLUMNS)} FROM tasks{where} ORDER BY created_at DESC, seq DESC LIMIT ? OFFSET ?"
        rows = self._db.execute(q, [*args, limit, offset]).fetchall()
        return [_from_row(r) for r in rows], total

    def ids(self, flt: TaskFilter) -> list[str]:
        where, args = flt.where()
        return [r[0] for r in self._db.execute(f"SELECT task_id FROM tasks{where}", args)]

    def cached(self, key: str, since: float) -> TaskRecord | None:
        q = (f"SELECT {','.join(_COLUMNS)} FROM tasks WHERE cache_key = ? AND status = 'completed' "
             "AND finished_at >= ? AND cached_from IS NULL ORDER BY finished_at DESC LIMIT 1")
        row = self._db.execute(q, (key, since)).fetchone()
        return _from_row(row) if row else None

    def counts(self) -> dict[tuple[str, str], int]:
        """(status, task_type) -> number of tasks."""
        rows = self._db.execute("SELECT status, task_type, COUNT(*) FROM tasks GROUP BY status, task_type")
        return {(s, t): int(n) for s, t, n in rows}

    def max_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0])

    # ---- small settings (the worker's registration survives a restart) ------------------
    def get_meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, _dump(value)))
