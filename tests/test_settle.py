"""Late settlement (``/coop/receipt/1.0.0``, node/market/settle.py): a provider whose job stream broke before the
client's countersignature arrived asks the client for it.

Real libp2p hosts on 127.0.0.1 and real signatures. The client hands a receipt only to the provider it names; the
provider takes only the receipt it signed, countersigned by that client; an unreachable client is asked again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio.testing

from node import net
from node.daemon import wall_clock_ms
from node.market.requests import SubmitRequest
from node.market.settle import answer_receipt_query, fetch_receipt
from node.market.wire import FrameChannel, MemoryChannel, Messenger, StreamChannel, loopback_pair, serve_loopback
from node.store import Store
from protocol import codec
from protocol.cosign import sign_as, terms_hash
from protocol.identity import Identity
from protocol.market import RECEIPT_PROTOCOL_ID
from protocol.messages import Chunk, JobAccepted, JobResult, Receipt, ReceiptQuery, Reject
from tests.fuzz_world import channel_pair, honest_job, honest_negotiation, job_spec, one_node_market, run_to_the_end
from tests.test_store import signed_receipt

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
FAST = (0.1, 0.2, 0.4, 0.8, 1.6)  # retry delays for the tests (the node's are 1-30 s)


@dataclass
class Side:
    identity: Identity
    host: net.NetHost
    messenger: Messenger

    async def open_channel(self, peer_id: str, protocol: str) -> FrameChannel:
        return StreamChannel(await self.host.open_stream(peer_id, protocol))


@asynccontextmanager
async def sides(n: int) -> AsyncIterator[list[Side]]:
    """``n`` connected hosts: [client, provider, others...]."""
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            identity = Identity.generate()
            host = await stack.enter_async_context(net.open_host(seed=identity.seed(), listen=LOOPBACK))
            out.append(Side(identity, host, Messenger(identity, wall_clock_ms)))
        for side in out[1:]:
            await side.host.connect(out[0].host.addrs()[0])
        yield out


def paid_run(client: Identity, provider: Identity, job_id: str = "job-1") -> tuple[Receipt, Receipt]:
    """(the provider's receipt, the same countersigned by the client)."""
    both = signed_receipt(job_id=job_id, client=client, provider=provider)
    return dataclasses.replace(both, client_signature=b""), both


def serve(client: Side, store: Store, queries: list[str] | None = None) -> None:
    answer = partial(answer_receipt_query, client.messenger, store)

    async def handler(stream: net.NetStream) -> None:
        if queries is not None:
            queries.append(stream.remote_peer)
        await answer(StreamChannel(stream))

    client.host.set_stream_handler(RECEIPT_PROTOCOL_ID, handler)


async def test_a_client_that_holds_the_receipt_hands_it_to_its_provider(tmp_path: Path) -> None:
    with trio.fail_after(30), Store.open(tmp_path / "c.db") as store:
        async with sides(2) as (client, provider):
            ours, both = paid_run(client.identity, provider.identity)
            store.put_receipt(both)
            queries: list[str] = []
            serve(client, store, queries)
            got = await fetch_receipt(provider.messenger, provider.open_channel, ours, retry_delays_s=FAST)
            assert got == both
            assert queries == [provider.identity.peer_id]


async def test_no_receipt_is_a_final_answer_and_nobody_else_gets_one(tmp_path: Path) -> None:
    with trio.fail_after(30), Store.open(tmp_path / "c.db") as store:
        async with sides(3) as (client, provider, mallory):
            ours, both = paid_run(client.identity, provider.identity)
            queries: list[str] = []
            serve(client, store, queries)
            assert await fetch_receipt(provider.messenger, provider.open_channel, ours, retry_delays_s=FAST) is None
            assert queries == [provider.identity.peer_id]  # asked once: no retries after "no receipt"
            store.put_receipt(both)
            # A third peer asks about that job as if it were the provider: the client says it holds nothing for it.
            theirs = dataclasses.replace(ours, provider=mallory.identity.peer_id)
            assert await fetch_receipt(mallory.messenger, mallory.open_channel, theirs, retry_delays_s=FAST) is None
            assert queries[-1] == mallory.identity.peer_id


async def test_an_unreachable_client_is_asked_again(tmp_path: Path) -> None:
    """The client does not serve the protocol at first (it is restarting): refused streams are retried."""
    with trio.fail_after(30), Store.open(tmp_path / "c.db") as store:
        async with sides(2) as (client, provider):
            ours, both = paid_run(client.identity, provider.identity)
            store.put_receipt(both)
            got: list[Receipt | None] = []
            refused = trio.Event()

            async def open_channel(peer_id: str, protocol: str) -> FrameChannel:
                try:
                    return await provider.open_channel(peer_id, protocol)
                except net.NetError:
                    refused.set()
                    raise

            async def fetch() -> None:
                got.append(await fetch_receipt(provider.messenger, open_channel, ours, retry_delays_s=FAST))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch)
                await refused.wait()
                serve(client, store)
            assert got == [both]


