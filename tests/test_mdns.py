"""mDNS LAN discovery: what an announcement may make us dial (pure), mDNS off on loopback, and two `node start`
processes in separate network namespaces on one bridge that find each other with no bootstrap address."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from node import net
from node.net.mdns import MAX_LAN_ADDRS, MAX_TRACKED_NAMES, _BoundedNames, all_loopback, lan_addrs, lan_peer
from protocol.identity import Identity
from scripts.cluster import node_config, node_env
from scripts.netns import Netns, prefix_for, unavailable_reason
from tests.cluster import Launcher, NodeProcess, wait_until

PEER = Identity.generate().peer_id
OTHER = Identity.generate().peer_id
RSA_PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # a valid libp2p id, but not Ed25519


def test_only_lan_tcp_addresses_are_taken() -> None:
    announced = [
        "/ip4/192.168.1.7/tcp/4001",
        "/ip4/192.168.1.7/tcp/4001",  # duplicate
        "/ip4/10.0.0.2/tcp/5000",
        "/ip4/169.254.3.4/tcp/4001",  # link-local
        "/ip6/fe80::1/tcp/4001",
        "/ip6/fd00::5/tcp/4001",  # unique local
        "/ip4/8.8.8.8/tcp/53",  # public: an announcement must not make us dial the internet
        "/ip4/224.0.0.251/tcp/5353",  # multicast
        "/ip4/0.0.0.0/tcp/4001",
        "/dns4/example.com/tcp/4001",
        "/ip4/10.0.0.3/udp/4001/quic-v1",
        "/ip4/10.0.0.4/tcp/4001/p2p-circuit",
        "/ip4/10.0.0.5/tcp/0",
        "/ip4/10.0.0.6/tcp/70000",
        "/ip4/10.0.0.7/tcp/4001/p2p/" + OTHER,  # someone else's id
        "garbage",
    ]
    assert lan_addrs(PEER, announced) == (
        f"/ip4/192.168.1.7/tcp/4001/p2p/{PEER}",
        f"/ip4/10.0.0.2/tcp/5000/p2p/{PEER}",
        f"/ip4/169.254.3.4/tcp/4001/p2p/{PEER}",
        f"/ip6/fe80::1/tcp/4001/p2p/{PEER}",
        f"/ip6/fd00::5/tcp/4001/p2p/{PEER}",
    )
    many = [f"/ip4/10.1.0.{i}/tcp/4001" for i in range(1, 50)]
    assert len(lan_addrs(PEER, many)) == MAX_LAN_ADDRS


def test_announcements_with_bad_ids_or_no_address_are_refused() -> None:
    addrs = ["/ip4/10.0.0.2/tcp/4001"]
    assert lan_peer(OTHER, PEER, addrs) == net.LanPeer(PEER, (f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}",))
    assert lan_peer(PEER, PEER, addrs) is None  # ourselves
    assert lan_peer(OTHER, RSA_PEER, addrs) is None
    assert lan_peer(OTHER, "not-a-peer-id", addrs) is None
    assert lan_peer(OTHER, PEER, ["/ip4/8.8.8.8/tcp/4001"]) is None


def test_listener_name_table_is_bounded() -> None:
    names = _BoundedNames()
    for i in range(MAX_TRACKED_NAMES + 10):
        names[f"n{i}"] = (PEER, i)
    assert len(names) == MAX_TRACKED_NAMES
    assert "n0" not in names
    assert f"n{MAX_TRACKED_NAMES + 9}" in names


def test_all_loopback() -> None:
    assert all_loopback(["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"])
    assert not all_loopback(["/ip4/127.0.0.1/tcp/0", "/ip4/0.0.0.0/tcp/0"])
    assert not all_loopback(["/ip4/10.0.0.1/tcp/4001"])
    assert not all_loopback([])


async def test_mdns_stays_off_on_loopback() -> None:
    # Many test nodes share this machine on 127.0.0.1: none of them may announce itself or join another's network.
    with trio.fail_after(30):
        async with net.open_host(seed=Identity.generate().seed(), listen=["/ip4/127.0.0.1/tcp/0"], mdns=True) as h:
            assert h.lan is None
            assert h.mdns_state == "off: listening on loopback only"


def _node_in(network: Netns, index: int, base: Path, launcher: Launcher) -> NodeProcess:
    where = network.node(index)
    data_dir = base / f"lan{index}"
    data_dir.mkdir()
    (data_dir / "config.toml").write_text(node_config(refresh=1, ttl=3, host=where.address, api_host=where.api_host))
    node = NodeProcess(data_dir=data_dir, env=node_env(), args=[], program=where.wrap([sys.executable, "-m", "node"]))
    launcher.nodes.append(node)
    return node


@pytest.mark.slow
async def test_two_nodes_on_one_bridge_find_each_other_by_mdns(tmp_path: Path, launcher: Launcher) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"needs network namespaces: {reason}")
    network = await trio.to_thread.run_sync(Netns.create, prefix_for(f"mdns-{tmp_path}"), 2)
    try:
        with trio.fail_after(150):  # two node start-ups dominate; mDNS itself answers in well under a second
            a, b = _node_in(network, 0, tmp_path, launcher), _node_in(network, 1, tmp_path, launcher)
            async with trio.open_nursery() as starting:  # no --bootstrap anywhere
                starting.start_soon(launcher.start, a)
                starting.start_soon(launcher.start, b)
            assert "coop: LAN discovery (mDNS): on" in a.lines

            for me, other in ((a, b), (b, a)):

                async def joined(me: NodeProcess = me, other: NodeProcess = other) -> bool:
                    status = await me.api("GET", "/v1/status")
                    peers = {p["peer_id"]: p for p in status["mdns"]["peers"]}  # type: ignore[index]
                    return other.peer_id in peers and peers[other.peer_id]["state"] == "joined"

                await wait_until(joined)
                listed = (await me.api("GET", "/v1/peers"))["peers"]  # type: ignore[index]
                assert other.peer_id in {p["peer_id"] for p in listed if p["in_routing_table"]}

            async def finds_b() -> bool:  # the DHT works across the LAN link: a's lookup finds b's signed ad
                found = await a.api("GET", "/v1/find", params={"cpus": 1})
                return b.peer_id in {p["peer_id"] for p in found["providers"]}  # type: ignore[index]

            await wait_until(finds_b)
            status = await a.api("GET", "/v1/status")
            assert status["mdns"]["refused"] == 0  # type: ignore[index]
            assert f"/ip4/{network.node(1).address}/tcp/" in status["mdns"]["peers"][0]["address"]  # type: ignore[index]
    finally:
        with trio.CancelScope(shield=True):
            await launcher.kill_all()
            await trio.to_thread.run_sync(network.destroy)
