import dataclasses

import pytest

from protocol import codec
from protocol.envelope import seal
from protocol.errors import BadSignature, Expired, MalformedMessage, RemoteProtocolError, WrongSigner
from protocol.identity import Identity
from protocol.records import (
    AD_TTL_MS,
    HINT_SHARDS,
    cap_key,
    class_key,
    hint_shard,
    select_ad_record,
    validate_ad_record,
)
from tests.factories import ALICE, BOB, MALLORY, NOW, capacity_ad, nonce


def ad_record(identity=BOB, *, seq=1, now=NOW, ad=None):
    envelope = seal(identity, ad or capacity_ad(identity, seq=seq), now=now, ttl_ms=AD_TTL_MS, nonce=nonce())
    return codec.encode(envelope)


def test_keys_are_short_and_distinct():
    assert len(cap_key(BOB.peer_id)) < 50
    assert len(class_key("gpu:nvidia-geforce-rtx-4090-with-a-very-long-name")) < 50
    assert cap_key(BOB.peer_id) != cap_key(ALICE.peer_id)
    assert class_key("cpu") != class_key("gpu")


def test_shard_keys_are_distinct_short_and_spread_evenly():
    keys = {class_key("cpu"), *(class_key("cpu", n) for n in range(HINT_SHARDS))}
    assert len(keys) == 1 + HINT_SHARDS
    assert all(len(k) < 50 for k in keys)
    assert class_key("gpu", 0) != class_key("cpu", 0)
    with pytest.raises(ValueError, match="no hint shard 8"):
        class_key("cpu", HINT_SHARDS)
    with pytest.raises(ValueError, match="no hint shard -1"):
        class_key("cpu", -1)
    counts = [0] * HINT_SHARDS
    for _ in range(800):
        counts[hint_shard(Identity.generate().peer_id)] += 1
    assert min(counts) > 50  # 100 expected per shard; a skewed or constant pick fails here
    assert hint_shard(BOB.peer_id) == hint_shard(BOB.peer_id)


def test_valid_ad_is_accepted():
    verified = validate_ad_record(cap_key(BOB.peer_id), ad_record(), now=NOW + 1000)
    assert verified.ad.peer == BOB.peer_id


def test_unsigned_garbage_is_rejected():
    with pytest.raises(RemoteProtocolError):
        validate_ad_record(cap_key(BOB.peer_id), codec.encode(capacity_ad()), now=NOW)
    with pytest.raises(MalformedMessage):
        validate_ad_record(cap_key(BOB.peer_id), b"\x93\x01", now=NOW)


def test_forged_ad_signed_by_another_key_is_rejected():
    # Mallory signs an ad that claims to be Bob's.
    envelope = seal(BOB, capacity_ad(BOB), now=NOW, ttl_ms=AD_TTL_MS, nonce=nonce())
    from protocol.envelope import _signing_bytes

    fields = {k: getattr(envelope, k) for k in ("domain", "payload", "issued_at", "expires_at", "nonce")}
    fields["signer"] = MALLORY.public_key
    forged = dataclasses.replace(envelope, signer=MALLORY.public_key, signature=MALLORY.sign(_signing_bytes(**fields)))
    with pytest.raises(WrongSigner):
        validate_ad_record(cap_key(BOB.peer_id), codec.encode(forged), now=NOW)


def test_tampered_ad_is_rejected():
    envelope = seal(BOB, capacity_ad(BOB), now=NOW, ttl_ms=AD_TTL_MS, nonce=nonce())
    richer = codec.encode(dataclasses.replace(capacity_ad(BOB), cpus=1024))
    tampered = dataclasses.replace(envelope, payload=richer)
    with pytest.raises(BadSignature):
        validate_ad_record(cap_key(BOB.peer_id), codec.encode(tampered), now=NOW)


def test_expired_ad_is_rejected():
    with pytest.raises(Expired):
        validate_ad_record(cap_key(BOB.peer_id), ad_record(), now=NOW + AD_TTL_MS + 60_000)


def test_foreign_key_is_rejected():
    """Bob's genuine ad stored under Alice's key (to hide or shadow Alice) is refused."""
    with pytest.raises(WrongSigner, match="not its own"):
        validate_ad_record(cap_key(ALICE.peer_id), ad_record(BOB), now=NOW)


def test_select_prefers_newest_valid():
    key = cap_key(BOB.peer_id)
    old = ad_record(seq=1, now=NOW)
    new = ad_record(seq=2, now=NOW + 10)
    forged_newer = ad_record(MALLORY, seq=99)  # valid signature but Mallory's ad: not for Bob's key
    assert select_ad_record(key, [old, new, forged_newer], now=NOW + 20) == 1
    assert select_ad_record(key, [new, old], now=NOW + 20) == 0
    with pytest.raises(MalformedMessage):
        select_ad_record(key, [forged_newer, b"junk"], now=NOW)
