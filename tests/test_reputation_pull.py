"""Reputation intake: the pull path skips records it already holds before checking their signatures; gossip
is checked once, by the validator, and stored from its result."""

from __future__ import annotations

import dataclasses

from node.reputation.records import RecordStore
from node.reputation.service import ReputationService
from node.store import Store
from protocol import codec
from protocol.messages import Outcome
from protocol.reputation import make_bundle, record_id
from tests.factories import ALICE, BOB, NOW
from tests.test_reputation_records import record_for, signed_receipt


def test_a_pulled_page_stores_new_records_and_skips_held_ones_unverified(tmp_path):
    store = Store.open(tmp_path / "coop.db")
    try:
        service = ReputationService(identity=BOB, records=RecordStore(store.db), clock_ms=lambda: NOW + 2000)
        receipt = signed_receipt()
        bundle = make_bundle(ALICE, record_for(receipt), receipt)
        rid = record_id(bundle.record)

        assert service._take_page((bundle,), 0, b"") == (bundle.record.time, rid, 1)
        assert service.records.count() == 1
        assert service.pulled_held == 0

        # The same record again, and a tampered copy at the same time: held, so neither is verified nor refused.
        tampered = dataclasses.replace(bundle, record=dataclasses.replace(bundle.record, score=0))
        assert record_id(tampered.record) == rid
        assert service._take_page((bundle, tampered), 0, b"") == (bundle.record.time, rid, 0)
        assert service.pulled_held == 2
        assert service.rejected == {}
        assert service.records.count() == 1

        # A tampered copy claiming to be newer is not held at that time: it is verified, and refused.
        newer = dataclasses.replace(tampered, record=dataclasses.replace(tampered.record, time=NOW + 1500))
        assert service._take_page((newer,), 0, b"") == (0, b"", 0)
        assert service.rejected == {"bad-signature": 1}
        assert service.records.time_of(rid) == bundle.record.time

        # A genuinely newer record by the same rater for the same receipt replaces the held one.
        update = make_bundle(ALICE, record_for(receipt, time=NOW + 1500, outcome=Outcome.SUCCESS, score=50), receipt)
        assert service._take_page((update,), 0, b"") == (NOW + 1500, rid, 1)
        assert service.records.time_of(rid) == NOW + 1500
        assert service.statistics()["pulled_held"] == 2
    finally:
        store.close()


class _Gossip:
    """The host's gossip inbox: these messages, then the end."""

    def __init__(self, messages: list[tuple[str, bytes]]) -> None:
        self.messages = messages

    async def gossip_messages(self, topic: str):
        for message in self.messages:
            yield message


async def test_gossip_is_stored_once_validated_and_checked_again_when_not(tmp_path):
    store = Store.open(tmp_path / "coop.db")
    try:
        service = ReputationService(identity=BOB, records=RecordStore(store.db), clock_ms=lambda: NOW + 2000)
        receipt = signed_receipt()
        good = codec.encode(make_bundle(ALICE, record_for(receipt), receipt))
        other = make_bundle(BOB, record_for(receipt, rater=BOB, ratee=ALICE), receipt)
        forged = codec.encode(dataclasses.replace(other, record=dataclasses.replace(other.record, score=1)))

        assert service.validate_gossip("peer", good)
        # `forged` never went through the validator (as if forgotten): consuming it checks it, and refuses it.
        service.host = _Gossip([("peer", good), ("peer", forged)])  # type: ignore[assignment]
        await service.consume_gossip()
        assert service.accepted == 1
        assert service.records.count() == 1
        assert service.rejected == {"bad-signature": 1}
        assert not service._validated  # what was remembered for the consumer was used, and dropped
    finally:
        store.close()
