"""Node configuration: one frozen value object, one loader.

Precedence for every setting: environment (`MCPP_*`) > command-line flag > YAML file > default.
Only `load_config` reads the environment; everything else receives a `NodeConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mcpp.errors import ConfigError

__all__ = [
    "NodeConfig",
    "load_config",
    "ENV_PREFIX",
    "DEFAULT_BOOTSTRAP_LISTEN",
    "DEFAULT_WORKER_LISTEN",
    "DEFAULT_MCP_PORT",
    "SETTINGS",
    "parse_swarm_key",
    "new_swarm_key",
    "development_secrets",
    "new_token",
]

ENV_PREFIX = "MCPP_"
DEFAULT_BOOTSTRAP_LISTEN = "/ip4/127.0.0.1/tcp/4001"
DEFAULT_WORKER_LISTEN = "/ip4/127.0.0.1/tcp/0"
DEFAULT_MCP_PORT = 8765

Role = Literal["bootstrap", "worker"]


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to run. Units are in the field names."""

    role: Role = "worker"
    listen: str = ""  # "" = the role's default (DEFAULT_*_LISTEN)
    announce: tuple[str, ...] = ()  # addresses to advertise instead of the listen address
    bootstrap: tuple[str, ...] = ()
    identity: str | None = None  # key file; None = <data_dir>/identity.key (kept across restarts)
    data_dir: str = "mcpp-data"
    mcp_transport: Literal["http", "stdio"] = "http"
    mcp_host: str = "127.0.0.1"
    mcp_port: int = DEFAULT_MCP_PORT
    # sse (the default) streams progress notifications of waiting tools; json answers every call
    # with one JSON body and drops notifications (the SDK's JSON mode)
    mcp_response: Literal["json", "sse"] = "sse"
    allowed_hosts: tuple[str, ...] = ()  # extra Host headers accepted by the MCP endpoint
    capabilities: tuple[str, ...] = ()
    log_level: str = "info"
    discovery_interval_s: float = 1.0
    ping_interval_s: float = 2.0
    peer_timeout_s: float = 5.0
    rpc_timeout_s: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    # the task queue
    max_concurrent: int = 4  # tasks this node's worker runs at once
    lease_s: float = 5.0  # a running task's lease; workers renew it every lease_s / 3
    max_payload_bytes: int = 1024 * 1024  # a task's payload and its result, as JSON
    max_queued_tasks: int = 100_000  # waiting (queued + blocked) tasks this node owns
    quotas: tuple[str, ...] = ()  # per tag: TAG=MAX_QUEUED/MAX_RUNNING, e.g. batch=100/4
    handlers: tuple[str, ...] = ()  # extra task types: NAME=module:function
    replicas: int = 1  # peers that hold a copy of each accepted task (0: none; see queue/replica.py)
    owner_timeout_s: float = 10.0  # a replica adopts the tasks of an owner gone this long
    replication: Literal["async", "sync"] = "sync"  # sync: task_submit waits for the replicas' copy
    # security (issue 8): secrets never appear in repr or logs
    token: str | None = field(default=None, repr=False)  # MCP bearer token; None = MCP on loopback only
    token_file: str | None = None  # a file holding the token (Compose/Kubernetes secrets)
    protect_metrics: bool = False  # /metrics and /status need the token too
    swarm_key: str | None = field(default=None, repr=False)  # 64 hex chars: libp2p private network (PSK)
    swarm_key_file: str | None = None  # go-ipfs swarm.key format, or the 64 hex chars alone
    allow_peers: tuple[str, ...] = ()  # if set, only these peer ids may connect (besides this node)
    max_inflight_per_peer: int = 64  # RPC requests one peer may have running on this node at once
    # the overlay (issue 16): neighbours kept open whatever the mesh's size; members by gossip
    degree_low: int = 6  # below this many neighbours a node dials members, up to `degree`
    degree: int = 8  # the overlay's target degree
    degree_high: int = 12  # above this, idle links are closed down to `degree`
    max_connections: int = 64  # hard cap of libp2p connections (neighbours + on-demand + DHT lookups)

    @property
    def listen_addr(self) -> str:
        if self.listen:
            return self.listen
        return DEFAULT_BOOTSTRAP_LISTEN if self.role == "bootstrap" else DEFAULT_WORKER_LISTEN

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)


