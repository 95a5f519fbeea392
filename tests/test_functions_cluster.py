"""Python function jobs across real `node start` processes: map in order, remote exceptions, declared runtimes."""

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import cloudpickle
import pytest
import trio

from node.client import AsyncClient, Client
from node.functions import FunctionJob, as_completed
from tests.cluster import wait_until

pytestmark = pytest.mark.slow

SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"


def square_plus_one(n):
    return n * n + 1


def divide(a, b):
    return a / b


def uses_only_here(x):
    import coop_only_here  # exists only in one provider runtime

    return coop_only_here.scale(x)


@pytest.fixture
def runtime_venv():
    """A venv (system Python, no pip: fast) with cloudpickle and a package no other runtime has.

    Made under a world-traversable temp dir, as the job uid must reach it (pytest's tmp_path is 0700).
    """
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON} to build a runtime venv the job uid can reach")
    root = Path(tempfile.mkdtemp(prefix="coop-runtime-"))
    root.chmod(0o755)
    venv = root / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    shutil.copytree(Path(cloudpickle.__file__).parent, site / "cloudpickle")  # what `pip install cloudpickle` puts
    (site / "coop_only_here").mkdir()
    (site / "coop_only_here" / "__init__.py").write_text("def scale(x):\n    return x * 1000\n")
    for path in root.rglob("*"):
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    yield venv
    shutil.rmtree(root, ignore_errors=True)


async def start_three(launcher, runtime_venv):
    """Three providers (p2 declares the runtime `extra`) and a client node that does not provide."""
    first = launcher.make("p0")
    await launcher.start(first)
    providers = [first]
    async with trio.open_nursery() as nursery:
        for i in (1, 2):
            node = launcher.make(f"p{i}", bootstrap=[first.address])
            if i == 2:
                with (node.data_dir / "config.toml").open("a") as f:
                    f.write(f'\n[runtimes]\nextra = "{runtime_venv}"\n')
            providers.append(node)
            nursery.start_soon(launcher.start, node)
        client = launcher.make("client", bootstrap=[first.address], extra_args=["--no-provide"])
        config = client.data_dir / "config.toml"
        config.write_text(config.read_text().replace("[trust]\n", "[trust]\nreplicas = 1\n"))  # one run per job
        nursery.start_soon(launcher.start, client)
    ids = {p.peer_id for p in providers}

    async def sees_all():
        found = await client.api("GET", "/v1/find", params={"cpus": 1, "runtime": "python"})
        return {p["peer_id"] for p in found["providers"]} >= ids

    await wait_until(sees_all)
    return providers, client


async def test_map_exceptions_and_runtimes_over_three_providers(launcher, runtime_venv):
    with trio.fail_after(240):
        providers, client_node = await start_three(launcher, runtime_venv)
        async with AsyncClient.from_data_dir(client_node.data_dir) as client:
            # map over 3 providers: every value, in input order
            values = await client.map(square_plus_one, range(20), memory="128MiB", timeout=60)
            assert values == [n * n + 1 for n in range(20)]
            jobs = await client.jobs(limit=100)
            assert {j["provider"] for j in jobs} <= {p.peer_id for p in providers}

            # a remote exception is re-raised here as itself, chained to the remote traceback
            future = await client.submit(divide, 1, 0, memory="128MiB", timeout=60)
            with pytest.raises(ZeroDivisionError) as caught:
                await future.result(timeout=120)
            remote = caught.value.__cause__.text
            assert "Traceback (most recent call last)" in remote
            assert re.search(r"line \d+, in divide\n", remote)
            assert remote.endswith("ZeroDivisionError: division by zero\n")

            # the runtime `extra` is advertised by p2 alone, and discovery only returns p2 for it
            found = await client_node.api("GET", "/v1/find", params={"runtime": "extra"})
            assert [p["peer_id"] for p in found["providers"]] == [providers[2].peer_id]
            (extra,) = [r for r in found["providers"][0]["runtimes"] if r["name"] == "extra"]
            assert extra["interpreter"].startswith(f"cpython-{sys.version_info.major}.{sys.version_info.minor}")

            # a function needing its package runs there, and nowhere else
            future = await client.submit(uses_only_here, 7, runtime="extra", memory="128MiB", timeout=60)
            assert await future.result(timeout=120) == 7000
            job = await future.job.status()
            assert job["provider"] == providers[2].peer_id
            assert [a["provider"] for a in job["attempts"]] == [providers[2].peer_id]
            # ... and in the default runtime (any provider) the package is missing, which comes back as itself
            future = await client.submit(uses_only_here, 7, memory="128MiB", timeout=60)
            with pytest.raises(ModuleNotFoundError, match="coop_only_here"):
                await future.result(timeout=120)

        # the synchronous client: submit, as_completed, map
        def sync_side():
            with Client.from_data_dir(client_node.data_dir) as client:
                futures = [client.submit(square_plus_one, n, memory="128MiB", timeout=60) for n in (3, 4)]
                assert all(isinstance(f, FunctionJob) for f in futures)
                finished = list(as_completed(futures, timeout=120))
                assert sorted(f.job_id for f in finished) == sorted(f.job_id for f in futures)
                return sorted(f.result() for f in finished)

        assert await trio.to_thread.run_sync(sync_side) == [10, 17]
