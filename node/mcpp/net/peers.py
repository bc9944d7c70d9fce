"""The peer table: what this node knows and has measured about every other node.

Formulas (documented in the README):
- rtt_p50_ms / rtt_p99_ms: over the last `RTT_WINDOW` pings (perf_counter_ns, sub-ms resolution).
- reliability = calls_ok / (calls_ok + calls_failed) over this node's outbound RPCs to the peer (1.0 if none).
- quality = reliability * 1 / (1 + rtt_p50_ms / 10): 1.0 for a perfect local peer, 0.5 at 10 ms.
- reputation: starts at 0.5; every outcome x in {0, 1} moves it by EWMA: rep = 0.9 * rep + 0.1 * x.
  Pings and RPC outcomes feed it now; task outcomes will feed it later.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PeerRecord", "PeerTable", "RTT_WINDOW", "percentile"]

RTT_WINDOW = 100
REPUTATION_START = 0.5
REPUTATION_ALPHA = 0.1


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


@dataclass
class PeerRecord:
    peer_id: str
    multiaddrs: list[str] = field(default_factory=list)
    role: str | None = None
    capabilities: list[str] = field(default_factory=list)
    mcp_url: str | None = None
    connected: bool = False
    connected_since: float | None = None  # wall clock
    last_seen: float | None = None  # wall clock of the last message from it
    source: str = "dht"
    persistent: bool = False
    reputation: float = REPUTATION_START
    rtt_ms: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=RTT_WINDOW))
    ping_failures: int = 0
    last_ping_sent: float = 0.0  # monotonic
    hello_done: bool = False
    worker: dict[str, Any] | None = None  # its task worker as it advertised it (hello / w.update)

    def add_rtt(self, ms: float) -> None:
        self.rtt_ms.append((time.time(), ms))
        self.last_seen = time.time()
        self.ping_failures = 0
        self.feed_reputation(True)

    def feed_reputation(self, ok: bool) -> None:
        self.reputation = (1 - REPUTATION_ALPHA) * self.reputation + REPUTATION_ALPHA * (1.0 if ok else 0.0)

    def rtt_p50(self) -> float | None:
        vals = [v for _, v in self.rtt_ms]
        return statistics.median(vals) if vals else None

    def rtt_p99(self) -> float | None:
        return percentile([v for _, v in self.rtt_ms], 99)

    def latest_rtt(self) -> float | None:
        return self.rtt_ms[-1][1] if self.rtt_ms else None

    def summary(self) -> dict[str, Any]:
        lat = self.latest_rtt()
        return {
            "peer_id": self.peer_id,
            "role": self.role,
            "multiaddrs": list(self.multiaddrs),
            "connected": self.connected,
            "latency_ms": None if lat is None else round(lat, 3),
            "last_seen": self.last_seen,
            "capabilities": list(self.capabilities),
            "reputation": round(self.reputation, 4),
        }


def quality(reliability: float, rtt_p50_ms: float | None) -> float | None:
    if rtt_p50_ms is None:
        return None
    return round(reliability / (1 + rtt_p50_ms / 10), 4)


class PeerTable:
    """Peers by id. Not thread-safe: only the node's trio loop touches it."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerRecord] = {}

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._peers.get(peer_id)

    def upsert(self, peer_id: str, **fields: Any) -> PeerRecord:
        rec = self._peers.get(peer_id)
        if rec is None:
            rec = self._peers[peer_id] = PeerRecord(peer_id=peer_id)
        for k, v in fields.items():
            if v is not None:
                setattr(rec, k, v)
        return rec

    def remove(self, peer_id: str) -> PeerRecord | None:
        return self._peers.pop(peer_id, None)

    def all(self) -> list[PeerRecord]:
        return list(self._peers.values())

    def connected(self) -> list[PeerRecord]:
        return [p for p in self._peers.values() if p.connected]

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)
