"""`mcpp chaos`: a Jepsen-style fault-injection checker.

It starts a cluster with the harness, keeps a steady load of tasks and diamond workflows on
random nodes through MCP, and meanwhile a nemesis injects faults into random nodes, one at a
time: `kill -9` (then a restart), `kill -9` for good (its data removed, never restarted; never
the bootstrap, and never below MIN_NODES), a fresh node joining, a graceful restart, a pause
past the task lease (SIGSTOP/SIGCONT, or `docker pause`), and with the Docker backend a network
partition (`docker network disconnect` for a while, then reconnect). Every accepted submit and every
observed completion is recorded. After the load stops and every node runs again, it checks:

- every accepted task reaches a final state, read through the nodes still in the mesh (else it
  is *lost*; a task id the mesh no longer knows is lost too, e.g. one whose owner was lost for
  good with no replica holding it);
- no task is completed twice in the record (the owner's attempt history has at most one
  successful attempt, and every observation of its result, from different nodes, agrees);
- every workflow is final and consistent with its graph (completed: each step's result is what
  its inputs imply; failed/cancelled: it names the step that failed);
- no node is left wedged (each answers /readyz and runs a fresh task end to end).

It writes DIR/verdict.json = {accepted, completed, retried, lost, duplicated, faults, ok, ...}
and DIR/record.json (every submit and observation), keeps each node's log in DIR/logs/, and
prints the verdict.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from mcpp.errors import HarnessError
from mcpp.mcp.client import ToolCallError, call_tool

__all__ = ["run", "ChaosConfig", "run_chaos"]

log = logging.getLogger("mcpp.chaos")
console = Console()
FINAL = {"completed", "failed", "cancelled", "dead_lettered"}
WF_FINAL = {"completed", "failed", "cancelled"}
LOG_LINES_KEPT = 20_000
INJECTED = ("kill -9", "restart (SIGTERM)", "pause", "partition", "kill -9 for good", "join")
MIN_NODES = 3  # a permanent kill never leaves fewer nodes than this
CALL_TIMEOUT_S = 5.0  # a call to a paused node must not stall the load


@dataclass(frozen=True)
class ChaosConfig:
    nodes: int = 5
    duration_s: float = 60.0
    backend: str = "process"
    out: Path = Path("chaos-results")
    seed: int | None = None
    clients: int = 4  # concurrent load loops
    fault_every_s: float = 4.0
    lease_s: float = 1.5
    settle_s: float = 90.0  # after the load: how long accepted tasks may take to become final
    max_tasks: int = 5000  # load is bounded in count as well as in time


@dataclass
class Record:
    started: float = field(default_factory=time.monotonic)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # task id -> submit facts
    workflows: dict[str, dict[str, Any]] = field(default_factory=dict)
    observations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)
    submit_failures: int = 0

    def t(self) -> float:
        return round(time.monotonic() - self.started, 3)


def diamond(k: int) -> list[dict[str, Any]]:
    """A -> (B, C) -> D; D's result must be {"b": k, "c": k}."""
    return [
        {"id": "a", "task_type": "echo", "payload": {"v": k}},
        {"id": "b", "task_type": "echo", "depends_on": ["a"], "payload": {"$ref": "steps.a.result.v"}},
        {"id": "c", "task_type": "echo", "depends_on": ["a"], "payload": {"w": {"$ref": "steps.a.result.v"}}},
        {"id": "d", "task_type": "echo", "depends_on": ["b", "c"],
         "payload": {"b": {"$ref": "steps.b.result"}, "c": {"$ref": "steps.c.result.w"}}},
    ]


