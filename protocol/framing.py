"""Length-prefixed framing of a byte stream, sans-IO.

Each frame is a 4-byte big-endian length followed by that many bytes. :class:`FrameBuffer` takes bytes as they
arrive in any split and yields whole frames; the length is checked against the cap as soon as the 4 prefix bytes
are in, so an oversized frame is refused before its body is buffered.
"""

from __future__ import annotations

from typing import Final

from protocol.errors import LocalProtocolError, OversizedFrame

LENGTH_BYTES: Final = 4


def frame(data: bytes, *, max_bytes: int) -> bytes:
    """Prefix ``data`` with its length."""
    if len(data) > max_bytes:
        raise LocalProtocolError(f"frame of {len(data)} bytes exceeds the cap of {max_bytes}")
    return len(data).to_bytes(LENGTH_BYTES, "big") + data


class FrameBuffer:
    """Reassembles frames from arbitrary chunks; never holds more than one frame plus a prefix."""

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._need: int | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add received bytes; return the frames completed by them.

        Raises:
            OversizedFrame: a length prefix announces more than ``max_bytes``.
        """
        self._buf += chunk
        frames = []
        while True:
            if self._need is None:
                if len(self._buf) < LENGTH_BYTES:
                    break
                need = int.from_bytes(self._buf[:LENGTH_BYTES], "big")
                if need > self.max_bytes:
                    raise OversizedFrame(f"peer announced a {need}-byte frame; the cap is {self.max_bytes}")
                del self._buf[:LENGTH_BYTES]
                self._need = need
            if len(self._buf) < self._need:
                break
            frames.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None
        return frames

    @property
    def pending(self) -> int:
        """Bytes held toward an incomplete frame (a clean end of stream has none)."""
        return len(self._buf) + (LENGTH_BYTES if self._need is not None else 0)
