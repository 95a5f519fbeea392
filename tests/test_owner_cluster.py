"""Owner policy across real `node start` processes: caps in the ad, idle-only mode, suspend and preempt.

The owner's load comes from the COOP_OWNER_LOAD_FILE test hook (a percentage in a file): on two shared,
busy cores real measurement would see every other test as "the owner". The real psutil measurement is
unit-tested in tests/test_owner_service.py. Ads are refreshed only every 30 s here, so a provider that
disappears from (or reappears in) another node's `find` within seconds shows the immediate republish.
"""

import pytest
import trio

from tests.cluster import wait_until

pytestmark = pytest.mark.slow
MIB = 1 << 20

# A job that runs for a few seconds in small steps, then prints a result computed along the way.
STEPS = "import time\nprint('started', flush=True)\nt=0\nfor i in range(40):\n    time.sleep(0.1)\n    t+=i\nprint(t)"


def owner_node(launcher, name, load_file, owner_toml, **kwargs):
    node = launcher.make(name, refresh=30, ttl=60, extra_env={"COOP_OWNER_LOAD_FILE": str(load_file)}, **kwargs)
    config = node.data_dir / "config.toml"
    config.write_text(config.read_text() + "\n[owner]\ncheck_seconds = 0.3\n" + owner_toml)
    return node


def no_replicas(node):
    """Clients here trust new providers enough not to replicate jobs (verification is tested elsewhere)."""
    config = node.data_dir / "config.toml"
    config.write_text(config.read_text().replace("[trust]\n", "[trust]\nreplicas = 1\n"))
    return node


async def offers(client):
    return {p["peer_id"]: p for p in await client.cli("find", "--cpus", "1")}


async def owner_state(node):
    return (await node.api("GET", "/v1/status"))["owner"]


async def test_caps_shape_the_ad_and_idle_only_follows_the_owner(launcher, tmp_path):
    load = tmp_path / "load"
    load.write_text("0")
    with trio.fail_after(150):
        provider = owner_node(launcher, "p", load, 'mode = "idle-only"\nidle_seconds = 1\nreclaim_seconds = 0\n'
                              'cpus = 1\nmemory = "256MiB"\n')  # fmt: skip
        await launcher.start(provider)
        client = no_replicas(launcher.make("c", bootstrap=[provider.address], extra_args=["--no-provide"]))
        await launcher.start(client)

        async def offered():
            return (await offers(client)).get(provider.peer_id)

        ad = await wait_until(offered)
        assert (ad["cpus"], ad["memory_bytes"]) == (1, 256 * MIB)  # the caps, not the machine
        job = await client.wait_job(await client.submit(["python3", "-c", "print(6*7)"], memory_bytes=64 * MIB))
        assert job["state"] == "completed", job
        assert job["provider"] == provider.peer_id

        load.write_text("90")  # the owner sits down
        await wait_until(lambda: _gone(client, provider))
        state = await owner_state(provider)
        assert not state["sharing"]
        assert "owner is using the machine" in state["reason"]
        assert state["owner_cpu_percent"] == 90

        load.write_text("3")  # ... and leaves again
        await wait_until(offered)
        assert (await owner_state(provider))["sharing"]


async def _gone(client, provider):
    return provider.peer_id not in await offers(client)


async def test_pause_and_resume_from_the_cli(launcher, tmp_path):
    with trio.fail_after(120):
        provider = owner_node(launcher, "p", tmp_path / "none", "")
        await launcher.start(provider)
        client = launcher.make("c", bootstrap=[provider.address], extra_args=["--no-provide"])
        await launcher.start(client)
        await wait_until(lambda: _present(client, provider))
        paused = await provider.cli("pause", "--drain")
        assert (paused["paused"], paused["drain"], paused["sharing"]) == (True, True, False)
        await wait_until(lambda: _gone(client, provider))
        changed = await provider.cli("policy", "--cpus", "1", "--max-jobs", "1")
        assert (changed["policy"]["cpus"], changed["policy"]["max_jobs"]) == (1, 1)
        resumed = await provider.cli("resume")
        assert (resumed["sharing"], resumed["offer"]["cpus"]) == (True, 1)
        ad = await wait_until(lambda: _present(client, provider))
        assert ad["cpus"] == 1


