"""Reputation across real node processes: gossip to all, pull after downtime, bad input refused, liars caught."""

import secrets
import sys
import time
from pathlib import Path

import pytest
import trio

from node import net
from protocol import codec
from protocol.cosign import sign_as, terms_hash
from protocol.identity import Identity
from protocol.messages import Outcome, Receipt, ReputationRecord, Usage
from protocol.reputation import REPUTATION_TOPIC, RecordBundle, make_bundle
from tests.cluster import wait_until

pytestmark = pytest.mark.slow
LIAR = [sys.executable, str(Path(__file__).parent / "fixtures" / "lying_provider.py")]


def now_ms():
    return int(time.time() * 1000)


async def records_held(node):
    return (await node.api("GET", "/v1/reputation"))["statistics"]


async def test_records_reach_every_node_and_a_restarted_node_catches_up_by_pull(launcher):
    with trio.fail_after(240):
        slow_ads = {"refresh": 5, "ttl": 15}  # ten nodes re-advertising every second would swamp two cores
        seed = launcher.make("n0", **slow_ads)
        await launcher.start(seed)
        nodes = [seed]
        async with trio.open_nursery() as nursery:
            for i in range(1, 10):
                extra = ["--no-provide"] if i == 9 else []
                node = launcher.make(f"n{i}", bootstrap=[seed.address], extra_args=extra, **slow_ads)
                nodes.append(node)
                nursery.start_soon(launcher.start, node)
        client, sleeper = nodes[9], nodes[5]
        await sleeper.stop()  # down while the records are made and gossiped

        async def client_sees_providers():
            return len(await client.cli("find")) >= 8

        await wait_until(client_sees_providers)
        job = await client.wait_job(await client.submit(["python3", "-c", "print(6*7)"]))
        assert job["state"] == "completed", job
        awake = [n for n in nodes if n is not sleeper]

        async def everyone_has_both_records():
            held = [(await records_held(n))["records"] for n in awake]
            return all(count >= 2 for count in held)

        await wait_until(everyone_has_both_records)
        gossiped = sum([(await records_held(n))["accepted_by_gossip"] for n in awake])
        assert gossiped >= 2 * (len(awake) - 2)  # most arrived by gossip, not just the periodic pull

        await launcher.start(sleeper)

        async def sleeper_caught_up():
            stats = await records_held(sleeper)
            return stats["records"] >= 2 and stats["pulled"] >= 2

        await wait_until(sleeper_caught_up)


async def test_bad_records_are_refused_counted_and_never_stored(launcher):
    with trio.fail_after(120):
        node = launcher.make("victim")
        await launcher.start(node)
        alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()

        def receipt(i):
            r = Receipt(job_id=f"fake-{i}", client=alice.peer_id, provider=bob.peer_id,
                        agreement_hash=secrets.token_bytes(32), result_hash=secrets.token_bytes(32), usage=Usage(),
                        cost=5, issued_at=now_ms() - 1000)  # fmt: skip
            return sign_as(bob, sign_as(alice, r, "client"), "provider")

        def record(rcpt, **kw):
            fields = {"rater": alice.peer_id, "ratee": bob.peer_id, "receipt_hash": terms_hash(rcpt),
                          "outcome": Outcome.SUCCESS, "score": 100, "time": now_ms()}  # fmt: skip
            return ReputationRecord(**(fields | kw))

        async with net.open_host(seed=alice.seed(), listen=["/ip4/127.0.0.1/tcp/0"],
                                 gossip_topics={REPUTATION_TOPIC: lambda peer, data: True}) as host:  # fmt: skip
            await host.bootstrap([node.address])
            before = (await records_held(node))["records"]

            async def publish(data):
                await host.publish(REPUTATION_TOPIC, data)

            # wait until the mesh carries our messages: one valid record arrives
            first = receipt(0)
            await publish(codec.encode(make_bundle(alice, record(first), first)))

            async def arrived():
                return (await records_held(node))["records"] == before + 1

            await wait_until(arrived)
            r1 = receipt(1)
            good = make_bundle(alice, record(r1), r1)
            forged = RecordBundle(record=record(r1, score=0), signature=mallory.sign(b"x"), receipt=r1)
            unbound = make_bundle(alice, record(r1, receipt_hash=secrets.token_bytes(32)), r1)
            plain = codec.to_plain(good)
            plain["record"]["comment"] = "x" * 200
            import msgpack

            oversized = msgpack.packb([1, "reputation-bundle", plain], use_bin_type=True) + b"\x00" * 9000
            await publish(codec.encode(forged))
            await publish(codec.encode(unbound))
            await publish(oversized)
            await publish(codec.encode(good))
            await publish(codec.encode(good))  # the same record again: a replay
            for i in range(2, 70):  # 68 more valid records from one rater within a minute
                r = receipt(i)
                await publish(codec.encode(make_bundle(alice, record(r), r)))

            async def all_judged():
                rejected = (await records_held(node))["rejected"]
                return sum(rejected.values()) >= 3 + 1 + 10 and rejected

            rejected = await wait_until(all_judged)
        assert rejected["bad-signature"] >= 1
        assert rejected["unbound-record"] >= 1
        assert rejected["oversized"] >= 1
        assert rejected["replayed"] >= 1
        assert rejected["rate-exceeded"] >= 10
        stats = await records_held(node)
        assert stats["records"] == before + 60  # the per-rater allowance: 60 a minute, the rest refused


async def test_a_provider_returning_wrong_results_is_caught_and_dropped(launcher):
    with trio.fail_after(180):
        first = launcher.make("honest1", per_cpu_second=20)
        await launcher.start(first)
        liar = launcher.make("liar", bootstrap=[first.address], per_cpu_second=5, program=LIAR)
        honest2 = launcher.make("honest2", bootstrap=[first.address], per_cpu_second=20)
        client = launcher.make("client", bootstrap=[first.address], extra_args=["--no-provide"])
        async with trio.open_nursery() as nursery:
            for node in (liar, honest2, client):
                nursery.start_soon(launcher.start, node)

        async def sees_all():
            return len(await client.cli("find")) == 3

        await wait_until(sees_all)
        job = await client.wait_job(await client.submit(["python3", "-c", "print(6*7)"], timeout=20))
        assert job["state"] == "completed", job
        assert await client.api("GET", f"/v1/jobs/{job['job_id']}/logs") == b"42\n"
        assert job["provider"] != liar.peer_id
        assert "outvoted" in job["result"]["verification"]
        assert job["attempts"][0]["provider"] == liar.peer_id  # the cheapest offer won first ...
        assert job["attempts"][0]["outcome"] == "bad-result"  # ... and was caught by its replicas

        seen = await client.api("GET", f"/v1/reputation/{liar.peer_id}")
        assert seen["score"] <= 0.3
        assert any(r["outcome"] == "bad-result" and r["rater"] == client.peer_id for r in seen["records"])

        # the liar is no longer among the client's choices
        job2 = await client.wait_job(await client.submit(["python3", "-c", "print(6*7)"], timeout=20))
        assert job2["state"] == "completed"
        assert job2["provider"] != liar.peer_id
        market = await client.api("GET", "/v1/market")
        asked = {q["provider"] for q in market["recent"] if q["job_id"] == job2["job_id"]}
        assert liar.peer_id not in asked

        # and the bad record reached the other nodes
        async def spread():
            records = (await honest2.api("GET", f"/v1/reputation/{liar.peer_id}"))["records"]
            return any(r["outcome"] == "bad-result" for r in records)

        await wait_until(spread)
