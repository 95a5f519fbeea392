"""Frame channels and message I/O for the market protocols.

A :class:`FrameChannel` moves whole frames. Over the network it is a libp2p stream with length-prefixed frames;
when a node deals with itself it is a pair of in-memory channels, so both sides run the very same code.

:func:`receive_message` is the boundary check: size cap, strict decode, and for envelopes the signature, the
validity window, replay, and that the signer is the authenticated peer at the other end of the channel.
Anything wrong raises a :class:`~protocol.errors.RemoteProtocolError` subclass.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import trio

from node import net
from protocol import codec
from protocol.envelope import DEFAULT_MAX_SKEW_MS, Envelope, NonceCache, open_envelope, seal
from protocol.errors import RemoteProtocolError, WrongSigner
from protocol.identity import Identity

log = logging.getLogger(__name__)

MESSAGE_TTL_MS: Final = 60_000
MAX_FRAME_BYTES: Final = Envelope.MAX_BYTES
LOOPBACK_BUFFER: Final = 16


class ChannelClosed(Exception):
    """The other side closed or reset the channel (or died)."""


class FrameChannel(Protocol):
    remote_peer: str

    async def send(self, data: bytes) -> None: ...
    async def receive(self, max_bytes: int) -> bytes: ...
    async def aclose(self) -> None: ...
    async def abort(self) -> None: ...


class StreamChannel:
    """A libp2p stream as a frame channel."""

    def __init__(self, stream: net.NetStream) -> None:
        self.stream = stream
        self.remote_peer = stream.remote_peer

    async def send(self, data: bytes) -> None:
        try:
            await net.send_frame(self.stream, data)
        except (net.StreamClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChannelClosed(str(exc)) from exc

    async def receive(self, max_bytes: int) -> bytes:
        try:
            return await net.receive_frame(self.stream, max_bytes)
        except (net.StreamClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChannelClosed(str(exc)) from exc

    async def aclose(self) -> None:
        await self.stream.close()

    async def abort(self) -> None:
        """Reset the stream: the other side's next read or write fails at once."""
        await self.stream.reset()


class MemoryChannel:
    """One end of an in-memory frame channel pair."""

    def __init__(
        self, remote_peer: str, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        self.remote_peer = remote_peer
        self._send = send
        self._receive = receive

    async def send(self, data: bytes) -> None:
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChannelClosed("the other end closed") from exc

    async def receive(self, max_bytes: int) -> bytes:
        try:
            data = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise ChannelClosed("the other end closed") from exc
        if len(data) > max_bytes:
            raise net.FrameTooLarge(f"frame of {len(data)} bytes over the cap of {max_bytes}")
        return data

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()

    async def abort(self) -> None:
        await self.aclose()


def loopback_pair(peer_id: str) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected ends, both naming ``peer_id`` (a node talking to itself)."""
    a_send, b_receive = trio.open_memory_channel[bytes](LOOPBACK_BUFFER)
    b_send, a_receive = trio.open_memory_channel[bytes](LOOPBACK_BUFFER)
    return MemoryChannel(peer_id, a_send, a_receive), MemoryChannel(peer_id, b_send, b_receive)


async def abort_quietly(channel: FrameChannel) -> None:
    """Reset ``channel``, even inside a cancelled scope, giving it at most a second."""
    with trio.move_on_after(1) as scope:
        scope.shield = True
        await channel.abort()


async def serve_loopback(handler: Callable[[FrameChannel], Awaitable[None]], channel: FrameChannel) -> None:
    """Run a protocol handler on one end of a :func:`loopback_pair`, as the host runs it on a network stream."""
    try:
        await handler(channel)
    except (RemoteProtocolError, ChannelClosed, trio.TooSlowError) as exc:
        log.debug("loopback %s ended: %r", handler.__name__, exc)
    except Exception:  # a handler bug ends this stream, as it would a network one, never the node
        log.exception("loopback %s failed", handler.__name__)
    finally:
        await channel.aclose()


class Messenger:
    """Sends and receives market messages for one identity, with one replay cache for all channels."""

    def __init__(
        self, identity: Identity, clock_ms: Callable[[], int], *, max_skew_ms: int = DEFAULT_MAX_SKEW_MS
    ) -> None:
        self.identity = identity
        self.clock_ms = clock_ms
        self.max_skew_ms = max_skew_ms
        self.nonces = NonceCache(capacity=100_000, max_skew_ms=max_skew_ms)

    async def send(self, channel: FrameChannel, message: object) -> None:
        """Send ``message``: sealed in a signed envelope if its type has a signer field, else as a bare frame."""
        if hasattr(type(message), "SIGNER"):
            envelope = seal(
                self.identity, message, now=self.clock_ms(), ttl_ms=MESSAGE_TTL_MS, nonce=secrets.token_bytes(16)
            )
            await channel.send(codec.encode(envelope))
        else:
            await channel.send(codec.encode(message))

    async def receive(self, channel: FrameChannel, expected: tuple[type[Any], ...]) -> Any:
        """Receive one message of one of the ``expected`` types.

        Raises:
            RemoteProtocolError: oversized, malformed, unexpected type, bad or foreign signature, expired, replay.
            ChannelClosed: the other side went away.
        """
        signed = tuple(t for t in expected if hasattr(t, "SIGNER"))
        plain = tuple(t for t in expected if not hasattr(t, "SIGNER"))
        data = await channel.receive(MAX_FRAME_BYTES)
        message = codec.decode(data, (*plain, Envelope) if signed else plain)
        if not isinstance(message, Envelope):
            return message
        if message.signer_peer_id != channel.remote_peer:
            raise WrongSigner(f"envelope signed by {message.signer_peer_id}, but the channel is {channel.remote_peer}")
        return open_envelope(
            message, signed, now=self.clock_ms(), nonce_cache=self.nonces, max_skew_ms=self.max_skew_ms
        )
