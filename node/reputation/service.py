"""The reputation service: rate finished jobs, gossip the records, pull what gossip missed, keep trust current.

Theory of operation
-------------------
* After a job, each side calls :meth:`ReputationService.rate` with the job's receipt: the record is signed,
  stored, and published on ``/coop/reputation/1``.
* Gossip is validated before it is accepted or forwarded (:meth:`validate_gossip`): decode under the size cap,
  rater signature, two-party receipt and binding, freshness, not already held, and at most
  ``RaterLimits.per_window`` records per rater per window. Every refusal is counted by reason; nothing refused
  is stored or forwarded.
* Gossip is best effort, so every ``sync_interval_s`` the node pulls from a few connected peers over
  ``/coop/sync/1.0.0``: pages of bundles after the cursor it reached with that peer (from the start, the first
  time), each verified exactly like gossip (except the rate limit: the puller asked for them).
* Trust scores (protocol/trust.py) are recomputed lazily after records change.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import trio

from node import net
from node.market.wire import ChannelClosed, FrameChannel, StreamChannel
from node.reputation.records import RecordStore
from node.store import MAX_SQL_INT
from protocol import codec
from protocol.cosign import terms_hash
from protocol.errors import MalformedMessage, RemoteProtocolError
from protocol.identity import Identity
from protocol.messages import Outcome, Receipt, ReputationRecord
from protocol.reputation import (
    REPUTATION_TOPIC,
    SYNC_PROTOCOL_ID,
    RaterLimits,
    RecordBundle,
    SyncRequest,
    SyncResponse,
    VerifiedRecord,
    make_bundle,
    record_id,
    verify_bundle,
)
from protocol.trust import TrustParams, TrustScore, TrustTable, compute_trust

log = logging.getLogger(__name__)

SYNC_PEERS: Final = 3  # peers pulled from per round
SYNC_MAX_PAGES: Final = 20  # per peer per round (500 records a page)
SYNC_TIMEOUT_S: Final = 10.0
MAX_GOSSIP_BYTES: Final = RecordBundle.MAX_BYTES
VALIDATED_CACHE: Final = 2 * net.GOSSIP_INBOX_LEN  # validated messages not yet consumed (the inbox holds 256)


class ReputationService:
    def __init__(
        self,
        *,
        identity: Identity,
        records: RecordStore,
        clock_ms: Callable[[], int],
        sync_interval_s: float = 30.0,
        trust_params: TrustParams | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.records = records
        self.host: net.NetHost | None = None  # set once the host is up (the host needs our validator first)
        self.clock_ms = clock_ms
        self.sync_interval_s = sync_interval_s
        self.trust_params = trust_params or TrustParams()
        self.rng = rng or random.Random()
        self.limits = RaterLimits()
        self.rejected: dict[str, int] = {}
        self.accepted = 0
        self.pulled = 0
        self.pulled_held = 0  # pulled records skipped unverified: we held them already
        self._cursors: dict[str, tuple[int, bytes]] = {}
        self._validated: OrderedDict[bytes, VerifiedRecord] = OrderedDict()  # sha256 of gossip data -> its check
        self._table: TrustTable | None = None

    # ------------------------------------------------------------------------------------------- trust

    def table(self) -> TrustTable:
        if self._table is None:
            evidence = self.records.evidence()
            self._table = compute_trust(
                evidence, me=self.identity.peer_id, now=self.clock_ms(), params=self.trust_params
            )
        return self._table

    def trust(self, peer: str) -> float:
        return self.table().score(peer)

    def explain(self, peer: str) -> TrustScore:
        return self.table().explain(peer)

    def _changed(self) -> None:
        self._table = None

    # ------------------------------------------------------------------------------------------- producing

    async def rate(self, *, receipt: Receipt, outcome: Outcome, score: int, comment: str = "") -> VerifiedRecord | None:
        """Sign, store and publish our record about the other party of ``receipt``.

        Returns None, rating nobody, for a job this node ran for itself: there is no other party (and a record
        naming us twice would not build; raised from the provider's receipt hook, that ended the node).
        """
        me = self.identity.peer_id
        if receipt.client == receipt.provider == me:
            return None
        ratee = receipt.provider if receipt.client == me else receipt.client
        record = ReputationRecord(
            rater=me,
            ratee=ratee,
            receipt_hash=terms_hash(receipt),
            outcome=outcome,
            score=score,
            time=max(self.clock_ms(), receipt.issued_at),
            comment=comment,
        )
        verified = verify_bundle(make_bundle(self.identity, record, receipt), now=self.clock_ms())
        if self.records.put(verified, received_ms=self.clock_ms()):
            self._changed()
        try:
            assert self.host is not None
            await self.host.publish(REPUTATION_TOPIC, codec.encode(verified.bundle))
        except (net.NetError, ValueError) as exc:  # gossip is best effort: the pull path delivers it later
            log.info("could not publish a record: %s", exc)
        return verified

    # ------------------------------------------------------------------------------------------- receiving

    def _refuse(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def _verify(self, bundle: RecordBundle) -> VerifiedRecord:
        """:func:`verify_bundle`, and that the record fits the records table.

        Two colluding identities can sign a receipt with any cost up to 2**64 - 1; SQLite integers stop at
        2**63 - 1, and storing one would raise OverflowError in the gossip consumer or the pull loop (ending the
        node). Such a record is refused like any other malformed one.
        """
        verified = verify_bundle(bundle, now=self.clock_ms())
        if verified.cost > MAX_SQL_INT:
            raise MalformedMessage("the receipt's cost is out of range")
        return verified

    def _check(self, data: bytes) -> VerifiedRecord | None:
        try:
            verified = self._verify(codec.decode(data, RecordBundle))
        except RemoteProtocolError as exc:
            self._refuse(exc.code)
            return None
        return verified

    def validate_gossip(self, peer: str, data: bytes) -> bool:
        """The topic validator: accept (and forward) only records that are valid, new, and within the rate."""
        if len(data) > MAX_GOSSIP_BYTES:
            self._refuse("oversized")
            return False
        verified = self._check(data)
        if verified is None:
            return False
        # Our own records are stored before they are published (and libp2p validates what we publish too).
        if verified.record.rater != self.identity.peer_id and not self._is_news(verified):
            self._refuse("replayed")
            return False
        try:
            self.limits.check(verified.record.rater, self.clock_ms())
        except RemoteProtocolError as exc:
            self._refuse(exc.code)
            return False
        self._remember(data, verified)
        return True

    def _remember(self, data: bytes, verified: VerifiedRecord) -> None:
        """Keep the validator's result for :meth:`consume_gossip`, for the last VALIDATED_CACHE messages."""
        self._validated[hashlib.sha256(data).digest()] = verified
        while len(self._validated) > VALIDATED_CACHE:
            self._validated.popitem(last=False)

    def _is_news(self, verified: VerifiedRecord) -> bool:
        held = self.records.time_of(verified.id)
        return held is None or held < verified.record.time

    async def consume_gossip(self) -> None:
        assert self.host is not None
        async for _peer, data in self.host.gossip_messages(REPUTATION_TOPIC):
            # Validated already: take the validator's result for these exact bytes (checking the three signatures
            # again was a tenth of a client's CPU in a round trip); check again only if it has been forgotten.
            verified = self._validated.pop(hashlib.sha256(data).digest(), None) or self._check(data)
            if verified is not None and self.records.put(verified, received_ms=self.clock_ms()):
                self.accepted += 1
                self._changed()

    # ------------------------------------------------------------------------------------------- pull path

    async def rpc_sync(self, channel: FrameChannel) -> None:
        """Serve pages of records until the peer closes the stream."""
        while True:
            try:
                with trio.fail_after(SYNC_TIMEOUT_S):
                    data = await channel.receive(SyncRequest.MAX_BYTES)
            except (ChannelClosed, trio.TooSlowError):
                return
            request = codec.decode(data, SyncRequest)
            # `since` may be up to 2**64 - 1 on the wire; no record is newer than SQLite's largest integer.
            since = min(request.since, MAX_SQL_INT)
            bundles, more = self.records.page(since=since, after_id=request.after_id, limit=request.limit)
            await channel.send(codec.encode(SyncResponse(bundles=tuple(bundles), more=more)))

    async def pull_from(self, peer: str) -> int:
        """Fetch the records ``peer`` holds after our cursor with it; return how many were new."""
        assert self.host is not None
        since, after = self._cursors.get(peer, (0, b""))
        new = 0
        stream = await self.host.open_stream(peer, SYNC_PROTOCOL_ID)
        channel = StreamChannel(stream)
        try:
            for _ in range(SYNC_MAX_PAGES):
                await channel.send(codec.encode(SyncRequest(since=since, after_id=after, limit=500)))
                with trio.fail_after(SYNC_TIMEOUT_S):
                    response = codec.decode(await channel.receive(SyncResponse.MAX_BYTES), SyncResponse)
                since, after, got = self._take_page(response.bundles, since, after)
                new += got
                if not response.more or not response.bundles:
                    break
        finally:
            await channel.aclose()
        self._cursors[peer] = (since, after)
        if new:
            self.pulled += new
            self._changed()
        return new

    def _take_page(self, bundles: tuple[RecordBundle, ...], since: int, after: bytes) -> tuple[int, bytes, int]:
        """Store a pulled page's new records; return the cursor after it and how many were new.

        A record we already hold at the same or a later time is skipped before its three signatures are checked:
        the first pull from each peer returns its whole history, nearly all of it held already, and verifying it
        again was most of an idle node's reputation work (docs/benchmarks.md, "Where the time goes"). Its time
        and id can move the cursor: both equal a record we verified when we stored it.
        """
        new = 0
        for bundle in bundles:
            rid = record_id(bundle.record)
            held = self.records.time_of(rid)
            if held is not None and held >= bundle.record.time:
                self.pulled_held += 1
                since, after = max((since, after), (bundle.record.time, rid))
                continue
            try:
                verified = self._verify(bundle)
            except RemoteProtocolError as exc:
                self._refuse(exc.code)
                continue
            since, after = max((since, after), (verified.record.time, verified.id))
            if self.records.put(verified, received_ms=self.clock_ms()):
                new += 1
        return since, after, new

    async def sync_forever(self) -> None:
        assert self.host is not None
        while True:
            peers = self.host.connected_peers()
            for peer in self.rng.sample(peers, min(SYNC_PEERS, len(peers))):
                try:
                    await self.pull_from(peer)
                except (net.NetError, ChannelClosed, trio.TooSlowError, RemoteProtocolError) as exc:
                    log.debug("pull from %s failed: %r", peer, exc)
            await trio.sleep(self.sync_interval_s)

    def statistics(self) -> dict[str, Any]:
        return {"records": self.records.count(), "accepted_by_gossip": self.accepted, "pulled": self.pulled,
                "pulled_held": self.pulled_held, "rejected": dict(self.rejected)}  # fmt: skip
