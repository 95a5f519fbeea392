"""DHT records: keys and validation of signed capacity ads.

Keys are short (py-libp2p drops non-multihash keys over 50 bytes from multi-hop lookups), so long names are
hashed: ``/coop/cap/<32 hex>`` for a peer's ad and ``/coop/cls/<32 hex>`` for a resource class's provider hints.

Shard keys: py-libp2p's storing nodes keep at most k = 20 providers per key, first come first kept (and a record
lives 48 h). One key per class would list at most about 20 providers however large the network. So a provider of
a broad class (:data:`SHARDED_CLASSES`) also announces under one of :data:`HINT_SHARDS` shard keys, picked by its
peer id (:func:`hint_shard`), and a finder asks the shards when the class's main key answers k or more (full: some
providers may be missing). A class then lists up to k x (1 + shards) providers, and small networks pay nothing.

A capacity ad record is the bytes of an :class:`~protocol.envelope.Envelope` holding a
:class:`~protocol.messages.CapacityAd`. :func:`validate_ad_record` accepts it only if the signature verifies,
the ad's peer is the signer, the key is that peer's own key (no storing ads under someone else's key), and the
envelope has not expired. :func:`select_ad_record` picks the newest (highest ``seq``, then latest issue time).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, final

from protocol.envelope import DEFAULT_MAX_SKEW_MS, Envelope, decode_envelope, verify_envelope
from protocol.errors import MalformedMessage, RemoteProtocolError, WrongSigner
from protocol.messages import CapacityAd

NAMESPACE: Final = "coop"
CAP_PREFIX: Final = f"/{NAMESPACE}/cap/"
CLASS_PREFIX: Final = f"/{NAMESPACE}/cls/"
AD_REFRESH_MS: Final = 60_000  # re-publish every 60 s ...
AD_TTL_MS: Final = 120_000  # ... and let each ad expire after 120 s (the Petals cadence)
# A provider also serves its current ad record itself: open a stream, read one frame of at most this size (the
# record is the same bytes as in the DHT and is validated the same way).
AD_PROTOCOL_ID: Final = f"/{NAMESPACE}/ad/1.0.0"
AD_RECORD_MAX_BYTES: Final = 16 << 10


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cap_key(peer_id: str) -> str:
    """The DHT key of a peer's capacity ad (42 bytes)."""
    return CAP_PREFIX + _short(peer_id)


HINT_SHARDS: Final = 8
PROVIDERS_PER_KEY: Final = 20  # what a storing node keeps per key (py-libp2p: k, its BUCKET_SIZE)
SHARDED_CLASSES: Final = frozenset({"cpu", "gpu"})  # the classes a find asks for; narrow ones get no shards


def class_key(resource_class: str, shard: int | None = None) -> str:
    """The DHT key under which providers of a resource class (``cpu``, ``mem:8g``, ``gpu:...``) are hinted.

    ``shard`` (0 to :data:`HINT_SHARDS` - 1) names one of the class's shard keys instead of its main key.

    Raises:
        ValueError: no such shard.
    """
    if shard is None:
        return CLASS_PREFIX + _short(resource_class)
    if not 0 <= shard < HINT_SHARDS:
        raise ValueError(f"no hint shard {shard}: shards are 0 to {HINT_SHARDS - 1}")
    return CLASS_PREFIX + _short(f"{resource_class}#{shard}")


def hint_shard(peer_id: str) -> int:
    """The shard key a provider announces under: fixed by its peer id, spread evenly."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "big") % HINT_SHARDS


@final
@dataclass(frozen=True, slots=True)
class VerifiedAd:
    ad: CapacityAd
    envelope: Envelope


def validate_ad_record(key: str, value: bytes, *, now: int, max_skew_ms: int = DEFAULT_MAX_SKEW_MS) -> VerifiedAd:
    """Check a capacity-ad record as stored under ``key``.

    Raises:
        RemoteProtocolError: a subclass naming what is wrong (malformed, bad signature, wrong signer, expired...).
    """
    envelope = decode_envelope(value)
    ad = verify_envelope(envelope, CapacityAd, now=now, max_skew_ms=max_skew_ms)
    if key != cap_key(ad.peer):
        raise WrongSigner(f"ad of {ad.peer} stored under a key that is not its own")
    return VerifiedAd(ad, envelope)


def select_ad_record(key: str, values: list[bytes], *, now: int) -> int:
    """Index of the newest valid record among ``values`` (highest seq, then latest issue).

    Raises:
        MalformedMessage: none of the values is valid.
    """
    best: tuple[int, int] | None = None
    best_index = -1
    for index, value in enumerate(values):
        try:
            verified = validate_ad_record(key, value, now=now)
        except RemoteProtocolError:
            continue
        rank = (verified.ad.seq, verified.envelope.issued_at)
        if best is None or rank > best:
            best, best_index = rank, index
    if best_index < 0:
        raise MalformedMessage("no valid capacity ad among the records")
    return best_index