# name -> (kind, validator hint). kinds: str, int, float, list, choice:<a|b>
SETTINGS: dict[str, str] = {
    "role": "choice:bootstrap|worker",
    "listen": "multiaddr",
    "announce": "multiaddr_list",
    "bootstrap": "list",  # checked (must end in /p2p/<id>) by the node before it binds anything
    "identity": "opt_str",
    "data_dir": "str",
    "mcp_transport": "choice:http|stdio",
    "mcp_host": "str",
    "mcp_port": "port",
    "mcp_response": "choice:json|sse",
    "allowed_hosts": "list",
    "capabilities": "list",
    "log_level": "choice:debug|info|warning|error",
    "discovery_interval_s": "pos_float",
    "ping_interval_s": "pos_float",
    "peer_timeout_s": "pos_float",
    "rpc_timeout_s": "pos_float",
    "max_message_bytes": "pos_int",
    "max_concurrent": "pos_int",
    "lease_s": "pos_float",
    "max_payload_bytes": "pos_int",
    "max_queued_tasks": "pos_int",
    "quotas": "list",
    "handlers": "list",
    "replicas": "nonneg_int",
    "owner_timeout_s": "pos_float",
    "replication": "choice:async|sync",
    "token": "secret",
    "token_file": "opt_str",
    "protect_metrics": "bool",
    "swarm_key": "secret",
    "swarm_key_file": "opt_str",
    "allow_peers": "list",
    "max_inflight_per_peer": "pos_int",
    "degree_low": "pos_int",
    "degree": "pos_int",
    "degree_high": "pos_int",
    "max_connections": "pos_int",
}


def _check_multiaddr(where: str, value: str) -> None:
    import multiaddr  # a parser only; no libp2p import here

    try:
        multiaddr.Multiaddr(value)
    except Exception as e:
        raise ConfigError(where, value, f"not a multiaddr ({e})") from None


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = SETTINGS[name]
    where = f"{name} (from {source})"
    if kind == "multiaddr_list":
        items = _coerce_list(where, value)
        for item in items:
            _check_multiaddr(where, item)
        return items
    if kind == "multiaddr":
        if not isinstance(value, str) or not value:
            raise ConfigError(where, value, "expected a multiaddr such as /ip4/127.0.0.1/tcp/4001")
        _check_multiaddr(where, value)
        return value
    if kind == "list":
        return _coerce_list(where, value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(where, value, "expected true or false")
    if kind == "secret":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(where, "***", "expected a non-empty string")
        return value.strip()
    if kind.startswith("choice:"):
        options = kind.split(":", 1)[1].split("|")
        if value not in options:
            raise ConfigError(where, value, f"must be one of {', '.join(options)}")
        return value
    if kind in ("port", "pos_int", "nonneg_int"):
        try:
            n = int(value)
            if isinstance(value, float) or isinstance(value, bool):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(where, value, "expected an integer") from None
        if kind == "port" and not 0 <= n <= 65535:
            raise ConfigError(where, value, "must be a port between 0 and 65535")
        if kind == "pos_int" and n <= 0:
            raise ConfigError(where, value, "must be > 0")
        if kind == "nonneg_int" and n < 0:
            raise ConfigError(where, value, "must be >= 0")
        return n
    if kind == "pos_float":
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ConfigError(where, value, "expected a number") from None
        if not x > 0 or x != x or x == float("inf"):
            raise ConfigError(where, value, "must be a finite number > 0")
        return x
    if value is None and kind == "opt_str":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) == "":
        raise ConfigError(where, value, "expected a non-empty string")
    return str(value)


def _coerce_list(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.replace(",", " ").split())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(where, value, "expected a list of strings")


