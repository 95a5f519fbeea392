"""The job's work dir on the host: staging inputs, measuring it, and digesting outputs safely.

Everything in the work dir is written by a stranger, so nothing here follows a symlink: outputs are opened
component by component with O_NOFOLLOW and must be regular files. Blocking file IO: the executor calls these from
a worker thread (they never spawn processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from node.sandbox.detect import reachable_by
from node.sandbox.errors import WorkDirError
from node.sandbox.spec import ExecSpec, OutputFile

ENTRY_COST_BYTES: Final = 512  # each file or dir costs at least this much, so a flood of empty files counts
MAX_SCAN_ENTRIES: Final = 1_000_000
_CHUNK: Final = 1 << 20


def prepare(spec: ExecSpec, *, uid: int, gid: int) -> None:
    """Create the work dir (0700, owned by the job uid), write the inputs into it.

    Raises:
        WorkDirError: if it exists and is not empty, or the job uid could not reach it.
    """
    work = spec.work_dir
    if not work.is_absolute():
        raise WorkDirError(f"work dir must be an absolute path: {work}")
    try:
        work.mkdir(mode=0o700)
    except FileExistsError:
        if work.is_symlink() or not work.is_dir() or any(work.iterdir()):
            raise WorkDirError(f"work dir {work} exists and is not an empty directory") from None
    except OSError as exc:
        raise WorkDirError(f"cannot create work dir {work}: {exc}") from exc
    if uid != os.getuid() and not reachable_by(work, uid, gid):
        raise WorkDirError(f"uid {uid} cannot reach {work}: every parent directory must be searchable (o+x)")
    try:
        _stage_inputs(spec, uid=uid, gid=gid)
    except OSError as exc:
        raise WorkDirError(f"cannot stage the inputs in {work}: {exc}") from exc


def _stage_inputs(spec: ExecSpec, *, uid: int, gid: int) -> None:
    work = spec.work_dir
    chown = uid != os.getuid()
    for item in spec.inputs:
        target = work / item.name
        for parent in reversed(target.relative_to(work).parents[:-1]):
            d = work / parent
            d.mkdir(mode=0o700, exist_ok=True)
            if chown:
                os.chown(d, uid, gid)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            if item.data is not None:
                f.write(item.data)
            else:
                assert item.source is not None
                with open(item.source, "rb") as src:
                    shutil.copyfileobj(src, f, _CHUNK)
        if chown:
            os.chown(target, uid, gid)
    if chown:
        os.chown(work, uid, gid)
    os.chmod(work, 0o700)


def disk_usage(root: Path) -> int:
    """Bytes the tree under `root` takes (not following symlinks); 0 if it is gone."""
    total = 0
    seen = 0
    stack = [str(root)]
    while stack and seen < MAX_SCAN_ENTRIES:
        top = stack.pop()
        with contextlib.suppress(OSError), os.scandir(top) as it:
            for entry in it:
                seen += 1
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    total += max(ENTRY_COST_BYTES, st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_blocks * 512)
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
    return total


def _open_beneath(root: Path, name: str) -> int:
    """Open `root/name` read-only without following any symlink on the way."""
    parts = name.split("/")
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = nxt
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def collect_outputs(root: Path, names: Sequence[str]) -> tuple[tuple[OutputFile, ...], tuple[str, ...]]:
    """Digest the expected outputs. Returns (found, missing); a symlink or non-regular file counts as missing."""
    found, missing = [], []
    for name in names:
        try:
            fd = _open_beneath(root, name)
        except OSError:
            missing.append(name)
            continue
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                missing.append(name)
                continue
            digest = hashlib.sha256()
            size = 0
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        found.append(OutputFile(name=name, sha256=digest.hexdigest(), size=size))
    return tuple(found), tuple(missing)
