"""`Node.find` reuses a provider's verified ad for AD_CACHE_S, never past the ad's expiry.

Fetching an ad is a stream to its provider or, when that fails, a DHT walk, GET_VALUE at the closest peers and
py-libp2p's entry-correction PUTs, for every provider in every find: at 30 nodes a find every 5 s kept two cores
busy (docs/benchmarks.md, "Discovery"). The network side is stood in for here (providers that cannot be reached
directly, tests/test_ad_fetch.py and the cluster tests use real hosts); what is under test is when a find goes
back to the network.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import trio
import trio.testing

from node import net
from node.api import FindQuery
from node.config import NodeConfig
from node.daemon import Node
from node.finder import AD_CACHE_S, FIND_CACHE_S
from protocol import codec
from protocol.envelope import seal
from protocol.records import cap_key
from tests.factories import ALICE, BOB, MALLORY, NOW, capacity_ad, nonce


class DhtStandIn:
    """Hints name BOB and MALLORY (who has no ad); their ads are served from ``ads`` and every fetch is counted."""

    def __init__(self) -> None:
        self.peer_id = "12D3KooWStandIn"
        self.ads: dict[str, bytes] = {}
        self.fetched: list[str] = []

    async def find_providers(self, key: str, count: int, *, trace: Any = None) -> list[str]:
        return [BOB.peer_id, MALLORY.peer_id][:count]

    async def dht_get(self, key: str) -> bytes | None:
        self.fetched.append(key)
        return self.ads.get(key)

    async def open_stream(self, peer_id: str, protocol_id: str) -> Any:
        raise net.DialError(f"{peer_id} is behind a NAT: its ad comes from the DHT")

    def learn_circuits(self, peer_id: str, addrs: Any) -> None:
        pass


def ad(identity, *, seq: int, now_ms: int, ttl_ms: int, cpus: int = 8) -> bytes:
    record = dataclasses.replace(capacity_ad(identity, seq=seq), cpus=cpus)
    return codec.encode(seal(identity, record, now=now_ms, ttl_ms=ttl_ms, nonce=nonce()))


async def test_a_verified_ad_is_reused_for_a_while_and_never_past_its_expiry(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    dht = DhtStandIn()
    clock_ms = lambda: NOW + int(trio.current_time() * 1000)  # noqa: E731 (wall clock follows the mock clock)
    node = Node(config=NodeConfig(data_dir=tmp_path), identity=ALICE, host=dht, clock_ms=clock_ms, out=io.StringIO())  # type: ignore[arg-type]
    dht.ads[cap_key(BOB.peer_id)] = ad(BOB, seq=1, now_ms=NOW, ttl_ms=600_000)

    async def found() -> dict[str, int]:
        return {p["peer_id"]: p["cpus"] for p in await node.find(FindQuery(cpus=1))}

    assert await found() == {BOB.peer_id: 8}
    assert sorted(dht.fetched) == sorted([cap_key(BOB.peer_id), cap_key(MALLORY.peer_id)])
    await trio.sleep(AD_CACHE_S - 1)
    dht.ads[cap_key(BOB.peer_id)] = ad(BOB, seq=2, now_ms=clock_ms(), ttl_ms=10_000, cpus=0)  # BOB stops sharing
    assert await found() == {BOB.peer_id: 8}  # the cached ad, not refetched
    assert dht.fetched.count(cap_key(BOB.peer_id)) == 1
    await trio.sleep(2)
    assert await found() == {}  # after AD_CACHE_S: BOB's new ad, which offers nothing
    assert dht.fetched.count(cap_key(BOB.peer_id)) == 2

    # An ad that expires before AD_CACHE_S is not reused past its expiry.
    dht.ads[cap_key(BOB.peer_id)] = ad(BOB, seq=3, now_ms=clock_ms(), ttl_ms=5_000)
    await trio.sleep(AD_CACHE_S)
    assert await found() == {BOB.peer_id: 8}
    assert dht.fetched.count(cap_key(BOB.peer_id)) == 3
    await trio.sleep(6)
    dht.ads.pop(cap_key(BOB.peer_id))  # expired and gone from the DHT
    assert await found() == {}
    assert dht.fetched.count(cap_key(BOB.peer_id)) == 4


class SlowHints(DhtStandIn):
    """Each hint lookup takes 2 s (a walk under load) and is recorded; the first ``empty`` of them find nobody."""

    def __init__(self, *, empty: int = 0) -> None:
        super().__init__()
        self.walks: list[float] = []
        self.empty = empty

    async def find_providers(self, key: str, count: int, *, trace: Any = None) -> list[str]:
        self.walks.append(trio.current_time())
        await trio.sleep(2)
        return [] if len(self.walks) <= self.empty else await super().find_providers(key, count, trace=trace)


async def finds_at_once(dht: DhtStandIn, tmp_path: Path, jobs: int) -> tuple[Node, list[list[str]]]:
    """``jobs`` jobs of one node asking its finder at once (BOB has an ad); the node and their answers."""
    clock_ms = lambda: NOW + int(trio.current_time() * 1000)  # noqa: E731
    node = Node(config=NodeConfig(data_dir=tmp_path), identity=ALICE, host=dht, clock_ms=clock_ms, out=io.StringIO())  # type: ignore[arg-type]
    dht.ads[cap_key(BOB.peer_id)] = ad(BOB, seq=1, now_ms=NOW, ttl_ms=600_000)
    answers: list[list[str]] = []

    async def job() -> None:
        answers.append(await node.find_peer_ids(JOB_REQUEST))

    async with trio.open_nursery() as nursery:
        for _ in range(jobs):
            nursery.start_soon(job)
    return node, answers


JOB_REQUEST = {"cpus": 1, "memory_bytes": 1 << 20, "gpus": 0, "gpu_model": ""}


async def test_jobs_that_miss_the_cache_together_share_one_find(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    dht = SlowHints()
    node, answers = await finds_at_once(dht, tmp_path, 8)
    assert answers == [[BOB.peer_id]] * 8
    assert len(dht.walks) == 1  # one find for the eight jobs
    await trio.sleep(FIND_CACHE_S)  # the answer is stale now: the next job finds again
    assert await node.find_peer_ids(JOB_REQUEST) == [BOB.peer_id]
    assert len(dht.walks) == 2


async def test_when_the_shared_find_finds_nobody_one_waiting_job_finds_again_for_the_rest(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    dht = SlowHints(empty=1)  # BOB's hint arrives after the first lookup
    _node, answers = await finds_at_once(dht, tmp_path, 8)
    assert sorted(answers) == [[]] + [[BOB.peer_id]] * 7  # the first job's own find found nobody
    assert dht.walks == [0, 2]  # an empty answer is not cached: one more find, shared by the seven
