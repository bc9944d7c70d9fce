"""Membership beyond this machine, by simulation: 1,000 and 10,000 nodes.

The node's own membership rules (`MemberView` of node/membership.py: apply, suspect, push
batches, push-pull) run unchanged on a simulated transport with a virtual clock: an overlay of
the configured degree, per-message latency, and message loss. What the node's driver does
(node/gossip.py) is mirrored with its own constants: a push batch every GOSSIP_S, a sync with a
random neighbour every SYNC_S, a broken link seen within the watch period and probed before it
is suspected.

One event is followed through the whole mesh at a time (a join, or a kill -9), so each node's
view holds only what the event is about: that keeps 10,000 views in memory; the cost of the
periodic sync, which carries the whole view, is reported separately (it grows with N).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import random
from dataclasses import dataclass
from typing import Any

from mcpp.node.membership import GOSSIP_S, SUSPECT_MIN_S, SYNC_S, Member, MemberView

__all__ = ["SimResult", "simulate", "PING_S", "DETECT_S", "MEMBER_BYTES"]

PING_S = 2.0  # neighbours ping each other (connections.py)
DETECT_S = 0.25 + 0.05  # a closed socket seen by the watch loop, then a failed direct + indirect probe
MEMBER_BYTES = 330  # one member's record in a sync, as JSON (measured on a node: peer id, address, worker)


@dataclass(frozen=True)
class SimResult:
    nodes: int
    degree: int
    loss: float
    event: str
    t50_s: float | None  # virtual seconds until half of the nodes knew
    t999_s: float | None  # until 99.9 % knew (None: not within the horizon)
    reached: float  # fraction that knew at the end
    messages_per_node: float  # membership messages sent per node for this event
    bytes_per_node: float
    dead_at_999_s: float | None  # failure: when 99.9 % have it dead (suspicion timeout included)
    steady_msgs_per_node_s: float  # pings + syncs, per node per second, with no event
    steady_bytes_per_node_s: float  # of which the sync's whole-view payload grows with N


def _overlay(n: int, degree: int, rng: random.Random) -> list[list[int]]:
    """A connected random overlay of mean degree ~`degree` (a ring plus random chords)."""
    adj: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        adj[i].add((i + 1) % n)
        adj[(i + 1) % n].add(i)
    for i in range(n):
        while len(adj[i]) < degree:
            j = rng.randrange(n)
            if j != i:
                adj[i].add(j)
                adj[j].add(i)
    return [sorted(a) for a in adj]


def simulate(n: int, event: str = "join", degree: int = 8, loss: float = 0.0, seed: int = 1,
             horizon_s: float = 60.0) -> SimResult:
    """Follow one join or one failure through an n-node mesh; see the module docstring."""
    if event not in ("join", "failure"):
        raise ValueError("event: join or failure")
    logging.getLogger("mcpp.membership").setLevel(logging.WARNING)
    rng = random.Random(seed)
    adj = _overlay(n, degree, rng)
    names = [f"n{i}" for i in range(n)]
    index = {name: i for i, name in enumerate(names)}
    views = [MemberView(Member(names[i], 1)) for i in range(n)]
    subject = n - 1  # the joining node, or the one that dies
    sid = names[subject]
    for v in views:
        v.take_outbox(["-"])  # each node's own announcement is old news
    if event == "failure":
        for i, v in enumerate(views):
            if i != subject:
                v.apply(Member(sid, 1), None)
                v.take_outbox(["-"])
    alive = [True] * n
    knows = [False] * n  # the event has reached this node
    knows[subject] = event == "join"
    first_known: list[float] = []
    sent = 0
    sent_bytes = 0
    queue: list[tuple[float, int, str, Any]] = []
    seq = 0

    def at(t: float, kind: str, arg: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(queue, (t, seq, kind, arg))

    def latency() -> float:
        return 0.0005 + rng.expovariate(1 / 0.002)  # 0.5 ms plus ~2 ms: a LAN

    def reached(i: int, t: float) -> None:
        if not knows[i] and i != subject:
            knows[i] = True
            first_known.append(t)

    def check(i: int, t: float) -> None:
        m = views[i].get(sid)
        if event == "join" and m is not None and m.live:
            reached(i, t)
        if event == "failure" and m is not None and (not m.live or m.state == "suspect"):
            reached(i, t)

    for i in range(n):
        at(rng.random() * GOSSIP_S, "tick", i)
        at(rng.random() * SYNC_S, "sync", i)
    def about_subject(i: int) -> list[dict[str, Any]]:
        # the part of a sync that concerns the event (the rest of the view is steady-state cost)
        return [u for u in views[i].snapshot() if u["id"] == sid]

    if event == "join":
        for j in adj[subject]:  # its first links: a push-pull each way
            at(latency(), "sync_msg", (subject, j, about_subject(subject)))
    else:
        alive[subject] = False
        for j in adj[subject]:
            at(DETECT_S + rng.random() * 0.1, "suspect", j)

    target = math.ceil(0.999 * (n - 1))
    t = 0.0
    while queue and t < horizon_s and len(first_known) < target:
        t, _, kind, arg = heapq.heappop(queue)
        if kind == "tick":
            i = arg
            if alive[i]:
                nbrs = [names[j] for j in adj[i] if alive[j] or event == "join"]
                for peer, updates in views[i].take_outbox(nbrs).items():
                    sent += 1
                    sent_bytes += len(json.dumps(updates))
                    if rng.random() >= loss:
                        at(t + latency(), "push", (i, index[peer], updates))
                at(t + GOSSIP_S, "tick", i)
        elif kind == "push":
            src, dst, updates = arg
            if alive[dst]:
                views[dst].receive_push(names[src], updates)
                check(dst, t)
        elif kind == "sync":
            i = arg
            if alive[i]:
                j = rng.choice(adj[i])
                if alive[j]:
                    at(t + latency(), "sync_msg", (i, j, about_subject(i)))
                at(t + SYNC_S, "sync", i)
        elif kind == "sync_msg":
            src, dst, members = arg
            sent += 1
            sent_bytes += len(json.dumps(members))
            if alive[dst] and rng.random() >= loss:
                views[dst].receive_sync(names[src], members)
                check(dst, t)
                answer = about_subject(dst)
                sent += 1
                sent_bytes += len(json.dumps(answer))
                if rng.random() >= loss:
                    views[src].receive_sync(names[dst], answer)
                    check(src, t)
        elif kind == "suspect":
            j = arg
            views[j].suspect(sid)
            check(j, t)

    first_known.sort()

    def quantile(q: float) -> float | None:
        k = math.ceil(q * (n - 1))
        return round(first_known[k - 1], 3) if 0 < k <= len(first_known) else None

    t999 = quantile(0.999)
    suspicion = SUSPECT_MIN_S * max(1.0, math.log10(n))
    sync_bytes = 2 * n * MEMBER_BYTES / SYNC_S  # a whole view each way, once per SYNC_S
    ping_msgs = 2 * degree / PING_S  # a ping and its answer per neighbour
    return SimResult(
        nodes=n, degree=degree, loss=loss, event=event, t50_s=quantile(0.5), t999_s=t999,
        reached=round(len(first_known) / (n - 1), 5), messages_per_node=round(sent / n, 2),
        bytes_per_node=round(sent_bytes / n, 1),
        dead_at_999_s=None if event != "failure" or t999 is None else round(t999 + suspicion, 3),
        steady_msgs_per_node_s=round(ping_msgs + 2 / SYNC_S, 2),
        steady_bytes_per_node_s=round(ping_msgs * 60 + sync_bytes, 1),
    )
