import pytest

from tests.cluster import Launcher


@pytest.fixture
async def launcher(tmp_path, nursery):
    launcher = Launcher(tmp_path, nursery)
    try:
        yield launcher
    finally:
        launcher.kill_all()
