"""Connection and stream limits (node/net/limits.py): one peer over its limits is cut short, others are served.

Real libp2p hosts on 127.0.0.1 in one process, with small limits so that the test stays quick.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from node.config import LIMIT_KEYS, ConfigError, NodeConfig, load_config_file, write_default_config
from node.net import (
    DialError,
    NetHost,
    NetLimits,
    NetStream,
    StreamClosed,
    StreamOpenError,
    open_host,
    receive_frame,
    send_frame,
)
from node.net.limits import StreamLimiter
from protocol.identity import Identity

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
HOLD = "/coop-test/hold/1.0.0"
ECHO = "/coop-test/echo/1.0.0"


@asynccontextmanager
async def open_hosts(n: int, *, limits: NetLimits) -> AsyncIterator[list[NetHost]]:
    """Host 0 has ``limits``; the others (the peers) the defaults."""
    async with AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(
                open_host(seed=Identity.generate().seed(), listen=LOOPBACK, limits=limits if i == 0 else None)
            )
            for i in range(n)
        ]
        yield hosts


async def _echo(stream: NetStream) -> None:
    await send_frame(stream, await receive_frame(stream, 1024))


async def _ping_on(stream: NetStream) -> bytes:
    await send_frame(stream, b"ping")
    return await receive_frame(stream, 1024)


async def _ping(host: NetHost, server: NetHost) -> bytes:
    async with await host.open_stream(server.peer_id, ECHO) as stream:
        return await _ping_on(stream)


async def _connect_and_ping(host: NetHost, server: NetHost) -> bytes:
    await host.connect(server.addrs()[0])
    return await _ping(host, server)


def test_stream_limiter_counts_open_streams_per_peer() -> None:
    limiter = StreamLimiter(NetLimits(max_inbound_streams_per_peer=2))
    one, two = (ID.from_base58(Identity.generate().peer_id) for _ in range(2))
    assert limiter.admit(one)
    assert limiter.admit(one)
    assert not limiter.admit(one)  # a third at once is refused ...
    assert limiter.admit(two)  # ... not another peer's
    limiter.release(one)
    assert limiter.admit(one)  # the limit is on streams held open


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_inbound_streams_per_peer"):
        NetLimits(max_inbound_streams_per_peer=0)


async def test_a_peer_holding_too_many_streams_is_reset_while_others_are_served() -> None:
    with trio.fail_after(30):
        async with open_hosts(3, limits=NetLimits(max_inbound_streams_per_peer=4)) as (server, greedy, polite):
            held = 0
            all_held = trio.Event()
            release = trio.Event()

            async def hold(stream: NetStream) -> None:
                nonlocal held
                await receive_frame(stream, 1024)
                held += 1
                if held == 4:
                    all_held.set()
                await release.wait()
                await send_frame(stream, b"done")

            server.set_stream_handler(HOLD, hold)
            server.set_stream_handler(ECHO, _echo)
            for peer in (greedy, polite):
                await peer.connect(server.addrs()[0])

            streams = [await greedy.open_stream(server.peer_id, HOLD) for _ in range(4)]
            for stream in streams:
                await send_frame(stream, b"hold")
            await all_held.wait()

            # The fifth stream from the same peer is reset at once ...
            with pytest.raises((StreamOpenError, StreamClosed)):  # reset as soon as the server sees it
                await _ping(greedy, server)
            assert server.statistics().streams_limited == 1
            # ... while another peer is served, and so is the greedy one's own held work.
            assert await _ping(polite, server) == b"ping"
            release.set()
            for stream in streams:
                assert await receive_frame(stream, 1024) == b"done"
                await stream.close()


async def test_a_peer_opening_streams_too_fast_is_reset_while_others_are_served() -> None:
    limits = NetLimits(inbound_streams_per_peer_per_second=0.01, inbound_stream_burst_per_peer=3)
    with trio.fail_after(30):
        async with open_hosts(3, limits=limits) as (server, greedy, polite):
            server.set_stream_handler(ECHO, _echo)
            for peer in (greedy, polite):
                await peer.connect(server.addrs()[0])
            for _ in range(3):  # the burst
                assert await _ping(greedy, server) == b"ping"
            with pytest.raises((StreamOpenError, StreamClosed)):
                await _ping(greedy, server)
            assert server.statistics().streams_limited == 1
            assert await _ping(polite, server) == b"ping"
            assert server.statistics().streams_accepted == 4


async def test_a_peer_reconnecting_too_fast_is_refused_while_others_connect() -> None:
    limits = NetLimits(connections_per_peer_per_second=0.01, connection_burst_per_peer=2)
    with trio.fail_after(30):
        async with open_hosts(3, limits=limits) as (server, greedy, polite):
            server.set_stream_handler(ECHO, _echo)
            address = server.addrs()[0]
            for _ in range(2):  # the burst
                await greedy.connect(address)
                assert await _ping(greedy, server) == b"ping"
                await greedy.disconnect(server.peer_id)
            with pytest.raises((DialError, StreamClosed)):  # refused once the peer id is known (after Noise)
                await _connect_and_ping(greedy, server)
            assert server.statistics().connections_refused >= 1
            await polite.connect(address)
            assert await _ping(polite, server) == b"ping"


def test_config_limits_are_the_net_limits(tmp_path: Path) -> None:
    # config.py names the keys without importing libp2p: they must stay NetLimits' fields, and the commented
    # defaults in the template must be NetLimits' defaults.
    assert set(LIMIT_KEYS) == set(NetLimits.__slots__)
    path = tmp_path / "config.toml"
    write_default_config(path)
    config = load_config_file(path, NodeConfig(data_dir=tmp_path))
    assert NetLimits(**dict(config.net_limits)) == NetLimits()  # type: ignore[arg-type]
    assert dict(config.net_limits) == {k: getattr(NetLimits(), k) for k in LIMIT_KEYS}


def test_config_limits_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[limits]\nmax_inbound_streams_per_peer = 8\nconnections_per_peer_per_second = 0.5\n")
    config = load_config_file(path, NodeConfig(data_dir=tmp_path))
    limits = NetLimits(**dict(config.net_limits))  # type: ignore[arg-type]
    assert limits.max_inbound_streams_per_peer == 8
    assert limits.connections_per_peer_per_second == 0.5
    assert limits.max_connections == NetLimits().max_connections
    for bad, message in (
        ("max_streams = 0", "must be positive"),
        ("max_streams = 1.5", "expected an integer"),
        ("max_streams = true", "got a boolean"),
        ("streams = 3", "unknown key"),
    ):
        path.write_text(f"[limits]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config_file(path, NodeConfig(data_dir=tmp_path))
