"""Negotiation machines driven pairwise through a fake link (h11's ConnectionPair idea).

The link seals every message in a signed envelope with the sender's key and opens it on the other side with a
replay cache, exactly as the daemon's stream handler does; Agreements travel as bare frames (self-signed).
"""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.cosign import verify_both
from protocol.envelope import NonceCache, decode_envelope, open_envelope, seal
from protocol.messages import Accept, Agreement, Counter, PriceSheet, Quote, QuoteRequest, Reject, RejectCode
from protocol.negotiation import (
    ClientNegotiation,
    Completed,
    Failed,
    FloorPolicy,
    ProviderNegotiation,
    Quoted,
    Send,
    State,
)
from protocol.pricing import worst_case_cost
from tests.factories import ALICE, BOB, MALLORY, NOW, nonce, quote_request

SIGNED = (QuoteRequest, Quote, Counter, Accept, Reject)


class FakeLink:
    def __init__(self, client: ClientNegotiation, provider: ProviderNegotiation, *, drop_to_client=False):
        self.client = client
        self.provider = provider
        self.drop_to_client = drop_to_client
        self.caches = {"client": NonceCache(), "provider": NonceCache()}
        self.transcript: list[str] = []

    def _carry(self, message, sender, receiver_name, now):
        if isinstance(message, Agreement):
            wire = codec.encode(message)
            return codec.decode(wire, Agreement)
        envelope = seal(sender, message, now=now, ttl_ms=30_000, nonce=nonce())
        wire = codec.encode(envelope)
        return open_envelope(decode_envelope(wire), SIGNED, now=now, nonce_cache=self.caches[receiver_name])

    def run(self, now=NOW, step_ms=10):
        pending = [("provider", a) for a in self.client.start(now)]
        while pending:
            now += step_ms
            to, action = pending.pop(0)
            if not isinstance(action, Send | Quoted):
                continue
            if isinstance(action, Quoted):
                pending += [("provider", a) for a in self.client.accept(now)]
                continue
            self.transcript.append(type(action.message).TYPE)
            if to == "provider":
                received = self._carry(action.message, self.client.identity, "provider", now)
                pending += [("client", a) for a in self.provider.receive(received, now)]
            elif not self.drop_to_client:
                received = self._carry(action.message, self.provider.identity, "client", now)
                pending += [("provider", a) for a in self.client.receive(received, now)]
        return now


def pair(*, floor, max_price, list_price=None, max_rounds=3):
    request = quote_request(ALICE, max_price=max_price)
    client = ClientNegotiation(identity=ALICE, request=request, provider=BOB.peer_id, max_rounds=max_rounds)
    provider = ProviderNegotiation(identity=BOB, policy=FloorPolicy(floor=floor, list_price=list_price))
    return client, provider


FLOOR = PriceSheet(start_fee=100, per_cpu_second=10, per_gib_second=1)


def test_straight_to_agreement():
    client, provider = pair(floor=FLOOR, max_price=100_000)
    FakeLink(client, provider).run()
    assert isinstance(client.outcome, Completed)
    assert isinstance(provider.outcome, Completed)
    assert client.outcome.agreement == provider.outcome.agreement
    agreement = client.outcome.agreement
    verify_both(agreement)
    assert agreement.price_sheet == FLOOR
    assert agreement.max_cost == 100_000
    assert client.next_deadline() is None


def test_counter_offer_moves_the_price_down_to_agreement():
    list_price = PriceSheet(start_fee=400, per_cpu_second=40, per_gib_second=4)
    request = quote_request(max_price=1)
    list_cost = worst_case_cost(request.resources, request.limits, list_price)
    floor_cost = worst_case_cost(request.resources, request.limits, FLOOR)
    max_price = (list_cost + floor_cost) // 2  # between floor and list: needs a counter
    client, provider = pair(floor=FLOOR, list_price=list_price, max_price=max_price)
    link = FakeLink(client, provider)
    link.run()
    assert "counter" in link.transcript
    assert isinstance(client.outcome, Completed), client.outcome
    agreement = client.outcome.agreement
    assert worst_case_cost(request.resources, request.limits, agreement.price_sheet) <= max_price
    verify_both(agreement)


