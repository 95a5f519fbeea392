"""Ed25519 identities and libp2p peer ids.

A Coop identity is an Ed25519 key pair. Its peer id is the libp2p one: the protobuf-encoded public key
(``KeyType.Ed25519 = 1``) wrapped in an *identity* multihash (the encoding is 36 bytes, under the 42-byte limit
above which libp2p would hash it), written in base58btc. Because the id embeds the key, anyone can recover the
public key from a peer id and check a signature without a lookup; ``tests/test_identity.py`` checks that the id
equals the one py-libp2p's host derives for the same key.

The key file holds the raw 32-byte private seed, written with mode 0600. This module does that one piece of
file I/O because the key format belongs with the identity; nothing here touches the network or the clock.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from protocol.errors import InvalidKey, LocalProtocolError

PUBLIC_KEY_BYTES: Final = 32
PRIVATE_KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
# libp2p crypto.pb PublicKey { Type = Ed25519 (1); Data = 32 bytes }: field 1 varint, field 2 length-delimited.
_PB_PREFIX: Final = b"\x08\x01\x12\x20"
# multihash: code 0x00 (identity), length 36.
_MH_PREFIX: Final = b"\x00\x24"
KEY_FILE_MODE: Final = 0o600
# Peer id <-> key conversions are pure base58 in Python, and every message validates its peer ids: memoise the
# valid ones (a failed conversion raises and is not cached). Bounded: about 3 MiB when full.
PEER_ID_CACHE_ENTRIES: Final = 1 << 14


@functools.lru_cache(maxsize=PEER_ID_CACHE_ENTRIES)
def peer_id_from_public_key(public_key: bytes) -> str:
    """Return the base58 libp2p peer id of a raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise InvalidKey(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return base58.b58encode(_MH_PREFIX + _PB_PREFIX + public_key).decode("ascii")


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Recover the raw Ed25519 public key embedded in a peer id.

    Raises:
        InvalidKey: the text is not an identity-multihash Ed25519 peer id.
    """
    if not isinstance(peer_id, str) or len(peer_id) > 64:
        raise InvalidKey("peer id must be a short base58 string")
    return _public_key_from_peer_id(peer_id)


@functools.lru_cache(maxsize=PEER_ID_CACHE_ENTRIES)
def _public_key_from_peer_id(peer_id: str) -> bytes:
    try:
        raw = base58.b58decode(peer_id.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidKey(f"peer id is not base58: {peer_id!r}") from exc
    prefix = _MH_PREFIX + _PB_PREFIX
    if len(raw) != len(prefix) + PUBLIC_KEY_BYTES or not raw.startswith(prefix):
        raise InvalidKey(f"not an Ed25519 peer id: {peer_id!r}")
    return raw[len(prefix) :]


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Return whether ``signature`` is a valid Ed25519 signature of ``data`` under ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@final
@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Identity:
    """An Ed25519 key pair. Build with :meth:`generate`, :meth:`from_seed` or :func:`load_identity`."""

    _private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != PRIVATE_KEY_BYTES:
            raise LocalProtocolError(f"an Ed25519 seed is {PRIVATE_KEY_BYTES} bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        """The raw 32-byte private seed (what the key file holds, and what libp2p's key pair is built from)."""
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_key(self) -> bytes:
        return self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"


def save_identity(identity: Identity, path: Path) -> None:
    """Write the key file atomically with mode 0600 (never world- or group-readable, even briefly)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
    try:
        os.fchmod(fd, KEY_FILE_MODE)
        os.write(fd, identity.seed())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_identity(path: Path) -> Identity:
    """Read a key file written by :func:`save_identity`.

    Raises:
        LocalProtocolError: the file has the wrong size or is readable by group or others.
    """
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise LocalProtocolError(f"key file {path} has mode {mode:04o}; it must be private (chmod 600 {path})")
    seed = path.read_bytes()
    if len(seed) != PRIVATE_KEY_BYTES:
        raise LocalProtocolError(f"key file {path} holds {len(seed)} bytes, expected {PRIVATE_KEY_BYTES}")
    return Identity.from_seed(seed)


def load_or_create_identity(path: Path) -> tuple[Identity, bool]:
    """Load the key at ``path``, creating it first if absent. Returns ``(identity, created)``."""
    path = Path(path)
    if path.exists():
        return load_identity(path), False
    identity = Identity.generate()
    save_identity(identity, path)
    return identity, True
