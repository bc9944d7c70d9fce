"""Membership by gossip: every node learns every live member of the mesh, with constant cost per node.

State (SWIM, with Lifeguard-style suspicion): each member is `alive`, `suspect`, `dead` or `left`,
with an *incarnation* that only the member itself raises. A newer incarnation wins; at the same
incarnation `dead`/`left` beat `suspect`, which beats `alive`. A node that hears itself suspected or
declared dead refutes it with a higher incarnation. A node's first incarnation is its start time in
ms, so a restarted node is newer than anything said about its previous life.

Dissemination (over the bounded overlay of open connections, never to the whole mesh):
- `m.push` eager push: an update that changed this node's view is forwarded once to every
  neighbour but the one it came from, batched every GOSSIP_S. An update crosses the overlay in
  (diameter x GOSSIP_S); each node sends at most (degree x updates) messages.
- `m.sync` push-pull anti-entropy: the whole view, exchanged with every new neighbour and with
  one random neighbour every SYNC_S (repairs anything a closed connection dropped).
- `m.probe` indirect probe: when a connection to a member breaks, up to INDIRECT_PROBES
  neighbours are asked to reach it before it is suspected (a broken link is not a dead node).

Failure detection is done by neighbours only: they hold a connection to the member and ping it
(see connections.py); a member has `degree` neighbours, so it is watched whatever N is. A broken
connection whose member answers no direct or indirect probe makes it `suspect`; unless refuted
within the suspicion timeout (SUSPECT_MIN_S, longer in bigger meshes, as Lifeguard does) it is
`dead`. A node that stops cleanly pushes `left` about itself first.

Partitions: each side declares the other dead after the suspicion timeout. Dead members are kept
for DEAD_KEEP_S and one of them is re-dialed every RECONNECT_S; when the partition heals, that
dial and the push-pull that follows tell each side the other is alive (they refute, with newer
incarnations), and the views merge.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mcpp.log import kv

__all__ = ["Member", "MemberView", "STATES", "LIVE_STATES"]

log = logging.getLogger("mcpp.membership")

STATES = ("alive", "suspect", "dead", "left")
LIVE_STATES = frozenset({"alive", "suspect"})
_RANK = {"alive": 0, "suspect": 1, "dead": 2, "left": 2}
GOSSIP_S = 0.1
SYNC_S = 10.0
SUSPECT_MIN_S = 2.0
DEAD_KEEP_S = 600.0
RECONNECT_S = 10.0
INDIRECT_PROBES = 3
PROBE_TIMEOUT_S = 2.0  # a dead process refuses at once; this bounds a slow (loaded) one
MAX_UPDATES_PER_PUSH = 512
MAX_MEMBERS = 100_000


@dataclass
class Member:
    """One member as this node knows it."""

    peer_id: str
    incarnation: int
    state: str = "alive"
    addrs: tuple[str, ...] = ()
    role: str = "worker"
    capabilities: tuple[str, ...] = ()
    mcp_url: str | None = None
    worker: dict[str, Any] | None = None
    load: dict[str, Any] | None = None  # the node's queue and worker counts (gossiped, see queue/service.py)
    since: float = field(default_factory=time.monotonic)  # monotonic time of the last change
    suspect_until: float | None = None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def wire(self) -> dict[str, Any]:
        return {"id": self.peer_id, "inc": self.incarnation, "state": self.state, "addrs": list(self.addrs),
                "role": self.role, "caps": list(self.capabilities), "mcp": self.mcp_url, "worker": self.worker,
                "load": self.load}

    def supersedes(self, old: Member) -> bool:
        """Whether this news replaces what is known (SWIM's ordering)."""
        if self.incarnation != old.incarnation:
            return self.incarnation > old.incarnation
        return _RANK[self.state] > _RANK[old.state]


def parse_member(d: Any) -> Member | None:
    """A member from the wire, or None if it is malformed (anything from the network is checked)."""
    if not isinstance(d, dict):
        return None
    pid, inc, state = d.get("id"), d.get("inc"), d.get("state")
    if not isinstance(pid, str) or not 0 < len(pid) < 128 or state not in _RANK:
        return None
    if not isinstance(inc, int) or isinstance(inc, bool) or not 0 <= inc < 2**63:
        return None
    addrs = d.get("addrs")
    caps = d.get("caps")
    mcp = d.get("mcp")
    worker = d.get("worker")
    load = d.get("load")
    role = d.get("role")
    return Member(
        peer_id=pid, incarnation=inc, state=str(state),
        addrs=tuple(a for a in addrs[:32] if isinstance(a, str) and len(a) < 512) if isinstance(addrs, list) else (),
        role=role if isinstance(role, str) and len(role) < 32 else "worker",
        capabilities=tuple(c for c in caps[:256] if isinstance(c, str) and len(c) < 256) if isinstance(caps, list) else (),
        mcp_url=mcp if isinstance(mcp, str) and len(mcp) < 512 else None,
        worker=worker if isinstance(worker, dict) else None,
        load=load if isinstance(load, dict) else None,
    )


Send = Callable[[str, str, Any, float], Awaitable[Any]]


@dataclass(frozen=True)
class MembershipStats:
    alive: int
    suspect: int
    dead: int
    pushes_sent: int
    pushes_received: int
    updates_applied: int
    syncs: int
    refutes: int


class MemberView:
    """This node's view of the mesh's members, and the rules that change it.

    Pure state and decisions, no I/O: the node moves messages (`outbox`, `take_outbox`) and calls
    `apply`, `suspect`, `tick`; the same code runs on a simulated transport.
    """

    def __init__(self, me: Member) -> None:
        self.me = me
        self.members: dict[str, Member] = {}
        self._outbox: dict[str, tuple[dict[str, Any], str | None]] = {}  # peer id -> (update, heard from)
        self.pushes_sent = 0
        self.pushes_received = 0
        self.updates_applied = 0
        self.syncs = 0
        self.refutes = 0
        self.on_change: list[Callable[[Member], None]] = []
        # Lifeguard's local health multiplier: >= 1, set by the node from its own event loop's
        # lag; a node too busy to hear refutations in time waits that much longer to declare deaths
        self.health = 1.0
        self.announce(me)

    # ---- reading -----------------------------------------------------------------------
    def get(self, peer_id: str) -> Member | None:
        return self.members.get(peer_id)

    def live(self) -> list[Member]:
        """Members alive or suspect, this node excluded."""
        return [m for m in self.members.values() if m.live and m.peer_id != self.me.peer_id]

    def alive_ids(self) -> list[str]:
        return sorted(m.peer_id for m in self.members.values() if m.state == "alive" and m.peer_id != self.me.peer_id)

    def size(self) -> int:
        """Live members, this node included (what suspicion timeouts scale with)."""
        return 1 + len(self.live())

    def snapshot(self) -> list[dict[str, Any]]:
        return [m.wire() for m in self.members.values()]

    def digest(self) -> str:
        """Who is in the view, at which incarnation and state: two views with the same digest
        have nothing to tell each other (a sync then costs one small message each way)."""
        h = hashlib.blake2b(digest_size=16)
        for pid in sorted(self.members):
            m = self.members[pid]
            h.update(f"{pid} {m.incarnation} {m.state}\n".encode())
        return h.hexdigest()

    def statistics(self) -> MembershipStats:
        states = [m.state for pid, m in self.members.items() if pid != self.me.peer_id]
        return MembershipStats(states.count("alive"), states.count("suspect"),
                               states.count("dead") + states.count("left"), self.pushes_sent,
                               self.pushes_received, self.updates_applied, self.syncs, self.refutes)

    def suspicion_s(self) -> float:
        """Lifeguard's scaling: longer in bigger meshes, where news takes more hops, and on a
        node that is itself slow (`health`)."""
        return SUSPECT_MIN_S * max(1.0, math.log10(max(1, self.size()))) * self.health

    # ---- changing ----------------------------------------------------------------------
    def announce(self, me: Member) -> None:
        """This node's own record (new info raises the incarnation)."""
        self.me = me
        self.members[me.peer_id] = me
        self._queue(me, None)

    def update_self(self, **info: Any) -> bool:
        """This node's own info changed: a new incarnation carries it. Returns whether it changed."""
        old = self.me
        if old.state == "left":
            return False  # a node that said it leaves stays gone (its gossip loop runs on while it stops)
        new = Member(old.peer_id, old.incarnation, "alive", **{
            "addrs": old.addrs, "role": old.role, "capabilities": old.capabilities,
            "mcp_url": old.mcp_url, "worker": old.worker, "load": old.load, **info})
        if new.wire() == old.wire():
            return False
        new.incarnation = old.incarnation + 1
        self.announce(new)
        return True

    def apply(self, update: Member, heard_from: str | None) -> bool:
        """News from the network. Returns whether it changed this node's view (then it is
        forwarded to every neighbour but `heard_from`)."""
        me = self.me.peer_id
        if update.peer_id == me:
            if update.state != "alive" and update.incarnation >= self.me.incarnation:
                self.refutes += 1  # "you are suspect/dead": not so, here is a newer me
                log.info("refuting", extra=kv(state=update.state, incarnation=update.incarnation))
                refuted = Member(**{**self.me.__dict__, "incarnation": update.incarnation + 1, "since": time.monotonic()})
                self.announce(refuted)
                return True
            return False
        old = self.members.get(update.peer_id)
        if old is None:
            if not update.live or len(self.members) >= MAX_MEMBERS:
                return False  # news of the death of a stranger: nothing to forget
        elif not update.supersedes(old):
            return False
        update.since = time.monotonic()
        if update.state == "suspect":
            update.suspect_until = update.since + self.suspicion_s()
        self.members[update.peer_id] = update
        self.updates_applied += 1
        if old is None or old.state != update.state:
            log.info("member " + update.state, extra=kv(peer=update.peer_id, incarnation=update.incarnation,
                                                       was=old.state if old else None))
        if not (old is not None and load_only(old, update)):
            # a new load summary alone is not forwarded: its owner pushes it to its neighbours
            # and syncs carry it further; flooded, 50 busy nodes' summaries (one each per
            # LOAD_GOSSIP_S) saturated 2 cores and leases expired behind them
            self._queue(update, heard_from)
        for hook in self.on_change:
            hook(update)
        return True

    def suspect(self, peer_id: str) -> bool:
        """This node could not reach a member: suspect it (at the incarnation it knows)."""
        m = self.members.get(peer_id)
        if m is None or m.state != "alive" or peer_id == self.me.peer_id:
            return False
        return self.apply(Member(**{**m.__dict__, "state": "suspect"}), None)

    def confirm(self, peer_id: str, state: str = "dead") -> bool:
        m = self.members.get(peer_id)
        if m is None or not m.live:
            return False
        return self.apply(Member(**{**m.__dict__, "state": state}), None)

    def leave(self) -> None:
        """This node stops cleanly: tell the others before closing."""
        self.announce(Member(**{**self.me.__dict__, "state": "left", "incarnation": self.me.incarnation + 1}))

    def tick(self, now: float | None = None) -> list[str]:
        """Suspicions that ran out become deaths; old deaths are forgotten. Returns the ids declared dead."""
        now = time.monotonic() if now is None else now
        dead = []
        for m in list(self.members.values()):
            if m.state == "suspect" and m.suspect_until is not None and now >= m.suspect_until:
                if self.confirm(m.peer_id):
                    dead.append(m.peer_id)
            elif m.state in ("dead", "left") and now - m.since > DEAD_KEEP_S:
                del self.members[m.peer_id]
        return dead

    def recently_dead(self) -> list[Member]:
        return [m for m in self.members.values() if m.state == "dead"]

    # ---- messages ----------------------------------------------------------------------
    def _queue(self, m: Member, heard_from: str | None) -> None:
        self._outbox[m.peer_id] = (m.wire(), heard_from)

    def take_outbox(self, neighbours: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The batched pushes to send now: neighbour -> updates (never back to where one came from)."""
        if not self._outbox or not neighbours:
            return {}  # (kept until there is someone to tell)
        items = list(self._outbox.values())
        self._outbox.clear()
        out: dict[str, list[dict[str, Any]]] = {}
        for n in neighbours:
            ups = [u for u, src in items if src != n]
            if ups:
                out[n] = ups[:MAX_UPDATES_PER_PUSH]
        self.pushes_sent += len(out)
        return out

    def receive_push(self, sender: str, updates: Any) -> int:
        self.pushes_received += 1
        n = 0
        if isinstance(updates, list):
            for d in updates[:MAX_UPDATES_PER_PUSH]:
                m = parse_member(d)
                if m is not None and self.apply(m, sender):
                    n += 1
        return n

    def receive_sync(self, sender: str, members: Any) -> int:
        self.syncs += 1
        n = 0
        if isinstance(members, list):
            for d in members[:MAX_MEMBERS]:
                m = parse_member(d)
                if m is not None and self.apply(m, sender):
                    n += 1
        return n


def load_only(old: Member, new: Member) -> bool:
    """Whether `new` differs from `old` only in its incarnation and load summary."""
    a, b = old.wire(), new.wire()
    return a.get("load") != b.get("load") and all(a.get(k) == b.get(k) for k in a.keys() | b.keys()
                                                  if k not in ("inc", "load"))


def pick(rng: random.Random, items: list[str], k: int) -> list[str]:
    return rng.sample(items, min(k, len(items)))
