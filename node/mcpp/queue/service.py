"""The mesh-wide task queue of one node: the operations behind the 14 queue tools.

It joins the owner side (`Broker`), the worker side (`Worker`) and the node's RPC endpoint.
Calls about one task go to its owner: the id names it (`<hex>@<peer id>`), or, for an id the
caller chose, the owner is found by asking every connected peer (`q.where`, cached).
Mesh-wide reads (task_list, queue_stats, worker_status with scope="mesh") ask every connected
peer in parallel and merge; a peer that does not answer in time is listed as unreachable.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import trio

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from mcpp.node import Node

from mcpp.config import NodeConfig
from mcpp.errors import ArgumentError, MCPPError, OwnerError, PeerError, QueueError, RemoteError, RPCError, TaskNotFound
from mcpp.log import kv
from mcpp.queue.broker import Broker, BrokerSettings, WorkerView
from mcpp.queue.handlers import HandlerRegistry
from mcpp.queue.model import (
    FINAL,
    STATUSES,
    check_limit,
    check_number,
    check_str_list,
    check_submit,
    check_task_id,
    owner_of,
    parse_quotas,
)
from mcpp.queue.store import TaskFilter, TaskStore
from mcpp.queue.summary import STAT_KEYS, LoadSummary, stats_of, worker_of
from mcpp.queue.worker import Worker, WorkerSettings

__all__ = ["QueueService", "SCOPES", "STORE_FILE"]

log = logging.getLogger("mcpp.queue")
SCOPES = ("mesh", "local")
STORE_FILE = "queue.sqlite3"
MESH_CALL_S = 5.0
MESH_FANOUT = 16  # mesh-wide reads call this many nodes at once
CPU_SAMPLE_S = 0.5  # worker_status's cpu_percent covers at least this long
LOCATE_CACHE = 10_000
DEP_LOST_S = 30.0  # after owner_timeout_s: a dependency no node holds is lost
CHECKPOINT_S = 1.0
WAIT_SLICE_S = 2.0
FAR_RTT_MS = 5.0  # a member that is not a neighbour: no RTT measured, assumed farther than one
RpcHandler = Callable[[str, Any], Awaitable[Any]]


class QueueService:
    def __init__(self, node: Node, config: NodeConfig) -> None:
        self.node = node
        self.me = node.peer_id
        self.config = config
        self.store = TaskStore(Path(config.data_dir) / STORE_FILE)
        self.registry = HandlerRegistry(config.handlers)
        self.worker = Worker(self.me, self.registry, self._initial_worker_settings(), self.call,
                             config.lease_s, config.max_payload_bytes)
        self.broker = Broker(
            self.me, self.store,
            BrokerSettings(config.lease_s, config.max_payload_bytes, config.max_queued_tasks, parse_quotas(config.quotas)),
            self.call, self.worker_views, self.type_known,
        )
        self.worker.on_change = self._worker_changed
        self.broker.health = node.health
        self._located: OrderedDict[str, str] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._pending: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = []
        self._process = psutil.Process()
        self._cpu_read_at = -CPU_SAMPLE_S
        self._cpu_last = 0.0
        self._local: dict[str, RpcHandler] = {
            "q.submit": self._rpc_submit,
            "q.status": self._rpc_status,
            "q.result": self._rpc_result,
            "q.cancel": self._rpc_cancel,
            "q.priority": self._rpc_priority,
            "q.retry": self._rpc_retry,
            "q.where": self._rpc_where,
            "q.statuses": self._rpc_statuses,
            "q.list": self._rpc_list,
            "q.stats": self._rpc_stats,
            "q.done": self._rpc_done,
            "q.beat": self._rpc_beat,
            "w.run": self.worker.on_run,
            "w.cancel": self.worker.on_cancel,
            "w.info": self._rpc_worker_info,
            "w.unregister": self._rpc_unregister,
            "w.update": self._rpc_worker_update,
        }
        for method, handler in self._local.items():
            node.rpc.register(method, handler)
        node.info_extra["worker"] = self.worker.info
        node.member_extra["worker"] = lambda: self.worker.settings.as_dict()  # gossiped to every member
        node.member_extra["load"] = LoadSummary(self.local_stats, self._worker_counts)  # and this (summary.py)
        node.capability_sources.append(lambda: self.worker.settings.task_types if self.worker.settings.active else ())
        node.peer_joined_hooks.append(lambda pid: self.broker.kick())
        from mcpp.queue.replica import Replicator

        self.replicator = Replicator(self, config.replicas, config.owner_timeout_s, config.replication == "sync")

    def close(self) -> None:
        self.store.close()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` in the queue's own nursery (held until `run` starts; dropped once the
        service is shutting down)."""
        if self._nursery is None:
            self._pending.append((fn, args))
            return
        with contextlib.suppress(RuntimeError):  # closed: the node is shutting down
            self._nursery.start_soon(fn, *args)

    def serve(self, method: str, handler: RpcHandler) -> None:
        """Serve an RPC method (also when this node calls itself through `call`)."""
        self._local[method] = handler
        self.node.rpc.register(method, handler)

    # ---- plumbing ----------------------------------------------------------------------
    def _initial_worker_settings(self) -> WorkerSettings:
        saved = self.store.get_meta("worker")
        if isinstance(saved, dict):
            types = tuple(t for t in saved.get("task_types", []) if self.registry.get(t) is not None)
            return WorkerSettings(str(saved.get("worker_id") or self.me), types,
                                  int(saved.get("max_concurrent", self.config.max_concurrent)),
                                  dict(saved.get("resources") or {}), bool(saved.get("active", True)))
        caps = self.config.capabilities
        types = tuple(c for c in caps if self.registry.get(c) is not None) if caps else tuple(self.registry.names())
        return WorkerSettings(self.me, types, self.config.max_concurrent)

    async def call(self, peer: str, method: str, params: Any, timeout_s: float | None = None) -> Any:
        """An RPC to `peer`, or a direct call when the peer is this node (same handlers)."""
        if peer == self.me:
            return await self._local[method](self.me, params)
        return await self.node.rpc.call(peer, method, params, timeout_s=timeout_s)

    async def owner_call(self, owner: str, method: str, params: Any, timeout_s: float | None = None) -> Any:
        """A call forwarded to a task's owner; the owner's errors keep their message."""
        try:
            return await self.call(owner, method, params, timeout_s)
        except RemoteError as e:
            raise OwnerError(owner, e.code, e.remote_message) from None
        except (PeerError, RPCError) as e:
            raise QueueError(f"task_id: the task's owner {owner} is not reachable ({e})") from None

    def peers(self) -> list[str]:
        """The neighbours (open links, hello done)."""
        return [r.peer_id for r in self.node.table.connected() if r.hello_done]

    def mesh_peers(self) -> list[str]:
        """Every other node: the neighbours and every live member known by gossip (mesh-wide
        reads reach them through connections opened on demand, MESH_FANOUT at a time)."""
        return list(dict.fromkeys([*self.peers(), *self.node.members()]))

    def worker_views(self) -> list[WorkerView]:
        views = []
        s = self.worker.settings
        if s.active and s.task_types:
            views.append(WorkerView(self.me, s.worker_id, frozenset(s.task_types), s.max_concurrent, dict(s.resources), 0.0))
        # neighbours tell their worker in hello (with its current load); every other live member's
        # worker is known by gossip, and a task for it opens a connection on demand
        seen = {self.me}
        for rec in self.node.table.connected():
            if rec.hello_done:
                seen.add(rec.peer_id)
                self._add_view(views, rec.peer_id, rec.worker, rec.rtt_p50() or 1.0)
        for m in self.node.view.live():
            if m.state == "alive" and m.peer_id not in seen:
                self._add_view(views, m.peer_id, m.worker, FAR_RTT_MS)
        return views

    @staticmethod
    def _add_view(views: list[WorkerView], peer_id: str, w: Any, rtt_ms: float) -> None:
        if not isinstance(w, dict) or not w.get("active"):
            return
        try:
            views.append(WorkerView(peer_id, str(w.get("worker_id") or peer_id),
                                    frozenset(str(t) for t in w.get("task_types", [])),
                                    int(w.get("max_concurrent", 1)),
                                    {str(k): float(v) for k, v in (w.get("resources") or {}).items()}, rtt_ms))
        except (TypeError, ValueError, AttributeError, OverflowError):
            return  # a peer that advertises nonsense gets no tasks

    def type_known(self, task_type: str) -> bool:
        if self.registry.get(task_type) is not None:
            return True
        return any(task_type in w.task_types for w in self.worker_views())

    def _worker_changed(self) -> None:
        self.store.set_meta("worker", self.worker.settings.as_dict())
        info = self.worker.info()
        for pid in self.peers():
            self.spawn(self._push_worker_info, pid, info)
        self.node.reprovide_soon()
        self.broker.kick()

    async def _push_worker_info(self, peer: str, info: dict[str, Any]) -> None:
        try:
            await self.node.rpc.call(peer, "w.update", info, timeout_s=5)
        except MCPPError as e:
            log.debug("worker update not delivered", extra=kv(peer=peer, error=str(e)))

    async def gather(self, method: str, params: Any, peers: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        """Call `method` on this node and every other node (or `peers`), MESH_FANOUT at a time:
        ({peer: answer}, unreachable)."""
        answers: dict[str, Any] = {}
        failed: list[str] = []
        targets = [self.me, *(self.mesh_peers() if peers is None else peers)]
        limit = trio.CapacityLimiter(MESH_FANOUT)

        async def one(pid: str) -> None:
            try:
                async with limit:
                    answers[pid] = await self.call(pid, method, params, MESH_CALL_S)
            except MCPPError as e:
                failed.append(pid)
                log.debug("mesh call failed", extra=kv(peer=pid, method=method, error=str(e)))

        with trio.move_on_after(MESH_CALL_S + 1):
            async with trio.open_nursery() as n:
                for pid in dict.fromkeys(targets):
                    n.start_soon(one, pid)
        return answers, failed

    # ---- locating owners ---------------------------------------------------------------
    async def locate(self, task_id: str, argument: str = "task_id") -> str:
        """The node that holds the task: this one, the owner named in the id when it is
        connected, else whoever answers `q.where` (a replica that adopted it, see replica.py)."""
        if self.store.exists(task_id):
            return self.me
        owner = owner_of(task_id)
        if owner is not None and owner != self.me and self.reachable(owner):
            return owner
        found = await self.find(task_id)
        if found is not None:
            return found
        if owner is not None:
            return owner  # not connected and nobody adopted it (yet): the call says unreachable
        raise TaskNotFound(task_id, argument)

    def reachable(self, peer: str) -> bool:
        """A neighbour, or a live member (reached on demand)."""
        rec = self.node.table.get(peer)
        return (rec is not None and rec.connected) or peer in self.node.members()

    async def find(self, task_id: str) -> str | None:
        """The owner of a caller-chosen id, or None if no connected node holds it."""
        if self.store.exists(task_id):
            return self.me
        cached = self._located.get(task_id)
        if cached is not None:
            return cached
        answers, _ = await self.gather("q.where", {"ids": [task_id]}, self.mesh_peers())
        for pid, ids in answers.items():
            if pid != self.me and task_id in (ids or []):
                self._located[task_id] = pid
                while len(self._located) > LOCATE_CACHE:
                    self._located.popitem(last=False)
                return pid
        return None

    # ---- rpc handlers (owner side) -----------------------------------------------------
    async def _rpc_where(self, peer: str, p: Any) -> Any:
        return [t for t in p["ids"][:1000] if isinstance(t, str) and self.store.exists(t)]

    async def _rpc_statuses(self, peer: str, p: Any) -> Any:
        recs = self.store.get_many([t for t in p["ids"][:1000] if isinstance(t, str)])
        return {tid: r.status for tid, r in recs.items()}

    async def _rpc_submit(self, peer: str, p: Any) -> Any:
        # a forwarded submit is checked again: the peer's own checks are not to be trusted
        check_submit(p["task_type"], p["payload"], p["task_id"], p["priority"], p["depends_on"], p["tags"],
                     p["timeout_s"], p["retry_policy"], p["metadata"], p["cache_ttl_s"], self.config.max_payload_bytes)
        if not self.type_known(p["task_type"]):
            raise ArgumentError("task_type", f"unknown task type {p['task_type']!r}")
        return await self._accept({k: p[k] for k in ("task_type", "payload", "task_id", "priority", "depends_on",
                                                     "tags", "timeout_s", "retry_policy", "metadata", "cache_ttl_s")})

    async def _rpc_status(self, peer: str, p: Any) -> Any:
        return self.broker.status(p["task_id"], bool(p.get("include_metrics")))

    async def _rpc_result(self, peer: str, p: Any) -> Any:
        tid = p["task_id"]
        timed_out = False
        if p.get("wait"):
            with trio.move_on_after(float(p.get("timeout_s", 30))) as cs:
                await self.broker.wait_final(tid)
            timed_out = cs.cancelled_caught
        out = self.broker.result(tid, bool(p.get("include_logs")), bool(p.get("include_history")))
        out["timed_out"] = timed_out
        return out

    async def _rpc_cancel(self, peer: str, p: Any) -> Any:
        reason = p.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
            raise ArgumentError("reason", "must be a string of at most 1000 characters")
        return self.broker.cancel(check_task_id(p["task_id"]), reason, bool(p.get("force")))

    async def _rpc_priority(self, peer: str, p: Any) -> Any:
        return self.broker.set_priority(p["task_id"], p.get("priority"), p.get("boost"))

    async def _rpc_retry(self, peer: str, p: Any) -> Any:
        return self.broker.retry(p["task_id"], p.get("priority"), p.get("timeout_s"), p.get("retry_policy"))

    async def _rpc_list(self, peer: str, p: Any) -> Any:
        flt = TaskFilter(**p["filter"])
        recs, total = self.broker.list_tasks(flt, int(p["limit"]), int(p.get("offset", 0)))
        return {"tasks": [r.summary() for r in recs], "total": total}

    async def _rpc_stats(self, peer: str, p: Any) -> Any:
        return self.local_stats()

    def local_stats(self) -> dict[str, Any]:
        out = self.broker.local_stats()
        out["timed"] = self.broker.stats.n_timed
        out["replicas_held"] = sum(self.replicator.held().values())
        out["replicas_final"] = self.replicator.held_final()
        out["adopted"] = self.replicator.adopted_count
        out["adoptions_declined"] = self.replicator.adoptions_declined
        return out

    async def _rpc_done(self, peer: str, p: Any) -> Any:
        free = p.get("free")
        results = p.get("results")
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise ArgumentError("results", "must be a list of completion objects")
        return self.broker.on_done(peer, free if isinstance(free, int) and not isinstance(free, bool) else None,
                                   results)

    async def _rpc_beat(self, peer: str, p: Any) -> Any:
        return self.broker.on_beat(peer, list(p.get("tasks") or []))

    async def _rpc_worker_info(self, peer: str, p: Any) -> Any:
        return self.worker_info(bool((p or {}).get("include_tasks")))

    async def _rpc_worker_update(self, peer: str, p: Any) -> Any:
        rec = self.node.table.get(peer)
        if rec is not None and isinstance(p, dict):
            rec.worker = p
            self.broker.kick()
        return {"ok": True}

    async def _rpc_unregister(self, peer: str, p: Any) -> Any:
        return self.unregister_local(bool(p.get("drain", True)))

    # ---- operations (the queue tools) --------------------------------------------------
    async def submit(self, task_type: Any, payload: Any, task_id: Any, priority: Any, depends_on: Any, tags: Any,
                     timeout_s: Any, retry_policy: Any, metadata: Any, cache_ttl_s: Any) -> dict[str, Any]:
        payload = {} if payload is None else payload
        depends_on = depends_on or []
        tags = tags or []
        metadata = metadata or {}
        check_submit(task_type, payload, task_id, priority, depends_on, tags, timeout_s, retry_policy, metadata,
                     cache_ttl_s, self.config.max_payload_bytes)
        if not self.type_known(task_type):
            raise ArgumentError("task_type", f"unknown task type {task_type!r}: no worker of the mesh serves it "
                                f"(this node's handlers: {', '.join(self.registry.names())})")
        args = {"task_type": task_type, "payload": payload, "task_id": task_id, "priority": priority,
                "depends_on": list(depends_on), "tags": list(tags), "timeout_s": timeout_s,
                "retry_policy": retry_policy, "metadata": metadata, "cache_ttl_s": cache_ttl_s}
        owner = self.me
        if task_id is not None:
            owner = owner_of(task_id) or await self.find(task_id) or self.me
        if owner != self.me:
            return dict(await self.owner_call(owner, "q.submit", args))
        return await self._accept(args)

    async def _accept(self, a: dict[str, Any]) -> dict[str, Any]:
        if a["task_id"] is not None and (existing := self.store.get(a["task_id"])) is not None:
            return self.broker.submitted(existing, existed=True)  # idempotent: returns the existing task
        deps: list[str] = a["depends_on"]
        dep_status: dict[str, str] = {}
        by_owner: dict[str, list[str]] = {}
        for i, d in enumerate(deps):
            by_owner.setdefault(await self.locate(d, f"depends_on[{i}]"), []).append(d)
        for owner, ids in by_owner.items():
            dep_status.update(await self.owner_call(owner, "q.statuses", {"ids": ids}))
        for i, d in enumerate(deps):
            if d not in dep_status:
                raise TaskNotFound(d, f"depends_on[{i}]")
        rec, existed = self.broker.accept(**a, dep_status=dep_status)
        out = self.broker.submitted(rec, existed)
        if not existed and not rec.final:
            held_by = await self.replicator.replicate(rec)  # sync: once the replicas hold it
            if held_by is not None:
                out["replicas"] = held_by
        return out

    async def status(self, task_id: Any, include_metrics: bool) -> dict[str, Any]:
        tid = check_task_id(task_id)
        return dict(await self.owner_call(await self.locate(tid), "q.status",
                                           {"task_id": tid, "include_metrics": include_metrics}))

    async def result(self, task_id: Any, wait: bool, timeout_s: Any, include_logs: bool,
                     include_history: bool) -> dict[str, Any]:
        tid = check_task_id(task_id)
        check_number("timeout_s", timeout_s, 0, 3600)
        owner = await self.locate(tid)
        params = {"task_id": tid, "wait": wait, "timeout_s": timeout_s, "include_logs": include_logs,
                  "include_history": include_history}
        if owner == self.me or not wait:
            return dict(await self.owner_call(owner, "q.result", params, float(timeout_s) + 10))
        # a long wait at a remote owner is cut into slices, so that it never holds one of the
        # owner's per-stream request slots for long; an owner that is gone is looked up again
        # each slice (a replica adopts its tasks after owner_timeout_s, see replica.py)
        deadline = trio.current_time() + float(timeout_s)
        while True:
            slice_s = max(0.0, min(WAIT_SLICE_S, deadline - trio.current_time()))
            try:
                out = dict(await self.owner_call(owner, "q.result", {**params, "timeout_s": slice_s}, slice_s + 10))
            except QueueError:
                if isinstance(sys.exc_info()[1], OwnerError) or trio.current_time() + 0.5 >= deadline:
                    raise
                await trio.sleep(0.5)
                owner = await self.locate(tid)
                continue
            if not out["timed_out"] or trio.current_time() >= deadline:
                return out

    async def cancel(self, task_id: Any, reason: Any, force: bool) -> dict[str, Any]:
        tid = check_task_id(task_id)
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
            raise ArgumentError("reason", "must be a string of at most 1000 characters")
        return dict(await self.owner_call(await self.locate(tid), "q.cancel",
                                           {"task_id": tid, "reason": reason, "force": force}))

    async def set_priority(self, task_id: Any, priority: Any, boost: Any) -> dict[str, Any]:
        tid = check_task_id(task_id)
        if priority is None and boost is None:
            raise ArgumentError("priority", "give priority (a new value) or boost (a change)")
        if priority is not None:
            check_number("priority", priority, -1e9, 1e9)
        if boost is not None:
            check_number("boost", boost, -1e9, 1e9)
        return dict(await self.owner_call(await self.locate(tid), "q.priority",
                                           {"task_id": tid, "priority": priority, "boost": boost}))

    async def retry(self, task_id: Any, priority: Any, timeout_s: Any, retry_policy: Any) -> dict[str, Any]:
        from mcpp.queue.model import RetryPolicy

        tid = check_task_id(task_id)
        if priority is not None:
            check_number("priority", priority, -1e9, 1e9)
        if timeout_s is not None:
            check_number("timeout_s", timeout_s, 0.001, 86400 * 7)
        if retry_policy is not None:
            RetryPolicy.parse(retry_policy)
        return dict(await self.owner_call(await self.locate(tid), "q.retry",
                                           {"task_id": tid, "priority": priority, "timeout_s": timeout_s,
                                            "retry_policy": retry_policy}))

    async def list_tasks(self, status: Any, task_type: Any, tag: Any, worker: Any, min_priority: Any,
                         max_priority: Any, limit: Any, offset: Any, scope: Any) -> dict[str, Any]:
        limit, offset = check_limit(limit, offset)
        if status is not None and status not in STATUSES:
            raise ArgumentError("status", f"must be one of {', '.join(STATUSES)}, got {status!r}")
        if scope not in SCOPES:
            raise ArgumentError("scope", f"must be mesh or local, got {scope!r}")
        for name, v in (("task_type", task_type), ("tag", tag), ("worker", worker)):
            if v is not None and (not isinstance(v, str) or not v or len(v) > 200):
                raise ArgumentError(name, "must be a non-empty string of at most 200 characters")
        for name, v in (("min_priority", min_priority), ("max_priority", max_priority)):
            if v is not None:
                check_number(name, v, -1e9, 1e9)
        flt = {"status": status, "task_type": task_type, "tag": tag, "worker": worker,
               "min_priority": min_priority, "max_priority": max_priority}
        params = {"filter": flt, "limit": limit + offset, "offset": 0}
        peers = self.mesh_peers() if scope == "mesh" else []
        answers, failed = await self.gather("q.list", params, peers)
        rows = [t for a in answers.values() for t in a["tasks"]]
        rows.sort(key=lambda t: (-(t["created_at"] or 0.0), t["task_id"]))
        total = sum(int(a["total"]) for a in answers.values())
        page = rows[offset : offset + limit]
        return {"tasks": page, "count": len(page), "total": total, "has_more": offset + len(page) < total,
                "scope": scope, "nodes": len(answers), "unreachable": failed}

    async def stats(self, scope: Any, include_worker_stats: bool) -> dict[str, Any]:
        if scope not in SCOPES:
            raise ArgumentError("scope", f"must be mesh or local, got {scope!r}")
        # this node's own figures are exact; every other member's come from its gossiped summary
        answers: dict[str, dict[str, Any]] = {self.me: self.local_stats()}
        failed: list[str] = []  # members whose summary has not arrived (yet)
        for pid in self.node.members() if scope == "mesh" else []:
            m = self.node.view.get(pid)
            a = stats_of(m.load if m is not None else None)
            if a is None:
                failed.append(pid)
            else:
                answers[pid] = a
        out: dict[str, Any] = {k: sum(int(a.get(k, 0)) for a in answers.values()) for k in STAT_KEYS}
        by_type: dict[str, dict[str, int]] = {}
        for a in answers.values():
            for t, counts in a["by_type"].items():
                for s, n in counts.items():
                    by_type.setdefault(t, {}).setdefault(s, 0)
                    by_type[t][s] += n
        timed = sum(int(a.get("timed", 0)) for a in answers.values())

        def mean(key: str) -> float | None:
            if not timed:
                return None
            return round(sum((a.get(key) or 0.0) * int(a.get("timed", 0)) for a in answers.values()) / timed, 6)

        out.update({
            "by_type": by_type,
            "completed_per_s": round(sum(float(a["completed_per_s"]) for a in answers.values()), 3),
            "mean_wait_s": mean("mean_wait_s"),
            "mean_run_s": mean("mean_run_s"),
            "paused": dict(self.broker.paused),
            "per_node": {pid: {k: a.get(k) for k in (*STAT_KEYS[:7], "completed_per_s", "paused")} for pid, a in answers.items()},
            "scope": scope,
            "unreachable": failed,
            "summaries_as_of": {pid: a.get("as_of") for pid, a in answers.items() if pid != self.me},
        })
        if include_worker_stats:
            out["workers"] = self._gossiped_workers(scope == "mesh")
        return out

    def _gossiped_workers(self, mesh: bool) -> list[dict[str, Any]]:
        """This node's worker (exact) and, for the mesh, every live member's as gossiped."""
        workers = [self.worker_info(False)]
        for pid in self.node.members() if mesh else []:
            m = self.node.view.get(pid)
            w = worker_of(pid, m.worker, m.load) if m is not None else None
            if w is not None:
                workers.append(w)
        return [self._with_reputation(w) for w in workers]

    def pause(self, task_type: Any, reason: Any) -> dict[str, Any]:
        self._check_opt_str("task_type", task_type)
        self._check_opt_str("reason", reason, 1000)
        return self.broker.pause(task_type, reason)

    def resume(self, task_type: Any, reorder: bool) -> dict[str, Any]:
        self._check_opt_str("task_type", task_type)
        return self.broker.resume(task_type, reorder)

    def clear(self, confirm: Any, status: Any, task_type: Any, tag: Any) -> dict[str, Any]:
        if confirm is not True:
            raise ArgumentError("confirm", "must be true to clear tasks (nothing was removed)")
        if status not in STATUSES:
            raise ArgumentError("status", f"must be one of {', '.join(STATUSES)}, got {status!r}")
        self._check_opt_str("task_type", task_type)
        self._check_opt_str("tag", tag)
        n = self.broker.clear(status, task_type, tag)
        return {"removed": n, "status": status, "task_type": task_type, "tag": tag}

    @staticmethod
    def _check_opt_str(name: str, v: Any, max_len: int = 200) -> None:
        if v is not None and (not isinstance(v, str) or not v or len(v) > max_len):
            raise ArgumentError(name, f"must be a non-empty string of at most {max_len} characters")

    # ---- workers -----------------------------------------------------------------------
    def register(self, capabilities: Any, max_concurrent: Any, resources: Any, worker_id: Any) -> dict[str, Any]:
        caps = check_str_list("capabilities", capabilities)
        if not caps:
            raise ArgumentError("capabilities", "give at least one task type")
        for i, c in enumerate(caps):
            if self.registry.get(c) is None:
                raise ArgumentError(f"capabilities[{i}]", f"no handler for task type {c!r} on this node "
                                    f"(registered: {', '.join(self.registry.names())})")
        check_number("max_concurrent", max_concurrent, 1, 10_000, integer=True)
        res: dict[str, float] = {}
        if resources is not None:
            if not isinstance(resources, dict):
                raise ArgumentError("resources", "must be an object such as {\"cpu\": 2, \"memory_mb\": 512}")
            for k, v in resources.items():
                res[str(k)] = check_number(f"resources.{k}", v, 0, 1e12)
        if worker_id is not None:
            self._check_opt_str("worker_id", worker_id)
        wid = worker_id or self.worker.settings.worker_id or self.me
        self.worker.configure(WorkerSettings(wid, tuple(dict.fromkeys(caps)), int(max_concurrent), res, True))
        return {**self.worker_info(False), "registered": True}

    def unregister_local(self, drain: bool) -> dict[str, Any]:
        s = self.worker.settings
        running = len(self.worker.running)
        requeued = 0 if drain else self.worker.stop_all(True, "worker unregistered without drain")
        self.worker.configure(WorkerSettings(s.worker_id, s.task_types, s.max_concurrent, s.resources, False))
        return {"worker_id": s.worker_id, "peer_id": self.me, "active": False, "drain": drain,
                "running": running - requeued, "requeued": requeued}

    async def unregister(self, worker_id: Any, drain: bool) -> dict[str, Any]:
        self._check_opt_str("worker_id", worker_id)
        if worker_id in (self.worker.settings.worker_id, self.me):
            return self.unregister_local(drain)
        for w in self._gossiped_workers(True):  # the worker ids of the mesh, by gossip
            if worker_id in (w.get("worker_id"), w.get("peer_id")):
                return dict(await self.owner_call(str(w["peer_id"]), "w.unregister", {"drain": drain}))
        raise ArgumentError("worker_id", f"no worker {worker_id!r} in the mesh")

    def _worker_counts(self) -> dict[str, int]:
        w = self.worker
        return {"running": len(w.running), "free": w.free(), "completed": w.completed, "failed": w.failed,
                "rejected": w.rejected}

    def worker_info(self, include_tasks: bool) -> dict[str, Any]:
        s = self.worker.settings
        mem = self._process.memory_info()
        done = self.worker.completed + self.worker.failed
        out: dict[str, Any] = {
            **self.worker.info(),
            "peer_id": self.me,
            "capabilities": list(s.task_types),
            "completed": self.worker.completed,
            "failed": self.worker.failed,
            "rejected": self.worker.rejected,
            "fenced": self.worker.fenced,
            "load": round(len(self.worker.running) / max(1, s.max_concurrent), 4),
            "rss_mb": round(mem.rss / 2**20, 2),
            "cpu_percent": self._cpu_percent(),
            "success_rate": None if done == 0 else round(self.worker.completed / done, 4),
        }
        if include_tasks:
            out["tasks"] = [{"task_id": r.task_id, "owner": r.owner, "attempt": r.attempt, "task_type": r.task_type,
                             "started_at": r.started_at, "progress": r.ctx.progress_value}
                            for r in self.worker.running.values()]
        return out

    def _cpu_percent(self) -> float:
        """This process's CPU since the previous reading; a reading less than CPU_SAMPLE_S after
        the previous one repeats it (psutil's interval would be a few ms: 0 %, e.g. when
        worker_status reads this node's worker twice in one call)."""
        now = time.monotonic()
        if now - self._cpu_read_at >= CPU_SAMPLE_S:
            self._cpu_read_at, self._cpu_last = now, self._process.cpu_percent(None)
        return self._cpu_last

    def _with_reputation(self, info: dict[str, Any]) -> dict[str, Any]:
        pid = str(info.get("peer_id"))
        rec = self.node.table.get(pid)
        rep = self.broker.reputation.get(pid)
        info["reputation"] = round(rep if rep is not None else (rec.reputation if rec else 0.5), 4)
        return info

    async def worker_status(self, worker_id: Any, include_tasks: bool) -> dict[str, Any]:
        """Every worker from the gossiped summaries; the ones named by `worker_id` (or all, with
        include_tasks) asked directly, for their tasks, RSS and CPU."""
        self._check_opt_str("worker_id", worker_id)
        workers = self._gossiped_workers(True)
        failed: list[str] = []
        if worker_id is not None:
            workers = [w for w in workers if worker_id in (w.get("worker_id"), w.get("peer_id"))]
            if not workers:
                raise ArgumentError("worker_id", f"no worker {worker_id!r} in the mesh")
        if worker_id is not None or include_tasks:
            infos, failed = await self.gather("w.info", {"include_tasks": include_tasks},
                                              [str(w["peer_id"]) for w in workers if w["peer_id"] != self.me])
            wanted = {w["peer_id"] for w in workers}
            workers = [self._with_reputation(i) for pid, i in infos.items() if pid in wanted] + [
                w for w in workers if w["peer_id"] in failed]
        workers.sort(key=lambda w: str(w.get("worker_id")))
        return {"workers": workers, "count": len(workers), "unreachable": failed}

    # ---- loops -------------------------------------------------------------------------
    async def _dependency_loop(self) -> None:
        """Tasks blocked on tasks of other owners: poll the nodes that hold them for final
        states. A dependency that no node holds for DEP_LOST_S (its owner gone, and no replica
        adopted it) fails its dependents with an error that says so: they never wait forever."""
        missing: dict[str, float] = {}
        while True:
            await trio.sleep(0.5)
            remote = self.broker.remote_dependencies()
            if not remote:
                missing.clear()
                continue
            by_owner: dict[str, list[str]] = {}
            for d in remote:
                o = owner_of(d)
                if o is None or d in missing or not self.reachable(o):
                    self._located.pop(d, None)
                    o = await self.find(d)  # an adopter (see replica.py), or None
                if o is not None:
                    by_owner.setdefault(o, []).append(d)
            answered: set[str] = set()
            for owner, ids in by_owner.items():
                try:
                    st = await self.call(owner, "q.statuses", {"ids": ids}, 5)
                except MCPPError:
                    continue
                if not isinstance(st, dict):
                    continue
                answered.update(st)
                for d, s in st.items():
                    if s in FINAL:
                        self.broker.dependency_final(d, s)
            mono = trio.current_time()
            for d in list(missing):
                if d not in remote:
                    del missing[d]
            for d in remote:
                named = owner_of(d)
                if d in answered or (named is not None and named != self.me and self.reachable(named)):
                    missing.pop(d, None)  # answered, or its owner is there (the call failed: try again)
                elif mono - missing.setdefault(d, mono) >= self.config.owner_timeout_s + DEP_LOST_S:
                    missing.pop(d, None)
                    log.warning("dependency lost: no node holds it", extra=kv(task=d, owner=owner_of(d)))
                    self.broker.dependency_final(d, "lost (its owner is gone and no node holds it)")

    async def _checkpoint_loop(self) -> None:
        """WAL checkpoints in a worker thread, so that their fsync never stalls the loop."""
        while True:
            await trio.sleep(CHECKPOINT_S)
            try:
                await trio.to_thread.run_sync(self.store.checkpoint)
            except Exception as e:  # a busy database: the next round catches up
                log.warning("wal checkpoint failed", extra=kv(error=str(e)))

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for fn, args in self._pending:
                nursery.start_soon(fn, *args)
            self._pending.clear()
            nursery.start_soon(self._checkpoint_loop)
            await nursery.start(self.worker.run)
            await nursery.start(self.broker.run)
            nursery.start_soon(self._dependency_loop)
            nursery.start_soon(self.replicator.run)
            task_status.started()

