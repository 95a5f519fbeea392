"""DHT records: keys and validation of signed capacity ads.

Keys are short (py-libp2p drops non-multihash keys over 50 bytes from multi-hop lookups), so long names are
hashed: ``/coop/cap/<32 hex>`` for a peer's ad and ``/coop/cls/<epoch>/<24 hex>`` for a resource class's
provider hints.

Provider hints and py-libp2p's provider store
---------------------------------------------
A node storing provider records keeps at most k = 20 providers per key, first come first kept, and a record
lives 48 h with no withdraw (docs/libp2p-facts.md, trap 7). One key per class would list at most 20 providers,
the first 20 ever to announce, for two days after they left. So a class's hints are spread over keys:

* **epochs**: every key names a :data:`HINT_EPOCH_MS` window (one hour); providers announce under the current
  window (and the next one when it starts within ``lead_ms``), finders ask the current window. A key's records
  are therefore from providers alive in the last hour, and the stale ones fall out of use with their window.
* **shards**: besides the class's main key, a provider announces under one of :data:`HINT_SHARDS` shard keys,
  picked by its peer id. A finder asks the main key, and only when it answers k or more providers (full, so
  providers may be missing) the shard keys too: a class lists up to k x (1 + shards) providers per window.

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


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cap_key(peer_id: str) -> str:
    """The DHT key of a peer's capacity ad (42 bytes)."""
    return CAP_PREFIX + _short(peer_id)


HINT_EPOCH_MS: Final = 3_600_000  # provider hints are keyed by the hour
HINT_SHARDS: Final = 8
PROVIDERS_PER_KEY: Final = 20  # what a storing node keeps per key (py-libp2p: k, BUCKET_SIZE)
# The broad classes a find asks for (node/daemon.py); narrow ones (``mem:<N>g``, ``gpu:<model>``) get no shards.
SHARDED_CLASSES: Final = frozenset({"cpu", "gpu"})


def hint_epoch(now_ms: int) -> int:
    """The hint window ``now_ms`` falls in."""
    return now_ms // HINT_EPOCH_MS


def hint_shard(peer_id: str, shards: int = HINT_SHARDS) -> int:
    """The shard a provider announces under: fixed by its peer id, spread evenly."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "big") % shards


def class_key(resource_class: str, *, epoch: int, shard: int | None = None) -> str:
    """The DHT key under which providers of a resource class (``cpu``, ``mem:8g``, ``gpu:...``) are hinted.

    ``shard=None`` is the class's main key for the window ``epoch``; a shard number gives one of its shard keys.
    """
    if epoch < 0 or (shard is not None and not 0 <= shard < HINT_SHARDS):
        raise ValueError(f"no hint key for epoch {epoch}, shard {shard}")
    name = resource_class if shard is None else f"{resource_class}#{shard}"
    return f"{CLASS_PREFIX}{epoch}/{_short(name)[:24]}"


def hint_key_epoch(key: str) -> int | None:
    """The window of a provider-hint key made by :func:`class_key`; None for any other key."""
    if not key.startswith(CLASS_PREFIX):
        return None
    epoch, _, rest = key[len(CLASS_PREFIX) :].partition("/")
    return int(epoch) if epoch.isdigit() and len(rest) == 24 else None


def provider_hint_keys(resource_class: str, peer_id: str, *, now_ms: int, lead_ms: int) -> list[str]:
    """Every key a provider of ``resource_class`` announces under at ``now_ms``: the main key and (for the
    :data:`SHARDED_CLASSES`) its shard key for the current window, and for the next window too when it starts
    within ``lead_ms`` (so the next window's keys are full when finders move to it; make ``lead_ms`` cover the
    refresh interval and the clock skew)."""
    epochs = [hint_epoch(now_ms)]
    if hint_epoch(now_ms + lead_ms) != epochs[0]:
        epochs.append(epochs[0] + 1)
    shards = [None, hint_shard(peer_id)] if resource_class in SHARDED_CLASSES else [None]
    return [class_key(resource_class, epoch=e, shard=n) for e in epochs for n in shards]


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