def test_counter_may_move_price_up():
    """A provider's counter-response can also raise the price; the client accepts if still under its max."""

    class Greedy(FloorPolicy):
        def counter(self, request, last, counter, *, now):
            return dataclasses.replace(last.price_sheet, start_fee=last.price_sheet.start_fee + 1)

    request = quote_request(max_price=10**9)
    client = ClientNegotiation(identity=ALICE, request=request, provider=BOB.peer_id)
    provider = ProviderNegotiation(identity=BOB, policy=Greedy(floor=FLOOR))
    client.start(NOW)
    quote = provider.receive(request, NOW)[0].message
    counter = Counter(job_id="job-1", client=ALICE.peer_id, quote_hash=_hash(quote), price_sheet=FLOOR, round=1)
    (send,) = provider.receive(counter, NOW + 1)
    assert send.message.price_sheet.start_fee == FLOOR.start_fee + 1
    (quoted,) = client.receive(send.message, NOW + 2)
    assert isinstance(quoted, Quoted)
    (accept,) = client.accept(NOW + 3)
    assert isinstance(accept.message, Accept)


def _hash(message):
    from protocol.envelope import message_hash

    return message_hash(message)


def test_rejection_carries_the_reason():
    client, provider = pair(floor=FLOOR, max_price=10)
    link = FakeLink(client, provider)
    link.run()
    assert link.transcript == ["quote-request", "reject"]
    assert isinstance(client.outcome, Failed)
    assert client.outcome.code is RejectCode.BELOW_FLOOR
    assert "floor" in client.outcome.message
    assert provider.state is State.FAILED


def test_rounds_are_bounded():
    list_price = PriceSheet(start_fee=1000, per_cpu_second=100)

    class Stubborn(FloorPolicy):
        def counter(self, request, last, counter, *, now):
            return last.price_sheet  # never moves

    request = quote_request(max_price=1100)
    client = ClientNegotiation(identity=ALICE, request=request, provider=BOB.peer_id, max_rounds=2)
    provider = ProviderNegotiation(identity=BOB, policy=Stubborn(floor=PriceSheet(), list_price=list_price))
    link = FakeLink(client, provider)
    link.run()
    assert link.transcript.count("counter") == 2
    assert isinstance(client.outcome, Failed)
    assert client.outcome.code is RejectCode.ABOVE_MAX_PRICE


def test_timeout_when_the_provider_never_answers():
    client, provider = pair(floor=FLOOR, max_price=100_000)
    link = FakeLink(client, provider, drop_to_client=True)
    now = link.run()
    deadline = client.next_deadline()
    assert deadline is not None
    assert client.on_timeout(deadline - 1) == []
    (failed,) = client.on_timeout(deadline)
    assert failed.code is RejectCode.TIMEOUT
    assert client.next_deadline() is None
    assert provider.on_timeout(now + 10**6)[0].code is RejectCode.TIMEOUT


def test_provider_refuses_forged_accept():
    request = quote_request()
    provider = ProviderNegotiation(identity=BOB, policy=FloorPolicy(floor=FLOOR))
    quote = provider.receive(request, NOW)[0].message
    forged = Accept(job_id="job-1", client=ALICE.peer_id, quote_hash=_hash(quote), client_signature=MALLORY.sign(b"x"))
    actions = provider.receive(forged, NOW + 1)
    assert isinstance(actions[0].message, Reject)
    assert actions[0].message.code is RejectCode.BAD_SIGNATURE


def test_client_refuses_agreement_with_changed_terms():
    client, provider = pair(floor=FLOOR, max_price=100_000)
    (send_request,) = client.start(NOW)
    (send_quote,) = provider.receive(send_request.message, NOW + 1)
    client.receive(send_quote.message, NOW + 2)
    (send_accept,) = client.accept(NOW + 2)
    send_agreement, _done = provider.receive(send_accept.message, NOW + 3)
    tampered = dataclasses.replace(send_agreement.message, max_cost=10**9)
    (failed,) = client.receive(tampered, NOW + 4)
    assert isinstance(failed, Failed)
    assert failed.code is RejectCode.BAD_REQUEST