def _read_file(path: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError("config", path, f"cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError("config", path, f"not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError("config", path, "the file must hold a mapping of settings")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in SETTINGS:
            raise ConfigError(f"{name} (from {path})", value, "unknown setting")
        out[name] = value
    return out


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> NodeConfig:
    """Build a NodeConfig. env > flags > file > defaults.

    Args:
        flags: settings given on the command line (None values mean "not given").
        env: the environment to read `MCPP_*` from (pass `os.environ`); None reads nothing.
        config_file: a YAML file of settings; `MCPP_CONFIG` in env overrides it.
    Raises:
        ConfigError: naming the setting and where it came from.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != () and v != []}
    env = env or {}
    path = env.get(ENV_PREFIX + "CONFIG") or config_file
    merged: dict[str, Any] = {}
    if path:
        for k, v in _read_file(path).items():
            merged[k] = _coerce(k, v, path)
    for k, v in flags.items():
        if k not in SETTINGS:
            raise ConfigError(k, v, "unknown setting")
        merged[k] = _coerce(k, v, "flag --" + k.replace("_", "-"))
    for k in SETTINGS:
        ev = env.get(ENV_PREFIX + k.upper())
        if ev is not None and ev != "":
            merged[k] = _coerce(k, ev, ENV_PREFIX + k.upper())
    if not merged.get("token") and merged.get("token_file"):
        merged["token"] = _read_secret("token_file", merged["token_file"])
    if not merged.get("swarm_key") and merged.get("swarm_key_file"):
        merged["swarm_key"] = _read_secret("swarm_key_file", merged["swarm_key_file"])
    if merged.get("swarm_key"):
        merged["swarm_key"] = parse_swarm_key(merged["swarm_key"], "swarm_key")
    _check_degree(merged)
    if merged.get("token") and len(merged["token"]) < 16:
        raise ConfigError("token", "***", "too short: use at least 16 characters (mcpp token prints a good one)")
    return NodeConfig(**merged)


def _check_degree(merged: dict[str, Any]) -> None:
    d = NodeConfig()
    low = merged.get("degree_low", d.degree_low)
    degree = merged.get("degree", d.degree)
    high = merged.get("degree_high", d.degree_high)
    cap = merged.get("max_connections", d.max_connections)
    if low > degree:
        raise ConfigError("degree_low", low, f"must be <= degree ({degree})")
    if high < degree:
        raise ConfigError("degree_high", high, f"must be >= degree ({degree})")
    if cap < high:
        raise ConfigError("max_connections", cap, f"must be >= degree_high ({high})")


def _read_secret(name: str, path: str) -> str:
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(name, path, f"cannot read: {e.strerror}") from e
    if not text:
        raise ConfigError(name, path, "the file is empty")
    return text


def parse_swarm_key(text: str, where: str = "swarm_key") -> str:
    """The 64 hex characters of a PSK, from either the bare hex or the go-ipfs `swarm.key`
    format (`/key/swarm/psk/1.0.0/`, `/base16/`, hex)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) == 3 and lines[0] == "/key/swarm/psk/1.0.0/":
        if lines[1] != "/base16/":
            raise ConfigError(where, "***", f"unsupported encoding {lines[1]!r} (only /base16/)")
        hex_key = lines[2]
    elif len(lines) == 1:
        hex_key = lines[0]
    else:
        raise ConfigError(where, "***", "expected 64 hex characters or a swarm.key file")
    try:
        raw = bytes.fromhex(hex_key)
    except ValueError:
        raise ConfigError(where, "***", "not hexadecimal") from None
    if len(raw) != 32:
        raise ConfigError(where, "***", f"a swarm key is 32 bytes (64 hex characters), got {len(raw)} bytes")
    return raw.hex()


def new_swarm_key() -> str:
    """A fresh swarm key in the go-ipfs `swarm.key` format."""
    import secrets

    return "/key/swarm/psk/1.0.0/\n/base16/\n" + secrets.token_hex(32) + "\n"


# The development secrets committed in bootstrap/dev/ (public: anyone can read them), by
# fingerprint (sha256) so that the node does not carry them: a node running with one says so.
_DEV_SHA256 = {
    "token": "2eba4cd98be679a7fbc2192f6f6e6b90c83103ab5a5159453c0e277240390d87",
    "swarm_key": "d8f04c01053b4610a6c03f5defba9ff37d6f6a86567478cdd9c652654401b817",
}
DEV_PEER_ID = "12D3KooWGUb9VYUzNFjsNFBiCGx2NkFm9K3pevwbAFomgeohoDMY"


def development_secrets(config: NodeConfig, peer_id: str) -> list[str]:
    """Which of this node's secrets are the public development ones (token, swarm_key, identity)."""
    import hashlib

    found = [name for name, digest in _DEV_SHA256.items()
             if (value := getattr(config, name)) and hashlib.sha256(value.encode()).hexdigest() == digest]
    return found + (["identity"] if peer_id == DEV_PEER_ID else [])


def new_token() -> str:
    import secrets

    return secrets.token_urlsafe(32)
