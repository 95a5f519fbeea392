"""Late settlement (``/coop/receipt/1.0.0``): a provider whose countersigned receipt never arrived asks for it.

Theory of operation
-------------------
A job stream ends with the provider's signed Receipt and the client's countersignature. The client stores the
countersigned receipt before sending it (write ahead, node/market/jobs.py), so when the stream breaks in between
(the connection dropped, a liveness check gave up on a loaded peer, the provider waited out its 30 s) the client
holds a receipt, has paid in its ledger, and the provider has neither. Nothing was lost yet, but the two ledgers
disagree.

So the provider asks: it opens ``/coop/receipt/1.0.0`` to the client and sends ``ReceiptQuery(job_id)``; the
client answers with the countersigned ``Receipt`` if it holds one naming the asker as the provider, else a signed
``Reject(no-receipt)``. A no-receipt answer is final: the provider resets the job stream before it asks, so a
client that has not read the provider's receipt by then never will, and one that has read it stored it at once
(before its signature leaves). An unreachable or silent client (restarting) is asked again, after 1, 2, 4, 8, 15
and 30 s.

The provider takes only the receipt it signed itself, countersigned by that client (both signatures checked),
so a client cannot make it store anything else; the client hands a receipt only to its own provider.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from node import net
from node.market.wire import ChannelClosed, FrameChannel, Messenger, abort_quietly
from node.store import Store
from protocol.cosign import verify_both
from protocol.errors import BadSignature, RemoteProtocolError
from protocol.market import RECEIPT_PROTOCOL_ID
from protocol.messages import Receipt, ReceiptQuery, Reject, RejectCode

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S: Final = 10.0  # one query: dial, ask, answer
RETRY_DELAYS_S: Final = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

OpenChannel = Callable[[str, str], Awaitable[FrameChannel]]


async def answer_receipt_query(messenger: Messenger, store: Store, channel: FrameChannel) -> None:
    """A client's side: hand the asking provider the countersigned receipt of its run, if this node holds one."""
    with trio.fail_after(QUERY_TIMEOUT_S):
        query = await messenger.receive(channel, (ReceiptQuery,))
        row = store.get_receipt(query.job_id)
        if row is not None and row.provider == channel.remote_peer and row.client == messenger.identity.peer_id:
            await messenger.send(channel, row.receipt)
            return
        refusal = Reject(job_id=query.job_id, peer=messenger.identity.peer_id, code=RejectCode.NO_RECEIPT,
                         message="no receipt of yours for that job")  # fmt: skip
        await messenger.send(channel, refusal)


async def fetch_receipt(
    messenger: Messenger,
    open_channel: OpenChannel,
    ours: Receipt,
    *,
    retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
) -> Receipt | None:
    """A provider's side: ask ``ours.client`` for its countersignature of ``ours`` (the receipt we signed).

    Returns the receipt with both signatures, or None when the client says it holds none, answers with anything
    but our receipt countersigned, or cannot be reached after every retry.
    """
    for delay in (0.0, *retry_delays_s):
        await trio.sleep(delay)
        try:
            with trio.fail_after(QUERY_TIMEOUT_S):
                answer = await _ask(messenger, open_channel, ours)
        except (net.NetError, ChannelClosed, trio.TooSlowError) as exc:
            log.info("job %s: asking the client for its countersignature failed: %r", ours.job_id, exc)
            continue
        except RemoteProtocolError as exc:
            log.warning("job %s: the client answered the receipt query with garbage: %r", ours.job_id, exc)
            return None
        if answer.job_id != ours.job_id:
            log.warning("job %s: the client answered the receipt query about another job", ours.job_id)
            return None
        if isinstance(answer, Reject):
            log.info("job %s: the client holds no receipt for it: %s", ours.job_id, answer.message)
            return None
        if dataclasses.replace(answer, client_signature=b"") != ours:
            log.warning("job %s: the client answered with a receipt we did not sign", ours.job_id)
            return None
        try:
            verify_both(answer)
        except BadSignature as exc:
            log.warning("job %s: the client's countersignature does not verify: %s", ours.job_id, exc)
            return None
        return answer
    return None


async def _ask(messenger: Messenger, open_channel: OpenChannel, ours: Receipt) -> Receipt | Reject:
    channel = await open_channel(ours.client, RECEIPT_PROTOCOL_ID)
    try:
        await messenger.send(channel, ReceiptQuery(job_id=ours.job_id))
        answer: Receipt | Reject = await messenger.receive(channel, (Receipt, Reject))
    except BaseException:
        await abort_quietly(channel)
        raise
    await channel.aclose()
    return answer
