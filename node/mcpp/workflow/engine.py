"""The workflow engine of one node: it coordinates the workflows this node accepted.

Every step is a task of the mesh queue, owned by the coordinator (so its record sits in the
same SQLite file) and dispatched to any worker that serves its type; steps whose dependencies
completed are submitted at once, so independent branches run in parallel on different nodes.
A step's task id is `<workflow id>.<step index>@<coordinator>`: submitting it twice returns the
same task, which makes resuming after a crash safe. The engine reacts to the queue's
final-state hook, and on restart reconciles every running workflow with the task records.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from mcpp.queue.service import QueueService

from mcpp.errors import ArgumentError, MCPPError, OwnerError, QueueError, WorkflowError
from mcpp.log import kv
from mcpp.queue.model import TaskRecord, check_limit, check_number, check_str_list, json_size, owner_of
from mcpp.workflow.model import (
    FAILURE_POLICIES,
    GRAPH_FORMATS,
    RefError,
    Step,
    critical_path,
    levels,
    parse_steps,
    render_graph,
    render_template,
    resolve_refs,
)
from mcpp.queue.replica import WorkflowHooks
from mcpp.workflow.store import StepState, WorkflowRecord, WorkflowStore, wf_pack, wf_unpack

__all__ = ["WorkflowEngine", "WF_STATUSES", "TEMPLATES"]

log = logging.getLogger("mcpp.workflow")
WF_STATUSES = ("running", "completed", "failed", "cancelled")
TEMPLATES = ("diamond", "map-reduce")
TERMINAL = frozenset({"completed", "failed", "cancelled", "skipped"})
_MAX_WF_ID = 100


def shipped_template(name: str) -> str:
    return resources.files("mcpp.workflow").joinpath("templates", f"{name}.yaml").read_text()


class WorkflowNotFound(WorkflowError, ArgumentError):
    def __init__(self, workflow_id: str) -> None:
        ArgumentError.__init__(self, "workflow_id", f"no workflow {workflow_id!r} in the mesh")


class WorkflowEngine:
    def __init__(self, queue: QueueService) -> None:
        self.q = queue
        self.broker = queue.broker
        self.me = queue.me
        self.store = WorkflowStore(queue.store.connection)
        self._seq = self.store.max_seq()
        self.active: dict[str, WorkflowRecord] = {wf.workflow_id: wf for wf in self.store.running()}
        self._by_task: dict[str, str] = {}
        for wf in self.active.values():
            for st in wf.state.values():
                if st.task_id:
                    self._by_task[st.task_id] = wf.workflow_id
        self._dirty: set[str] = set(self.active)
        self._wake = trio.Event()
        self._waiters: dict[str, trio.Event] = {}
        self.broker.final_hooks.append(self._on_task_final)
        queue.replicator.workflows = WorkflowHooks(
            records=lambda: [wf_pack(w) for w in self.store.all()], adopt=self._adopt, forget=self._forget,
            exists=self.store.exists)
        for method, handler in {
            "wf.submit": self._rpc_submit, "wf.status": self._rpc_status, "wf.cancel": self._rpc_cancel,
            "wf.result": self._rpc_result, "wf.list": self._rpc_list, "wf.where": self._rpc_where,
            "wf.deps": self._rpc_deps,
        }.items():
            queue.serve(method, handler)
        if self.active:
            log.info("workflows resumed", extra=kv(n=len(self.active)))

    # ---- engine ------------------------------------------------------------------------
    def _on_task_final(self, rec: TaskRecord) -> None:
        wf_id = self._by_task.get(rec.task_id)
        if wf_id is not None:
            self._dirty.add(wf_id)
            self._wake.set()

    def _step_task_id(self, wf: WorkflowRecord, index: int) -> str:
        # unique per workflow id (caller-chosen ids may share any prefix), stable across restarts
        # and across an adoption: named after the workflow's first coordinator
        digest = hashlib.sha256(wf.workflow_id.encode()).hexdigest()[:20]
        return f"wf{digest}.{index}@{self._origin(wf)}"

    def _origin(self, wf: WorkflowRecord) -> str:
        """The node that accepted the workflow: named in its id, or in its submitted steps' ids
        (the roots are submitted on acceptance), else this one."""
        return owner_of(wf.workflow_id) or next(
            (o for st in wf.state.values() if st.task_id and (o := owner_of(st.task_id))), self.me)

    def _advance(self, wf: WorkflowRecord) -> None:
        """Move one workflow forward: take finished steps, apply the failure policy, submit the
        steps that became ready, and finish the workflow when every step is terminal."""
        changed = False
        records: dict[str, TaskRecord] = {}
        submitted = [st.task_id for st in wf.state.values() if st.status == "submitted" and st.task_id]
        if submitted:
            records = self.q.store.get_many(submitted)
        for sid, st in wf.state.items():
            if st.status != "submitted":
                continue
            rec = records.get(st.task_id or "")
            if rec is None:  # its task was removed (queue_clear)
                st.status, st.error = "cancelled", "the step's task was removed from the queue"
                changed = True
            elif rec.final:
                st.status = {"completed": "completed", "cancelled": "cancelled"}.get(rec.status, "failed")
                st.error = rec.error
                changed = True
        broken = [sid for sid, st in wf.state.items() if st.status in ("failed", "cancelled")]
        if broken and wf.cancel_reason is None:
            if wf.failure_policy == "fail_fast":
                changed |= self._stop_all(wf, f"fail_fast: step {broken[0]!r} ended {wf.state[broken[0]].status}")
            else:
                changed |= self._skip_dependents(wf, set(broken))
        if wf.cancel_reason is None:
            changed |= self._submit_ready(wf)
        if all(st.status in TERMINAL for st in wf.state.values()):
            if wf.cancel_reason is not None and not wf.cancel_reason.startswith("fail_fast"):
                wf.status = "cancelled"
            else:
                wf.status = "completed" if all(st.status == "completed" for st in wf.state.values()) else "failed"
            wf.finished_at = time.time()
            changed = True
            self.active.pop(wf.workflow_id, None)
            for st in wf.state.values():
                self._by_task.pop(st.task_id or "", None)
            ev = self._waiters.pop(wf.workflow_id, None)
            if ev is not None:
                ev.set()
            log.info("workflow finished", extra=kv(workflow=wf.workflow_id, status=wf.status))
        if changed:
            self._save(wf)

    def _submit_ready(self, wf: WorkflowRecord) -> bool:
        changed = False
        results: dict[str, Any] = {}
        for i, step in enumerate(wf.steps):
            st = wf.state[step.id]
            if st.status != "pending" or any(wf.state[d].status != "completed" for d in step.depends_on):
                continue
            if any(f"steps.{d}." in str(step.payload) for d in step.depends_on):
                for d in step.depends_on:
                    if d not in results:
                        rec = self.q.store.get(wf.state[d].task_id or "")
                        results[d] = rec.result if rec else None
            try:
                payload = resolve_refs(step.payload, results)
                size = json_size("payload", payload)
                if size > self.q.config.max_payload_bytes:
                    raise RefError(f"payload: {size} bytes after $ref resolution is over max_payload_bytes")
            except (RefError, ArgumentError) as e:
                st.status, st.error = "failed", str(e)
                changed = True
                self._dirty.add(wf.workflow_id)
                self._wake.set()
                continue
            task_id = self._step_task_id(wf, i)
            try:
                rec, existed = self.broker.accept(
                    step.task_type, payload, task_id, step.priority if step.priority is not None else wf.priority,
                    [], list(dict.fromkeys([*wf.tags, *step.tags])), step.timeout_s or 300.0, step.retry_policy,
                    {"workflow_id": wf.workflow_id, "step_id": step.id}, 0, {},
                )
                if not existed:
                    self.q.replicator.copy_soon(rec)
            except MCPPError as e:  # e.g. this node's queue is full: the step fails, the policy applies
                st.status, st.error = "failed", f"submit refused: {e}"
                changed = True
                self._dirty.add(wf.workflow_id)
                self._wake.set()
                continue
            st.status, st.task_id = "submitted", task_id
            self._by_task[task_id] = wf.workflow_id
            changed = True
            if rec.final:
                self._dirty.add(wf.workflow_id)  # already final (e.g. resumed after a crash): no hook will fire
                self._wake.set()
        return changed

    def _stop_all(self, wf: WorkflowRecord, reason: str, force: bool = False) -> bool:
        wf.cancel_reason = reason
        for st in wf.state.values():
            if st.status == "pending":
                st.status, st.error = "cancelled", reason
            elif st.status == "submitted" and st.task_id:
                try:
                    self.broker.cancel(st.task_id, reason, force)
                except MCPPError as e:
                    log.warning("step cancel failed", extra=kv(task=st.task_id, error=str(e)))
        self._dirty.add(wf.workflow_id)
        self._wake.set()
        return True

    def _skip_dependents(self, wf: WorkflowRecord, broken: set[str]) -> bool:
        changed = False
        grew = True
        while grew:
            grew = False
            for step in wf.steps:
                st = wf.state[step.id]
                if st.status == "pending" and any(d in broken or wf.state[d].status == "skipped" for d in step.depends_on):
                    st.status, st.error = "skipped", "a dependency did not complete"
                    grew = changed = True
        return changed

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            dirty, self._dirty = self._dirty, set()
            for wf_id in dirty:
                wf = self.active.get(wf_id)
                if wf is not None:
                    try:
                        self._advance(wf)
                    except Exception:
                        log.critical("workflow step failed", exc_info=True, extra=kv(workflow=wf_id))

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._loop)
            self._wake.set()
            task_status.started()

    # ---- local operations (the coordinator's side) ---------------------------------------
    def _get(self, workflow_id: str) -> WorkflowRecord:
        wf = self.active.get(workflow_id) or self.store.get(workflow_id)
        if wf is None:
            raise WorkflowNotFound(workflow_id)
        return wf

    def _accept(self, a: dict[str, Any]) -> dict[str, Any]:
        if a["workflow_id"] is not None:
            existing = self.store.get(a["workflow_id"])
            if existing is not None:
                return self._submitted(existing, existed=True)
        steps = parse_steps(a["steps"], self.q.type_known)
        self._seq += 1
        wf_id = a["workflow_id"] or f"{secrets.token_hex(8)}@{self.me}"
        wf = WorkflowRecord(
            workflow_id=wf_id, name=a["name"], seq=self._seq, steps=steps, failure_policy=a["failure_policy"],
            priority=float(a["priority"]), tags=list(a["tags"]), metadata=dict(a["metadata"]),
            state={s.id: StepState() for s in steps}, created_at=time.time(),
        )
        self.active[wf_id] = wf
        self._save(wf)
        self._advance(wf)
        return self._submitted(wf)

    async def _accept_durable(self, a: dict[str, Any]) -> dict[str, Any]:
        """`_accept`; with replication sync, answered once the coordinator's replicas hold the
        workflow record (or REPLICATE_WAIT_S passed), and says how many do (`replicas`)."""
        out = self._accept(a)
        rep = self.q.replicator
        if rep.sync and not out["existing"]:
            # still in the batch that _accept queued (no checkpoint since): the same delivery
            done = rep.copy_workflow(wf_pack(self._get(out["workflow_id"])))
            out["replicas"] = await rep.wait_held(done)
        return out

    def _save(self, wf: WorkflowRecord) -> None:
        """Store the record here and copy it to this coordinator's replicas (replica.py)."""
        self.store.save(wf)
        self.q.replicator.copy_workflow(wf_pack(wf))

    def _adopt(self, records: list[dict[str, Any]]) -> int:
        """Workflows of a lost coordinator (their tasks were adopted just before): stored as
        mine; the running ones are coordinated from here on. A step whose task copy never
        arrived is submitted again under the same task id."""
        n = 0
        for d in records:
            try:
                wf = wf_unpack(d)
            except ValueError as e:
                log.warning("unreadable workflow copy skipped", extra=kv(error=str(e)))
                continue
            if self.store.exists(wf.workflow_id):
                continue
            self._seq += 1
            wf.seq = self._seq
            if not wf.final:
                known = self.q.store.get_many([st.task_id for st in wf.state.values() if st.task_id])
                for st in wf.state.values():
                    if st.status == "submitted" and st.task_id not in known:
                        st.status, st.task_id = "pending", None
                    elif st.task_id:
                        self._by_task[st.task_id] = wf.workflow_id
                self.active[wf.workflow_id] = wf
                self._dirty.add(wf.workflow_id)
            self._save(wf)
            n += 1
        self._wake.set()
        return n

    def _forget(self, workflow_ids: list[str]) -> int:
        """Workflows another node adopted while this one was away: dropped here."""
        gone = [w for w in workflow_ids if self.store.exists(w)]
        for w in gone:
            wf = self.active.pop(w, None)
            for st in wf.state.values() if wf else ():
                self._by_task.pop(st.task_id or "", None)
        self.store.delete(gone)
        return len(gone)

    def _submitted(self, wf: WorkflowRecord, existed: bool = False) -> dict[str, Any]:
        return {"workflow_id": wf.workflow_id, "name": wf.name, "status": wf.status, "steps": len(wf.steps),
                "levels": levels(wf.steps), "coordinator": self.me, "existing": existed}

    def _step_rows(self, wf: WorkflowRecord, metrics: bool) -> list[dict[str, Any]]:
        ids = [st.task_id for st in wf.state.values() if st.task_id]
        recs = self.q.store.get_many(ids) if ids else {}
        rows = []
        for step in wf.steps:
            st = wf.state[step.id]
            rec = recs.get(st.task_id or "")
            status = st.status
            if status == "submitted":
                status = "running" if rec is not None and rec.status == "running" else "queued"
            row: dict[str, Any] = {"id": step.id, "task_type": step.task_type, "status": status,
                                   "task_id": st.task_id, "worker": rec.worker if rec else None,
                                   "started_at": rec.started_at if rec else None,
                                   "finished_at": rec.finished_at if rec else None,
                                   "attempts": rec.attempts if rec else 0, "error": st.error}
            if metrics:
                row["wait_s"] = (None if rec is None or rec.started_at is None
                                 else round(rec.started_at - (rec.queued_at or rec.created_at), 6))
                row["run_s"] = (None if rec is None or rec.started_at is None or rec.finished_at is None
                                else round(rec.finished_at - rec.started_at, 6))
            rows.append(row)
        return rows

    def _status(self, workflow_id: str, include_steps: bool, include_metrics: bool) -> dict[str, Any]:
        wf = self._get(workflow_id)
        rows = self._step_rows(wf, include_metrics)
        n = len(rows)
        count = {k: sum(1 for r in rows if r["status"] == k) for k in
                 ("completed", "running", "queued", "pending", "failed", "cancelled", "skipped")}
        out: dict[str, Any] = {
            "workflow_id": wf.workflow_id, "name": wf.name, "status": wf.status, "coordinator": self.me,
            "failure_policy": wf.failure_policy,
            "progress": {"completed": count["completed"], "running": count["running"] + count["queued"],
                         "pending": count["pending"], "failed": count["failed"] + count["cancelled"],
                         "skipped": count["skipped"], "total": n,
                         "percent": round(100.0 * count["completed"] / n, 1) if n else 100.0},
            "current_steps": [r["id"] for r in rows if r["status"] in ("running", "queued")],
            "created_at": wf.created_at, "finished_at": wf.finished_at, "cancel_reason": wf.cancel_reason,
            "tags": wf.tags,
        }
        if include_steps:
            out["steps"] = rows
        if include_metrics:
            end = wf.finished_at or time.time()
            out["metrics"] = {"duration_s": round(end - wf.created_at, 6)}
        return out

    def _cancel(self, workflow_id: str, reason: str | None, force: bool) -> dict[str, Any]:
        wf = self._get(workflow_id)
        if wf.final:
            return {"workflow_id": workflow_id, "status": wf.status, "cancelled_steps": [], "cancelled": False}
        before = {sid for sid, st in wf.state.items() if st.status in ("pending", "submitted")}
        self._stop_all(wf, reason or "cancelled by request", force)
        self._advance(wf)
        return {"workflow_id": workflow_id, "status": wf.status, "cancelled_steps": sorted(before),
                "cancelled": True, "reason": wf.cancel_reason}

    def _result(self, workflow_id: str, include_steps: bool, include_logs: bool) -> dict[str, Any]:
        wf = self._get(workflow_id)
        ids = [st.task_id for st in wf.state.values() if st.task_id]
        recs = self.q.store.get_many(ids) if ids else {}
        results, errors, logs = {}, {}, {}
        for step in wf.steps:
            st = wf.state[step.id]
            rec = recs.get(st.task_id or "")
            if st.status == "completed" and rec is not None:
                results[step.id] = rec.result
            elif st.error:
                errors[step.id] = st.error
            if include_logs and rec is not None:
                logs[step.id] = list(rec.logs)
        end = wf.finished_at or time.time()
        out: dict[str, Any] = {"workflow_id": wf.workflow_id, "status": wf.status, "results": results,
                               "errors": errors, "duration_ms": round((end - wf.created_at) * 1000, 3)}
        if include_steps:
            out["steps"] = self._step_rows(wf, True)
        if include_logs:
            out["logs"] = logs
        return out

    def _deps(self, steps: list[Step], wf: WorkflowRecord | None, fmt: str) -> dict[str, Any]:
        durations: dict[str, float] = {}
        if wf is not None:
            ids = [st.task_id for st in wf.state.values() if st.task_id]
            recs = self.q.store.get_many(ids) if ids else {}
            for sid, st in wf.state.items():
                rec = recs.get(st.task_id or "")
                if rec is not None and rec.started_at is not None and rec.finished_at is not None:
                    durations[sid] = (rec.finished_at - rec.started_at) * 1000
        measured = wf is not None and len(durations) == len(steps)
        path, length = critical_path(steps, (lambda s: durations[s]) if measured else (lambda s: 1.0))
        return {"workflow_id": wf.workflow_id if wf else None, "format": fmt, "graph": render_graph(steps, fmt),
                "levels": levels(steps), "critical_path": path,
                "critical_path_length": round(length, 3), "weighted_by": "duration_ms" if measured else "steps",
                "step_durations_ms": {k: round(v, 3) for k, v in durations.items()}}

    # ---- rpc handlers ------------------------------------------------------------------
    async def _rpc_submit(self, peer: str, p: Any) -> Any:
        # a forwarded submit is checked again (parse_steps runs in _accept)
        if not isinstance(p.get("name"), str) or p.get("failure_policy") not in FAILURE_POLICIES:
            raise ArgumentError("name", "a workflow needs a name and failure_policy fail_fast or continue")
        check_number("priority", p.get("priority"), -1e9, 1e9)
        check_str_list("tags", p.get("tags") or [], max_items=20)
        if not isinstance(p.get("metadata") or {}, dict):
            raise ArgumentError("metadata", "must be an object")
        return await self._accept_durable(p)

    async def _rpc_status(self, peer: str, p: Any) -> Any:
        return self._status(p["workflow_id"], bool(p.get("include_steps", True)), bool(p.get("include_metrics")))

    async def _rpc_cancel(self, peer: str, p: Any) -> Any:
        reason = p.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
            raise ArgumentError("reason", "must be a string of at most 1000 characters")
        return self._cancel(p["workflow_id"], reason, bool(p.get("force")))

    async def _rpc_result(self, peer: str, p: Any) -> Any:
        wf_id = p["workflow_id"]
        wf = self._get(wf_id)
        timed_out = False
        if p.get("wait") and not wf.final:
            with trio.move_on_after(float(p.get("timeout_s", 60))) as cs:
                while not self._get(wf_id).final:
                    await self._waiters.setdefault(wf_id, trio.Event()).wait()
            timed_out = cs.cancelled_caught
        out = self._result(wf_id, bool(p.get("include_steps", True)), bool(p.get("include_logs")))
        out["timed_out"] = timed_out
        return out

    async def _rpc_list(self, peer: str, p: Any) -> Any:
        rows, total = self.store.select(p.get("status"), p.get("tag"), int(p["limit"]), 0)
        return {"total": total, "workflows": [
            {"workflow_id": w.workflow_id, "name": w.name, "status": w.status, "coordinator": self.me,
             "steps": len(w.steps), "tags": w.tags, "created_at": w.created_at, "finished_at": w.finished_at,
             "completed_steps": sum(1 for s in w.state.values() if s.status == "completed")} for w in rows]}

    async def _rpc_where(self, peer: str, p: Any) -> Any:
        return [w for w in p["ids"][:100] if isinstance(w, str) and self.store.exists(w)]

    async def _rpc_deps(self, peer: str, p: Any) -> Any:
        wf = self._get(p["workflow_id"])
        return self._deps(wf.steps, wf, p["format"])

    # ---- operations (the workflow tools, on any node) -----------------------------------
    async def _locate(self, workflow_id: Any) -> tuple[str, str]:
        if not isinstance(workflow_id, str) or not workflow_id or len(workflow_id) > _MAX_WF_ID:
            raise ArgumentError("workflow_id", f"must be a non-empty string of at most {_MAX_WF_ID} characters")
        """The node that coordinates the workflow: this one, the one named in its id when it is
        reachable, else whoever answers `wf.where` (a replica that adopted it, see replica.py)."""
        if self.store.exists(workflow_id):
            return workflow_id, self.me
        owner = owner_of(workflow_id)
        if owner is not None and owner != self.me and self.q.reachable(owner):
            return workflow_id, owner
        answers, _ = await self.q.gather("wf.where", {"ids": [workflow_id]}, self.q.mesh_peers())
        for pid, ids in answers.items():
            if workflow_id in (ids or []):
                return workflow_id, pid
        if owner is not None:
            return workflow_id, owner  # not reachable and nobody adopted it (yet): the call says so
        raise WorkflowNotFound(workflow_id)

    async def _forward(self, owner: str, method: str, params: Any, timeout_s: float | None = None) -> dict[str, Any]:
        try:
            return dict(await self.q.owner_call(owner, method, params, timeout_s))
        except QueueError as e:
            if isinstance(e, OwnerError) and e.code == WorkflowNotFound.__name__:  # keep its kind
                raise WorkflowNotFound(str(params.get("workflow_id"))) from None
            raise WorkflowError(str(e).replace("task_id:", "workflow_id:").replace("task's", "workflow's")) from None

    async def submit(self, name: Any, steps: Any, workflow_id: Any, template: Any, params: Any,
                     failure_policy: Any, priority: Any, tags: Any, metadata: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ArgumentError("name", "must be a non-empty string of at most 200 characters")
        if (steps is None) == (template is None):
            raise ArgumentError("steps", "give exactly one of steps or template")
        if failure_policy not in FAILURE_POLICIES:
            raise ArgumentError("failure_policy", f"must be fail_fast or continue, got {failure_policy!r}")
        check_number("priority", priority, -1e9, 1e9)
        tags = list(check_str_list("tags", tags or [], max_items=20))
        if not isinstance(metadata or {}, dict):
            raise ArgumentError("metadata", "must be an object")
        if workflow_id is not None and (not isinstance(workflow_id, str) or not workflow_id.strip()
                                        or len(workflow_id) > _MAX_WF_ID or any(ord(c) < 32 for c in workflow_id)):
            raise ArgumentError("workflow_id", f"must be a non-empty string of at most {_MAX_WF_ID} characters")
        if template is not None:
            if not isinstance(template, str) or not template.strip():
                raise ArgumentError("template", f"must be YAML text or a shipped template ({', '.join(TEMPLATES)})")
            text = shipped_template(template) if template in TEMPLATES else template
            doc = render_template(text, params or {})
            steps = doc["steps"]
            if "failure_policy" in doc and failure_policy == "fail_fast":
                failure_policy = doc["failure_policy"]
                if failure_policy not in FAILURE_POLICIES:
                    raise ArgumentError("template", f"failure_policy must be fail_fast or continue, got {failure_policy!r}")
        elif params:
            raise ArgumentError("params", "only used with template")
        parse_steps(steps, self.q.type_known)  # validate here: nothing is sent or stored if this fails
        a = {"name": name, "steps": steps, "workflow_id": workflow_id, "failure_policy": failure_policy,
             "priority": priority, "tags": tags, "metadata": metadata or {}}
        if workflow_id is not None:
            try:
                _, owner = await self._locate(workflow_id)
                return await self._forward(owner, "wf.submit", a)
            except WorkflowNotFound:
                pass
        return await self._accept_durable(a)

    async def status(self, workflow_id: Any, include_steps: bool, include_metrics: bool) -> dict[str, Any]:
        wid, owner = await self._locate(workflow_id)
        return await self._forward(owner, "wf.status", {"workflow_id": wid, "include_steps": include_steps,
                                                         "include_metrics": include_metrics})

    async def cancel(self, workflow_id: Any, reason: Any, force: bool) -> dict[str, Any]:
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
            raise ArgumentError("reason", "must be a string of at most 1000 characters")
        wid, owner = await self._locate(workflow_id)
        return await self._forward(owner, "wf.cancel", {"workflow_id": wid, "reason": reason, "force": force})

    async def result(self, workflow_id: Any, wait: bool, timeout_s: Any, include_steps: bool,
                     include_logs: bool) -> dict[str, Any]:
        check_number("timeout_s", timeout_s, 0, 3600)
        wid, owner = await self._locate(workflow_id)
        params = {"workflow_id": wid, "wait": wait, "include_steps": include_steps, "include_logs": include_logs}
        deadline = trio.current_time() + float(timeout_s)
        while True:  # waits at a remote coordinator in slices (see QueueService.result)
            slice_s = max(0.0, min(2.0 if owner != self.me else float(timeout_s), deadline - trio.current_time()))
            try:
                out = await self._forward(owner, "wf.result", {**params, "timeout_s": slice_s}, slice_s + 10)
            except WorkflowError as e:
                # a coordinator gone while we wait: look again (a replica adopts its workflows)
                if not wait or isinstance(e, WorkflowNotFound) or trio.current_time() + 1.0 >= deadline:
                    raise
                await trio.sleep(1.0)
                wid, owner = await self._locate(wid)
                continue
            if not wait or not out["timed_out"] or trio.current_time() >= deadline:
                return out

    async def list_workflows(self, status: Any, peer: Any, tag: Any, limit: Any, offset: Any) -> dict[str, Any]:
        limit, offset = check_limit(limit, offset)
        if status is not None and status not in WF_STATUSES:
            raise ArgumentError("status", f"must be one of {', '.join(WF_STATUSES)}, got {status!r}")
        if tag is not None and (not isinstance(tag, str) or not tag):
            raise ArgumentError("tag", "must be a non-empty string")
        if peer is not None:
            if not isinstance(peer, str) or (peer != self.me and peer not in self.q.mesh_peers()):
                raise ArgumentError("peer", f"{peer!r} is not this node or a connected peer")
            targets: list[str] | None = [] if peer == self.me else [peer]
        else:
            targets = None
        answers, failed = await self.q.gather("wf.list", {"status": status, "tag": tag, "limit": limit + offset},
                                               targets)
        if peer is not None and peer != self.me:
            answers.pop(self.me, None)
        rows = [w for a in answers.values() for w in a["workflows"]]
        rows.sort(key=lambda w: (-(w["created_at"] or 0.0), w["workflow_id"]))
        total = sum(int(a["total"]) for a in answers.values())
        page = rows[offset : offset + limit]
        return {"workflows": page, "count": len(page), "total": total, "has_more": offset + len(page) < total,
                "unreachable": failed}

    async def dependencies(self, workflow_id: Any, steps: Any, fmt: Any) -> dict[str, Any]:
        if fmt not in GRAPH_FORMATS:
            raise ArgumentError("format", f"must be one of {', '.join(GRAPH_FORMATS)}, got {fmt!r}")
        if (workflow_id is None) == (steps is None):
            raise ArgumentError("workflow_id", "give exactly one of workflow_id or steps")
        if steps is not None:
            return self._deps(parse_steps(steps, self.q.type_known), None, fmt)
        wid, owner = await self._locate(workflow_id)
        return await self._forward(owner, "wf.deps", {"workflow_id": wid, "format": fmt})
