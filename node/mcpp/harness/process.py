"""Start, inspect, fault and stop N-node meshes. Tests and the CLI use this module.

`ClusterBackend` is the interface every backend implements (the process backend is here; a
Docker backend can sit behind the same interface). Backends are context managers that stop
everything they started, also when start-up fails half way.

The process backend runs 1 bootstrap + N-1 workers as OS processes on 127.0.0.1. Workers get
only the bootstrap's multiaddr. Children die with the harness (PR_SET_PDEATHSIG), so a killed
harness leaves no orphan nodes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from mcpp.net import identity
from mcpp.errors import HarnessError, NodeStartError

__all__ = [
    "NodeRecord",
    "ClusterBackend",
    "ProcessCluster",
    "local_cluster",
    "read_cluster_file",
    "node_status",
    "free_ports",
    "CLUSTER_FILE",
    "poll_statuses",
]

CLUSTER_FILE = "cluster.json"
# the node program the fork server runs (`mcpp <argv>`), named, not imported: the harness sits
# below the program in the layers
NODE_ENTRY = "mcpp.cli:main"
NODE_PRELOAD = ("mcpp.cli", "mcpp.runner")
POLL_S = 0.2  # status polls cost the nodes CPU: 20 nodes x 5 Hz is plenty
MAX_MISSED_POLLS = 3  # wait_formed: after this many unanswered /status polls in a row a node counts as down
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class NodeRecord:
    name: str
    role: str
    peer_id: str
    multiaddrs: list[str]
    mcp_url: str
    pid: int

    @property
    def base_url(self) -> str:
        return self.mcp_url.rsplit("/mcp", 1)[0]


class ClusterBackend(Protocol):
    """What every cluster backend offers (process now; docker later)."""

    nodes: list[NodeRecord]
    formed_in_s: float

    def start(self) -> list[NodeRecord]: ...
    def stop(self) -> None: ...
    def kill(self, name: str, sig: int = signal.SIGKILL) -> None: ...
    def restart(self, name: str) -> NodeRecord: ...
    def wait_formed(self, timeout_s: float = 30.0, expect: int | None = None) -> float: ...
    def logs(self, name: str, lines: int = 40) -> str: ...


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (bind to port 0, then release)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_status(base_url: str, timeout_s: float = 1.0, headers: dict[str, str] | None = None) -> dict[str, Any] | None:
    """GET /status of a node, or None if it does not answer."""
    try:
        r = httpx.get(base_url + "/status", timeout=timeout_s, headers=headers)
        if r.status_code == 200:
            data = r.json()
            return data if isinstance(data, dict) else None
    except (httpx.HTTPError, ValueError):
        return None
    return None


def poll_statuses(base_urls: list[str], headers: dict[str, str] | None = None) -> list[dict[str, Any] | None]:
    """GET /status of many nodes at once (a busy node must not delay the others' polls)."""
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(base_urls)))) as pool:
        return list(pool.map(lambda u: node_status(u, 2.0, headers), base_urls))


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Forked:
    """A node process forked by the fork server; Popen-like (pid, poll, wait, send_signal)."""

    def __init__(self, server: _ForkServer, pid: int) -> None:
        self._server = server
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        return self._server.exit_codes.get(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        srv = self._server
        with srv.changed:
            if not srv.changed.wait_for(lambda: self.pid in srv.exit_codes or srv.closed, timeout):
                raise subprocess.TimeoutExpired(f"node pid {self.pid}", timeout or 0)
        if self.pid not in srv.exit_codes:  # the fork server is gone; so are its children
            raise HarnessError(f"node pid {self.pid}: the fork server exited, exit code unknown")
        return srv.exit_codes[self.pid]

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _ForkServer:
    """Client side of `python -m mcpp.harness.zygote` (see zygote.py)."""

    def __init__(self, env: dict[str, str], tag: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcpp.harness.zygote", "--entry", NODE_ENTRY, "--preload", *NODE_PRELOAD, "--tag", tag],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, preexec_fn=_die_with_parent,
        )
        self.exit_codes: dict[int, int] = {}
        self.changed = threading.Condition()
        self._pids: list[int] = []
        self._reader = threading.Thread(target=self._read, name="mcpp-forkserver", daemon=True)
        self._reader.start()
        with self.changed:
            started = self.changed.wait_for(lambda: self._ready or self.closed, 60)
        if not started or self.closed:
            self.close()
            raise HarnessError("the fork server did not start" + (" in 60 s" if not started else ""))

    _ready = False
    closed = False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                doc = json.loads(line)
                with self.changed:
                    if "ready" in doc:
                        self._ready = True
                    elif "pid" in doc:
                        self._pids.append(int(doc["pid"]))
                    elif "exit" in doc:
                        self.exit_codes[int(doc["exit"])] = int(doc["code"])
                    self.changed.notify_all()
        finally:  # EOF, or a line we cannot read: either way nobody may wait forever
            with self.changed:
                self.closed = True
                self.changed.notify_all()

    def spawn(self, argv: list[str], log: Path) -> _Forked:
        assert self.proc.stdin is not None
        with self.changed:
            n = len(self._pids)
            self.proc.stdin.write((json.dumps({"argv": argv, "log": str(log)}) + "\n").encode())
            self.proc.stdin.flush()
            if not self.changed.wait_for(lambda: len(self._pids) > n or self.closed, 30):
                raise HarnessError("the fork server did not fork in 30 s")
            if len(self._pids) <= n:
                raise HarnessError("the fork server exited")
            return _Forked(self, self._pids[n])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


@dataclass(kw_only=True)
class _Secrets:
    """Issue 8: a token for MCP, a swarm key for the mesh. Both are generated unless given;
    secure=False runs open nodes (no token, no swarm key)."""

    token: str | None = None  # MCP bearer token
    swarm_key: str | None = None  # private-network key (64 hex characters)
    secure: bool = True


class ClusterCommon(_Secrets):
    """What every backend shares: readiness and formation waits, records, cluster.json.
    A backend provides nodes, directory, progress, formed_in_s, up_in_s, backend, logs_hint,
    is_running(name), logs(name) and stop()."""

    nodes: list[NodeRecord]
    directory: Path
    progress: ProgressFn | None
    formed_in_s: float
    up_in_s: float
    backend: str = "?"
    logs_hint: str = "check the node logs"

    def is_running(self, name: str) -> bool:
        raise NotImplementedError

    def logs(self, name: str, lines: int = 40) -> str:
        raise NotImplementedError

    def start(self) -> list[NodeRecord]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_formed(self, timeout_s: float = 30.0, expect: int | None = None, _t0: float | None = None) -> float:
        """Wait until every running node knows all the other running nodes as live members and
        holds at least its overlay's low degree of connections (all the others in a small mesh).

        Each node's latest answer counts: a node too busy to answer a poll in time (50 nodes on
        2 cores) keeps its previous reading instead of counting as seeing nobody, unless it
        missed MAX_MISSED_POLLS in a row or its process ended.
        Returns seconds since `_t0` (or since the call). Raises NodeStartError with logs on timeout.
        """
        t0 = time.monotonic() if _t0 is None else _t0
        deadline = time.monotonic() + timeout_s
        live = [r for r in self.nodes if self.is_running(r.name)]
        want = (len(live) - 1) if expect is None else expect
        ids = {r.peer_id for r in live}
        last: dict[str, int] = {r.name: 0 for r in live}
        ok: dict[str, bool] = {r.name: False for r in live}
        unanswered: dict[str, int] = {r.name: 0 for r in live}
        while True:
            for r, st in zip(live, poll_statuses([r.base_url for r in live], self.headers())):
                if st is None:
                    unanswered[r.name] += 1
                    if unanswered[r.name] >= MAX_MISSED_POLLS or not self.is_running(r.name):
                        ok[r.name] = False  # not a busy node any more: a dead or hung one
                    continue
                unanswered[r.name] = 0
                # formed: every other node is a live member, and the overlay has its low degree
                seen = set(st.get("members", st.get("connected", []))) & ids
                linked = len(set(st.get("connected", [])) & ids)
                last[r.name] = len(seen)
                raw = st.get("degree_low")
                degree = raw if isinstance(raw, int) else want
                ok[r.name] = len(seen) >= want and linked >= min(want, degree) and bool(st.get("ready"))
            done = sum(ok.values())
            if self.progress:
                self.progress(done, len(live), "forming")
            if done == len(live):
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                worst = min(last, key=lambda n: (ok[n], last[n]))
                raise NodeStartError(
                    worst,
                    f"mesh not formed in {timeout_s:g} s: it sees {last[worst]} of {want} peers "
                    f"({unanswered[worst]} /status polls in a row unanswered) (Hint: {self.logs_hint})",
                    self.logs(worst),
                )
            time.sleep(POLL_S)

    # ---- secrets ---------------------------------------------------------------------------
    def _init_secrets(self) -> None:
        """Generate what was not given (once: restarts reuse them); secure=False runs open nodes."""
        from mcpp.config import new_token, parse_swarm_key

        if not self.secure:
            return
        if self.token is None:
            self.token = new_token()
        if self.swarm_key is None:
            self.swarm_key = secrets.token_hex(32)
        self.swarm_key = parse_swarm_key(self.swarm_key, "swarm_key")

    def headers(self) -> dict[str, str]:
        """HTTP headers a client of this cluster's MCP endpoints sends."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def record(self, name: str) -> NodeRecord:
        for r in self.nodes:
            if r.name == name:
                return r
        raise HarnessError(f"no node named {name!r}")

    def cluster_file(self) -> Path:
        return self.directory / CLUSTER_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "formed_in_s": round(self.formed_in_s, 3),
            "up_in_s": round(self.up_in_s, 3),
            "harness_pid": os.getpid(),
            "token": self.token,
            "private_network": self.swarm_key is not None,
            "nodes": [asdict(r) for r in self.nodes],
        }

    def write_cluster_file(self) -> None:
        """cluster.json holds the token: it is written 0600, like a key file."""
        tmp = self.cluster_file().with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, self.cluster_file())



@dataclass
class _Proc:
    name: str
    role: str
    argv: list[str]
    log_path: Path
    mcp_port: int
    popen: subprocess.Popen[bytes] | _Forked | None = None


@dataclass
class ProcessCluster(ClusterCommon):
    """N nodes as local processes. Use as a context manager (or call start/stop)."""

    size: int
    directory: Path
    base_port: int | None = None
    node_args: Sequence[str] = ()
    env: dict[str, str] | None = None
    formation_timeout_s: float = 60.0
    progress: ProgressFn | None = None
    fork_server: bool = True  # fork nodes from a pre-imported server (False: exec each node cold)
    nodes: list[NodeRecord] = field(default_factory=list)
    formed_in_s: float = 0.0
    up_in_s: float = 0.0  # until every node's endpoint answered (process start-up included)
    _procs: dict[str, _Proc] = field(default_factory=dict)
    _server: _ForkServer | None = None
    _boot_addr: str = ""
    _added: int = 0
    _secret_args: list[str] = field(default_factory=list)
    backend = "process"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise HarnessError("a cluster needs at least 1 node")
        self.directory = Path(self.directory)
        self.logs_hint = f"check the logs in {self.directory / 'logs'}"

    # ---- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> ProcessCluster:
        super().__enter__()
        return self

    def _ports(self) -> list[int]:
        if self.base_port is not None:
            return list(range(self.base_port, self.base_port + 2 * self.size))
        return free_ports(2 * self.size)

    def start(self) -> list[NodeRecord]:
        d = self.directory
        (d / "logs").mkdir(parents=True, exist_ok=True)
        (d / "keys").mkdir(parents=True, exist_ok=True)
        ports = self._ports()
        boot_key = d / "keys" / "node-0.key"
        if not boot_key.exists():
            identity.save(identity.generate(), boot_key)
        boot_id = identity.peer_id_of(identity.load(boot_key))
        self._boot_addr = f"/ip4/127.0.0.1/tcp/{ports[0]}/p2p/{boot_id}"
        self._secret_args = self._write_secrets()
        t0 = time.monotonic()
        for i in range(self.size):
            self._new_proc(f"node-{i}", "bootstrap" if i == 0 else "worker", ports[2 * i], ports[2 * i + 1])
        self.nodes = self._wait_records()
        self.up_in_s = time.monotonic() - t0
        self.formed_in_s = self.wait_formed(self.formation_timeout_s, _t0=t0)
        self.write_cluster_file()
        return self.nodes

    def _new_proc(self, name: str, role: str, p2p_port: int, mcp_port: int) -> None:
        d = self.directory
        argv = [
            sys.executable, "-m", "mcpp", "node",
            "--role", role,
            "--identity", str(d / "keys" / f"{name}.key"),
            "--listen", f"/ip4/127.0.0.1/tcp/{p2p_port}",
            "--mcp-host", "127.0.0.1",
            "--mcp-port", str(mcp_port),
            "--data-dir", str(d / "data" / name),
            *self._secret_args,
            *self.node_args,
        ]
        if role == "worker":
            argv += ["--bootstrap", self._boot_addr]
        self._procs[name] = _Proc(name, role, argv, d / "logs" / f"{name}.log", mcp_port)
        self._spawn(self._procs[name])

    def add_node(self) -> NodeRecord:
        """A fresh worker (new identity, empty data directory) joins the running mesh."""
        self._added += 1
        name = f"node-{self.size - 1 + self._added}"  # never a name used before (nor its key)
        p2p_port, mcp_port = free_ports(2)
        self._new_proc(name, "worker", p2p_port, mcp_port)
        self.nodes = self._wait_records([name])
        self.write_cluster_file()
        return self.record(name)

    def remove(self, name: str) -> None:
        """Lose a node for good: kill -9, its data directory and key deleted, gone from the cluster."""
        if self.is_running(name):
            self.kill(name, signal.SIGKILL)
        shutil.rmtree(self.directory / "data" / name, ignore_errors=True)
        (self.directory / "keys" / f"{name}.key").unlink(missing_ok=True)
        del self._procs[name]
        self.nodes = [n for n in self.nodes if n.name != name]
        self.write_cluster_file()

    def _write_secrets(self) -> list[str]:
        """Token and swarm key as 0600 files (never on a command line); the node flags to read them."""
        self._init_secrets()
        args: list[str] = []
        sd = self.directory / "secrets"
        for value, fname, flag in ((self.token, "token", "--token-file"),
                                   (self.swarm_key, "swarm.key", "--swarm-key-file")):
            if value is None:
                continue
            sd.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(sd / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value + "\n")
            args += [flag, str(sd / fname)]
        return args

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCPP_")}
        env.update(self.env or {})
        return env

    def _spawn(self, proc: _Proc, extra_args: Sequence[str] = ()) -> None:
        argv = [*proc.argv, *extra_args]
        if self.fork_server:
            if self._server is None:
                self._server = _ForkServer(self._env(), str(self.directory))
            proc.popen = self._server.spawn(argv[3:], proc.log_path)  # argv after "python -m mcpp"
            return
        env = self._env()
        log = open(proc.log_path, "ab")
        try:
            proc.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    def _base(self, proc: _Proc) -> str:
        return f"http://127.0.0.1:{proc.mcp_port}"

    def _wait_records(self, names: Sequence[str] | None = None) -> list[NodeRecord]:
        names = list(names or self._procs)
        deadline = time.monotonic() + self.formation_timeout_s
        records: dict[str, NodeRecord] = {}
        while len(records) < len(names):
            pending = [n for n in names if n not in records]
            for name in pending:
                proc = self._procs[name]
                assert proc.popen is not None
                if proc.popen.poll() is not None:
                    raise NodeStartError(name, f"exited with code {proc.popen.returncode}", self.logs(name))
            statuses = poll_statuses([self._base(self._procs[n]) for n in pending], self.headers())
            for name, st in zip(pending, statuses):
                proc = self._procs[name]
                assert proc.popen is not None
                if st is not None:
                    records[name] = NodeRecord(
                        name=name, role=proc.role, peer_id=st["peer_id"], multiaddrs=st["multiaddrs"],
                        mcp_url=st["mcp_url"], pid=proc.popen.pid,
                    )
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in records]
                raise NodeStartError(missing[0], "its MCP endpoint did not answer in time", self.logs(missing[0]))
            if len(records) < len(names):
                time.sleep(POLL_S)
        if len(names) == len(self._procs):
            return [records[n] for n in self._procs]
        by_name = {r.name: r for r in self.nodes}
        by_name.update(records)
        return [by_name[n] for n in self._procs if n in by_name]

    def stop(self) -> None:
        """SIGTERM every node, wait up to 10 s, then SIGKILL what is left."""
        procs = [p.popen for p in self._procs.values() if p.popen is not None and p.popen.poll() is None]
        for pp in procs:
            with contextlib.suppress(ProcessLookupError):
                pp.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        try:
            for pp in procs:
                try:
                    pp.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pp.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired, HarnessError):
                        pp.wait(10)
                except HarnessError:
                    pass
        finally:
            if self._server is not None:
                self._server.close()
                self._server = None

    # ---- faults and inspection ---------------------------------------------------------
    def is_running(self, name: str) -> bool:
        p = self._procs[name].popen
        return p is not None and p.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self._procs[name]
        assert proc.popen is not None
        proc.popen.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            proc.popen.wait(timeout=15)

    def exit_code(self, name: str) -> int | None:
        p = self._procs[name].popen
        return None if p is None else p.poll()

    def restart(self, name: str, extra_args: Sequence[str] = ()) -> NodeRecord:
        """Start a stopped node again with the same arguments (same identity and ports), plus
        `extra_args` for this run only (e.g. a changed allowlist)."""
        if self.is_running(name):
            raise HarnessError(f"{name} is still running")
        proc = self._procs[name]
        self._spawn(proc, extra_args)
        self.nodes = self._wait_records([name])
        self.write_cluster_file()
        return self.record(name)

    def logs(self, name: str, lines: int = 40) -> str:
        try:
            text = self._procs[name].log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])



@contextlib.contextmanager
def local_cluster(
    nodes: int,
    directory: str | Path,
    base_port: int | None = None,
    node_args: Sequence[str] = (),
    formation_timeout_s: float = 60.0,
    progress: ProgressFn | None = None,
    secure: bool = True,
) -> Iterator[ProcessCluster]:
    """A formed N-node mesh of local processes (with a token and a swarm key unless
    secure=False); everything is stopped on exit."""
    with ProcessCluster(
        nodes, Path(directory), base_port, node_args, formation_timeout_s=formation_timeout_s, progress=progress,
        secure=secure,
    ) as c:
        yield c


def read_cluster_file(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CLUSTER_FILE
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise HarnessError(f"no cluster in {directory}: cannot read {path} ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise HarnessError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise HarnessError(f"{path} does not hold a cluster record")
    return data
