"""Negotiation as two sans-IO state machines, one per side.

Theory of operation
-------------------
::

    client                                   provider
    QuoteRequest  ----------------------->   policy.quote()        -> Quote | Reject
                  <-----------------------   Quote (round 0)
    [Counter      ----------------------->   policy.counter()      -> Quote | Reject ]  at most max_rounds
    Accept(sig)   ----------------------->   derive Agreement, check client sig, countersign
                  <-----------------------   Agreement (both signatures)

Both sides derive the Agreement from the request and the accepted quote with :func:`agreement_for`, so the
Accept only needs the client's signature. The machines never do I/O: feed them messages with
``receive(message, now)``, call ``on_timeout(now)`` when ``next_deadline()`` passes, and carry out the returned
actions (:class:`Send`, :class:`Completed`, :class:`Failed`). Envelope sealing and opening happen outside, at
the boundary; the machines check that what they get belongs to this negotiation (job id, peers, hashes).

Rules: a terminal machine ignores nothing silently: any further message gets ``[]`` and leaves ``outcome``
unchanged. Every terminal state carries a reason (:attr:`outcome`). Rounds are bounded on both sides.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Final, Protocol, final

from protocol.cosign import sign_as, verify_role
from protocol.envelope import message_hash
from protocol.errors import BadSignature, InvalidKey
from protocol.identity import Identity
from protocol.messages import (
    Accept,
    Agreement,
    Counter,
    PriceSheet,
    Quote,
    QuoteRequest,
    Reject,
    RejectCode,
)
from protocol.pricing import Decline, midpoint, scale_sheet, sheet_at_least, worst_case_cost

DEFAULT_MAX_ROUNDS: Final = 3
DEFAULT_TIMEOUT_MS: Final = 10_000
DEFAULT_QUOTE_TTL_MS: Final = 30_000


class State(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"  # client: waiting for a quote
    COUNTERED = "countered"  # client: waiting for a revised quote
    QUOTED_CLIENT = "quote-in-hand"  # client: holds an acceptable quote; call accept() or withdraw()
    ACCEPTED = "accepted"  # client: waiting for the countersigned agreement
    QUOTED = "quoted"  # provider: waiting for accept / counter
    DONE = "done"
    FAILED = "failed"


@final
@dataclass(frozen=True, slots=True)
class Send:
    message: QuoteRequest | Quote | Counter | Accept | Reject | Agreement


@final
@dataclass(frozen=True, slots=True)
class Quoted:
    """The client holds an acceptable quote (worst-case ``cost``); the caller ranks and calls accept()."""

    quote: Quote
    cost: int


@final
@dataclass(frozen=True, slots=True)
class Completed:
    agreement: Agreement


@final
@dataclass(frozen=True, slots=True)
class Failed:
    code: RejectCode
    message: str


Action = Send | Quoted | Completed | Failed


def agreement_for(request: QuoteRequest, quote: Quote) -> Agreement:
    """The unsigned Agreement both sides derive from a request and the quote the client accepts."""
    return Agreement(
        job_id=request.job_id,
        client=request.client,
        provider=quote.provider,
        request_hash=message_hash(request),
        quote_hash=message_hash(quote),
        price_sheet=quote.price_sheet,
        resources=request.resources,
        limits=request.limits,
        max_cost=request.max_price,
    )


class QuotePolicy(Protocol):
    """The provider's pricing decisions (pure)."""

    def quote(self, request: QuoteRequest, *, now: int) -> PriceSheet | Decline: ...

    def counter(self, request: QuoteRequest, last: Quote, counter: Counter, *, now: int) -> PriceSheet | Decline: ...


@final
@dataclass(frozen=True, slots=True)
class FloorPolicy:
    """Quote ``list_price``; accept any counter at or above ``floor``, else meet half way while above floor."""

    floor: PriceSheet
    list_price: PriceSheet | None = None

    def quote(self, request: QuoteRequest, *, now: int) -> PriceSheet | Decline:
        sheet = self.list_price or self.floor
        if worst_case_cost(request.resources, request.limits, self.floor) > request.max_price:
            return Decline(RejectCode.BELOW_FLOOR, "max price is below this provider's floor for the job")
        return sheet

    def counter(self, request: QuoteRequest, last: Quote, counter: Counter, *, now: int) -> PriceSheet | Decline:
        if sheet_at_least(counter.price_sheet, self.floor):
            return counter.price_sheet
        middle = midpoint(counter.price_sheet, last.price_sheet)
        if not sheet_at_least(middle, self.floor) or middle == last.price_sheet:
            return Decline(RejectCode.BELOW_FLOOR, "counter-offer is below this provider's floor")
        return middle