async def test_the_provider_takes_only_its_own_receipt_countersigned(caplog) -> None:
    """A hostile client answers with another job's receipt, a receipt with a changed cost, a forged signature,
    garbage: each is refused and nothing is returned."""
    caplog.set_level(logging.INFO, logger="node.market.settle")
    with trio.fail_after(30):
        async with sides(2) as (client, provider):
            ours, both = paid_run(client.identity, provider.identity)
            other = paid_run(client.identity, provider.identity, job_id="job-2")[1]
            cheaper = sign_as(client.identity, dataclasses.replace(both, cost=1), "client")
            forged = dataclasses.replace(both, client_signature=bytes(64))
            answers = [codec.encode(r) for r in (other, cheaper, forged)] + [b"\x93\x01garbage"]
            why = ["about another job", "a receipt we did not sign", "countersignature does not verify", "garbage"]
            for answer, reason in zip(answers, why, strict=True):
                caplog.clear()

                async def handler(stream: net.NetStream, answer: bytes = answer) -> None:
                    channel = StreamChannel(stream)
                    await client.messenger.receive(channel, (ReceiptQuery,))
                    await channel.send(answer)

                client.host.set_stream_handler(RECEIPT_PROTOCOL_ID, handler)
                got = await fetch_receipt(provider.messenger, provider.open_channel, ours, retry_delays_s=FAST)
                assert got is None, answer
                assert [r.message for r in caplog.records if reason in r.message], (reason, caplog.records)


async def test_a_countersignature_lost_with_the_stream_is_fetched_and_both_ledgers_agree(
    tmp_path: Path, monkeypatch, autojump_clock
) -> None:
    """The whole path in one process: a node runs its own job over loopback channels (the real JobManager and
    ProviderService), and the channel breaks as the client's countersignature is sent. The client keeps its
    receipt (stored first); the provider asks for it over /coop/receipt/1.0.0 and ends completed with the same
    receipt, where it used to end "failed: the client went away before signing the receipt" with none."""

    class BreaksAtTheCountersignature:
        def __init__(self, inner: MemoryChannel) -> None:
            self.inner = inner
            self.remote_peer = inner.remote_peer

        async def send(self, data: bytes) -> None:
            with contextlib.suppress(Exception):
                if codec.decode(data, Receipt).client_signature:
                    await self.inner.abort()  # the connection drops with our signature on the way
            await self.inner.send(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    def pair(peer_id: str) -> tuple[Any, MemoryChannel]:
        mine, theirs = loopback_pair(peer_id)
        return BreaksAtTheCountersignature(mine), theirs

    monkeypatch.setattr("node.market.jobs.loopback_pair", pair)
    asked: list[str] = []
    with trio.fail_after(120), Store.open(tmp_path / "c.db") as store, Store.open(tmp_path / "p.db") as theirs:
        manager = one_node_market(tmp_path, store, theirs)

        async def open_channel(peer_id: str, protocol: str) -> FrameChannel:
            asked.append(protocol)
            mine, other_end = loopback_pair(peer_id)
            nursery.start_soon(serve_loopback, partial(answer_receipt_query, manager.messenger, store), other_end)
            return mine

        assert manager.provider is not None
        manager.provider.open_channel = open_channel
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.serve)
            job_id = await manager.submit(SubmitRequest(command=("echo", "42")))
            row = await run_to_the_end(manager, job_id)
            nursery.cancel_scope.cancel()
        run = theirs.get_job(job_id, "provider")
        assert run is not None
        assert row.state == "completed"
        assert (run.state, run.error) == ("completed", None)
        assert asked == [RECEIPT_PROTOCOL_ID]
        ours, provider_copy = store.get_receipt(job_id), theirs.get_receipt(job_id)
        assert ours is not None
        assert ours == provider_copy


async def test_a_job_sent_again_while_its_provider_asks_for_the_countersignature(world, autojump_clock) -> None:
    """The client died after the provider's receipt reached it and before it countersigned (so it holds none).
    While the provider asks it for the countersignature (unreachable: restarting), the client, back, sends the job
    again: the old run is recorded failed first, then the new run completes and is paid, and the two never
    write the job's row at once."""
    asks = trio.Event()

    async def unreachable(peer_id: str, protocol: str) -> FrameChannel:
        asks.set()
        raise net.DialError("connection refused")

    world.provider.open_channel = unreachable
    agreement = await honest_negotiation(world)
    job_id = agreement.job_id
    pair = channel_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.provider.rpc_job, pair.server)
        await world.client.send(pair.client, job_spec(agreement))
        await world.client.receive(pair.client, (JobAccepted, Reject))
        while not isinstance(await world.client.receive(pair.client, (Chunk, JobResult)), JobResult):
            pass
        await world.client.receive(pair.client, (Receipt,))
        await pair.client.aclose()  # the client dies here
        await asks.wait()
        row = world.store.get_job(job_id, "provider")
        assert row is not None
        assert row.state == "running"  # still settling: neither paid nor failed yet
        autojump_clock.jump(1.0)  # a later request: a new agreement (the old one was used)
        again = await honest_negotiation(world, job_id)
        both = await honest_job(world, again)
    assert both.agreement_hash == terms_hash(again)
    stored = world.store.get_receipt(job_id)
    assert stored is not None
    assert stored.receipt == both
    attempts = world.store.attempts(job_id, "provider")
    assert [a.outcome for a in attempts] == ["failed", "completed"]
    row = world.store.get_job(job_id, "provider")
    assert row is not None
    assert (row.state, row.error) == ("completed", None)  # the old run's settling did not overwrite it
    assert world.provider._settling == {}
