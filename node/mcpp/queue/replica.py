"""Owner-loss protection: every task a node accepts is copied to its replica peers, and a replica
takes the tasks over when their owner has been gone for `owner_timeout_s`.

- The replica set of an owner is the `replicas` connected peers closest to it by XOR distance of
  sha256(peer id) (the Kademlia metric), so every node computes the same set.
- A new record goes out at once, pipelined: up to PUTS_IN_FLIGHT `r.put` batches are in
  flight, and while all are, the next collects everything accepted meanwhile. With `replication = "sync"`, `task_submit`
  returns only after its record reached the replicas (or REPLICATE_WAIT_S passed) and says
  how many hold it (`replicas`); with "async" (the default) it returns at once and the copy
  follows within one round trip (an owner lost for good in that window loses the just-accepted
  tasks; they are durable on the owner's disk).
  Final states are sent later, batched, so replicas forget finished tasks.
- When the replica set changes (a replica left, a closer peer joined), the owner sends every
  active record to the new members.
- A replica that holds non-final records of an owner that has not been connected for
  `owner_timeout_s` first probes it: it pings it (dialing it), then asks every connected peer
  whether it still has the owner as a peer (SWIM's indirect probe). Only if none does, it
  adopts them: it stores them as its own (same task ids) and queues them. (A link broken
  between the replica and a live owner alone must not run the owner's tasks twice.) Any
  node then finds them through `q.where` (service.locate). At-least-once: a task the dead
  owner had running runs again.
- An owner that comes back asks each peer (`r.adopted`) which of its tasks were adopted and
  drops them, so one record per task survives. A replica asks an owner that (re)joins which
  of the copies it holds are finished (`r.finished`), and asks again every HELD_CHECK_S about
  copies not updated for as long: final states sent while the two were apart are not lost (a
  failed final batch is also sent again while that replica is in the set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from mcpp.queue.service import QueueService

from mcpp.errors import ArgumentError, MCPPError
from mcpp.log import kv
from mcpp.queue.model import RetryPolicy, TaskRecord

__all__ = ["Replicator", "pack", "unpack"]

log = logging.getLogger("mcpp.replica")
REPLICATE_WAIT_S = 2.0
PUTS_IN_FLIGHT = 4  # batches of copies on their way to the replicas at once
FINAL_FLUSH_S = 0.5
CHECK_EVERY_S = 1.0
PROBE_TIMEOUT_S = 2.0
HELD_CHECK_S = 10.0
FINAL_BATCH = 5000
MAX_RETRY_FINALS = 50_000
PUSH_BATCH = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replicas (
  task_id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  record TEXT NOT NULL,
  received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS replicas_owner ON replicas(owner);
CREATE TABLE IF NOT EXISTS adopted (task_id TEXT PRIMARY KEY, from_owner TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS adopted_owner ON adopted(from_owner);
"""
_FIELDS = {f.name for f in dataclasses.fields(TaskRecord)}


def pack(rec: TaskRecord) -> dict[str, Any]:
    d = {f: getattr(rec, f) for f in _FIELDS}
    d["retry_policy"] = rec.retry_policy.as_dict()
    return d


def unpack(d: Any) -> TaskRecord:
    """A record sent by a peer: checked field by field (a peer's data is not trusted)."""
    if not isinstance(d, dict) or set(d) != _FIELDS:
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