class _Machine:
    state: State
    outcome: Completed | Failed | None
    _deadline: int | None

    def next_deadline(self) -> int | None:
        """When :meth:`on_timeout` must be called if nothing arrives (ms), or None when terminal."""
        return None if self.terminal else self._deadline

    @property
    def terminal(self) -> bool:
        return self.state in (State.DONE, State.FAILED)

    def _fail(self, code: RejectCode, message: str) -> list[Action]:
        self.state = State.FAILED
        failed = Failed(code, message)
        self.outcome = failed
        return [failed]

    def on_timeout(self, now: int) -> list[Action]:
        if self.terminal or self._deadline is None or now < self._deadline:
            return []
        if self.state is State.QUOTED_CLIENT:
            return self._fail(RejectCode.QUOTE_EXPIRED, "the quote expired before it was accepted")
        return self._fail(RejectCode.TIMEOUT, f"no answer from the peer in state {self.state.value}")


class ClientNegotiation(_Machine):
    """The client's side of one negotiation with one provider."""

    def __init__(
        self,
        *,
        identity: Identity,
        request: QuoteRequest,
        provider: str,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
    ) -> None:
        if request.client != identity.peer_id:
            raise ValueError("request.client must be this identity")
        self.identity = identity
        self.request = request
        self.provider = provider
        self.max_rounds = max_rounds
        self.timeout_ms = timeout_ms
        self.request_hash = message_hash(request)
        self.state = State.IDLE
        self.outcome = None
        self.rounds = 0
        self.last_quote: Quote | None = None
        self._agreement: Agreement | None = None
        self._deadline = None

    def start(self, now: int) -> list[Action]:
        if self.state is not State.IDLE:
            return []
        self.state = State.REQUESTED
        self._deadline = now + self.timeout_ms
        return [Send(self.request)]

    def quoted_cost(self, quote: Quote) -> int:
        return worst_case_cost(self.request.resources, self.request.limits, quote.price_sheet)

    def receive(self, message: object, now: int) -> list[Action]:
        if self.terminal:
            return []
        if isinstance(message, Reject):
            if message.job_id != self.request.job_id or message.peer != self.provider:
                return self._fail(RejectCode.BAD_REQUEST, "reject for another negotiation")
            return self._fail(message.code, message.message or message.code.value)
        if isinstance(message, Quote) and self.state in (State.REQUESTED, State.COUNTERED):
            return self._on_quote(message, now)
        if isinstance(message, Agreement) and self.state is State.ACCEPTED:
            return self._on_agreement(message)
        return self._fail(RejectCode.BAD_REQUEST, f"unexpected {type(message).__name__} in state {self.state.value}")

    def _on_quote(self, quote: Quote, now: int) -> list[Action]:
        if (
            quote.job_id != self.request.job_id
            or quote.provider != self.provider
            or quote.request_hash != self.request_hash
        ):
            return self._fail(RejectCode.BAD_REQUEST, "quote does not answer this request")
        if quote.valid_until <= now:
            return self._fail(RejectCode.QUOTE_EXPIRED, "quote arrived already expired")
        self.last_quote = quote
        cost = self.quoted_cost(quote)
        if cost <= self.request.max_price:
            self.state = State.QUOTED_CLIENT
            self._deadline = quote.valid_until
            return [Quoted(quote, cost)]
        if self.rounds >= self.max_rounds:
            return self._fail(
                RejectCode.ABOVE_MAX_PRICE,
                f"best quote costs up to {cost}, above the max price {self.request.max_price}",
            )
        self.rounds += 1
        self.state = State.COUNTERED
        self._deadline = now + self.timeout_ms
        proposal = scale_sheet(quote.price_sheet, self.request.max_price, max(cost, 1))
        counter = Counter(
            job_id=self.request.job_id,
            client=self.identity.peer_id,
            quote_hash=message_hash(quote),
            price_sheet=proposal,
            round=self.rounds,
        )
        return [Send(counter)]

    def accept(self, now: int) -> list[Action]:
        """Accept the quote in hand: sign the derived Agreement and send the Accept."""
        if self.state is not State.QUOTED_CLIENT or self.last_quote is None:
            return []
        if self.last_quote.valid_until <= now:
            return self._fail(RejectCode.QUOTE_EXPIRED, "the quote expired before it was accepted")
        agreement = sign_as(self.identity, agreement_for(self.request, self.last_quote), "client")
        self._agreement = agreement
        self.state = State.ACCEPTED
        self._deadline = now + self.timeout_ms
        accept = Accept(
            job_id=self.request.job_id,
            client=self.identity.peer_id,
            quote_hash=message_hash(self.last_quote),
            client_signature=agreement.client_signature,
        )
        return [Send(accept)]

    def withdraw(self, message: str = "another offer was chosen") -> list[Action]:
        """Decline politely (a signed Reject to the provider) and end this negotiation."""
        if self.terminal:
            return []
        reject = Reject(
            job_id=self.request.job_id, peer=self.identity.peer_id, code=RejectCode.WITHDRAWN, message=message
        )
        return [Send(reject), *self._fail(RejectCode.WITHDRAWN, message)]

    def _on_agreement(self, agreement: Agreement) -> list[Action]:
        assert self._agreement is not None
        ours = self._agreement
        if dataclasses.replace(agreement, provider_signature=b"") != ours:
            return self._fail(RejectCode.BAD_REQUEST, "agreement differs from the accepted terms")
        try:
            verify_role(agreement, "provider")
        except (BadSignature, InvalidKey):
            return self._fail(RejectCode.BAD_SIGNATURE, "provider's agreement signature is invalid")
        self.state = State.DONE
        done = Completed(agreement)
        self.outcome = done
        return [done]


