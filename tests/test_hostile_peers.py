"""Hostile peers against real provider and client processes: each lie or garbage is refused with a typed
error, and the nodes keep serving honest work afterwards."""

import contextlib
import secrets
import time

import pytest
import trio

from node import net
from node.daemon import record_validators
from node.market.wire import ChannelClosed, Messenger, StreamChannel
from protocol import codec
from protocol.cosign import terms_hash
from protocol.envelope import seal
from protocol.identity import Identity
from protocol.market import JOB_PROTOCOL_ID, NEGOTIATE_PROTOCOL_ID
from protocol.messages import (
    Agreement,
    CapacityAd,
    JobAccepted,
    JobSpec,
    Limits,
    PriceSheet,
    Quote,
    QuoteRequest,
    Reject,
    RejectCode,
    Resources,
)
from protocol.negotiation import ClientNegotiation, Quoted, Send
from protocol.records import AD_TTL_MS, cap_key, class_key
from tests.cluster import wait_until

pytestmark = pytest.mark.slow


def now_ms():
    return int(time.time() * 1000)


async def refused(node):
    return (await node.api("GET", "/v1/status"))["refused_streams"]


async def read_until_closed(stream):
    """Read until the peer closes or resets the stream; return what came."""
    data = b""
    try:
        while chunk := await stream.read_some():
            data += chunk
    except net.NetError:
        pass
    return data


async def negotiate(messenger, identity, provider_id, host, *, job_id="hostile-job"):
    request = QuoteRequest(
        job_id=job_id, client=identity.peer_id, resources=Resources(cpus=1, memory_bytes=64 << 20),
        limits=Limits(cpu_seconds=10, wall_seconds=10, memory_bytes=64 << 20), max_price=100_000,
        deadline=now_ms() + 60_000,
    )  # fmt: skip
    channel = StreamChannel(await host.open_stream(provider_id, NEGOTIATE_PROTOCOL_ID))
    machine = ClientNegotiation(identity=identity, request=request, provider=provider_id)
    actions = machine.start(now_ms())
    while not machine.terminal:
        for action in actions:
            if isinstance(action, Send):
                await messenger.send(channel, action.message)
        if isinstance(actions[-1], Quoted):
            actions = machine.accept(now_ms())
            continue
        message = await messenger.receive(channel, (Quote, Reject, Agreement))
        actions = machine.receive(message, now_ms())
    await channel.aclose()
    return machine.outcome.agreement


async def test_hostile_client_frames_are_refused_and_the_provider_keeps_serving(launcher, tmp_path):
    with trio.fail_after(120):
        provider = launcher.make("provider")
        await launcher.start(provider)
        client = launcher.make("client", bootstrap=[provider.address], extra_args=["--no-provide"])
        await launcher.start(client)
        me = Identity.generate()
        mallory = Identity.generate()
        async with net.open_host(seed=me.seed(), listen=["/ip4/127.0.0.1/tcp/0"]) as host:
            await host.connect(provider.address)
            messenger = Messenger(me, now_ms)
            # 1. an oversized frame: the provider resets before reading the body
            stream = await host.open_stream(provider.peer_id, NEGOTIATE_PROTOCOL_ID)
            await stream.write((100 << 20).to_bytes(4, "big") + b"x" * 1000)
            assert await read_until_closed(stream) == b""

            # 2. a malformed frame (valid length, garbage body)
            stream = await host.open_stream(provider.peer_id, NEGOTIATE_PROTOCOL_ID)
            await net.send_frame(stream, b"\x93\x01\xadquote-request\xc1garbage")
            assert await read_until_closed(stream) == b""

            # 3. a request signed with another key than the connection's (Mallory's request sent by us)
            request = QuoteRequest(
                job_id="forged", client=mallory.peer_id, resources=Resources(), limits=Limits(),
                max_price=10**6, deadline=now_ms() + 60_000,
            )  # fmt: skip
            forged = seal(mallory, request, now=now_ms(), ttl_ms=60_000, nonce=secrets.token_bytes(16))
            stream = await host.open_stream(provider.peer_id, NEGOTIATE_PROTOCOL_ID)
            await net.send_frame(stream, codec.encode(forged))
            assert await read_until_closed(stream) == b""
            # 4. replaying an agreement: the second job on the same agreement is refused with a reason
            agreement = await negotiate(messenger, me, provider.peer_id, host)
            spec = JobSpec(job_id=agreement.job_id, client=me.peer_id, agreement_hash=terms_hash(agreement),
                           command=("true",), limits=agreement.limits)  # fmt: skip
            channel = StreamChannel(await host.open_stream(provider.peer_id, JOB_PROTOCOL_ID))
            await messenger.send(channel, spec)
            assert isinstance(await messenger.receive(channel, (JobAccepted, Reject)), JobAccepted)
            await channel.abort()  # walk away: the provider kills the job, the agreement stays used
            channel = StreamChannel(await host.open_stream(provider.peer_id, JOB_PROTOCOL_ID))
            await messenger.send(channel, spec)
            answer = await messenger.receive(channel, (JobAccepted, Reject))
            assert isinstance(answer, Reject)
            assert answer.code is RejectCode.AGREEMENT_USED

            # 5. the very same envelope bytes sent again: a replay
            replayed = seal(me, spec, now=now_ms(), ttl_ms=60_000, nonce=secrets.token_bytes(16))
            for expect_answer in (True, False):
                stream = await host.open_stream(provider.peer_id, JOB_PROTOCOL_ID)
                await net.send_frame(stream, codec.encode(replayed))
                got = await read_until_closed(stream)
                assert bool(got) is expect_answer  # first: a Reject frame; then: dropped as a replay

        counts = await refused(provider)
        assert counts.get("oversized", 0) >= 1
        assert counts.get("malformed", 0) + counts.get("unknown-type", 0) >= 1
        assert counts.get("wrong-signer", 0) >= 1
        assert counts.get("replayed", 0) >= 1

        # the provider still serves honest work
        job = await client.wait_job(await client.submit(["python3", "-c", "print(6*7)"]))
        assert job["state"] == "completed", (job["error"], job["attempts"])
        assert await client.api("GET", f"/v1/jobs/{job['job_id']}/logs") == b"42\n"


