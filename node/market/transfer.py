"""Moving files over a frame channel as Chunks, with sizes and digests checked as they arrive."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Final

from node.market.wire import FrameChannel, Messenger
from protocol.errors import MalformedMessage
from protocol.messages import MAX_CHUNK_BYTES, Chunk, ChunkKind, FileRef

READ_BYTES: Final = MAX_CHUNK_BYTES


class DigestMismatch(MalformedMessage):
    """A received file's size or sha256 differs from what the signed spec or result promised."""

    code = "digest-mismatch"


def file_ref(name: str, path: Path) -> FileRef:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return FileRef(name=name, sha256=digest.digest(), size=size)


async def send_file(
    messenger: Messenger, channel: FrameChannel, *, job_id: str, kind: ChunkKind, name: str, path: Path
) -> None:
    """Send a file as chunks; an empty file is one empty chunk (so the receiver sees it)."""
    with path.open("rb") as f:
        first = True
        while True:
            data = f.read(READ_BYTES)
            if not data and not first:
                return
            await messenger.send(channel, Chunk(job_id=job_id, kind=kind, name=name, data=data))
            first = False
            if len(data) < READ_BYTES:
                return


async def receive_file(
    messenger: Messenger, channel: FrameChannel, *, job_id: str, kind: ChunkKind, ref: FileRef, dest: Path
) -> None:
    """Receive ``ref`` into ``dest``, refusing more bytes than promised and checking the digest.

    Raises:
        DigestMismatch: wrong size or digest (``dest`` is removed).
        MalformedMessage: a chunk for another job, kind or file.
    """
    digest = hashlib.sha256()
    received = 0
    tmp = dest.with_name(dest.name + ".part")
    try:
        with tmp.open("wb") as f:
            while True:
                chunk = await messenger.receive(channel, (Chunk,))
                if chunk.job_id != job_id or chunk.kind is not kind or chunk.name != ref.name:
                    raise MalformedMessage(f"expected {kind.value} chunk of {ref.name!r}, got {chunk.kind.value}")
                received += len(chunk.data)
                if received > ref.size:
                    raise DigestMismatch(f"{ref.name}: more than the promised {ref.size} bytes")
                digest.update(chunk.data)
                f.write(chunk.data)
                if received == ref.size:
                    break
        if digest.digest() != ref.sha256:
            raise DigestMismatch(f"{ref.name}: sha256 does not match the signed digest")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
