"""A node serves a fresh signed ad every refresh, whether or not its DHT put has finished (node/daemon.py).

A put walks the DHT; on a partitioned or loaded network it can take longer than an ad lives (py-libp2p waits 10 s
for each unreachable peer). The ad a provider serves itself on /coop/ad/1.0.0 used to be renewed only after the
put: in tests/test_partition.py reachable providers answered finders with "no ad" while their put waited on the
cut half, and a client could not find the providers of its own half. The DHT is stood in for by a put that hangs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import trio
import trio.testing

from node.config import NodeConfig
from node.daemon import Node
from protocol.messages import CapacityAd
from protocol.records import cap_key, validate_ad_record
from tests.factories import ALICE, NOW

TTL_S, REFRESH_S = 3.0, 1.0


class HangingDht:
    """The first put succeeds; every later one hangs until ``release`` is set."""

    def __init__(self) -> None:
        self.peer_id = ALICE.peer_id
        self.puts: list[tuple[str, bytes]] = []
        self.release = trio.Event()

    async def dht_put(self, key: str, value: bytes) -> None:
        self.puts.append((key, value))
        if len(self.puts) > 1:
            await self.release.wait()

    def addrs(self) -> list[Any]:
        return []


async def test_the_served_ad_stays_fresh_while_a_dht_put_hangs(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    dht = HangingDht()
    clock_ms = lambda: NOW + int(trio.current_time() * 1000)  # noqa: E731 (wall clock follows the mock clock)
    config = NodeConfig(data_dir=tmp_path, ad_ttl_seconds=TTL_S, ad_refresh_seconds=REFRESH_S)
    node = Node(config=config, identity=ALICE, host=dht, clock_ms=clock_ms, out=io.StringIO())  # type: ignore[arg-type]

    def served() -> CapacityAd:
        record = node.ad_record()
        assert record is not None, "the node serves no ad"
        return validate_ad_record(cap_key(ALICE.peer_id), record, now=clock_ms()).ad  # signed by us, unexpired

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.advertise_forever)
            assert dht.puts == [(cap_key(ALICE.peer_id), node.ad_record())]  # ready once the first put is done
            first = node.ad_state.seq
            seqs = []
            await trio.sleep(REFRESH_S / 2)  # ok: virtual time (autojump_clock); samples fall between refreshes
            for _ in range(int(4 * TTL_S / REFRESH_S)):  # four ad lifetimes with the second put hanging
                await trio.sleep(REFRESH_S)  # ok: virtual time (autojump_clock)
                seqs.append(served().seq)
            assert len(dht.puts) == 2  # one put at a time: the hanging one was not joined by others
            assert seqs == sorted(set(seqs))  # a new ad each refresh, seq always rising
            assert len(seqs) == 4 * TTL_S / REFRESH_S
            assert node.ad_state.seq == first  # the DHT still holds the first: the status says so
            dht.release.set()
            await trio.sleep(REFRESH_S * 1.5)  # ok: virtual time (autojump_clock)
            assert len(dht.puts) == 3  # the next refresh puts the newest ad
            assert node.ad_state.seq > first
            nursery.cancel_scope.cancel()