async def test_a_provider_that_lies_in_its_quote_is_refused(launcher):
    with trio.fail_after(120):
        honest = launcher.make("honest", per_cpu_second=50)
        await launcher.start(honest)
        client = launcher.make("client", bootstrap=[honest.address], extra_args=["--no-provide"])
        await launcher.start(client)
        liar = Identity.generate()
        validate, select = record_validators(now_ms, 1000)
        lies = []
        async with net.open_host(seed=liar.seed(), listen=["/ip4/127.0.0.1/tcp/0"], dht_validate=validate,
                                 dht_select=select) as host:  # fmt: skip
            messenger = Messenger(liar, now_ms)

            async def lying_negotiation(stream):
                channel = StreamChannel(stream)
                request = await messenger.receive(channel, (QuoteRequest,))
                # a quote far cheaper than anyone's, but for a request the client never sent
                lie = Quote(job_id=request.job_id, provider=liar.peer_id, request_hash=b"\x00" * 32,
                            price_sheet=PriceSheet(), valid_until=now_ms() + 30_000, load_permille=0)  # fmt: skip
                await messenger.send(channel, lie)
                lies.append(request.job_id)
                with contextlib.suppress(ChannelClosed):
                    await messenger.receive(channel, (QuoteRequest,))

            host.set_stream_handler(NEGOTIATE_PROTOCOL_ID, lying_negotiation)
            await host.bootstrap([honest.address])
            ad = CapacityAd(peer=liar.peer_id, seq=now_ms(), cpus=64, memory_bytes=1 << 40, disk_bytes=1 << 40,
                            sandbox_tier="bwrap", price_sheet=PriceSheet(), addrs=tuple(host.addrs()))  # fmt: skip
            envelope = seal(liar, ad, now=now_ms(), ttl_ms=AD_TTL_MS, nonce=secrets.token_bytes(16))
            await host.dht_put(cap_key(liar.peer_id), codec.encode(envelope))
            await host.provide(class_key("cpu"))

            async def client_sees_liar():
                return liar.peer_id in {p["peer_id"] for p in await client.cli("find")}

            await wait_until(client_sees_liar)
            job = await client.wait_job(await client.submit(["true"], timeout=10))
            assert lies[0] == job["job_id"]  # the liar was asked (and again for the verification replica) ...
            assert job["state"] == "completed", (job["error"], job["attempts"])
            assert job["provider"] == honest.peer_id  # ... but its lie did not win
            market = await client.api("GET", "/v1/market")
            assert {q["provider"] for q in market["recent"]} == {honest.peer_id}
