"""The Docker backend of the harness: N nodes as containers of the node image on a private
Docker network, through testcontainers.

Same records and cluster.json as the process backend; MCP ports are published on 127.0.0.1
only. Workers get only the bootstrap's address (`/dns4/node-0/tcp/4001/p2p/<id>`, resolved on
the private network) and find the others through the DHT. Every container and network carries
the labels `mcpp.harness=1` and `mcpp.run=<run id>`; `reap()` removes what a crashed run left.

No Ryuk here (its image cannot be pulled): the backend cleans up itself, also when start-up
fails half way (it is a context manager, like the process backend).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import signal
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# testcontainers reads its configuration at import: no Ryuk, and reach containers via 127.0.0.1
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
os.environ.setdefault("TC_HOST", "127.0.0.1")

from mcpp.net import identity  # noqa: E402
from mcpp.errors import HarnessError, NodeStartError  # noqa: E402
from mcpp.harness.process import POLL_S, ClusterCommon, NodeRecord, ProgressFn, free_ports, poll_statuses  # noqa: E402
from mcpp.harness.image import IMAGE_TAG, image_exists, stale_image_hint  # noqa: E402

__all__ = ["DockerCluster", "reap", "LABEL"]

LABEL = "mcpp.harness"
P2P_PORT = 4001
MCP_PORT = 8765
KEY_PATH = "/etc/mcpp/identity.key"


def reap(run_id: str | None = None) -> int:
    """Remove the containers and networks of a run (all harness runs if run_id is None)."""
    import docker

    client = docker.from_env()
    labels = [f"{LABEL}=1"] + ([f"mcpp.run={run_id}"] if run_id else [])
    n = 0
    for c in client.containers.list(all=True, filters={"label": labels}):
        with contextlib.suppress(Exception):
            c.remove(force=True)
            n += 1
    for net in client.networks.list(filters={"label": labels}):
        with contextlib.suppress(Exception):
            net.remove()
    client.close()
    return n


def _key_tar(key: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(KEY_PATH.lstrip("/"))
        info.size = len(key)
        info.mode = 0o444  # the node runs as uid 10001
        tar.addfile(info, io.BytesIO(key))
    return buf.getvalue()


def _own_subnet() -> Any:
    """IPAM config with a /24 that no Docker network on this engine uses yet."""
    import ipaddress

    import docker

    client = docker.from_env()
    used = [ipaddress.ip_network(c["Subnet"], strict=False)
            for n in client.networks.list(greedy=True)
            for c in ((n.attrs.get("IPAM") or {}).get("Config") or []) if c.get("Subnet")]
    for third in range(256):
        net = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(net))])
    raise HarnessError("no free 10.213.x.0/24 subnet for the cluster network")


@dataclass
class DockerCluster(ClusterCommon):
    """N nodes as containers. Use as a context manager (or call start/stop)."""

    size: int
    directory: Path
    image: str = IMAGE_TAG
    node_args: Sequence[str] = ()
    env: dict[str, str] | None = None
    formation_timeout_s: float = 90.0
    progress: ProgressFn | None = None
    nodes: list[NodeRecord] = field(default_factory=list)
    formed_in_s: float = 0.0
    up_in_s: float = 0.0
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    _containers: dict[str, Any] = field(default_factory=dict)
    _roles: dict[str, str] = field(default_factory=dict)
    _ports: dict[str, int] = field(default_factory=dict)
    _partitioned: dict[str, str] = field(default_factory=dict)  # name -> its address, while cut off
    _boot_id: str = ""
    _added: int = 0
    _network: Any = None
    backend = "docker"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise HarnessError("a cluster needs at least 1 node")
        self.directory = Path(self.directory)
        self.logs_hint = "check `docker logs` of the container (DockerCluster.logs(name))"

    def __enter__(self) -> DockerCluster:
        super().__enter__()
        return self

    # ---- lifecycle ---------------------------------------------------------------------
    def _labels(self) -> dict[str, str]:
        return {LABEL: "1", "mcpp.run": self.run_id}

    def container_name(self, name: str) -> str:
        return f"mcpp-{self.run_id}-{name}"

    def start(self) -> list[NodeRecord]:
        from testcontainers.core.network import Network

        if not image_exists(self.image):
            raise HarnessError(f"image {self.image} not found: build it with `mcpp image build`")
        if self.image == IMAGE_TAG and (why := stale_image_hint(self.image)) is not None:
            raise HarnessError(why)  # else a run would test yesterday's code
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "keys").mkdir(exist_ok=True)
        boot_key = self.directory / "keys" / "node-0.key"
        if not boot_key.exists():
            identity.save(identity.generate(), boot_key)
        boot_id = identity.peer_id_of(identity.load(boot_key))
        self._init_secrets()
        # an explicit subnet: only then can a partitioned node reconnect with its own address
        # (a partition cuts links; it does not renumber the node, which advertises its address)
        self._network = Network(docker_network_kw={"labels": self._labels(), "ipam": _own_subnet()}).create()
        ports = free_ports(self.size)
        t0 = time.monotonic()
        self._boot_id = boot_id
        for i in range(self.size):
            self._new_container(f"node-{i}", "bootstrap" if i == 0 else "worker", ports[i])
        # cold Python starts in every container: N containers on 2 cores take longer than 60 s
        self.nodes = self._wait_records(list(self._containers), time.monotonic() + max(60.0, self.formation_timeout_s))
        self.up_in_s = time.monotonic() - t0
        self.formed_in_s = self.wait_formed(self.formation_timeout_s, _t0=t0)
        self.write_cluster_file()
        return self.nodes

    def _new_container(self, name: str, role: str, port: int) -> None:
        from testcontainers.core.container import DockerContainer

        c = (DockerContainer(self.image)
             .with_name(self.container_name(name))
             .with_network(self._network)
             .with_network_aliases(name)
             .with_env("MCPP_ROLE", role)
             .with_env("MCPP_ALLOWED_HOSTS", name)
             .with_kwargs(labels=self._labels(), hostname=name))
        if self.token:
            c.with_env("MCPP_TOKEN", self.token)
        if self.swarm_key:
            c.with_env("MCPP_SWARM_KEY", self.swarm_key)
        for k, v in (self.env or {}).items():
            c.with_env(k, v)
        if role == "bootstrap":
            c.with_env("MCPP_IDENTITY", KEY_PATH)
            c.with_copy_into_container((self.directory / "keys" / "node-0.key").read_bytes(), KEY_PATH, 0o444)
        else:
            c.with_env("MCPP_BOOTSTRAP", f"/dns4/node-0/tcp/{P2P_PORT}/p2p/{self._boot_id}")
        if self.node_args:
            c.with_command(list(self.node_args))
        # published on 127.0.0.1 only (docker-py takes an (ip, port) tuple)
        c.ports[f"{MCP_PORT}/tcp"] = ("127.0.0.1", port)  # type: ignore[assignment]
        self._containers[name] = c
        self._roles[name] = role
        self._ports[name] = port
        c.start()

    def add_node(self) -> NodeRecord:
        """A fresh worker container (new identity, empty /data) joins the running mesh."""
        self._added += 1
        name = f"node-{self.size - 1 + self._added}"  # never a name used before
        self._new_container(name, "worker", free_ports(1)[0])
        self.nodes = self._wait_records([name], time.monotonic() + 90)
        self.write_cluster_file()
        return self.record(name)

    def remove(self, name: str) -> None:
        """Lose a node for good: kill -9, the container removed with its volume (its /data)."""
        w = self._wrapped(name)
        with contextlib.suppress(Exception):
            w.kill(signal="SIGKILL")
        w.remove(v=True, force=True)
        for d in (self._containers, self._roles, self._ports):
            d.pop(name, None)
        self.nodes = [n for n in self.nodes if n.name != name]
        self.write_cluster_file()

    def _base(self, name: str) -> str:
        return f"http://127.0.0.1:{self._ports[name]}"

    def _wait_records(self, names: list[str], deadline: float) -> list[NodeRecord]:
        records: dict[str, NodeRecord] = {}
        while len(records) < len(names):
            pending = [n for n in names if n not in records]
            for name in pending:
                if self._state(name) in ("exited", "dead"):
                    raise NodeStartError(name, "its container exited", self.logs(name))
            for name, st in zip(pending, poll_statuses([self._base(n) for n in pending], self.headers())):
                if st is not None:
                    records[name] = NodeRecord(name=name, role=self._roles[name], peer_id=st["peer_id"],
                                               multiaddrs=st["multiaddrs"], mcp_url=self._base(name) + "/mcp",
                                               pid=self._pid(name))
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in records][0]
                raise NodeStartError(missing, "its MCP endpoint did not answer in time", self.logs(missing))
            if len(records) < len(names):
                time.sleep(POLL_S)
        by_name = {r.name: r for r in self.nodes}
        by_name.update(records)
        return [by_name[n] for n in self._containers if n in by_name]

    def stop(self) -> None:
        """Remove every container (and its volume) and the network, whatever state they are in."""
        for c in self._containers.values():
            with contextlib.suppress(Exception):
                c.stop(force=True, delete_volume=True)
        self._containers.clear()
        if self._network is not None:
            with contextlib.suppress(Exception):
                self._network.remove()
            self._network = None
        with contextlib.suppress(Exception):
            reap(self.run_id)  # anything a half-failed start left behind

    # ---- faults and inspection ---------------------------------------------------------
    def _wrapped(self, name: str) -> Any:
        try:
            return self._containers[name].get_wrapped_container()
        except KeyError:
            raise HarnessError(f"no node named {name!r}") from None

    def _state(self, name: str) -> str:
        w = self._wrapped(name)
        w.reload()
        return str(w.status)

    def _pid(self, name: str) -> int:
        w = self._wrapped(name)
        w.reload()
        return int(w.attrs.get("State", {}).get("Pid") or 0)

    def is_running(self, name: str) -> bool:
        return self._state(name) == "running"

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "run_id": self.run_id, "image": self.image, "network": self._network.name}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """`docker kill --signal` (SIGKILL by default): the container stops, its /data stays."""
        self._wrapped(name).kill(signal=signal.Signals(sig).name)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            deadline = time.monotonic() + 15
            while self._state(name) == "running" and time.monotonic() < deadline:
                time.sleep(0.1)

    def restart(self, name: str) -> NodeRecord:
        """Start the container again (same identity, data and published port) or restart it."""
        w = self._wrapped(name)
        if self._state(name) == "running":
            w.restart(timeout=10)
        else:
            w.start()
        self.nodes = self._wait_records([name], time.monotonic() + 60)
        self.write_cluster_file()
        return self.record(name)

    def pause(self, name: str) -> None:
        self._wrapped(name).pause()

    def unpause(self, name: str) -> None:
        self._wrapped(name).unpause()

    def disconnect(self, name: str) -> None:
        """Cut the node off the mesh network (its MCP port stays reachable from the host)."""
        ip = self.ip(name)
        if ip:  # a second disconnect (already cut off) must not forget the address
            self._partitioned.setdefault(name, ip)
        self._network._unwrap_network.disconnect(self._wrapped(name), force=True)

    def connect(self, name: str) -> None:
        """Heal a partition: back on the mesh network, at the address it had."""
        ip = self._partitioned.pop(name, None)
        self._network._unwrap_network.connect(self._wrapped(name), aliases=[name], ipv4_address=ip)

    def ip(self, name: str) -> str:
        """The node's address on the cluster network ("" while it is cut off)."""
        w = self._wrapped(name)
        w.reload()
        net = w.attrs["NetworkSettings"]["Networks"].get(self._network.name) or {}
        return str(net.get("IPAddress") or "")

    def logs(self, name: str, lines: int = 40) -> str:
        try:
            return str(self._wrapped(name).logs(tail=lines).decode(errors="replace"))
        except Exception:
            return ""