def test_unexpected_message_fails_with_reason():
    client, _ = pair(floor=FLOOR, max_price=100_000)
    client.start(NOW)
    (failed,) = client.receive(quote_request(), NOW)
    assert failed.code is RejectCode.BAD_REQUEST
    assert client.receive(quote_request(), NOW) == []  # terminal machines stay put


def test_expired_quote_is_not_accepted_by_provider():
    request = quote_request()
    client = ClientNegotiation(identity=ALICE, request=request, provider=BOB.peer_id)
    provider = ProviderNegotiation(identity=BOB, policy=FloorPolicy(floor=FLOOR), quote_ttl_ms=100)
    client.start(NOW)
    (send_quote,) = provider.receive(request, NOW)
    client.receive(send_quote.message, NOW + 50)
    (send_accept,) = client.accept(NOW + 50)
    actions = provider.receive(send_accept.message, NOW + 101)
    assert actions[0].message.code is RejectCode.QUOTE_EXPIRED


@settings(max_examples=60, deadline=None)
@given(
    floor_cpu=st.integers(0, 50),
    list_extra=st.integers(0, 50),
    start_fee=st.integers(0, 500),
    max_price=st.integers(0, 5000),
    rounds=st.integers(0, 4),
)
def test_property_outcomes_agree_and_respect_max_price(floor_cpu, list_extra, start_fee, max_price, rounds):
    floor = PriceSheet(start_fee=start_fee, per_cpu_second=floor_cpu)
    list_price = PriceSheet(start_fee=start_fee, per_cpu_second=floor_cpu + list_extra)
    client, provider = pair(floor=floor, list_price=list_price, max_price=max_price, max_rounds=rounds)
    FakeLink(client, provider).run()
    assert client.terminal
    if isinstance(client.outcome, Completed):
        assert isinstance(provider.outcome, Completed)
        assert provider.outcome.agreement == client.outcome.agreement
        agreement = client.outcome.agreement
        verify_both(agreement)
        cost = worst_case_cost(agreement.resources, agreement.limits, agreement.price_sheet)
        assert cost <= max_price
        assert cost >= worst_case_cost(agreement.resources, agreement.limits, floor)
    else:
        assert isinstance(client.outcome, Failed)
        assert client.outcome.message
        floor_cost = worst_case_cost(client.request.resources, client.request.limits, floor)
        if floor_cost <= max_price and rounds >= 3 and list_extra == 0:
            pytest.fail("a request at or above the floor with list == floor must succeed")


def test_client_can_withdraw_and_quotes_in_hand_expire():
    request = quote_request()
    client = ClientNegotiation(identity=ALICE, request=request, provider=BOB.peer_id)
    provider = ProviderNegotiation(identity=BOB, policy=FloorPolicy(floor=FLOOR), quote_ttl_ms=1000)
    client.start(NOW)
    (send_quote,) = provider.receive(request, NOW)
    (quoted,) = client.receive(send_quote.message, NOW + 1)
    assert isinstance(quoted, Quoted)
    assert client.next_deadline() == send_quote.message.valid_until
    (expired,) = client.on_timeout(send_quote.message.valid_until)
    assert expired.code is RejectCode.QUOTE_EXPIRED

    other = ClientNegotiation(identity=ALICE, request=request, provider=BOB.peer_id)
    other.start(NOW)
    other.receive(send_quote.message, NOW + 1)
    send_reject, failed = other.withdraw()
    assert failed.code is RejectCode.WITHDRAWN
    assert send_reject.message.code is RejectCode.WITHDRAWN
    (gone,) = provider.receive(send_reject.message, NOW + 2)
    assert gone.code is RejectCode.WITHDRAWN
