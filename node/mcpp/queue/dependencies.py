"""Dependencies: a task blocked on others waits in an index until each completes (then it is
queued) or one ends otherwise (then it fails, naming the dependency).

See broker_state.py for how `Broker` is layered.
"""

from __future__ import annotations

from mcpp.queue.attempts import Attempts
from mcpp.queue.model import TaskRecord, now, owner_of

__all__ = ["Dependencies"]


class Dependencies(Attempts):
    """The dependency index of blocked tasks."""

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