def _distance(a: str, b: str) -> int:
    ha = int.from_bytes(hashlib.sha256(a.encode()).digest(), "big")
    hb = int.from_bytes(hashlib.sha256(b.encode()).digest(), "big")
    return ha ^ hb


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
        self._batch_done: _Delivery | None = None
        self._put_slots = trio.Semaphore(PUTS_IN_FLIGHT)
        self._finals: list[str] = []
        self._last_set: tuple[str, ...] = ()
        self._absent_since: dict[str, float] = {}
        self._probing: set[str] = set()
        self._checking: set[str] = set()
        self._last_held_check = time.monotonic()
        self.adopted_count = 0
        self.adoptions_declined = 0
        q.serve("r.put", self._rpc_put)
        q.serve("r.adopted", self._rpc_adopted)
        q.serve("r.sees", self._rpc_sees)
        q.broker.final_hooks.append(self._on_final)
        q.node.peer_joined_hooks.append(lambda pid: q.spawn(self._reconcile, pid))
        q.node.peer_joined_hooks.append(lambda pid: q.spawn(self._drop_finished, pid))
        q.serve("r.finished", self._rpc_finished)

    # ---- owner side --------------------------------------------------------------------
    def replica_peers(self) -> list[str]:
        if self.copies <= 0:
            return []
        peers = self.q.peers()
        peers.sort(key=lambda p: _distance(self.me, p))
        return peers[: self.copies]

    async def replicate(self, rec: TaskRecord) -> int | None:
        """Copy a just-accepted task to the replica peers. One batch is in flight at a time and
        the next one collects everything accepted meanwhile (group commit). With `sync` the
        caller returns when its batch was delivered (or after REPLICATE_WAIT_S) and learns how
        many peers confirmed they hold it (0: none, e.g. a node alone); otherwise at once, None."""
        if self.copies <= 0 or rec.final or not self.q.peers():
            return 0 if self.sync else None
        self._batch.append(pack(rec))
        done = self._batch_done
        if done is None:
            done = self._batch_done = _Delivery()
        if not self._flushing:
            self._flushing = True
            self.q.spawn(self._flusher)
        if not self.sync:
            return None
        with trio.move_on_after(REPLICATE_WAIT_S):
            await done.event.wait()
        return done.held_by

    async def _flusher(self) -> None:
        """Send the collected records as a batch as soon as one of PUTS_IN_FLIGHT slots is free;
        while all are taken, the next batch keeps collecting (group commit)."""
        try:
            while self._batch:
                await self._put_slots.acquire()
                await trio.lowlevel.checkpoint()  # submits arriving meanwhile join this batch
                batch, done = self._batch, self._batch_done
                self._batch, self._batch_done = [], None
                self.q.spawn(self._deliver, self.replica_peers(), batch, done)
        finally:
            self._flushing = False

    async def _deliver(self, peers: list[str], batch: list[dict[str, Any]], done: _Delivery | None) -> None:
        try:
            failed = await self._send(peers, {"records": batch})
            if done is not None:
                done.held_by = len(peers) - len(failed)
        finally:
            if done is not None:
                done.event.set()
            self._put_slots.release()

    async def _send(self, peers: list[str], body: dict[str, Any]) -> list[str]:
        """r.put to each peer; returns the peers it failed for."""
        failed: list[str] = []

        async def one(pid: str) -> None:
            try:
                await self.q.call(pid, "r.put", body, REPLICATE_WAIT_S)
            except MCPPError as e:
                failed.append(pid)
                log.warning("replication failed", extra=kv(peer=pid, error=str(e)))

        async with trio.open_nursery() as n:
            for pid in peers:
                n.start_soon(one, pid)
        return failed

    async def _send_finals(self, peers: list[str], finals: list[str]) -> None:
        """Finished tasks, so the replicas forget them. Kept for the next flush while a replica
        that is still in the set did not get them (else it would adopt finished tasks)."""
        failed: set[str] = set()
        for i in range(0, len(finals), FINAL_BATCH):  # r.put reads at most FINAL_BATCH ids a message
            failed.update(await self._send(peers, {"records": [], "final": finals[i : i + FINAL_BATCH]}))
        if failed & set(self.replica_peers()):
            # bounded: what does not fit is caught by the replica's periodic r.finished check
            self._finals[:0] = finals[-MAX_RETRY_FINALS:]
            del self._finals[MAX_RETRY_FINALS:]

    def _on_final(self, rec: TaskRecord) -> None:
        if self.copies > 0 and rec.owner == self.me:
            self._finals.append(rec.task_id)

    async def _push_active(self, peers: list[str]) -> None:
        """Send every active record to replicas that joined the set."""
        recs = [pack(r) for r in self.q.store.active()]
        for i in range(0, len(recs), PUSH_BATCH):
            await self._send(peers, {"records": recs[i : i + PUSH_BATCH]})
        if recs:
            log.info("active tasks copied to new replicas", extra=kv(peers=peers, tasks=len(recs)))

    async def _reconcile(self, peer: str) -> None:
        """A peer (re)joined: drop my tasks that it adopted while I was away (a returning owner may
        have run some again meanwhile: they are dropped too). A node that holds no task asks
        nothing (a forming mesh opens many links, and the call counted as work on each)."""
        if self.q.store.is_empty():
            return
        try:
            ids = await self.q.call(peer, "r.adopted", {}, 10.0)
        except MCPPError:
            return
        if isinstance(ids, list) and ids:
            dropped = self.q.broker.forget([t for t in ids if isinstance(t, str)])
            log.warning("tasks adopted by a replica while this node was away: dropped here",
                        extra=kv(peer=peer, tasks=dropped))

    # ---- replica side ------------------------------------------------------------------
    async def _drop_finished(self, owner: str, older_than_s: float = 0.0) -> None:
        """Forget the copies of an owner's tasks that finished while their final batch could
        not reach this node (a partition, a restart); the owner says which. Run when the owner
        (re)joins, and every HELD_CHECK_S for copies not updated for as long."""
        if owner in self._checking:
            return
        self._checking.add(owner)
        try:
            ids = [r[0] for r in self.db.execute("SELECT task_id FROM replicas WHERE owner = ? AND received_at < ?",
                                                 (owner, time.time() - older_than_s))]
            for i in range(0, len(ids), PUSH_BATCH):
                done = await self.q.call(owner, "r.finished", {"ids": ids[i : i + PUSH_BATCH]}, 10.0)
                if isinstance(done, list) and done:
                    self.db.executemany("DELETE FROM replicas WHERE task_id = ? AND owner = ?",
                                        [(t, owner) for t in done if isinstance(t, str)])
                    log.info("dropped copies of tasks that finished meanwhile", extra=kv(owner=owner, tasks=len(done)))
        except MCPPError:
            pass
        finally:
            self._checking.discard(owner)

    async def _rpc_finished(self, peer: str, p: Any) -> Any:
        """Of these ids of mine, the ones a replica may forget: final here, or not mine any more."""
        ids = p.get("ids") if isinstance(p, dict) else None
        if not isinstance(ids, list) or len(ids) > PUSH_BATCH:
            raise ArgumentError("ids", f"must be a list of at most {PUSH_BATCH} task ids")
        out = []
        for t in ids:
            rec = self.q.store.get(t) if isinstance(t, str) else None
            if rec is None or rec.final:
                out.append(t)
        return out

    async def _rpc_put(self, peer: str, p: Any) -> Any:
        recs = p.get("records") if isinstance(p, dict) else None
        finals = p.get("final") if isinstance(p, dict) else None
        if not isinstance(recs, list) or (finals is not None and not isinstance(finals, list)):
            raise ArgumentError("records", "must be a list")
        rows = []
        t = time.time()
        for d in recs[:1000]:
            # the shape only: a copy is read in full (unpack) if it is ever adopted
            if not isinstance(d, dict) or d.keys() != _FIELDS or not isinstance(d["task_id"], str):
                raise ArgumentError("records", "each record must have exactly the task record's fields")
            if d["owner"] != peer:
                raise ArgumentError("records", "a peer may only replicate tasks it owns")
            rows.append((d["task_id"], peer, json.dumps(d, separators=(",", ":")), t))
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT OR REPLACE INTO replicas VALUES (?, ?, ?, ?)", rows)
            if finals:
                self.db.executemany("DELETE FROM replicas WHERE task_id = ? AND owner = ?",
                                    [(t, peer) for t in finals[:FINAL_BATCH] if isinstance(t, str)])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return {"stored": len(rows)}

    async def _rpc_adopted(self, peer: str, p: Any) -> Any:
        rows = self.db.execute("SELECT task_id FROM adopted WHERE from_owner = ?", (peer,)).fetchall()
        return [r[0] for r in rows]

    async def _rpc_sees(self, peer: str, p: Any) -> Any:
        owner = p.get("owner") if isinstance(p, dict) else None
        if not isinstance(owner, str):
            raise ArgumentError("owner", "must be a peer id string")
        return {"connected": owner in self.q.peers()}

    def held(self) -> dict[str, int]:
        rows = self.db.execute("SELECT owner, COUNT(*) FROM replicas GROUP BY owner").fetchall()
        return {str(o): int(n) for o, n in rows}

    def adopt(self, owner: str) -> int:
        """Take over the held tasks of an owner that is gone."""
        rows = self.db.execute("SELECT record FROM replicas WHERE owner = ?", (owner,)).fetchall()
        recs = []
        for (text,) in rows:
            try:
                recs.append(unpack(json.loads(text)))
            except (ArgumentError, ValueError):
                continue
        adopted = self.q.broker.adopt(recs)
        n = len(adopted)
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT OR REPLACE INTO adopted VALUES (?, ?, ?)",
                                [(r.task_id, owner, time.time()) for r in recs])
            self.db.execute("DELETE FROM replicas WHERE owner = ?", (owner,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.adopted_count += n
        log.warning("adopted the tasks of a lost owner", extra=kv(owner=owner, tasks=n))
        if adopted and self.replica_peers():  # they are mine now: my replicas hold them too
            self.q.spawn(self._send, self.replica_peers(), {"records": [pack(r) for r in adopted]})
        return n

    # ---- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await trio.sleep(CHECK_EVERY_S if not self._finals else FINAL_FLUSH_S)
            try:
                await self._tick()
            except MCPPError as e:
                log.warning("replica tick failed", extra=kv(error=str(e)))

    async def _tick(self) -> None:
        peers = self.replica_peers()
        if self._finals and peers:
            finals, self._finals = self._finals, []
            self.q.spawn(self._send_finals, peers, finals)
        new = [p for p in peers if p not in self._last_set]
        if new:
            self.q.spawn(self._push_active, new)
        self._last_set = tuple(peers)
        connected = set(self.q.peers())
        mono = time.monotonic()
        if mono - self._last_held_check >= HELD_CHECK_S:
            self._last_held_check = mono
            for owner in self.held():
                if owner in connected:
                    self.q.spawn(self._drop_finished, owner, HELD_CHECK_S)
        for owner in self.held():
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
                self.adopt(owner)
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

