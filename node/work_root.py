"""Where a provider's job work dirs go: a root reachable by the unprivileged job uid, one per data dir.

The daemon creates it at start (emptied of what a killed daemon left behind) and removes it at exit when it is
its own dir under the system temp dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def remove_if_empty(path: Path) -> None:
    """A work root under the system temp dir is this data dir's own: leave nothing behind when no job is left."""
    if path.parent == Path(tempfile.gettempdir()):
        with contextlib.suppress(OSError):
            path.rmdir()


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents] if p.exists())


def work_root_for(data_dir: Path) -> Path:
    """Where job work dirs go: DATA_DIR/work when the unprivileged job uid can reach it, else a private dir
    under the system temp dir (as root, the default data dir sits under /root, which others cannot traverse)."""
    if os.geteuid() != 0 or _traversable_by_others(data_dir):
        return data_dir / "work"
    tag = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"coop-work-{tag}"


def choose_work_root(data_dir: Path) -> tuple[Path, int]:
    """Create (0711) and return ``work_root_for(data_dir)``, emptied of job dirs a killed daemon left behind
    (no job runs before this daemon starts one, and the data dir is this daemon's alone), and how many it removed.

    The daemon removes the root at exit if it is in /tmp.
    """
    root = work_root_for(data_dir)
    root.mkdir(mode=0o711, exist_ok=True)
    root.chmod(0o711)
    stale = 0
    for entry in root.iterdir():
        stale += 1
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return root, stale
