"""What py-libp2p 0.8.1's circuit relay v2 does with hosts built as ours are (Noise only, Yamux, one connection
per peer), before it is wired into the adapter (docs/nat.md): a private node reserves a slot at a relay, and
another node dials it through the relay and talks to it over a stream.

The first test pins the library's behaviour that node/net/relay.py relies on. The second (slow) is the daemon's:
in network namespaces, a provider the client cannot dial runs the client's job through a relay node.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from scripts.cluster import node_config, node_env
from scripts.netns import Netns, prefix_for, unavailable_reason
from tests.cluster import Launcher, NodeProcess, wait_until

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
ECHO = TProtocol("/coop-test/echo/1.0.0")


def _host() -> IHost:
    keys = create_new_key_pair()
    noise = NoiseTransport(keys, noise_privkey=create_new_x25519_key_pair().private_key)
    return new_host(
        key_pair=keys,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=LOOPBACK,
    )


@asynccontextmanager
async def _relay_transport(host: IHost, *, hop: bool) -> AsyncIterator[CircuitV2Transport]:
    limits = RelayLimits(duration=600, data=1 << 26, max_circuit_conns=8, max_reservations=8)
    roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if hop else RelayRole(0))
    protocol = CircuitV2Protocol(host, limits=limits, allow_hop=hop)
    host.set_stream_handler(PROTOCOL_ID, protocol._handle_hop_stream)
    host.set_stream_handler(STOP_PROTOCOL_ID, protocol._handle_stop_stream)
    async with background_trio_service(protocol):
        yield CircuitV2Transport(host, protocol, RelayConfig(roles=roles, limits=limits))


async def _echo(stream: INetStream) -> None:
    await stream.write(b"echo:" + await stream.read(100))
    await stream.close()


async def test_a_reserved_node_is_reached_through_the_relay() -> None:
    with trio.fail_after(60):
        relay, private, client = _host(), _host(), _host()
        async with AsyncExitStack() as stack:
            for host in (relay, private, client):
                await stack.enter_async_context(host.run(LOOPBACK))
            await stack.enter_async_context(_relay_transport(relay, hop=True))
            private_transport = await stack.enter_async_context(_relay_transport(private, hop=False))
            client_transport = await stack.enter_async_context(_relay_transport(client, hop=False))
            private.set_stream_handler(ECHO, _echo)
            relay_addr = relay.get_addrs()[0]
            await private.connect(info_from_p2p_addr(relay_addr))
            await client.connect(info_from_p2p_addr(relay_addr))

            # Reservation: RelayDiscovery(auto_reserve=True) did not find the relay within 10 s in a probe (it
            # scans on a timer), so the wiring must reserve explicitly, as here.
            async with trio.open_nursery() as nursery:
                stream = await private.new_stream(relay.get_id(), [PROTOCOL_ID])
                assert await private_transport.reserve(stream, relay.get_id(), nursery)
                nursery.cancel_scope.cancel()  # stops the reservation refresher

            circuit = multiaddr.Multiaddr(f"{relay_addr}/p2p-circuit/p2p/{private.get_id()}")
            connection = await client_transport.dial(circuit)
            assert connection.muxed_conn.peer_id == private.get_id()  # Noise authenticated the private node
            stream = await client.new_stream(private.get_id(), [ECHO])
            await stream.write(b"hi")
            assert await stream.read(100) == b"echo:hi"
            await stream.close()


def _node_in(network: Netns, index: int, base: Path, launcher: Launcher, args: list[str]) -> NodeProcess:
    where = network.node(index)
    data_dir = base / f"relay{index}"
    data_dir.mkdir()
    (data_dir / "config.toml").write_text(node_config(refresh=1, ttl=3, host=where.address, api_host=where.api_host))
    program = where.wrap([sys.executable, "-m", "node"])
    node = NodeProcess(data_dir=data_dir, env=node_env(), args=["--no-mdns", *args], program=program)
    launcher.nodes.append(node)
    return node


@pytest.mark.slow
async def test_a_provider_that_cannot_be_dialled_runs_a_job_through_a_relay(tmp_path: Path, launcher: Launcher) -> None:
    # One bridge, three namespaces; the client and the provider have "unreachable" routes to each other, as if
    # each sat behind its own NAT, and both reach the relay.
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"needs network namespaces: {reason}")
    network = await trio.to_thread.run_sync(Netns.create, prefix_for(f"relay-{tmp_path}"), 3)
    try:
        with trio.fail_after(180):  # three node start-ups dominate
            for a, b in ((1, 2), (2, 1)):
                await trio.run_process(
                    ["ip", "-n", network.node(a).namespace, "route", "add", "unreachable", network.node(b).address]
                )
            relay = _node_in(network, 0, tmp_path, launcher, ["--relay-service", "--no-provide"])
            await launcher.start(relay)
            seed = ["--bootstrap", relay.address]
            provider = _node_in(network, 1, tmp_path, launcher, [*seed, "--relay", relay.address])
            client = _node_in(network, 2, tmp_path, launcher, [*seed, "--no-provide"])
            async with trio.open_nursery() as starting:
                starting.start_soon(launcher.start, provider)
                starting.start_soon(launcher.start, client)

            async def relayed_ad() -> bool:  # the provider holds a reservation, and its signed ad names the circuit
                found = await client.api("GET", "/v1/find", params={"cpus": 1})
                ads = {p["peer_id"]: p for p in found["providers"]}  # type: ignore[index]
                return provider.peer_id in ads and any("/p2p-circuit/" in a for a in ads[provider.peer_id]["addrs"])

            await wait_until(relayed_ad)
            status = await provider.api("GET", "/v1/status")
            assert status["reach"]["reachability"] == "private via relay"  # type: ignore[index]
            _, _, host, _, port, *_ = provider.address.split("/")
            probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=2)"
            with pytest.raises(subprocess.CalledProcessError):  # no direct path from the client, really
                await trio.run_process(network.node(2).wrap([sys.executable, "-c", probe]), capture_stderr=True)

            job_id = await client.submit(["python3", "-c", "print(6*7)"])
            job = await client.wait_job(job_id)
            assert job["state"] == "completed", job
            assert job["provider"] == provider.peer_id
            assert await client.api("GET", f"/v1/jobs/{job_id}/logs") == b"42\n"
    finally:
        with trio.CancelScope(shield=True):
            await launcher.kill_all()
            await trio.to_thread.run_sync(network.destroy)
