"""`mcpp secrets init`: one deployment's own MCP token, swarm key and bootstrap identity.

Compose and Kubernetes read them from one folder that git ignores (default `bootstrap/secrets/`),
never from the repository:

    mcp-token         the MCP bearer token                        (Compose secret, k8s Secret)
    swarm-key         the libp2p private-network key (swarm.key)  (Compose secret, k8s Secret)
    bootstrap.key     the bootstrap's identity (libp2p protobuf)  (Compose bind mount, k8s Secret)
    bootstrap.peer-id its peer id (public)                        (workers' MCPP_BOOTSTRAP)
    kustomization.yaml  the k8s Secrets (secretGenerator) and the peer id, read by k8s/
    compose env       MCPP_SECRETS_DIR, MCPP_BOOTSTRAP_ID, MCPP_UID/GID (by default compose/.env)

Secret files are mode 0600 in a 0700 folder. The node containers run as uid 10001: run as
root, `init` gives the three mounted files to 10001 (still 0600); run as another user, Compose
runs the containers as that user (MCPP_UID) so that they can read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mcpp.config import new_swarm_key, new_token
from mcpp.errors import ArgumentError
from mcpp.net import identity

__all__ = ["SecretsInit", "init_secrets", "DEFAULT_DIR", "IMAGE_UID", "COMPOSE_KEYS"]

DEFAULT_DIR = Path("bootstrap") / "secrets"
IMAGE_UID = 10001  # USER in node/Dockerfile
TOKEN, SWARM_KEY, IDENTITY, PEER_ID = "mcp-token", "swarm-key", "bootstrap.key", "bootstrap.peer-id"
MOUNTED = (TOKEN, SWARM_KEY, IDENTITY)  # what the Compose containers read
COMPOSE_KEYS = ("MCPP_SECRETS_DIR", "MCPP_BOOTSTRAP_ID", "MCPP_UID", "MCPP_GID")

KUSTOMIZATION = """\
# Written by `mcpp secrets init`: this deployment's Secrets, made from the files beside this one
# (kustomize secretGenerator; the name suffix changes with the content, so a rotation rolls the
# pods). k8s/kustomization.yaml includes this folder. Never commit it.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
secretGenerator:
  - name: mcpp-secrets
    files:
      - mcp-token
      - swarm-key
  - name: mcpp-bootstrap-identity
    files:
      - identity.key=bootstrap.key
configMapGenerator:
  # the bootstrap's peer id, copied into mcpp-config's MCPP_BOOTSTRAP by k8s/ (replacements);
  # local-config: used while rendering, not deployed
  - name: mcpp-bootstrap-peer
    files:
      - peer-id=bootstrap.peer-id
    options:
      disableNameSuffixHash: true
      annotations:
        config.kubernetes.io/local-config: "true"
"""


@dataclass(frozen=True)
class SecretsInit:
    """What `init_secrets` wrote."""

    dir: Path
    peer_id: str
    written: tuple[str, ...]  # file names in dir
    compose_env: Path | None
    owner_uid: int


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _owner() -> tuple[int, int]:
    """Who the Compose containers run as: the image's user when we can give it the files (root),
    else the user who owns them."""
    if os.geteuid() == 0:
        return IMAGE_UID, IMAGE_UID
    return os.geteuid(), os.getegid()


def init_secrets(
    directory: Path = DEFAULT_DIR,
    *,
    force: bool = False,
    rotate_token: bool = False,
    compose_env: Path | None = None,
) -> SecretsInit:
    """Generate a deployment's secrets into `directory` (see the module docstring).

    Args:
        force: replace every secret of an existing folder (a new token, swarm key and identity:
            the running mesh must be redeployed).
        rotate_token: replace the MCP token alone (the folder must exist).
        compose_env: the env file Compose reads (its keys COMPOSE_KEYS are replaced, other lines
            kept); None writes none.
    Raises:
        ArgumentError: naming the option (existing secrets without --force, --rotate-token
            without secrets, both options).
    """
    if force and rotate_token:
        raise ArgumentError("--rotate-token", "replaces the token alone; --force replaces everything: pick one")
    directory = Path(directory)
    have = [n for n in (TOKEN, SWARM_KEY, IDENTITY) if (directory / n).exists()]
    if rotate_token:
        missing = [n for n in (SWARM_KEY, IDENTITY) if n not in have]
        if missing:
            raise ArgumentError("--rotate-token", f"{directory} has no {', '.join(missing)}: run `mcpp secrets init` first")
    elif have and not force:
        raise ArgumentError("--dir", f"{directory} already holds {', '.join(have)} (--force replaces every secret, "
                                     "--rotate-token the token alone)")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    written = [TOKEN]
    _write(directory / TOKEN, new_token().encode())
    if rotate_token:
        peer_id = identity.peer_id_of(identity.load(directory / IDENTITY))
    else:
        _write(directory / SWARM_KEY, new_swarm_key().encode())
        kp = identity.generate()
        identity.save(kp, directory / IDENTITY, overwrite=True)
        peer_id = identity.peer_id_of(kp)
        written += [SWARM_KEY, IDENTITY]
    _write(directory / PEER_ID, peer_id.encode(), 0o644)
    _write(directory / "kustomization.yaml", KUSTOMIZATION.encode(), 0o644)
    written += [PEER_ID, "kustomization.yaml"]
    uid, gid = _owner()
    if os.geteuid() == 0:
        for n in MOUNTED:
            os.chown(directory / n, uid, gid)
    if compose_env is not None:
        _write_compose_env(compose_env, directory, peer_id, uid, gid)
    return SecretsInit(directory, peer_id, tuple(written), compose_env, uid)


def _write_compose_env(path: Path, directory: Path, peer_id: str, uid: int, gid: int) -> None:
    """Set COMPOSE_KEYS in Compose's env file, keeping its other lines (MCPP_IMAGE, ports...).
    The secrets folder is given relative to the env file's folder (the Compose project's)."""
    path = Path(path)
    kept = []
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.split("=", 1)[0].strip() not in COMPOSE_KEYS
                and not ln.startswith("# written by `mcpp secrets init`")]
    rel = os.path.relpath(directory.resolve(), path.parent.resolve())
    ours = ["# written by `mcpp secrets init`: where Compose reads this deployment's secrets",
            f"MCPP_SECRETS_DIR={rel}", f"MCPP_BOOTSTRAP_ID={peer_id}", f"MCPP_UID={uid}", f"MCPP_GID={gid}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, ("\n".join(kept + ours) + "\n").encode(), 0o644)
