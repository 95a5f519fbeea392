import dataclasses

import pytest

from protocol import codec
from protocol.envelope import (
    DEFAULT_MAX_SKEW_MS,
    Envelope,
    NonceCache,
    decode_envelope,
    message_hash,
    open_envelope,
    seal,
)
from protocol.errors import (
    BadSignature,
    Expired,
    LocalProtocolError,
    NotYetValid,
    RemoteProtocolError,
    Replayed,
    WrongDomain,
    WrongSigner,
)
from protocol.messages import CapacityAd, Quote, QuoteRequest
from tests.factories import ALICE, BOB, MALLORY, NOW, capacity_ad, nonce, quote_request

TTL = 60_000


def sealed_request(identity=ALICE, message=None, now=NOW):
    return seal(identity, message or quote_request(identity), now=now, ttl_ms=TTL, nonce=nonce())


def test_seal_and_open_round_trip():
    envelope = sealed_request()
    wire = codec.encode(envelope)
    again = decode_envelope(wire)
    assert again == envelope
    message = open_envelope(again, QuoteRequest, now=NOW + 1000, nonce_cache=NonceCache())
    assert message == quote_request()
    assert envelope.signer_peer_id == ALICE.peer_id


def test_cannot_seal_someone_elses_message():
    with pytest.raises(LocalProtocolError):
        seal(MALLORY, quote_request(ALICE), now=NOW, ttl_ms=TTL, nonce=nonce())


def _decode_and_open(wire):
    return open_envelope(decode_envelope(wire), QuoteRequest, now=NOW, nonce_cache=NonceCache())


def test_every_byte_tampered_is_refused():
    wire = codec.encode(sealed_request())
    for index in range(len(wire)):
        for flip in (0x01, 0x80):
            tampered = bytearray(wire)
            tampered[index] ^= flip
            with pytest.raises(RemoteProtocolError):
                _decode_and_open(bytes(tampered))


@pytest.mark.parametrize("field", ["payload", "issued_at", "expires_at", "nonce", "signature", "signer"])
def test_tampered_fields_are_bad_signatures(field):
    envelope = sealed_request()
    value = getattr(envelope, field)
    if isinstance(value, bytes):
        changed = bytearray(value)
        changed[len(changed) // 2] ^= 0x01
        value = bytes(changed)
    else:
        value = value - 1 if field == "issued_at" else value + 1
    if field == "signer":
        value = MALLORY.public_key  # a valid key that did not sign
    tampered = dataclasses.replace(envelope, **{field: value})
    with pytest.raises(BadSignature):
        open_envelope(tampered, QuoteRequest, now=NOW, nonce_cache=NonceCache())


def test_wrong_signer_is_its_own_error():
    # Mallory signs (validly) a request that claims to come from Alice.
    forged = sealed_request(identity=ALICE)
    payload_from_alice = forged.payload
    fields = {
        "signer": MALLORY.public_key,
        "domain": forged.domain,
        "payload": payload_from_alice,
        "issued_at": NOW,
        "expires_at": NOW + TTL,
        "nonce": nonce(),
    }
    from protocol.envelope import _signing_bytes

    envelope = Envelope(signature=MALLORY.sign(_signing_bytes(**fields)), **fields)
    with pytest.raises(WrongSigner):
        open_envelope(envelope, QuoteRequest, now=NOW, nonce_cache=NonceCache())


def test_domain_separation():
    envelope = seal(BOB, capacity_ad(BOB), now=NOW, ttl_ms=TTL, nonce=nonce())
    with pytest.raises(WrongDomain):
        open_envelope(envelope, Quote, now=NOW, nonce_cache=NonceCache())
    assert open_envelope(envelope, CapacityAd, now=NOW, nonce_cache=NonceCache()).peer == BOB.peer_id


def test_expiry_and_future_dates_with_skew():
    envelope = sealed_request()
    cache = NonceCache()
    # within skew either way: accepted
    open_envelope(envelope, QuoteRequest, now=NOW + TTL + DEFAULT_MAX_SKEW_MS, nonce_cache=NonceCache())
    open_envelope(envelope, QuoteRequest, now=NOW - DEFAULT_MAX_SKEW_MS, nonce_cache=cache)
    with pytest.raises(Expired):
        open_envelope(envelope, QuoteRequest, now=NOW + TTL + DEFAULT_MAX_SKEW_MS + 1, nonce_cache=NonceCache())
    with pytest.raises(NotYetValid):
        open_envelope(envelope, QuoteRequest, now=NOW - DEFAULT_MAX_SKEW_MS - 1, nonce_cache=NonceCache())


def test_replay_is_refused():
    envelope = sealed_request()
    cache = NonceCache()
    open_envelope(envelope, QuoteRequest, now=NOW, nonce_cache=cache)
    with pytest.raises(Replayed):
        open_envelope(envelope, QuoteRequest, now=NOW + 1, nonce_cache=cache)
    # the same nonce from a different signer is a different pair
    other = seal(BOB, quote_request(BOB), now=NOW, ttl_ms=TTL, nonce=envelope.nonce)
    open_envelope(other, QuoteRequest, now=NOW, nonce_cache=cache)


def test_each_failure_has_a_distinct_type():
    kinds = {BadSignature, WrongSigner, WrongDomain, Expired, NotYetValid, Replayed}
    assert len(kinds) == len({k.code for k in kinds})
    for kind in kinds:
        assert issubclass(kind, RemoteProtocolError)


def test_nonce_cache_is_bounded_and_never_lets_a_replay_through():
    cache = NonceCache(capacity=4, max_skew_ms=0)
    envelopes = [sealed_request(now=NOW + i) for i in range(10)]
    for envelope in envelopes:
        open_envelope(envelope, QuoteRequest, now=NOW + 10, nonce_cache=cache, max_skew_ms=0)
        assert len(cache) <= 4
    for envelope in envelopes:  # evicted ones are caught by the floor, kept ones by the set
        with pytest.raises(Replayed):
            open_envelope(envelope, QuoteRequest, now=NOW + 10, nonce_cache=cache, max_skew_ms=0)


def test_nonce_cache_forgets_expired_entries():
    cache = NonceCache(capacity=10, max_skew_ms=0)
    envelope = sealed_request()
    open_envelope(envelope, QuoteRequest, now=NOW, nonce_cache=cache, max_skew_ms=0)
    fresh = sealed_request(now=NOW + TTL + 1)
    open_envelope(fresh, QuoteRequest, now=NOW + TTL + 1, nonce_cache=cache, max_skew_ms=0)
    assert len(cache) == 1


def test_message_hash_depends_on_type_and_content():
    a = quote_request()
    assert message_hash(a) == message_hash(quote_request())
    assert message_hash(a) != message_hash(dataclasses.replace(a, max_price=a.max_price + 1))
