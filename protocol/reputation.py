"""Reputation records on the wire: signed by the rater, bound to a two-party receipt, checked before use.

A :class:`RecordBundle` carries a :class:`~protocol.messages.ReputationRecord`, the rater's signature over it,
and the Receipt (signed by both client and provider) it is bound to. A record is evidence only if
:func:`verify_bundle` accepts it:

* the rater's signature verifies (the key comes from the rater's peer id);
* the receipt's two signatures verify, the record names that receipt's hash, and the rater and ratee are the
  receipt's client and provider (one each): nobody can rate a job they were not part of, and a job costs both
  sides real work, so records cannot be minted for free;
* the record is not older than ``max_age_ms`` nor from the future, and not older than its job.

Record signatures are long-lived statements (unlike envelopes, which expire within a week) because records
stay useful for weeks: replays are harmless duplicates, deduplicated by :func:`record_id` (one record per rater
per receipt; a newer one from the same rater replaces it). :class:`RaterLimits` caps how many records one rater
may push per window.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import ClassVar, Final, final

from protocol import codec
from protocol.cosign import terms_hash, verify_both
from protocol.errors import BadSignature, Expired, LocalProtocolError, NotYetValid, RemoteProtocolError
from protocol.identity import Identity, public_key_from_peer_id, verify_signature
from protocol.messages import Receipt, ReputationRecord

REPUTATION_TOPIC: Final = "/coop/reputation/1"
SYNC_PROTOCOL_ID: Final = "/coop/sync/1.0.0"
MAX_RECORD_AGE_MS: Final = 90 * 24 * 3600 * 1000  # records older than 90 days are no longer exchanged
DEFAULT_SKEW_MS: Final = 30_000
_SIGNING_PREFIX: Final = b"coop-record/v1\x00"


class UnboundRecord(RemoteProtocolError):
    """The record is not bound to its receipt (wrong hash, or rater/ratee are not that job's two parties)."""

    code = "unbound-record"


class RateExceeded(RemoteProtocolError):
    """A rater pushed more records than its allowance in the current window."""

    code = "rate-exceeded"


@final
@codec.register
@dataclass(frozen=True, slots=True, kw_only=True)
class RecordBundle:
    TYPE: ClassVar[str] = "reputation-bundle"
    MAX_BYTES: ClassVar[int] = 8 << 10

    record: ReputationRecord
    signature: bytes
    receipt: Receipt

    def __post_init__(self) -> None:
        if len(self.signature) != 64:
            raise LocalProtocolError("record signature must be 64 bytes")


@final
@codec.register
@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRequest:
    """Pull: records whose time is at or after ``since`` (then after ``after_id`` within that ms), oldest first."""

    TYPE: ClassVar[str] = "sync-request"
    MAX_BYTES: ClassVar[int] = 256

    since: int
    after_id: bytes = b""
    limit: int = 100

    def __post_init__(self) -> None:
        if not self.since >= 0 or not 1 <= self.limit <= 500 or len(self.after_id) not in (0, 32):
            raise LocalProtocolError("bad sync request")


@final
@codec.register
@dataclass(frozen=True, slots=True, kw_only=True)
class SyncResponse:
    TYPE: ClassVar[str] = "sync-response"
    MAX_BYTES: ClassVar[int] = 2 << 20

    bundles: tuple[RecordBundle, ...]
    more: bool

    def __post_init__(self) -> None:
        if len(self.bundles) > 500:
            raise LocalProtocolError("too many bundles in one response")


def record_signing_bytes(record: ReputationRecord) -> bytes:
    return _SIGNING_PREFIX + codec.encode(record)


def record_id(record: ReputationRecord) -> bytes:
    """One record per rater per receipt: the id does not depend on the score or time."""
    return hashlib.sha256(record.rater.encode() + b"\x00" + record.receipt_hash).digest()


def make_bundle(identity: Identity, record: ReputationRecord, receipt: Receipt) -> RecordBundle:
    if record.rater != identity.peer_id:
        raise LocalProtocolError("the rater must be this identity")
    return RecordBundle(record=record, signature=identity.sign(record_signing_bytes(record)), receipt=receipt)


@final
@dataclass(frozen=True, slots=True)
class VerifiedRecord:
    record: ReputationRecord
    receipt: Receipt
    bundle: RecordBundle
    id: bytes

    @property
    def cost(self) -> int:
        return self.receipt.cost


def verify_bundle(
    bundle: RecordBundle, *, now: int, max_age_ms: int = MAX_RECORD_AGE_MS, max_skew_ms: int = DEFAULT_SKEW_MS
) -> VerifiedRecord:
    """Check a bundle (see the module docstring). Raises a RemoteProtocolError subclass naming what is wrong."""
    record, receipt = bundle.record, bundle.receipt
    if not verify_signature(public_key_from_peer_id(record.rater), bundle.signature, record_signing_bytes(record)):
        raise BadSignature("the rater's signature on the record does not verify")
    verify_both(receipt)
    if record.receipt_hash != terms_hash(receipt):
        raise UnboundRecord("the record names another receipt")
    if {record.rater, record.ratee} != {receipt.client, receipt.provider}:
        raise UnboundRecord("the rater and ratee are not the two parties of the receipt")
    if record.time > now + max_skew_ms:
        raise NotYetValid("the record is dated in the future")
    if record.time < now - max_age_ms:
        raise Expired("the record is too old to be exchanged")
    if record.time + max_skew_ms < receipt.issued_at:
        raise UnboundRecord("the record predates the job it rates")
    return VerifiedRecord(record, receipt, bundle, record_id(record))


def decode_bundle(data: bytes, *, now: int) -> VerifiedRecord:
    """Decode gossip bytes and verify them."""
    return verify_bundle(codec.decode(data, RecordBundle), now=now)


class RaterLimits:
    """At most ``per_window`` records per rater per ``window_ms``; tracks at most ``max_raters`` raters (LRU)."""

    def __init__(self, *, per_window: int = 60, window_ms: int = 60_000, max_raters: int = 10_000) -> None:
        self.per_window = per_window
        self.window_ms = window_ms
        self.max_raters = max_raters
        self._seen: OrderedDict[str, deque[int]] = OrderedDict()

    def check(self, rater: str, now: int) -> None:
        """Count one record from ``rater``; raise :class:`RateExceeded` past the allowance."""
        times = self._seen.pop(rater, None) or deque()
        while times and times[0] <= now - self.window_ms:
            times.popleft()
        self._seen[rater] = times
        if len(self._seen) > self.max_raters:
            self._seen.popitem(last=False)
        if len(times) >= self.per_window:
            raise RateExceeded(f"more than {self.per_window} records in {self.window_ms // 1000} s from one rater")
        times.append(now)
