"""Seed lists: render bootstrap multiaddrs (/ip4|dns4/../tcp/../p2p/<id>) for each deployment target."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from mcpp.net import identity
from mcpp.errors import ArgumentError

__all__ = ["Seed", "seed_from_key", "render", "FORMATS"]

FORMATS = ("lines", "env", "yaml", "json", "configmap")


@dataclass(frozen=True)
class Seed:
    host: str
    port: int
    peer_id: str

    @property
    def multiaddr(self) -> str:
        proto = "ip4" if _is_ipv4(self.host) else "dns4"
        return f"/{proto}/{self.host}/tcp/{self.port}/p2p/{self.peer_id}"


def _is_ipv4(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() and 0 <= int(p) <= 255 for p in parts)


def seed_from_key(key_file: str, host: str, port: int) -> Seed:
    if not 1 <= port <= 65535:
        raise ArgumentError("port", f"must be 1-65535, got {port}")
    if not host:
        raise ArgumentError("host", "must not be empty")
    return Seed(host, port, identity.peer_id_of(identity.load(key_file)))


def render(seeds: Sequence[Seed], fmt: str, name: str = "mcpp-bootstrap") -> str:
    addrs = [s.multiaddr for s in seeds]
    if fmt == "lines":
        return "\n".join(addrs) + "\n"
    if fmt == "env":
        return "MCPP_BOOTSTRAP=" + ",".join(addrs) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump({"bootstrap": addrs}, sort_keys=False)
    if fmt == "json":
        return json.dumps(addrs, indent=2) + "\n"
    if fmt == "configmap":
        doc = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name},
            "data": {"MCPP_BOOTSTRAP": ",".join(addrs)},
        }
        return yaml.safe_dump(doc, sort_keys=False)
    raise ArgumentError("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
