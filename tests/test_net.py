"""Tests for node.net, the libp2p adapter: real hosts on 127.0.0.1, in one process."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p import new_host
from libp2p.abc import ISecureTransport
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.secio import transport as secio
from libp2p.security.tls.transport import PROTOCOL_ID as TLS_PROTOCOL_ID
from libp2p.security.tls.transport import TLSTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from node.net import (
    FRAME_HEADER,
    DialError,
    FrameTooLarge,
    InvalidAddress,
    ListenError,
    NetHost,
    NetStream,
    StreamClosed,
    StreamOpenError,
    open_host,
    receive_frame,
    send_frame,
)
from protocol.errors import RemoteProtocolError
from protocol.identity import Identity

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
ECHO = "/coop-test/echo/1.0.0"
CAPPED = "/coop-test/capped/1.0.0"
CAP = 64


@asynccontextmanager
async def open_hosts(n: int, **kwargs: object) -> AsyncIterator[list[NetHost]]:
    async with AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(
                open_host(seed=Identity.generate().seed(), listen=LOOPBACK, **kwargs)  # type: ignore[arg-type]
            )
            for _ in range(n)
        ]
        yield hosts


async def test_two_hosts_connect_and_echo_frames() -> None:
    with trio.fail_after(30):
        seed_a, seed_b = Identity.generate().seed(), Identity.generate().seed()
        async with open_host(seed=seed_a, listen=LOOPBACK) as a, open_host(seed=seed_b, listen=LOOPBACK) as b:
            assert a.peer_id == Identity.from_seed(seed_a).peer_id
            assert b.peer_id == Identity.from_seed(seed_b).peer_id
            assert all(addr.endswith(f"/p2p/{b.peer_id}") for addr in b.addrs())
            assert logging.getLogger("libp2p").propagate

            seen_remote: list[str] = []
            rejected: list[BaseException] = []
            rejected_event = trio.Event()

            async def echo(stream: NetStream) -> None:
                seen_remote.append(stream.remote_peer)
                await send_frame(stream, await receive_frame(stream, 4096))

            async def capped(stream: NetStream) -> None:
                try:
                    await receive_frame(stream, CAP)
                except FrameTooLarge as exc:
                    rejected.append(exc)
                    rejected_event.set()
                    raise

            b.set_stream_handler(ECHO, echo)
            b.set_stream_handler(CAPPED, capped)

            assert await a.connect(b.addrs()[0]) == b.peer_id
            assert b.peer_id in a.connected_peers()

            async with await a.open_stream(b.peer_id, ECHO) as stream:
                assert stream.remote_peer == b.peer_id
                await send_frame(stream, b"hello coop")
                assert await receive_frame(stream, CAP) == b"hello coop"
            assert seen_remote == [a.peer_id]
            assert a.peer_id in b.connected_peers()

            # An echoed frame over our cap is refused on our side.
            stream = await a.open_stream(b.peer_id, ECHO)
            await send_frame(stream, bytes(1000))
            with pytest.raises(FrameTooLarge) as info:
                await receive_frame(stream, CAP)
            assert isinstance(info.value, RemoteProtocolError)

            # The cap is checked before the body is read: a header announcing 2 GiB, with no body, is refused at
            # once (reading the body would hang until fail_after).
            stream = await a.open_stream(b.peer_id, CAPPED)
            await stream.write(FRAME_HEADER.pack(1 << 31))
            await rejected_event.wait()
            assert len(rejected) == 1
            with pytest.raises(StreamClosed):  # the handler's error reset the stream
                await receive_frame(stream, CAP)

            stats = b.statistics()
            assert stats.frames_too_large == 1
            assert stats.streams_dropped == 1
            assert stats.streams_accepted == 3
            assert a.statistics().frames_too_large == 1
            assert a.statistics().streams_opened == 3

            with pytest.raises(StreamOpenError):
                await a.open_stream(b.peer_id, "/coop-test/nobody-speaks-this/1.0.0")


async def test_connect_errors_are_typed() -> None:
    with trio.fail_after(30):
        async with open_hosts(1) as [a]:
            absent = Identity.generate().peer_id
            with pytest.raises(DialError, match="could not connect"):
                await a.connect(f"/ip4/127.0.0.1/tcp/1/p2p/{absent}")
            # A second dial is not short-circuited by the negative dial cache: it really dials again.
            with pytest.raises(DialError, match="could not connect") as info:
                await a.connect(f"/ip4/127.0.0.1/tcp/1/p2p/{absent}")
            assert "negative cache" not in str(info.value)
            assert a.statistics().dials_failed == 2
            with pytest.raises(InvalidAddress):
                await a.connect("/ip4/127.0.0.1/tcp/1")
            with pytest.raises(InvalidAddress):
                await a.connect("not a multiaddr")
            with pytest.raises(InvalidAddress):
                await a.open_stream("not-a-peer-id", ECHO)


async def test_open_host_errors() -> None:
    with trio.fail_after(30):
        with pytest.raises(KeyError):  # the caller's exception comes out bare, not nested in groups
            async with open_hosts(1):
                raise KeyError("from the caller")
        with pytest.raises(ListenError):
            async with open_host(seed=Identity.generate().seed(), listen=["/ip4/192.0.2.1/tcp/0"]):
                pass  # pragma: no cover


def _plaintext(key_pair: object) -> ISecureTransport:
    return InsecureTransport(key_pair)  # type: ignore[arg-type]


def _secio(key_pair: object) -> ISecureTransport:
    return secio.Transport(key_pair)  # type: ignore[arg-type]


def _tls(key_pair: object) -> ISecureTransport:
    return TLSTransport(key_pair)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("protocol_id", "make_transport"),
    [(PLAINTEXT_PROTOCOL_ID, _plaintext), (secio.ID, _secio), (TLS_PROTOCOL_ID, _tls)],
    ids=["plaintext", "secio", "tls"],
)
async def test_non_noise_dial_is_refused(
    protocol_id: str, make_transport: Callable[[object], ISecureTransport]
) -> None:
    """A peer that offers only plaintext (or secio, or TLS) can neither dial us nor be dialed by us."""
    with trio.fail_after(30):
        key_pair = create_new_key_pair()
        rogue = new_host(
            key_pair=key_pair,
            sec_opt={TProtocol(protocol_id): make_transport(key_pair)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            connection_config=ConnectionConfig(max_connections_per_peer=1),
        )
        rogue_id = rogue.get_id().to_base58()
        async with open_hosts(1) as [ours], rogue.run([Multiaddr(LOOPBACK[0])]):
            with pytest.raises(SwarmException):
                await rogue.connect(info_from_p2p_addr(Multiaddr(ours.addrs()[0])))
            assert rogue_id not in ours.connected_peers()
            assert rogue.get_connected_peers() == []

            with pytest.raises(DialError):
                await ours.connect(str(rogue.get_addrs()[0]))
            assert ours.connected_peers() == []


def _accept_ok(key: str, value: bytes) -> None:
    if not value.startswith(b"ok:"):
        raise ValueError("not an ok: record")


def _accept_anything(key: str, value: bytes) -> None:
    return None


def _select_greatest(key: str, values: list[bytes]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _key(kind: str, name: str) -> str:
    return f"/coop/{kind}/{hashlib.sha256(name.encode()).hexdigest()[:16]}"


async def test_dht_put_get_and_providers_across_three_hosts() -> None:
    with trio.fail_after(30):
        async with (
            # `a` is careless: its validator accepts anything, so its bad records reach the others' validators.
            open_host(seed=Identity.generate().seed(), listen=LOOPBACK, dht_validate=_accept_anything) as a,
            open_hosts(2, dht_validate=_accept_ok, dht_select=_select_greatest) as [b, c],
        ):
            assert await a.bootstrap(b.addrs()) == 1
            assert await c.bootstrap([*b.addrs(), f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id}"]) == 1
            assert b.routing_table_size() == 2

            good = _key("cap", "gpu-a100")
            await a.dht_put(good, b"ok:1")
            assert await c.dht_get(good) == b"ok:1"

            # An honest node will not put a record its validator rejects...
            bad = _key("cap", "forged")
            with pytest.raises(ValueError, match="not an ok: record"):
                await c.dht_put(bad, b"forged")
            assert await c.dht_get(bad) is None
            # ...and a record a careless node puts is refused by the others' validators and never returned.
            await a.dht_put(bad, b"forged")
            assert await a.dht_get(bad) == b"forged"
            assert await b.dht_get(bad) is None
            assert await c.dht_get(bad) is None

            # libp2p returns a local copy unvalidated (trap 5); dht_get re-validates it.
            planted = _key("cap", "planted")
            c._dht.value_store.put(planted.encode(), b"planted")
            assert await c.dht_get(planted) is None
            assert c.statistics().dht_records_rejected == 1

            with pytest.raises(ValueError, match="bytes"):
                await a.dht_put("/coop/cap/" + "x" * 60, b"ok:long")
            with pytest.raises(ValueError, match="/coop/"):
                await a.dht_put("/other/x", b"ok:x")

            topic = _key("prov", "job-runner")
            assert await a.provide(topic)
            assert await c.find_providers(topic, 5) == [a.peer_id]
            assert await c.find_providers(_key("prov", "nobody"), 5) == []
