"""Node identities: an Ed25519 key pair stored as a libp2p protobuf private key (mode 0600)."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from mcpp.errors import IdentityError

__all__ = ["generate", "save", "load", "load_or_generate", "peer_id_of"]


def generate() -> KeyPair:
    return create_new_key_pair()


def peer_id_of(kp: KeyPair) -> str:
    return ID.from_pubkey(kp.public_key).to_base58()


def save(kp: KeyPair, path: str | Path, overwrite: bool = False) -> None:
    p = Path(path)
    if p.exists() and not overwrite:
        raise IdentityError(str(p), "exists already (pass --force to replace it)")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(kp.private_key.serialize())
    os.replace(tmp, p)


def load(path: str | Path) -> KeyPair:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise IdentityError(str(p), f"cannot read: {e.strerror}") from e
    try:
        priv = deserialize_private_key(data)
    except Exception as e:  # libp2p raises several types for bad bytes
        raise IdentityError(str(p), f"not a libp2p private key ({e})") from e
    return KeyPair(priv, priv.get_public_key())


def load_or_generate(path: str | None) -> KeyPair:
    """The node's key: loaded from `path` (created there if missing) or ephemeral when None."""
    if path is None:
        return generate()
    if not Path(path).exists():
        kp = generate()
        save(kp, path)
        return kp
    return load(path)