class ProviderNegotiation(_Machine):
    """The provider's side of one negotiation with one client."""

    def __init__(
        self,
        *,
        identity: Identity,
        policy: QuotePolicy,
        load_permille: int = 0,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        quote_ttl_ms: int = DEFAULT_QUOTE_TTL_MS,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
    ) -> None:
        self.identity = identity
        self.policy = policy
        self.load_permille = load_permille
        self.max_rounds = max_rounds
        self.quote_ttl_ms = quote_ttl_ms
        self.timeout_ms = timeout_ms
        self.state = State.IDLE
        self.outcome = None
        self.request: QuoteRequest | None = None
        self.last_quote: Quote | None = None
        self._deadline = None

    def _reject(self, job_id: str, code: RejectCode, message: str, *, retryable: bool = False) -> list[Action]:
        reject = Reject(job_id=job_id, peer=self.identity.peer_id, code=code, message=message, retryable=retryable)
        return [Send(reject), *self._fail(code, message)]

    def _quote(self, sheet: PriceSheet, round_: int, now: int) -> list[Action]:
        assert self.request is not None
        quote = Quote(
            job_id=self.request.job_id,
            provider=self.identity.peer_id,
            request_hash=message_hash(self.request),
            price_sheet=sheet,
            valid_until=now + self.quote_ttl_ms,
            load_permille=self.load_permille,
            round=round_,
        )
        self.last_quote = quote
        self.state = State.QUOTED
        self._deadline = now + self.timeout_ms
        return [Send(quote)]

    def receive(self, message: object, now: int) -> list[Action]:
        if self.terminal:
            return []
        if isinstance(message, QuoteRequest) and self.state is State.IDLE:
            self.request = message
            if message.deadline <= now:
                return self._reject(message.job_id, RejectCode.BAD_REQUEST, "the job's deadline has passed")
            decision = self.policy.quote(message, now=now)
            if isinstance(decision, Decline):
                return self._reject(message.job_id, decision.code, decision.message, retryable=True)
            return self._quote(decision, 0, now)
        if self.state is not State.QUOTED or self.request is None or self.last_quote is None:
            return self._fail(RejectCode.BAD_REQUEST, f"unexpected {type(message).__name__} in {self.state.value}")
        job_id = self.request.job_id
        if isinstance(message, Reject):
            return self._fail(message.code, f"client withdrew: {message.message or message.code.value}")
        if isinstance(message, Counter):
            return self._on_counter(message, now)
        if isinstance(message, Accept):
            return self._on_accept(message, now)
        return self._reject(job_id, RejectCode.BAD_REQUEST, f"unexpected {type(message).__name__}")

    def _on_counter(self, counter: Counter, now: int) -> list[Action]:
        assert self.request is not None
        assert self.last_quote is not None
        job_id = self.request.job_id
        if counter.job_id != job_id or counter.client != self.request.client:
            return self._reject(job_id, RejectCode.BAD_REQUEST, "counter for another negotiation")
        if counter.quote_hash != message_hash(self.last_quote):
            return self._reject(job_id, RejectCode.BAD_REQUEST, "counter does not answer the latest quote")
        if counter.round != self.last_quote.round + 1 or counter.round > self.max_rounds:
            return self._reject(job_id, RejectCode.ROUNDS_EXHAUSTED, f"at most {self.max_rounds} counter rounds")
        decision = self.policy.counter(self.request, self.last_quote, counter, now=now)
        if isinstance(decision, Decline):
            return self._reject(job_id, decision.code, decision.message)
        return self._quote(decision, counter.round, now)

    def _on_accept(self, accept: Accept, now: int) -> list[Action]:
        assert self.request is not None
        assert self.last_quote is not None
        job_id = self.request.job_id
        if accept.job_id != job_id or accept.client != self.request.client:
            return self._reject(job_id, RejectCode.BAD_REQUEST, "accept for another negotiation")
        if accept.quote_hash != message_hash(self.last_quote):
            return self._reject(job_id, RejectCode.BAD_REQUEST, "accept names a quote that is not the latest")
        if self.last_quote.valid_until < now:
            return self._reject(job_id, RejectCode.QUOTE_EXPIRED, "the accepted quote has expired", retryable=True)
        terms = agreement_for(self.request, self.last_quote)
        half = dataclasses.replace(terms, client_signature=accept.client_signature)
        try:
            verify_role(half, "client")
        except (BadSignature, InvalidKey):
            return self._reject(job_id, RejectCode.BAD_SIGNATURE, "client's agreement signature is invalid")
        agreement = sign_as(self.identity, half, "provider")
        self.state = State.DONE
        done = Completed(agreement)
        self.outcome = done
        return [Send(agreement), done]
