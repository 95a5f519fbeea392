"""Peer liveness (node/net/liveness.py): a bounded number of pings per round, missed pings first.

The schedule is tested on trio's mock clock with a stand-in host (the partition test, tests/test_partition.py,
covers silent peers on real connections across network namespaces).
"""

from __future__ import annotations

from collections import Counter

import trio
import trio.testing
from libp2p.peer.peerstore import PeerStoreError

from node.net.liveness import MISSES_TO_DROP, PeerKeeper, ping_order
from protocol.identity import Identity


def test_ping_order_puts_missed_pings_first_then_the_longest_unchecked() -> None:
    connected = {"a", "b", "c", "d"}
    assert ping_order(connected, {}, {}) == ["a", "b", "c", "d"]
    assert ping_order(connected, {}, {"a": 3.0, "b": 1.0}) == ["c", "d", "b", "a"]
    assert ping_order(connected, {"a": 1}, {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.5}) == ["a", "d", "b", "c"]


class _Peerstore:
    def addrs(self, _peer: object) -> list[str]:
        raise PeerStoreError("no addresses in this stand-in")


class _Inner:
    def get_peerstore(self) -> _Peerstore:
        return _Peerstore()

    def get_network(self) -> object:
        return object()


class _RoutingTable:
    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove_peer(self, peer: object) -> None:
        self.removed.append(str(peer))


class _Dht:
    def __init__(self) -> None:
        self.routing_table = _RoutingTable()


class FakeHost:
    def __init__(self, peers: list[str]) -> None:
        self.peers = set(peers)
        self._host = _Inner()
        self._dht = _Dht()

    def connected_peers(self) -> list[str]:
        return sorted(self.peers)

    async def disconnect(self, peer_id: str) -> None:
        self.peers.discard(peer_id)


async def test_each_round_pings_at_most_its_budget_and_a_silent_peer_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = [Identity.generate().peer_id for _ in range(10)]
    silent = peers[7]
    host = FakeHost(peers)
    keeper = PeerKeeper(host, interval_s=5.0, timeout_s=1.0, pings_per_round=3)  # type: ignore[arg-type]
    rounds: Counter[int] = Counter()
    pinged: Counter[str] = Counter()

    async def ping(peer_id: str) -> bool:
        rounds[int(trio.current_time() // 5.0)] += 1
        pinged[peer_id] += 1
        return peer_id != silent

    keeper.ping = ping  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.probe_forever)
        await trio.sleep(4 * 5.0 - 1)  # rounds at 0, 5, 10, 15 s
        assert set(rounds.values()) == {3}  # 3 pings a round, never all 10 peers at once
        assert set(pinged) == set(peers)  # every peer checked within ceil(10 / 3) = 4 rounds
        await trio.sleep(10 * 5.0)
        nursery.cancel_scope.cancel()
    assert max(rounds.values()) == 3
    # the silent peer, once missed, is pinged first in the next round and dropped after MISSES_TO_DROP misses
    assert pinged[silent] == MISSES_TO_DROP
    assert silent not in host.peers
    assert keeper.statistics().silent_dropped == 1
    assert keeper.statistics().pings == sum(pinged.values())
    assert min(pinged[p] for p in peers if p != silent) >= 4  # the 9 live peers share 14 rounds of 3 pings