class Chaos:
    def __init__(self, cfg: ChaosConfig, cluster: Any) -> None:
        self.cfg = cfg
        self.c = cluster
        self.rng = random.Random(cfg.seed)
        self.rec = Record()
        self.stop_load = trio.Event()
        self.down: set[str] = set()  # nodes the nemesis has faulted right now

    # ---- calls -------------------------------------------------------------------------
    async def _call(self, name: str, tool: str, args: dict[str, Any], timeout_s: float = CALL_TIMEOUT_S) -> Any:
        url = self.c.record(name).mcp_url
        with trio.fail_after(timeout_s):
            return await call_tool(url, tool, args, token=self.c.token)

    def _names(self) -> list[str]:
        return [n.name for n in self.c.nodes]

    # ---- load --------------------------------------------------------------------------
    async def _client(self, idx: int) -> None:
        n = 0
        while not self.stop_load.is_set() and len(self.rec.accepted) < self.cfg.max_tasks:
            name = self.rng.choice(self._names())
            n += 1
            k = idx * 1_000_000 + n
            roll = self.rng.random()
            try:
                if roll < 0.1:
                    r = await self._call(name, "workflow_submit", {"name": f"chaos-{k}", "steps": diamond(k)})
                    self.rec.workflows[r["workflow_id"]] = {"k": k, "node": name, "t": self.rec.t()}
                else:
                    kind, payload = ("sleep", {"seconds": 0.2}) if roll < 0.3 else ("echo", {"k": k})
                    r = await self._call(name, "task_submit", {"task_type": kind, "payload": payload})
                    self.rec.accepted[r["task_id"]] = {"node": name, "t": self.rec.t(), "type": kind,
                                                       "payload": payload, "replicas": r.get("replicas")}
            except (ToolCallError, trio.TooSlowError, OSError, BaseExceptionGroup, httpx.HTTPError, HarnessError):
                self.rec.submit_failures += 1  # not accepted (or the node was just lost): nothing is owed
            await trio.sleep(0.02)

    # ---- nemesis -----------------------------------------------------------------------
    def _fault(self, kind: str, name: str, **extra: Any) -> None:
        self.rec.faults.append({"t": self.rec.t(), "kind": kind, "node": name, **extra})
        log.info("fault", extra={"kind": kind, "node": name})

    async def _nemesis(self) -> None:
        kinds = ["kill", "pause", "restart", "lose", "join"] + (["partition"] if self.cfg.backend == "docker" else [])
        await trio.sleep(min(2.0, self.cfg.fault_every_s))
        order: list[str] = []
        while not self.stop_load.is_set():
            if not order:  # every kind once per round, in a random order: a short run sees them all
                order = self.rng.sample(kinds, len(kinds))
            kind = order.pop()
            if kind == "lose" and len(self._names()) <= MIN_NODES:
                kind = "join"
            # the bootstrap is a well-known, stable identity: it is never lost for good
            name = self.rng.choice([n for n in self._names() if kind != "lose" or n != "node-0"])
            self.down.add(name)
            try:
                await self._inject(kind, name)
            finally:
                self.down.discard(name)
            with trio.move_on_after(self.rng.uniform(0.5, 1.5) * self.cfg.fault_every_s):
                await self.stop_load.wait()

    async def _inject(self, kind: str, name: str) -> None:
        c = self.c
        run = trio.to_thread.run_sync
        if kind == "lose":
            self._fault("kill -9 for good", name, permanent=True, data="removed")
            await run(c.remove, name)
        elif kind == "join":
            rec = await run(c.add_node)
            self._fault("join", rec.name, fresh=True, peer_id=rec.peer_id)
            await self._call(rec.name, "worker_register", {"capabilities": ["echo", "sleep"], "max_concurrent": 8}, 15)
        elif kind == "kill":
            self._fault("kill -9", name)
            await run(c.kill, name, signal.SIGKILL)
            await trio.sleep(self.rng.uniform(1.0, 3.0))
            await run(c.restart, name)
            self._fault("restarted", name)
        elif kind == "restart":
            self._fault("restart (SIGTERM)", name)
            await run(c.kill, name, signal.SIGTERM)
            await run(c.restart, name)
            self._fault("restarted", name)
        elif kind == "pause":
            hold = round(self.rng.uniform(2.0, 3.0) * self.cfg.lease_s, 2)
            self._fault("pause", name, seconds=hold)
            if self.cfg.backend == "docker":
                await run(c.pause, name)
                await trio.sleep(hold)
                await run(c.unpause, name)
            else:
                await run(c.kill, name, signal.SIGSTOP)
                await trio.sleep(hold)
                await run(c.kill, name, signal.SIGCONT)
            self._fault("resumed", name)
        elif kind == "partition":
            hold = round(self.rng.uniform(3.0, 6.0), 2)
            self._fault("partition", name, seconds=hold)
            await run(c.disconnect, name)
            await trio.sleep(hold)
            await run(c.connect, name)
            self._fault("healed", name)

    # ---- checking ----------------------------------------------------------------------
    async def _heal(self) -> None:
        for name in self._names():
            if not await trio.to_thread.run_sync(self.c.is_running, name):
                await trio.to_thread.run_sync(self.c.restart, name)
                self._fault("restarted (heal)", name)
        await trio.to_thread.run_sync(self.c.wait_formed, 90.0)

    async def _observe(self, tid: str) -> dict[str, Any] | None:
        """The task's result read through a random node (forwarded to its owner)."""
        for _ in range(3):
            name = self.rng.choice(self._names())
            try:
                r = await self._call(name, "task_result", {"task_id": tid, "include_history": True}, 10.0)
            except ToolCallError as e:
                if "no task" in str(e):
                    return {"status": "unknown", "error": str(e), "via": name}
                continue
            except (trio.TooSlowError, OSError, BaseExceptionGroup, httpx.HTTPError):
                continue
            obs = {"status": r["status"], "result": r.get("result"), "worker": r.get("worker"), "via": name,
                   "ok_attempts": sum(1 for h in r.get("history") or [] if h.get("outcome") == "ok"),
                   "attempts": len(r.get("history") or [])}
            self.rec.observations.setdefault(tid, []).append(obs)
            return obs
        return None

    async def _settle(self) -> dict[str, dict[str, Any]]:
        """Poll every accepted task until final (or the settle time is over); read each final one
        twice, through different nodes."""
        final: dict[str, dict[str, Any]] = {}
        deadline = trio.current_time() + self.cfg.settle_s
        pending = set(self.rec.accepted)
        while pending and trio.current_time() < deadline:
            limiter = trio.CapacityLimiter(8)

            async def one(tid: str) -> None:
                async with limiter:
                    obs = await self._observe(tid)
                if obs is not None and obs["status"] in FINAL:
                    final[tid] = obs
                    pending.discard(tid)

            async with trio.open_nursery() as nursery:
                for tid in list(pending):
                    nursery.start_soon(one, tid)
            if pending:
                await trio.sleep(1.0)
        async with trio.open_nursery() as nursery:  # a second look at every final task
            limiter = trio.CapacityLimiter(8)

            async def again(tid: str) -> None:
                async with limiter:
                    await self._observe(tid)

            for tid in final:
                nursery.start_soon(again, tid)
        return final

    async def _check_workflows(self) -> dict[str, Any]:
        done: dict[str, Any] = {}
        bad: list[dict[str, Any]] = []
        deadline = trio.current_time() + self.cfg.settle_s
        for wid, facts in self.rec.workflows.items():
            r: dict[str, Any] = {"status": "unknown", "error": "not read"}
            while True:  # at least one reading each, more until final or the settle time is over
                try:
                    r = await self._call(self.rng.choice(self._names()), "workflow_result",
                                         {"workflow_id": wid, "wait": True, "timeout_s": 10}, 15.0)
                except (ToolCallError, trio.TooSlowError, OSError, BaseExceptionGroup, httpx.HTTPError) as e:
                    r = {"status": "unknown", "error": str(e)}
                if r["status"] in WF_FINAL or trio.current_time() >= deadline:
                    break
                await trio.sleep(1)
            status = r["status"]
            done[status] = done.get(status, 0) + 1
            k = facts["k"]
            if status == "completed":
                want = {"a": {"v": k}, "b": k, "c": {"w": k}, "d": {"b": k, "c": k}}
                got = {s: r["results"].get(s) for s in want}
                if got != want:
                    bad.append({"workflow_id": wid, "why": "results do not follow the graph", "got": got})
            elif status in ("failed", "cancelled"):
                if not r.get("errors"):
                    bad.append({"workflow_id": wid, "why": f"{status} without naming the failed step"})
            else:
                bad.append({"workflow_id": wid, "why": f"not final: {status}", "detail": r.get("error")})
        return {"submitted": len(self.rec.workflows), "by_status": done, "inconsistent": bad}

    async def _wedged(self) -> list[str]:
        wedged = []
        for name in self._names():
            base = self.c.record(name).base_url
            try:
                ready = await trio.to_thread.run_sync(lambda: httpx.get(base + "/readyz", timeout=5).status_code)
                s = await self._call(name, "task_submit", {"task_type": "echo", "payload": {"probe": name}}, 10)
                r = await self._call(name, "task_result", {"task_id": s["task_id"], "wait": True, "timeout_s": 20}, 25)
                if ready != 200 or r["status"] != "completed":
                    wedged.append(name)
            except (ToolCallError, trio.TooSlowError, OSError, BaseExceptionGroup, httpx.HTTPError):
                wedged.append(name)
        return wedged

    def verdict(self, final: dict[str, dict[str, Any]], workflows: dict[str, Any], wedged: list[str]) -> dict[str, Any]:
        lost = sorted(t for t in self.rec.accepted if t not in final)
        duplicated = []
        for tid, obs in self.rec.observations.items():
            finals = [o for o in obs if o["status"] in FINAL]
            if any(o["ok_attempts"] > 1 for o in finals):
                duplicated.append(tid)
            elif len({json.dumps([o["status"], o["result"], o["worker"]], sort_keys=True) for o in finals}) > 1:
                duplicated.append(tid)  # two readings disagree: the record changed after it was final
        statuses: dict[str, int] = {}
        for last in final.values():
            statuses[last["status"]] = statuses.get(last["status"], 0) + 1
        retried = sum(1 for o in final.values() if o["attempts"] > 1)
        faults = [f for f in self.rec.faults if f["kind"] in INJECTED]
        ok = not lost and not duplicated and not wedged and not workflows["inconsistent"]
        return {
            "ok": ok, "accepted": len(self.rec.accepted), "completed": statuses.get("completed", 0),
            "final_by_status": statuses, "retried": retried, "lost": len(lost), "duplicated": len(duplicated),
            "lost_ids": lost[:50], "duplicated_ids": duplicated[:50], "submit_failures": self.rec.submit_failures,
            "workflows": workflows, "wedged": wedged, "faults_injected": len(faults), "faults": self.rec.faults,
            "lost_for_good": sum(1 for f in faults if f.get("permanent")),
            "fresh_joins": sum(1 for f in faults if f["kind"] == "join"),
            "acknowledged_without_replica": sum(1 for a in self.rec.accepted.values() if a.get("replicas") == 0),
            "nodes": self.cfg.nodes, "backend": self.cfg.backend, "duration_s": self.cfg.duration_s,
            "seed": self.cfg.seed,
        }

    # ---- the run -----------------------------------------------------------------------
    async def main(self, live: Live | None) -> dict[str, Any]:
        for n in self.c.nodes:  # every node serves the task types of the load
            await self._call(n.name, "worker_register", {"capabilities": ["echo", "sleep"], "max_concurrent": 8}, 15)
        async with trio.open_nursery() as nursery:
            for i in range(self.cfg.clients):
                nursery.start_soon(self._client, i)
            nursery.start_soon(self._nemesis)
            end = trio.current_time() + self.cfg.duration_s
            while trio.current_time() < end and len(self.rec.accepted) < self.cfg.max_tasks:
                if live is not None:
                    live.update(self._table("load + faults"))
                await trio.sleep(0.5)
            self.stop_load.set()
        if live is not None:
            live.update(self._table("healing and settling"))
        await self._heal()
        final = await self._settle()
        workflows = await self._check_workflows()
        wedged = await self._wedged()
        return self.verdict(final, workflows, wedged)

    def _table(self, phase: str) -> Table:
        t = Table(title=f"mcpp chaos: {phase} ({self.rec.t():.0f} s)")
        for col in ("accepted tasks", "workflows", "submit failures", "faults", "last fault"):
            t.add_column(col)
        last = self.rec.faults[-1] if self.rec.faults else {}
        t.add_row(str(len(self.rec.accepted)), str(len(self.rec.workflows)), str(self.rec.submit_failures),
                  str(len(self.rec.faults)), f"{last.get('kind', '-')} {last.get('node', '')}")
        return t


