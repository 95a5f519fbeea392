import pytest
import trio

from tests.cluster import Launcher
from tests.fuzz_world import world  # noqa: F401  (the fuzz tests' fixture: one real provider, in memory)


@pytest.fixture
async def launcher(tmp_path, nursery):
    launcher = Launcher(tmp_path, nursery)
    try:
        yield launcher
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await launcher.kill_all()
