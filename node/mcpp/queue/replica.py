"""Owner-loss protection: every task a node accepts is copied to its replica peers, and a replica
takes the tasks over when their owner has been gone for `owner_timeout_s`.

- The replica set of an owner is the `replicas` connected peers closest to it by XOR distance of
  sha256(peer id) (the Kademlia metric), so every node computes the same set.
- A new record goes out at once, pipelined: up to PUTS_IN_FLIGHT `r.put` batches are in
  flight, and while all are, the next collects everything accepted meanwhile. With `replication
  = "sync"` (the default), `task_submit` returns only after its record reached the replicas (or
  REPLICATE_WAIT_S passed) and says how many hold it (`replicas`); with "async" it returns at
  once and the copy follows within one round trip (an owner lost for good in that window loses
  the just-accepted tasks; they are durable on the owner's disk).
- Final records (status, result, error) follow in batches every FINAL_FLUSH_S: a replica keeps
  them, so a finished task stays readable when its owner is gone for good, and a task blocked
  on it can still learn how it ended. Tasks removed by queue_clear are removed there too.
- When the replica set changes (a replica left, a closer peer joined), the owner sends every
  record it holds to the new members.
- A replica that holds records of an owner that has not been connected for `owner_timeout_s`
  first probes it: it pings it (dialing it), then asks every connected peer whether it still has
  the owner as a peer (SWIM's indirect probe). Only if none does, it adopts them. (A link broken
  between the replica and a live owner alone must not run the owner's tasks twice.)
- Adopting fences the owner first: the adopter raises the owner's epoch above the last one it
  saw (every `r.put` carries the owner's epoch) and tells every connected peer (`r.fence`). A
  peer's worker then refuses dispatches of that owner below the fence, and runs of the adopted
  tasks it has (running, or done but not yet delivered) report to the adopter from then on:
  the adopter leases them to that worker instead of running them again. The other records are
  stored as the adopter's own (same task ids): final ones stay readable, the rest are queued.
  Any node finds them through `q.where` (service.locate). At-least-once: a task that was running
  on a worker no peer could tell about runs again.
- An owner that comes back asks each peer (`r.adopted`) which of its tasks were adopted, drops
  them and takes the adopter's fence as its epoch; a worker that refuses it a dispatch says who
  fenced it, and it asks that node first. A replica asks an owner that (re)joins for the final
  state of the copies it holds as active (`r.finished`), and asks again every HELD_CHECK_S
  about copies not updated for as long: final states sent while the two were apart are not
  lost (a failed final batch is also sent again while that replica is in the set).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from mcpp.queue.service import QueueService

from mcpp.errors import ArgumentError, MCPPError
from mcpp.log import kv
from mcpp.queue.model import FINAL, TaskRecord
from mcpp.queue.replica_wire import FIELDS, MAX_EPOCH, PUT_BYTES, PUT_MAX, batches, distance, is_epoch, pack, unpack
from mcpp.queue.store import TaskFilter

__all__ = ["Replicator", "pack", "unpack"]

log = logging.getLogger("mcpp.replica")
REPLICATE_WAIT_S = 2.5  # how long a sync submit waits for its copy at most
PUT_TIMEOUT_S = 1.0  # a replica that does not store a new copy in this time is passed over
PUTS_IN_FLIGHT = 4  # batches of copies on their way to the replicas at once
FINAL_FLUSH_S = 0.5
FINAL_BATCH = 100  # final records an r.put: storing them holds the replica's loop (~3 ms)
CHECK_EVERY_S = 1.0
PROBE_TIMEOUT_S = 2.0
FENCE_TIMEOUT_S = 5.0
HELD_CHECK_S = 10.0
RESTORE_WINDOW_S = 120.0  # a node that started with an empty store takes its copies back from peers met this soon
MAX_RETRY_FINALS = 50_000
PUSH_BATCH = 200

_SCHEMA = """
DROP TABLE IF EXISTS replicas;
CREATE TABLE IF NOT EXISTS copies (
  task_id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  final INTEGER NOT NULL,
  record TEXT NOT NULL,
  received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS copies_owner ON copies(owner, final);
CREATE TABLE IF NOT EXISTS adopted (task_id TEXT PRIMARY KEY, from_owner TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS adopted_owner ON adopted(from_owner);
CREATE TABLE IF NOT EXISTS wf_copies (
  workflow_id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  final INTEGER NOT NULL,
  record TEXT NOT NULL,
  received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS wf_copies_owner ON wf_copies(owner);
CREATE TABLE IF NOT EXISTS adopted_wf (workflow_id TEXT PRIMARY KEY, from_owner TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS adopted_wf_owner ON adopted_wf(from_owner);
CREATE TABLE IF NOT EXISTS epochs (owner TEXT PRIMARY KEY, epoch INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fences (owner TEXT PRIMARY KEY, epoch INTEGER NOT NULL, adopter TEXT NOT NULL);
"""
# a final copy is replaced by an active one only if that is newer (task_retry raises seq):
# batches may arrive out of order
_UPSERT = """INSERT INTO copies VALUES (?, ?, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET
  owner = excluded.owner, final = excluded.final, record = excluded.record, received_at = excluded.received_at
  WHERE copies.final = 0 OR excluded.final = 1
     OR json_extract(excluded.record, '$.seq') > json_extract(copies.record, '$.seq')"""
_WF_UPSERT = _UPSERT.replace("copies", "wf_copies").replace("task_id", "workflow_id")
@dataclasses.dataclass
class WorkflowHooks:
    """What the workflow engine lends the replicator: its records to copy to new replicas, and
    how to adopt (replicated records of a lost coordinator) or forget (ones adopted elsewhere)."""

    records: Callable[[], list[dict[str, Any]]] = list
    adopt: Callable[[list[dict[str, Any]]], int] = lambda recs: 0
    forget: Callable[[list[str]], int] = lambda ids: 0
    exists: Callable[[str], bool] = lambda workflow_id: False


@dataclasses.dataclass
class _Delivery:
    """One batch of copies in flight: set once sent, with how many replicas confirmed it."""

    event: trio.Event = dataclasses.field(default_factory=trio.Event)
    held_by: int = 0


class Replicator:
    """Both sides: this node as an owner (sending copies) and as a replica (holding, adopting)."""

    def __init__(self, q: QueueService, copies: int, owner_timeout_s: float, sync: bool = False) -> None:
        self.q = q
        self.me = q.me
        self.copies = copies
        self.sync = sync
        self._flushing = False
        self.owner_timeout_s = owner_timeout_s
        self.db = q.store.connection
        self.db.executescript(_SCHEMA)
        self._batch: list[dict[str, Any]] = []
        self._wfs: dict[str, dict[str, Any]] = {}
        self.workflows = WorkflowHooks()
        self._batch_done: _Delivery | None = None
        self._put_slots = trio.Semaphore(PUTS_IN_FLIGHT)
        self._finals: list[dict[str, Any]] = []
        self._drops: list[str] = []
        self._last_set: tuple[str, ...] = ()
        self._absent_since: dict[str, float] = {}
        self._probing: set[str] = set()
        self._checking: set[str] = set()
        self._resyncing: set[str] = set()
        self._last_held_check = time.monotonic()
        self._seen: dict[str, int] = {str(o): int(e) for o, e in self.db.execute("SELECT owner, epoch FROM epochs")}
        self._fences: dict[str, tuple[int, str]] = {
            str(o): (int(e), str(a)) for o, e, a in self.db.execute("SELECT owner, epoch, adopter FROM fences")}
        q.broker.epoch = self._seen.get(self.me, 0)
        # started with an empty store: maybe a node whose disk was lost, back with its identity
        self._restore_until = time.monotonic() + RESTORE_WINDOW_S if q.store.is_empty() else 0.0
        self.adopted_count = 0
        self.adoptions_declined = 0
        q.serve("r.put", self._rpc_put)
        q.serve("r.adopted", self._rpc_adopted)
        q.serve("r.sees", self._rpc_sees)
        q.serve("r.fence", self._rpc_fence)
        q.serve("r.finished", self._rpc_finished)
        q.serve("r.held", self._rpc_held)
        q.serve("r.take", self._rpc_take)
        q.serve("r.absorb", self._rpc_absorb)
        q.broker.final_hooks.append(self._on_final)
        q.broker.removed_hooks.append(lambda ids: self._drops.extend(ids))
        q.broker.requeued_hooks.append(self.copy_soon)
        q.broker.fenced_hooks.append(self._on_fenced)
        q.worker.fence_of = self._fences.get
        q.node.peer_joined_hooks.append(lambda pid: q.spawn(self._reconcile, pid))
        q.node.peer_joined_hooks.append(lambda pid: q.spawn(self._restore, pid))
        q.node.peer_joined_hooks.append(lambda pid: q.spawn(self._refresh, pid))

    @property
    def epoch(self) -> int:
        return self.q.broker.epoch

    # ---- owner side --------------------------------------------------------------------
    def replica_peers(self) -> list[str]:
        return self._bydistance()[: self.copies] if self.copies > 0 else []

    def _bydistance(self) -> list[str]:
        peers = self.q.peers()
        peers.sort(key=lambda p: distance(self.me, p))
        return peers

    async def replicate(self, rec: TaskRecord) -> int | None:
        """Copy a just-accepted task to the replica peers (`copy_soon`). With `sync` the caller
        returns when its batch was delivered (or after REPLICATE_WAIT_S) and learns how many
        peers confirmed they hold it (0: none, e.g. a node alone); otherwise at once, None."""
        done = self.copy_soon(rec)
        return await self.wait_held(done) if self.sync else None

    async def wait_held(self, done: _Delivery | None) -> int:
        """How many replicas confirmed a queued copy (waits at most REPLICATE_WAIT_S)."""
        if done is None:
            return 0
        with trio.move_on_after(REPLICATE_WAIT_S):
            await done.event.wait()
        return done.held_by

    def copy_soon(self, rec: TaskRecord) -> _Delivery | None:
        """Queue a copy of an accepted record: up to PUTS_IN_FLIGHT batches are in flight and
        the next one collects everything accepted meanwhile (group commit). None: no copy."""
        if self.copies <= 0 or rec.final or not self.q.peers():
            return None
        self._batch.append(pack(rec))
        return self._flush_soon()

    def copy_workflow(self, wf: dict[str, Any]) -> _Delivery | None:
        """Queue a copy of a workflow record (its definition and step states; the latest one
        of a workflow replaces an older one still waiting in the batch)."""
        if self.copies <= 0 or not self.q.peers():
            return None
        self._wfs[wf["workflow_id"]] = wf
        return self._flush_soon()

    def _flush_soon(self) -> _Delivery:
        done = self._batch_done
        if done is None:
            done = self._batch_done = _Delivery()
        if not self._flushing:
            self._flushing = True
            self.q.spawn(self._flusher)
        return done

    async def _flusher(self) -> None:
        """Send the collected records as a batch as soon as one of PUTS_IN_FLIGHT slots is free;
        while all are taken, the next batch keeps collecting (group commit)."""
        try:
            while self._batch or self._wfs:
                await self._put_slots.acquire()
                await trio.lowlevel.checkpoint()  # submits arriving meanwhile join this batch
                batch, wfs, done = self._batch, list(self._wfs.values()), self._batch_done
                self._batch, self._wfs, self._batch_done = [], {}, None
                self.q.spawn(self._deliver, self.replica_peers(), batch, done, wfs)
        finally:
            self._flushing = False

    async def _deliver(self, peers: list[str], batch: list[dict[str, Any]], done: _Delivery | None,
                       wfs: list[dict[str, Any]] | None = None) -> None:
        try:
            held = len(peers)
            for i, part in enumerate(batches(batch) or [[]]):
                body: dict[str, Any] = {"records": part}
                if wfs and i == 0:
                    body["workflows"] = wfs
                missing = len(await self._send(peers, body, PUT_TIMEOUT_S))
                if missing:
                    # a replica that does not answer (paused, overloaded, just gone): the next
                    # closest peers hold the copy instead (an adopter gathers every holder's)
                    spare = [p for p in self._bydistance() if p not in peers][:missing]
                    if spare:
                        missing -= len(spare) - len(await self._send(spare, body, PUT_TIMEOUT_S))
                held = min(held, len(peers) - missing)
            if done is not None:
                done.held_by = held
        finally:
            if done is not None:
                done.event.set()
            self._put_slots.release()

    async def _send(self, peers: list[str], body: dict[str, Any], timeout_s: float = 2.0) -> list[str]:
        """r.put to each peer (with this owner's epoch); returns the peers it failed for."""
        failed: list[str] = []
        body = {**body, "epoch": self.epoch}

        async def one(pid: str) -> None:
            try:
                await self.q.call(pid, "r.put", body, timeout_s)
            except MCPPError as e:
                failed.append(pid)
                log.warning("replication failed", extra=kv(peer=pid, error=str(e)))

        async with trio.open_nursery() as n:
            for pid in peers:
                n.start_soon(one, pid)
        return failed

    async def _send_finals(self, peers: list[str], finals: list[dict[str, Any]], drops: list[str]) -> None:
        """Final records (kept by the replicas) and removed ids. Kept for the next flush while a
        replica that is still in the set did not get them."""
        failed: set[str] = set()
        for part in batches(finals, FINAL_BATCH):
            failed.update(await self._send(peers, {"records": part}))
        for i in range(0, len(drops), PUT_MAX):
            failed.update(await self._send(peers, {"records": [], "drop": drops[i : i + PUT_MAX]}))
        if failed & set(self.replica_peers()):
            # bounded: what does not fit is caught by the replica's periodic r.finished check
            self._finals[:0] = finals[-MAX_RETRY_FINALS:]
            del self._finals[MAX_RETRY_FINALS:]
            self._drops[:0] = drops[-MAX_RETRY_FINALS:]
            del self._drops[MAX_RETRY_FINALS:]

    def _on_final(self, rec: TaskRecord) -> None:
        # with no replica now, the next one gets every record from _push_all
        if self.copies > 0 and rec.owner == self.me and self.q.peers():
            self._finals.append(pack(rec))
            del self._finals[:-MAX_RETRY_FINALS]

    async def _push_all(self, peers: list[str]) -> None:
        """Send every record this node owns (tasks and workflows, active and final) to replicas
        that joined the set."""
        wfs = self.workflows.records()
        for i in range(0, len(wfs), PUSH_BATCH):
            await self._send(peers, {"records": [], "workflows": wfs[i : i + PUSH_BATCH]})
        ids = self.q.store.ids(TaskFilter())
        for i in range(0, len(ids), PUSH_BATCH):
            recs = [pack(r) for r in self.q.store.get_many(ids[i : i + PUSH_BATCH]).values()]
            for part in batches(recs):
                await self._send(peers, {"records": part})
        if ids:
            log.info("records copied to new replicas", extra=kv(peers=peers, tasks=len(ids)))

    async def _reconcile(self, peer: str, fenced: bool = False) -> None:
        """A peer (re)joined, or fenced this node: drop my tasks that it adopted while I was away
        (a returning owner may have run some again meanwhile: they are dropped too) and take its
        fence as my epoch. A node that holds no task and was not fenced asks nothing (a forming
        mesh opens many links, and the call counted as work on each)."""
        if (not fenced and self.q.store.is_empty()) or peer in self._resyncing:
            return
        self._resyncing.add(peer)
        try:
            got = await self.q.call(peer, "r.adopted", {}, 10.0)
        except MCPPError as e:
            if fenced:
                log.warning("fenced, but the adopter cannot tell which tasks it took: not dispatching to "
                            "workers that know the fence", extra=kv(adopter=peer, error=str(e)))
            return
        finally:
            self._resyncing.discard(peer)
        ids = got.get("ids") if isinstance(got, dict) else None
        epoch = got.get("epoch") if isinstance(got, dict) else None
        wf_ids = got.get("workflows") if isinstance(got, dict) else None
        if isinstance(wf_ids, list) and wf_ids:
            n = self.workflows.forget([w for w in wf_ids if isinstance(w, str)])
            log.warning("workflows adopted by a replica while this node was away: dropped here",
                        extra=kv(peer=peer, workflows=n))
        if isinstance(ids, list) and ids:
            dropped = self.q.broker.forget([t for t in ids if isinstance(t, str)])
            log.warning("tasks adopted by a replica while this node was away: dropped here",
                        extra=kv(peer=peer, tasks=dropped))
        if is_epoch(epoch) and epoch > self.epoch:
            self._set_epoch(self.me, epoch)
            self.q.broker.epoch = epoch
            log.warning("fenced by an adopter: epoch raised", extra=kv(adopter=peer, epoch=epoch))
            self.q.broker.kick()

    async def _restore(self, peer: str) -> None:
        """This node started with an empty store: if `peer` holds copies of its records (its
        disk was lost, its identity was not), take them back: they are its own again."""
        if time.monotonic() > self._restore_until:
            return
        n = 0

        def keep(recs: list[Any], wfs: list[Any]) -> tuple[list[str], list[str]]:
            """Only what this node does not hold: a copy of a record it has (accepted since its
            start) stays where it is, a replica's copy."""
            nonlocal n
            mine = []
            for d in recs:
                try:
                    mine.append(unpack(d))
                except ArgumentError:
                    continue  # a malformed copy is skipped, not the page
            taken = self.q.broker.adopt(mine, {})
            new_wfs = [w for w in wfs if isinstance(w, dict) and isinstance(w.get("workflow_id"), str)
                       and not self.workflows.exists(w["workflow_id"])]
            n += len(taken) + self.workflows.adopt(new_wfs)
            for r in taken:
                if r.final:
                    self._finals.append(pack(r))
                else:
                    self.copy_soon(r)
            return [r.task_id for r in taken], [w["workflow_id"] for w in new_wfs]

        try:
            await self._take_all(self.me, peer, keep)
        except (MCPPError, ArgumentError, TypeError, ValueError, KeyError, AttributeError) as e:
            log.warning("could not take back copies from a peer", extra=kv(peer=peer, error=str(e)))
        if n:
            log.warning("records of this node restored from a peer (it started with an empty store)",
                        extra=kv(peer=peer, records=n))

    def _on_fenced(self, epoch: int, adopter: str) -> None:
        if is_epoch(epoch) and epoch > self.epoch:
            self.q.spawn(self._reconcile, adopter, True)

    def _set_epoch(self, owner: str, epoch: int) -> None:
        self._seen[owner] = epoch
        self.db.execute("INSERT OR REPLACE INTO epochs VALUES (?, ?)", (owner, epoch))

    # ---- replica side ------------------------------------------------------------------
    async def _refresh(self, owner: str, older_than_s: float = 0.0) -> None:
        """Ask an owner how the tasks ended that are active in my copies (their final batch may
        not have reached this node: a partition, a restart): final ones are updated, removed
        ones dropped. Run when the owner (re)joins, and every HELD_CHECK_S for copies not updated
        for as long."""
        if owner in self._checking:
            return
        self._checking.add(owner)
        try:
            ids = [r[0] for r in self.db.execute(
                "SELECT task_id FROM copies WHERE owner = ? AND final = 0 AND received_at < ?",
                (owner, time.time() - older_than_s))]
            for i in range(0, len(ids), PUSH_BATCH):
                got = await self.q.call(owner, "r.finished", {"ids": ids[i : i + PUSH_BATCH]}, 10.0)
                if not isinstance(got, dict):
                    continue
                gone = [t for t in got.get("gone") or [] if isinstance(t, str)]
                self.db.executemany("DELETE FROM copies WHERE task_id = ? AND owner = ?", [(t, owner) for t in gone])
                final = got.get("final") or []
                if isinstance(final, list) and final:
                    self._store_copies(owner, final)
                if gone or final:
                    log.info("copies brought up to date", extra=kv(owner=owner, final=len(final), gone=len(gone)))
        except MCPPError:
            pass
        finally:
            self._checking.discard(owner)

    async def _rpc_finished(self, peer: str, p: Any) -> Any:
        """Of these ids of mine: the final records, and the ids a replica may forget."""
        ids = p.get("ids") if isinstance(p, dict) else None
        if not isinstance(ids, list) or len(ids) > PUSH_BATCH:
            raise ArgumentError("ids", f"must be a list of at most {PUSH_BATCH} task ids")
        recs = self.q.store.get_many([t for t in ids if isinstance(t, str)])
        restoring = time.monotonic() <= self._restore_until  # unknown here may be lost here: keep them
        return {"gone": [] if restoring else [t for t in ids if t not in recs],
                "final": [pack(r) for r in recs.values() if r.final and r.owner == self.me]}

    def _store_copies(self, peer: str, recs: list[Any]) -> int:
        t = time.time()
        rows = []
        for d in recs[:PUT_MAX]:
            # the shape only: a copy is read in full (unpack) if it is ever adopted
            if not isinstance(d, dict) or d.keys() != FIELDS or not isinstance(d["task_id"], str):
                raise ArgumentError("records", "each record must have exactly the task record's fields")
            if d["owner"] != peer:
                raise ArgumentError("records", "a peer may only replicate tasks it owns")
            rows.append((d["task_id"], peer, int(d["status"] in FINAL), json.dumps(d, separators=(",", ":")), t))
        self.db.executemany(_UPSERT, rows)
        return len(rows)

    async def _rpc_put(self, peer: str, p: Any) -> Any:
        recs = p.get("records") if isinstance(p, dict) else None
        wfs = p.get("workflows", []) if isinstance(p, dict) else None
        drops = p.get("drop") if isinstance(p, dict) else None
        epoch = p.get("epoch", 0) if isinstance(p, dict) else None
        if not isinstance(recs, list) or (drops is not None and not isinstance(drops, list)):
            raise ArgumentError("records", "must be a list")
        if not isinstance(wfs, list):
            raise ArgumentError("workflows", "must be a list of workflow records")
        if not is_epoch(epoch):
            raise ArgumentError("epoch", f"must be the owner's epoch, an integer from 0 to {MAX_EPOCH}")
        self.db.execute("BEGIN")
        try:
            n = self._store_copies(peer, recs)
            self._store_wf_copies(peer, wfs)
            if drops:
                self.db.executemany("DELETE FROM copies WHERE task_id = ? AND owner = ?",
                                    [(t, peer) for t in drops[:PUT_MAX] if isinstance(t, str)])
            if epoch > self._seen.get(peer, 0):
                self._set_epoch(peer, epoch)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return {"stored": n}

    async def _rpc_adopted(self, peer: str, p: Any) -> Any:
        """Which of `peer`'s tasks and workflows I took over: adopted ones, and the steps I
        submitted for its adopted workflows (their ids carry its name), and the fence I set."""
        ids = {r[0] for r in self.db.execute("SELECT task_id FROM adopted WHERE from_owner = ?", (peer,))}
        ids.update(r[0] for r in self.db.execute("SELECT task_id FROM tasks WHERE task_id LIKE ?", (f"%@{peer}",)))
        wfs = [r[0] for r in self.db.execute("SELECT workflow_id FROM adopted_wf WHERE from_owner = ?", (peer,))]
        fence = self._fences.get(peer)
        return {"ids": sorted(ids), "workflows": wfs, "epoch": fence[0] if fence and fence[1] == self.me else 0}

    async def _rpc_sees(self, peer: str, p: Any) -> Any:
        owner = p.get("owner") if isinstance(p, dict) else None
        if not isinstance(owner, str):
            raise ArgumentError("owner", "must be a peer id string")
        return {"connected": owner in self.q.peers()}

    async def _rpc_fence(self, peer: str, p: Any) -> Any:
        """`peer` adopts the tasks `ids` of `owner` at fence `epoch`: refuse that owner's older
        dispatches, and let my runs of those tasks report to `peer`."""
        owner = p.get("owner") if isinstance(p, dict) else None
        epoch = p.get("epoch") if isinstance(p, dict) else None
        ids = p.get("ids") if isinstance(p, dict) else None
        if not isinstance(owner, str) or owner == peer or owner == self.me:
            raise ArgumentError("owner", "must be the peer id of another node")
        if not is_epoch(epoch) or epoch < 1:
            raise ArgumentError("epoch", f"must be an integer from 1 to {MAX_EPOCH}")
        if not isinstance(ids, list):
            raise ArgumentError("ids", "must be a list of task ids")
        self._fence(owner, epoch, peer)
        return {"running": self.q.worker.rehome(owner, peer, {t for t in ids if isinstance(t, str)})}

    def _fence(self, owner: str, epoch: int, adopter: str) -> None:
        if epoch > self._fences.get(owner, (0, ""))[0]:
            self._fences[owner] = (epoch, adopter)
            self.db.execute("INSERT OR REPLACE INTO fences VALUES (?, ?, ?)", (owner, epoch, adopter))

    def held(self) -> dict[str, int]:
        """Active copies by owner (the tasks that would run here if their owner were lost)."""
        rows = self.db.execute("SELECT owner, COUNT(*) FROM copies WHERE final = 0 GROUP BY owner").fetchall()
        return {str(o): int(n) for o, n in rows}

    def held_final(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM copies WHERE final = 1").fetchone()[0])

    def _owners(self) -> list[str]:
        return [str(r[0]) for r in self.db.execute("SELECT owner FROM copies UNION SELECT owner FROM wf_copies")]

    async def _rpc_held(self, peer: str, p: Any) -> Any:
        owner = p.get("owner") if isinstance(p, dict) else None
        if not isinstance(owner, str):
            raise ArgumentError("owner", "must be a peer id string")
        n = self.db.execute("SELECT (SELECT COUNT(*) FROM copies WHERE owner = ?) + "
                            "(SELECT COUNT(*) FROM wf_copies WHERE owner = ?)", (owner, owner)).fetchone()[0]
        fence = self._fences.get(owner)
        return {"n": int(n), "adopter": fence[1] if fence else None}

    async def _rpc_absorb(self, peer: str, p: Any) -> Any:
        """`peer` holds copies of an owner I adopted (it was away when I did): I take and adopt
        them too (ids already mine are skipped)."""
        owner = p.get("owner") if isinstance(p, dict) else None
        if not isinstance(owner, str) or self._fences.get(owner, (0, ""))[1] != self.me:
            raise ArgumentError("owner", "not an owner this node adopted")
        self.q.spawn(self._absorb, owner, peer)
        return {"ok": True}

    async def _absorb(self, owner: str, holder: str) -> None:
        await self._take_from(owner, holder)
        await self._take_over(owner, self._fences[owner][0])

    async def _rpc_take(self, peer: str, p: Any) -> Any:
        """The adopter of `owner` takes my copies of its records, a page at a time (they are
        its to keep from now on: deleted here)."""
        owner = p.get("owner") if isinstance(p, dict) else None
        if not isinstance(owner, str):
            raise ArgumentError("owner", "must be a peer id string")
        if owner != peer and owner in self.q.peers():
            raise ArgumentError("owner", "is connected here: its copies are not for taking")
        done = p.get("stored") or {}
        if not isinstance(done, dict):
            raise ArgumentError("stored", "must be {tasks: [ids], workflows: [ids]}")
        # the previous page is deleted only now that the taker says it stored it
        self.db.executemany("DELETE FROM copies WHERE task_id = ? AND owner = ?",
                            [(t, owner) for t in done.get("tasks") or [] if isinstance(t, str)])
        self.db.executemany("DELETE FROM wf_copies WHERE workflow_id = ? AND owner = ?",
                            [(w, owner) for w in done.get("workflows") or [] if isinstance(w, str)])
        page: dict[str, list[Any]] = {"records": [], "workflows": []}
        size = 0
        for key, q in (("workflows", "SELECT record FROM wf_copies WHERE owner = ? LIMIT ?"),
                       ("records", "SELECT record FROM copies WHERE owner = ? LIMIT ?")):
            for (text,) in self.db.execute(q, (owner, PUSH_BATCH)):
                if size and size + len(text) > PUT_BYTES:
                    return page
                page[key].append(json.loads(text))
                size += len(text)
        return page

    async def _take_all(self, owner: str, holder: str,
                        store: Callable[[list[Any], list[Any]], tuple[list[str], list[str]]]) -> None:
        """Every copy `holder` has of `owner`, a page at a time: `store` keeps what it takes and
        says which task and workflow ids; those are deleted there with the next call. A page of
        which it takes nothing ends the loop."""
        stored: dict[str, list[str]] = {}
        while True:
            got = await self.q.call(holder, "r.take", {"owner": owner, "stored": stored}, 10.0)
            recs = got.get("records") if isinstance(got, dict) else None
            wfs = got.get("workflows") if isinstance(got, dict) else None
            if not isinstance(recs, list) or not isinstance(wfs, list):
                raise ArgumentError("records", "a page of copies must hold two lists")
            if not recs and not wfs:
                return
            tasks, workflows = store(recs, wfs)
            stored = {"tasks": tasks, "workflows": workflows}
            if not tasks and not workflows:
                return

    async def _gather_copies(self, owner: str) -> bool:
        """Before adopting: of the nodes that hold copies of `owner` (a replica set changes as
        nodes come and go, so old replicas may hold some too), the one closest to it adopts, and
        takes the others' copies first (a final copy wins over an active one). False: another
        node adopts."""
        answers, _ = await self.q.gather("r.held", {"owner": owner}, [p for p in self.q.peers() if p != owner])
        adopters = {a["adopter"] for pid, a in answers.items() if isinstance(a, dict) and isinstance(a.get("adopter"), str)}
        adopter = next((a for a in sorted(adopters) if a != self.me and a in answers), None)
        if adopter is not None:
            # adopted already while this node was away (down, paused): the adopter takes my copies
            try:
                await self.q.call(adopter, "r.absorb", {"owner": owner}, 10.0)
                log.warning("copies of an owner adopted elsewhere handed to its adopter",
                            extra=kv(owner=owner, adopter=adopter))
            except MCPPError as e:
                log.warning("could not hand copies to the adopter", extra=kv(owner=owner, adopter=adopter, error=str(e)))
            return False
        holders = [pid for pid, a in answers.items()
                   if pid != self.me and isinstance(a, dict) and isinstance(a.get("n"), int) and a["n"] > 0]
        elected = min([self.me, *holders], key=lambda p: distance(owner, p))
        if elected != self.me:
            log.info("a closer holder adopts this owner's records", extra=kv(owner=owner, adopter=elected))
            return False
        for pid in holders:
            await self._take_from(owner, pid)
        return True

    async def _take_from(self, owner: str, holder: str) -> None:
        def keep(recs: list[Any], wfs: list[Any]) -> tuple[list[str], list[str]]:
            self._store_copies(owner, recs)
            self._store_wf_copies(owner, wfs)
            return [d["task_id"] for d in recs], [w["workflow_id"] for w in wfs]

        try:
            await self._take_all(owner, holder, keep)
        except (MCPPError, ArgumentError, TypeError, ValueError, KeyError, AttributeError) as e:
            log.warning("could not take a holder's copies", extra=kv(owner=owner, holder=holder, error=str(e)))

    def _store_wf_copies(self, owner: str, wfs: list[Any]) -> None:
        if not all(isinstance(w, dict) and isinstance(w.get("workflow_id"), str)
                   and isinstance(w.get("status"), str) for w in wfs[:PUT_MAX]):
            raise ArgumentError("workflows", "must be a list of workflow records")
        t = time.time()
        self.db.executemany(_WF_UPSERT, [(w["workflow_id"], owner, int(w["status"] != "running"),
                                          json.dumps(w, separators=(",", ":")), t) for w in wfs[:PUT_MAX]])

    async def adopt(self, owner: str) -> int:
        """Take over the records of an owner that is gone: gather the copies, fence it, learn
        which of its tasks still run on a worker, then store them all as mine."""
        if not await self._gather_copies(owner):
            return 0
        return await self._take_over(owner, max(self._seen.get(owner, 0), self._fences.get(owner, (0, ""))[0]) + 1)

    async def _take_over(self, owner: str, epoch: int) -> int:
        """Fence `owner` at `epoch`, learn which of the held tasks still run on a worker, then
        store every held record of it as mine."""
        rows = self.db.execute("SELECT record FROM copies WHERE owner = ?", (owner,)).fetchall()
        recs = []
        for (text,) in rows:
            try:
                recs.append(unpack(json.loads(text)))
            except (ArgumentError, ValueError):
                continue
        active = sorted(r.task_id for r in recs if not r.final)
        self._fence(owner, epoch, self.me)
        running = {t: (self.me, a) for t, a in self.q.worker.rehome(owner, self.me, set(active)).items()}
        answers, _ = await self.q.gather("r.fence", {"owner": owner, "epoch": epoch, "ids": active},
                                         [p for p in self.q.peers() if p != owner])
        for pid, got in answers.items():
            moved = got.get("running") if isinstance(got, dict) and pid != self.me else None
            if isinstance(moved, dict):
                running.update({t: (pid, a) for t, a in moved.items() if isinstance(a, int) and t in active})
        adopted = self.q.broker.adopt(recs, running)
        n = len(adopted)
        wfs = [json.loads(r[0]) for r in self.db.execute("SELECT record FROM wf_copies WHERE owner = ?", (owner,))]
        n_wf = self.workflows.adopt(wfs)  # after the tasks: a workflow's steps are known here then
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT OR REPLACE INTO adopted VALUES (?, ?, ?)",
                                [(r.task_id, owner, time.time()) for r in recs])
            self.db.executemany("INSERT OR REPLACE INTO adopted_wf VALUES (?, ?, ?)",
                                [(w["workflow_id"], owner, time.time()) for w in wfs])
            self.db.execute("DELETE FROM copies WHERE owner = ?", (owner,))
            self.db.execute("DELETE FROM wf_copies WHERE owner = ?", (owner,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.adopted_count += n
        log.warning("adopted the tasks of a lost owner", extra=kv(owner=owner, tasks=n, workflows=n_wf,
                                                                  running_elsewhere=len(running), epoch=epoch))
        if adopted and self.replica_peers():  # they are mine now: my replicas hold them too
            for part in batches([pack(r) for r in adopted]):
                self.q.spawn(self._send, self.replica_peers(), {"records": part})
        return n

    # ---- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await trio.sleep(CHECK_EVERY_S if not (self._finals or self._drops) else FINAL_FLUSH_S)
            try:
                await self._tick()
            except MCPPError as e:
                log.warning("replica tick failed", extra=kv(error=str(e)))

    async def _tick(self) -> None:
        peers = self.replica_peers()
        if (self._finals or self._drops) and peers:
            finals, self._finals = self._finals, []
            drops, self._drops = self._drops, []
            self.q.spawn(self._send_finals, peers, finals, drops)
        new = [p for p in peers if p not in self._last_set]
        if new:
            self.q.spawn(self._push_all, new)
        self._last_set = tuple(peers)
        connected = set(self.q.peers())
        mono = time.monotonic()
        if mono - self._last_held_check >= HELD_CHECK_S:
            self._last_held_check = mono
            for owner in self.held():
                if owner in connected:
                    self.q.spawn(self._refresh, owner, HELD_CHECK_S)
        for owner in self._owners():
            if owner in connected or owner == self.me:
                self._absent_since.pop(owner, None)
                continue
            since = self._absent_since.setdefault(owner, mono)
            if mono - since >= self.owner_timeout_s and owner not in self._probing:
                self._probing.add(owner)
                self.q.spawn(self._probe_then_adopt, owner)

    async def _probe_then_adopt(self, owner: str) -> None:
        try:
            alive = await self._alive(owner)
            self._absent_since.pop(owner, None)  # alive: look again after another owner_timeout_s
            if alive:
                self.adoptions_declined += 1
                log.info("owner unreachable from here but alive: not adopting", extra=kv(owner=owner, via=alive))
            elif owner not in self.q.peers():
                await self.adopt(owner)
        finally:
            self._probing.discard(owner)

    async def _alive(self, owner: str) -> str | None:
        """Who still reaches `owner`: "self" (it answers a ping), a peer that has it connected, or None."""
        try:
            await self.q.node.ping(owner, timeout_s=PROBE_TIMEOUT_S)
            return "self"
        except MCPPError:
            pass
        seen: list[str] = []

        async def ask(peer: str) -> None:
            try:
                r = await self.q.call(peer, "r.sees", {"owner": owner}, PROBE_TIMEOUT_S)
            except MCPPError:
                return
            if isinstance(r, dict) and r.get("connected") is True:
                seen.append(peer)

        async with trio.open_nursery() as nursery:
            for peer in self.q.peers():
                if peer != owner:
                    nursery.start_soon(ask, peer)
        return seen[0] if seen else None
