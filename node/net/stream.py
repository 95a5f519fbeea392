"""Streams of the adapter: :class:`NetStream` (typed errors, reset on a failed handler) and length-prefixed frames."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import final

import trio
from libp2p.abc import INetStream

from node.net.common import (
    _RESET_TIMEOUT_S,
    _STREAM_ERRORS,
    DEFAULT_READ_BYTES,
    FRAME_HEADER,
    MAX_FRAME_BYTES,
    FrameTooLarge,
    StreamClosed,
    _Counters,
)

logger = logging.getLogger("node.net")


@final
class NetStream:
    """One libp2p stream, with typed errors. Use as an async context manager, or call :meth:`close`.

    Attributes:
        remote_peer: the authenticated (Noise) peer id of the other end.
        protocol: the negotiated protocol id.
    """

    __slots__ = ("_counters", "_raw", "protocol", "remote_peer")

    def __init__(self, raw: INetStream, protocol: str, counters: _Counters) -> None:
        self._raw = raw
        self._counters = counters
        self.remote_peer: str = raw.muxed_conn.peer_id.to_base58()
        self.protocol = protocol

    async def read_some(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        """Read between 1 and ``max_bytes`` bytes; ``b""`` means the peer closed its side cleanly.

        Raises:
            StreamClosed: the stream was reset or the connection dropped.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        try:
            return await self._raw.read(max_bytes)
        except EOFError:  # libp2p's StreamEOF and MuxedStreamEOF are both EOFError
            return b""
        except _STREAM_ERRORS as exc:
            raise StreamClosed(f"stream from {self.remote_peer} broke: {exc!r}") from exc

    async def read_exactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes (libp2p reads can be short).

        Raises:
            StreamClosed: the stream ended, was reset, or the connection dropped before ``n`` bytes arrived.
        """
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.read_some(n - len(buf))
            if not chunk:
                raise StreamClosed(f"stream from {self.remote_peer} ended after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    async def write(self, data: bytes) -> None:
        """Write all of ``data``.

        Raises:
            StreamClosed: the stream is closed for writing, was reset, or the connection dropped.
        """
        try:
            await self._raw.write(data)
        except _STREAM_ERRORS as exc:
            raise StreamClosed(f"stream to {self.remote_peer} broke: {exc!r}") from exc

    async def close(self) -> None:
        """Close our side (the peer reads EOF) and release the stream. Idempotent; never raises on a dead stream."""
        try:
            await self._raw.close()
        except _STREAM_ERRORS as exc:
            logger.debug("closing a stream to %s: %r", self.remote_peer, exc)

    async def reset(self) -> None:
        """Abort the stream in both directions (the peer sees a reset). Idempotent."""
        try:
            await self._raw.reset()
        except _STREAM_ERRORS as exc:
            logger.debug("resetting a stream to %s: %r", self.remote_peer, exc)

    async def _reset_shielded(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(_RESET_TIMEOUT_S):
            await self.reset()

    async def __aenter__(self) -> NetStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self._reset_shielded()


async def send_frame(stream: NetStream, data: bytes) -> None:
    """Write ``data`` with a 4-byte big-endian length prefix.

    Raises:
        ValueError: ``data`` is longer than the header can express (our bug).
        StreamClosed: the stream broke.
    """
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(data)} bytes exceeds the 4-byte length prefix")
    await stream.write(FRAME_HEADER.pack(len(data)) + data)


async def receive_frame(stream: NetStream, max_bytes: int) -> bytes:
    """Read one length-prefixed frame, refusing (before reading the body) any frame over ``max_bytes``.

    Raises:
        FrameTooLarge: the announced length exceeds ``max_bytes``; the stream has been reset.
        StreamClosed: the stream ended or broke before a whole frame arrived.
    """
    (length,) = FRAME_HEADER.unpack(await stream.read_exactly(FRAME_HEADER.size))
    if length > max_bytes:
        stream._counters.frames_too_large += 1
        await stream._reset_shielded()
        raise FrameTooLarge(f"{stream.remote_peer} announced a {length}-byte frame; the cap is {max_bytes}")
    return await stream.read_exactly(length) if length else b""