async def _present(client, provider):
    return (await offers(client)).get(provider.peer_id)


async def test_running_job_is_suspended_and_resumed(launcher, tmp_path):
    load = tmp_path / "load"
    load.write_text("0")
    with trio.fail_after(150):
        provider = owner_node(launcher, "p", load, 'mode = "idle-only"\nidle_seconds = 0.5\nreclaim_seconds = 0\n'
                              'on_reclaim = "suspend"\n')  # fmt: skip
        await launcher.start(provider)
        client = no_replicas(launcher.make("c", bootstrap=[provider.address], extra_args=["--no-provide"]))
        await launcher.start(client)
        await wait_until(lambda: _present(client, provider))
        job_id = await client.submit(["python3", "-c", STEPS])

        async def running():
            return (await owner_state(provider))["jobs"]["running"] == 1

        await wait_until(running, interval=0.1)
        load.write_text("95")

        async def suspended():
            return (await owner_state(provider))["jobs"]["suspended"] == 1

        await wait_until(suspended, interval=0.1)
        assert (await client.api("GET", f"/v1/jobs/{job_id}"))["state"] == "running"  # heartbeats go on
        load.write_text("0")
        job = await client.wait_job(job_id)
        assert job["state"] == "completed", job
        assert job["exit_status"] == 0
        assert await client.api("GET", f"/v1/jobs/{job_id}/logs") == f"started\n{sum(range(40))}\n".encode()
        totals = (await owner_state(provider))["totals"]
        assert totals["suspended"] == 1
        assert totals["resumed"] == 1
        assert any("suspended 1 job(s)" in line for line in provider.lines)


async def test_preempted_job_is_rescheduled_elsewhere(launcher, tmp_path):
    load = tmp_path / "load"
    load.write_text("0")
    with trio.fail_after(180):
        # The workstation is cheaper, so the client picks it first; the server is dearer but well within the
        # client's default max price (a 60 s job at 40 per CPU-second is 2,400 of 100,000 milli-credits).
        workstation = owner_node(launcher, "ws", load, 'mode = "idle-only"\nidle_seconds = 0.5\nreclaim_seconds = 0\n'
                                 'on_reclaim = "preempt"\n', per_cpu_second=10)  # fmt: skip
        await launcher.start(workstation)
        server = launcher.make("srv", bootstrap=[workstation.address], per_cpu_second=40)
        client = no_replicas(launcher.make("c", bootstrap=[workstation.address], extra_args=["--no-provide"]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(launcher.start, server)
            nursery.start_soon(launcher.start, client)

        async def both():
            return {workstation.peer_id, server.peer_id} <= set(await offers(client))

        await wait_until(both)
        # Twice STEPS' length (8 s), so that a slow status poll on a loaded machine still sees it running.
        job_id = await client.submit(["python3", "-c", STEPS.replace("range(40)", "range(80)")])

        async def running_on_workstation():
            return (await owner_state(workstation))["jobs"]["running"] == 1

        await wait_until(running_on_workstation, interval=0.1)
        load.write_text("95")  # the owner is back: idle-only with on_reclaim = "preempt" stops the job
        job = await client.wait_job(job_id)
        assert job["state"] == "completed", (job["error"], job["attempts"])
        assert job["provider"] == server.peer_id
        first, second = job["attempts"]
        assert (first["provider"], first["outcome"]) == (workstation.peer_id, "failed")
        assert "preempted" in first["reason"]
        assert (second["provider"], second["outcome"]) == (server.peer_id, "completed")
        assert await client.api("GET", f"/v1/jobs/{job_id}/logs") == f"started\n{sum(range(80))}\n".encode()
        assert (await owner_state(workstation))["totals"]["preempted"] == 1
        assert any("preempted 1 job(s)" in line for line in workstation.lines)
        on_ws = await workstation.api("GET", f"/v1/jobs/{job_id}")
        assert on_ws["state"] == "cancelled"
        assert on_ws["error"].startswith("preempted")
