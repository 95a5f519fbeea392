"""Signed envelopes: who says what, for which purpose, valid when, said once.

An :class:`Envelope` wraps the canonical frame of one message with the signer's public key, a domain tag naming
the message type (so a signature made for one type can never be presented as another), issue and expiry times,
and a random nonce. The signature covers a fixed prefix plus the canonical encoding of every other field.

:func:`open_envelope` checks, in order: domain, signature, payload decoding, that the signer is the peer the
message names (its ``SIGNER`` field), validity window with an allowed clock skew, and replay against a
:class:`NonceCache` the caller owns. Each failure is its own :class:`~protocol.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar, final

from protocol import codec
from protocol.errors import (
    BadSignature,
    Expired,
    LocalProtocolError,
    MalformedMessage,
    NotYetValid,
    Replayed,
    WrongDomain,
    WrongSigner,
)
from protocol.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_from_public_key,
    verify_signature,
)

NONCE_BYTES: Final = 16
DEFAULT_MAX_SKEW_MS: Final = 30_000  # 30 s of clock disagreement tolerated either way
MAX_TTL_MS: Final = 7 * 24 * 3600 * 1000  # an envelope may live at most a week
_SIGNING_PREFIX: Final = b"coop-envelope-v1\x00"

M = TypeVar("M")


def domain_of(cls: type[Any]) -> str:
    """The domain-separation tag of a message type."""
    return f"coop/{cls.TYPE}/v1"


@final
@codec.register
@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    TYPE: ClassVar[str] = "envelope"
    MAX_BYTES: ClassVar[int] = 260 << 10  # the largest payload (job-spec, 256 KiB) plus the envelope fields

    signer: bytes
    domain: str
    payload: bytes
    issued_at: int
    expires_at: int
    nonce: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if len(self.signer) != PUBLIC_KEY_BYTES:
            raise LocalProtocolError("signer must be a 32-byte Ed25519 public key")
        if len(self.nonce) != NONCE_BYTES:
            raise LocalProtocolError(f"nonce must be {NONCE_BYTES} bytes")
        if len(self.signature) != SIGNATURE_BYTES:
            raise LocalProtocolError(f"signature must be {SIGNATURE_BYTES} bytes")
        if len(self.domain) > 64:
            raise LocalProtocolError("domain tag too long")
        if not 0 <= self.issued_at < self.expires_at <= self.issued_at + MAX_TTL_MS:
            raise LocalProtocolError("need 0 <= issued_at < expires_at <= issued_at + one week")

    @property
    def signer_peer_id(self) -> str:
        return peer_id_from_public_key(self.signer)


def _signing_bytes(
    *, signer: bytes, domain: str, payload: bytes, issued_at: int, expires_at: int, nonce: bytes
) -> bytes:
    return _SIGNING_PREFIX + codec.pack_canonical([domain, signer, payload, issued_at, expires_at, nonce])


def seal(identity: Identity, message: object, *, now: int, ttl_ms: int, nonce: bytes) -> Envelope:
    """Sign ``message`` for ``ttl_ms`` milliseconds from ``now``. The caller supplies a fresh random nonce."""
    cls = type(message)
    signer_field = getattr(cls, "SIGNER", None)
    if signer_field is None:
        raise LocalProtocolError(f"{cls.__name__} has no SIGNER field and cannot be sealed")
    if getattr(message, signer_field) != identity.peer_id:
        raise LocalProtocolError(f"{cls.__name__}.{signer_field} is not this identity's peer id")
    payload = codec.encode(message)
    fields = {
        "signer": identity.public_key,
        "domain": domain_of(cls),
        "payload": payload,
        "issued_at": now,
        "expires_at": now + ttl_ms,
        "nonce": nonce,
    }
    return Envelope(signature=identity.sign(_signing_bytes(**fields)), **fields)  # type: ignore[arg-type]


class NonceCache:
    """Bounded memory of (signer, nonce) pairs seen, for replay protection.

    Entries are forgotten once their envelope has expired (plus skew): an expired envelope is refused anyway.
    When full, the entry that expires soonest is evicted and the cache's *floor* rises to that entry's issue time:
    from then on anything issued at or before the floor is refused as a possible replay. That keeps memory bounded
    without ever letting a replay through; under overload it can refuse a genuine old message, never accept a
    repeated one.
    """

    def __init__(self, capacity: int = 100_000, *, max_skew_ms: int = DEFAULT_MAX_SKEW_MS) -> None:
        if capacity < 1:
            raise LocalProtocolError("capacity must be positive")
        self._capacity = capacity
        self._skew = max_skew_ms
        self._seen: dict[tuple[bytes, bytes], int] = {}
        self._heap: list[tuple[int, int, bytes, bytes]] = []  # (expires_at, issued_at, signer, nonce)
        self.floor = -1

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, *, signer: bytes, nonce: bytes, issued_at: int, expires_at: int, now: int) -> None:
        """Record the pair, or raise :class:`Replayed` if it was seen or is below the floor."""
        while self._heap and self._heap[0][0] + self._skew < now:
            _, _, s, n = heapq.heappop(self._heap)
            self._seen.pop((s, n), None)
        key = (signer, nonce)
        if key in self._seen:
            raise Replayed("this envelope was already received")
        if issued_at <= self.floor:
            raise Replayed("envelope is older than the replay window can vouch for")
        if len(self._seen) >= self._capacity:
            _, old_issued, s, n = heapq.heappop(self._heap)
            self._seen.pop((s, n), None)
            self.floor = max(self.floor, old_issued)
            if issued_at <= self.floor:
                raise Replayed("envelope is older than the replay window can vouch for")
        self._seen[key] = expires_at
        heapq.heappush(self._heap, (expires_at, issued_at, signer, nonce))


def verify_envelope(
    envelope: Envelope,
    expected: type[M] | tuple[type[Any], ...],
    *,
    now: int,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
) -> M:
    """Check domain, signature, signer binding and validity window; return the message. No replay check.

    ``expected`` is the message class acceptable here, or a tuple of them (chosen by the envelope's domain tag).
    """
    choices = expected if isinstance(expected, tuple) else (expected,)
    by_domain: dict[str, type[Any]] = {domain_of(c): c for c in choices}
    cls = by_domain.get(envelope.domain)
    if cls is None:
        wanted = ", ".join(by_domain)
        raise WrongDomain(f"envelope for {envelope.domain[:64]!r} presented as {wanted}")
    signed = _signing_bytes(
        signer=envelope.signer,
        domain=envelope.domain,
        payload=envelope.payload,
        issued_at=envelope.issued_at,
        expires_at=envelope.expires_at,
        nonce=envelope.nonce,
    )
    if not verify_signature(envelope.signer, envelope.signature, signed):
        raise BadSignature(f"{cls.TYPE} envelope signature does not verify")
    message: M = codec.decode(envelope.payload, cls)
    claimed = getattr(message, cls.SIGNER)
    if claimed != envelope.signer_peer_id:
        raise WrongSigner(f"{cls.TYPE} claims to be from {claimed} but is signed by {envelope.signer_peer_id}")
    if envelope.issued_at > now + max_skew_ms:
        raise NotYetValid(f"issued {envelope.issued_at - now} ms in the future")
    if envelope.expires_at + max_skew_ms < now:
        raise Expired(f"expired {now - envelope.expires_at} ms ago")
    return message


def open_envelope(
    envelope: Envelope,
    expected: type[M] | tuple[type[Any], ...],
    *,
    now: int,
    nonce_cache: NonceCache,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
) -> M:
    """:func:`verify_envelope`, then the replay check against ``nonce_cache``."""
    message = verify_envelope(envelope, expected, now=now, max_skew_ms=max_skew_ms)
    nonce_cache.check_and_add(
        signer=envelope.signer,
        nonce=envelope.nonce,
        issued_at=envelope.issued_at,
        expires_at=envelope.expires_at,
        now=now,
    )
    return message


def decode_envelope(data: bytes) -> Envelope:
    """Decode envelope bytes from the network (size-capped, strictly typed)."""
    try:
        return codec.decode(data, Envelope)
    except LocalProtocolError as exc:  # pragma: no cover - codec already converts these
        raise MalformedMessage(str(exc)) from exc


def message_hash(message: object) -> bytes:
    """sha256 over the message's domain tag and canonical frame: how messages refer to each other."""
    return hashlib.sha256(domain_of(type(message)).encode() + b"\x00" + codec.encode(message)).digest()
