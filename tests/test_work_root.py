"""A provider's job work root: created reachable for the job uid, emptied of what a killed daemon left."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

from node.work_root import choose_work_root, work_root_for


def test_a_restarted_provider_empties_the_work_dirs_a_killed_one_left(tmp_path: Path) -> None:
    root = work_root_for(tmp_path)
    try:
        assert choose_work_root(tmp_path) == (root, 0)
        (root / "jd1-aaaa" / "work" / "out").mkdir(parents=True)
        (root / "jd1-aaaa" / "work" / "out" / "big.bin").write_bytes(b"x" * 4096)
        (root / "jd2-bbbb" / "inputs").mkdir(parents=True)
        (root / "stray-file").write_text("left over")
        outside = tmp_path / "keep"
        outside.mkdir()
        (root / "link").symlink_to(outside)  # a link is removed, never followed
        assert choose_work_root(tmp_path) == (root, 4)
        assert list(root.iterdir()) == []
        assert outside.is_dir()
        assert stat.S_IMODE(root.stat().st_mode) == 0o711
    finally:
        shutil.rmtree(root, ignore_errors=True)
