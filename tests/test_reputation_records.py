import dataclasses

import pytest

from protocol import codec
from protocol.cosign import sign_as, terms_hash
from protocol.errors import BadSignature, Expired, NotYetValid, RemoteProtocolError
from protocol.messages import Outcome, Receipt, ReputationRecord
from protocol.reputation import (
    MAX_RECORD_AGE_MS,
    RateExceeded,
    RaterLimits,
    RecordBundle,
    SyncRequest,
    SyncResponse,
    UnboundRecord,
    decode_bundle,
    make_bundle,
    record_id,
    verify_bundle,
)
from tests.factories import ALICE, BOB, MALLORY, NOW, all_messages, digest


def signed_receipt():
    receipt = next(m for m in all_messages() if isinstance(m, Receipt))
    return sign_as(BOB, sign_as(ALICE, receipt, "client"), "provider")


def record_for(receipt, *, rater=ALICE, ratee=BOB, time=NOW + 1000, outcome=Outcome.SUCCESS, score=100):
    return ReputationRecord(rater=rater.peer_id, ratee=ratee.peer_id, receipt_hash=terms_hash(receipt),
                            outcome=outcome, score=score, time=time)  # fmt: skip


def test_bundle_round_trip_and_verify():
    receipt = signed_receipt()
    bundle = make_bundle(ALICE, record_for(receipt), receipt)
    wire = codec.encode(bundle)
    verified = decode_bundle(wire, now=NOW + 2000)
    assert verified.record.ratee == BOB.peer_id
    assert verified.cost == receipt.cost
    assert verified.id == record_id(bundle.record)
    # the provider may rate the client too
    back = make_bundle(BOB, record_for(receipt, rater=BOB, ratee=ALICE), receipt)
    verify_bundle(back, now=NOW + 2000)


def test_sync_messages_round_trip():
    receipt = signed_receipt()
    bundle = make_bundle(ALICE, record_for(receipt), receipt)
    for message in (
        SyncRequest(since=NOW, after_id=b"\x01" * 32, limit=50),
        SyncResponse(bundles=(bundle,), more=True),
    ):
        assert codec.decode(codec.encode(message)) == message


def test_forged_record_is_refused():
    receipt = signed_receipt()
    bundle = make_bundle(ALICE, record_for(receipt), receipt)
    better = dataclasses.replace(bundle.record, score=0, outcome=Outcome.BAD_RESULT)
    with pytest.raises(BadSignature):
        verify_bundle(dataclasses.replace(bundle, record=better), now=NOW + 2000)
    # signed by Mallory but claiming Alice as rater
    forged = RecordBundle(record=better, signature=MALLORY.sign(b"x"), receipt=receipt)
    with pytest.raises(BadSignature):
        verify_bundle(forged, now=NOW + 2000)


def test_record_without_a_valid_two_party_receipt_is_refused():
    receipt = signed_receipt()
    unsigned = dataclasses.replace(receipt, client_signature=b"")
    with pytest.raises(BadSignature):
        verify_bundle(make_bundle(ALICE, record_for(receipt), unsigned), now=NOW + 2000)
    other = sign_as(BOB, sign_as(ALICE, dataclasses.replace(receipt, job_id="other"), "client"), "provider")
    with pytest.raises(UnboundRecord):  # names a receipt other than the one attached
        verify_bundle(make_bundle(ALICE, record_for(receipt), other), now=NOW + 2000)
    with pytest.raises(UnboundRecord):  # Mallory was not part of the job
        verify_bundle(make_bundle(MALLORY, record_for(receipt, rater=MALLORY), receipt), now=NOW + 2000)


def test_record_times_are_checked():
    receipt = signed_receipt()
    with pytest.raises(NotYetValid):
        verify_bundle(make_bundle(ALICE, record_for(receipt, time=NOW + 10**7), receipt), now=NOW)
    with pytest.raises(Expired):
        verify_bundle(make_bundle(ALICE, record_for(receipt), receipt), now=NOW + MAX_RECORD_AGE_MS + 10**6)
    with pytest.raises(UnboundRecord):  # rates a job before it happened
        verify_bundle(make_bundle(ALICE, record_for(receipt, time=NOW - 10**6), receipt), now=NOW)


def test_oversized_bundle_is_refused():
    receipt = signed_receipt()
    bundle = make_bundle(ALICE, record_for(receipt), receipt)
    plain = codec.to_plain(bundle)
    plain["record"]["comment"] = "x" * 9000
    import msgpack

    with pytest.raises(RemoteProtocolError):
        codec.decode(msgpack.packb([1, "reputation-bundle", plain], use_bin_type=True))


def test_record_id_is_per_rater_per_receipt():
    receipt = signed_receipt()
    first = record_for(receipt, score=50)
    assert record_id(first) == record_id(dataclasses.replace(first, score=90, time=NOW + 5000))
    assert record_id(first) != record_id(record_for(receipt, rater=BOB, ratee=ALICE))
    assert record_id(first) != record_id(dataclasses.replace(first, receipt_hash=digest("x")))


def test_rater_limits():
    limits = RaterLimits(per_window=3, window_ms=1000, max_raters=2)
    for t in range(3):
        limits.check("a", NOW + t)
    with pytest.raises(RateExceeded):
        limits.check("a", NOW + 3)
    limits.check("a", NOW + 1001)  # the window moved on
    limits.check("b", NOW)
    limits.check("c", NOW)  # "a" is forgotten (LRU bound)
    limits.check("a", NOW + 1002)