def run_chaos(cfg: ChaosConfig, show: bool = True) -> dict[str, Any]:
    """Run one chaos session; writes verdict.json and record.json into cfg.out; returns the verdict."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    node_args = ["--lease-s", str(cfg.lease_s), "--log-level", "warning"]
    cluster: Any
    if cfg.backend == "docker":
        from mcpp.harness.docker import DockerCluster

        cluster = DockerCluster(cfg.nodes, cfg.out / "cluster", env={"MCPP_LEASE_S": str(cfg.lease_s)},
                                formation_timeout_s=120)
    elif cfg.backend == "process":
        from mcpp.harness import ProcessCluster

        cluster = ProcessCluster(cfg.nodes, cfg.out / "cluster", node_args=node_args, formation_timeout_s=90)
    else:
        raise HarnessError(f"--backend must be process or docker, not {cfg.backend!r}")
    t0 = time.monotonic()
    with cluster:
        chaos = Chaos(cfg, cluster)
        if show:
            with Live(chaos._table("starting"), console=console, refresh_per_second=2, transient=True) as live:
                verdict = trio.run(chaos.main, live)
        else:
            verdict = trio.run(chaos.main, None)
        record = {"accepted": chaos.rec.accepted, "workflows": chaos.rec.workflows,
                  "observations": chaos.rec.observations, "faults": chaos.rec.faults}
        logs = cfg.out / "logs"  # kept for the post-mortem (containers are removed on exit)
        logs.mkdir(exist_ok=True)
        for n in cluster.nodes:
            (logs / f"{n.name}.log").write_text(cluster.logs(n.name, lines=LOG_LINES_KEPT))
    verdict["wall_s"] = round(time.monotonic() - t0, 1)
    verdict["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    (cfg.out / "verdict.json").write_text(json.dumps(verdict, indent=2))
    (cfg.out / "record.json").write_text(json.dumps(record, indent=1))
    return verdict


def run(args: argparse.Namespace) -> int:
    cfg = ChaosConfig(nodes=args.nodes, duration_s=args.duration, backend=args.backend, out=Path(args.out),
                      seed=args.seed)
    if cfg.nodes < 3:
        raise HarnessError("--nodes must be at least 3 (faults need survivors)")
    if not 5 <= cfg.duration_s <= 3600:
        raise HarnessError("--duration must be between 5 and 3600 seconds")
    v = run_chaos(cfg)
    wf = v["workflows"]
    console.print(
        f"[bold]{'OK' if v['ok'] else 'FAILED'}[/]: {v['accepted']} tasks accepted, {v['completed']} completed "
        f"({v['final_by_status']}), {v['retried']} retried, [bold]{v['lost']} lost, {v['duplicated']} duplicated[/]; "
        f"{wf['submitted']} workflows {wf['by_status']}, {len(wf['inconsistent'])} inconsistent; "
        f"{v['faults_injected']} faults injected "
        f"({', '.join(sorted({f['kind'] for f in v['faults'] if f['kind'] in INJECTED}))}); wedged nodes: {v['wedged'] or 'none'}; "
        f"{v['submit_failures']} submits refused or timed out during faults (not accepted, not owed). "
        f"Wrote {cfg.out / 'verdict.json'}", highlight=False)
    return 0 if v["ok"] else 1
