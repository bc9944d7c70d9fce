"""`mcpp cluster up|status|down`: the harness from a shell, with rich progress and tables."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mcpp.errors import HarnessError
from mcpp.harness.process import ProcessCluster, node_status, read_cluster_file

__all__ = ["run", "nodes_table"]

console = Console(stderr=False)


def nodes_table(nodes: list[dict[str, Any]], live: bool = True, token: str | None = None) -> Table:
    t = Table(title="mcpp mesh")
    for col in ("name", "role", "peer id", "libp2p", "mcp url", "pid", "links", "members", "state"):
        t.add_column(col)
    for n in nodes:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        st = node_status(n["mcp_url"].rsplit("/mcp", 1)[0], 1.0, headers) if live else None
        peers = str(len(st["connected"])) if st else "-"
        members = str(len(st.get("members", []))) if st else "-"
        state = ("ready" if st.get("ready") else "joining") if st else "down"
        addr = n["multiaddrs"][0].split("/p2p/")[0] if n["multiaddrs"] else "-"
        t.add_row(n["name"], n["role"], n["peer_id"][-12:], addr, n["mcp_url"], str(n["pid"]), peers, members, state)
    return t


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _up(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise HarnessError("--nodes must be at least 1")
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster: Any
    if args.backend == "docker":
        from mcpp.harness.docker import DockerCluster

        cluster = DockerCluster(args.nodes, Path(args.dir), image=args.image, formation_timeout_s=args.timeout)
    else:
        cluster = ProcessCluster(args.nodes, Path(args.dir), args.base_port, formation_timeout_s=args.timeout)
    try:
        with Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total} nodes see all peers"), TimeElapsedColumn(),
            console=console, transient=True,
        ) as progress:
            task = progress.add_task(f"starting {args.nodes} nodes", total=args.nodes)

            def on_progress(done: int, total: int, phase: str) -> None:
                progress.update(task, completed=done, total=total, description=f"{phase} mesh")

            cluster.progress = on_progress
            with cluster:
                progress.stop()
                data = cluster.to_json()
                console.print(nodes_table(data["nodes"], token=cluster.token))
                console.print(
                    f"mesh of {args.nodes} formed in [bold]{cluster.formed_in_s:.2f} s[/]; "
                    f"wrote {cluster.cluster_file()}; Ctrl-C or `mcpp cluster down --dir {args.dir}` stops it"
                )
                if cluster.token:
                    console.print(
                        "MCP needs the cluster's bearer token (in cluster.json, key [bold]token[/]; the mesh is a "
                        "private network keyed by a generated swarm key):\n"
                        f"  export MCPP_TOKEN=$(python3 -c \"import json;print(json.load(open('{cluster.cluster_file()}'))['token'])\")\n"
                        f"  mcpp task submit echo '{{\"hi\": 1}}' --url {data['nodes'][0]['mcp_url']}\n"
                        "  (any MCP client: header 'Authorization: Bearer $MCPP_TOKEN')", markup=True, highlight=False,
                    )
                while True:
                    time.sleep(3600)
    except _Stop as e:
        console.print(f"stopping the mesh ({e})")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    console.print("all nodes stopped")
    return 0


def _status(args: argparse.Namespace) -> int:
    data = read_cluster_file(args.dir)
    console.print(nodes_table(data["nodes"], token=data.get("token")))
    console.print(f"formed in {data['formed_in_s']} s; harness pid {data.get('harness_pid')}")
    return 0


def _ours(pid: int) -> bool:
    """Is pid still a process of this cluster (and not a reused pid)? Checked by its command line
    (`mcpp` nodes, the fork server tagged with the cluster dir, or `mcpp cluster up`)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "mcpp" in cmd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still "exists"; /proc tells
    with contextlib.suppress(OSError):
        if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
            return False
    return True


def _down(args: argparse.Namespace) -> int:
    data = read_cluster_file(args.dir)
    pids = [n["pid"] for n in data["nodes"] if _ours(n["pid"])]
    harness = data.get("harness_pid")
    if isinstance(harness, int) and not _ours(harness):
        harness = None
    if isinstance(harness, int) and _alive(harness):
        os.kill(harness, signal.SIGTERM)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    everyone = pids + ([harness] if isinstance(harness, int) else [])
    while any(_alive(p) for p in everyone) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in everyone if _alive(p)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    removed = 0
    if data.get("backend") == "docker" and isinstance(data.get("run_id"), str):
        from mcpp.harness.docker import reap

        removed = reap(data["run_id"])  # whatever the harness did not remove itself
    console.print(f"stopped {len(pids)} nodes" + (f" ({len(left)} needed SIGKILL)" if left else "")
                  + (f"; removed {removed} leftover container(s)" if removed else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    return {"up": _up, "status": _status, "down": _down}[args.cluster_command](args)
