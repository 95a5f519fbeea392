"""Five real `node start` processes on 127.0.0.1: join, peers, find, GPU matching, expiry, restart."""

import signal
import tempfile
from pathlib import Path

import httpx
import pytest
import trio

from node.work_root import work_root_for
from tests.cluster import wait_until

pytestmark = pytest.mark.slow

GPU = '{"gpus":[{"model":"NVIDIA GeForce RTX 4090","memory_bytes":25757220864}]}'
TTL = 3.0
SKEW = 0.5


async def test_five_node_cluster(launcher):
    with trio.fail_after(150):
        seed = launcher.make("n0", ttl=TTL, skew=SKEW)
        await launcher.start(seed)
        nodes = [seed]
        for i in range(1, 5):
            env = {"COOP_FAKE_NVML": GPU} if i == 3 else {}
            node = launcher.make(f"n{i}", bootstrap=[seed.address], ttl=TTL, skew=SKEW, extra_env=env)
            nodes.append(node)
        async with trio.open_nursery() as starting:
            for node in nodes[1:]:
                starting.start_soon(launcher.start, node)
        ids = [n.peer_id for n in nodes]
        assert len(set(ids)) == 5

        # every node lists the others in `node peers`
        for node in nodes:

            async def knows_everyone(node=node):
                peers = {p["peer_id"] for p in await node.cli("peers")}
                return peers >= set(ids) - {node.peer_id}

            await wait_until(knows_everyone)

        last, gpu_node, victim = nodes[4], nodes[3], nodes[2]

        async def found(*args):
            return {p["peer_id"]: p for p in await last.cli("find", *args)}

        # `node find --cpus 1` from the last node returns all five providers, each with a verified ad
        providers = await wait_until(lambda: _when(found("--cpus", "1"), lambda f: set(f) == set(ids)))
        assert all(p["verified"] and p["cpus"] >= 1 for p in providers.values())

        # only the node started with a (fake) GPU is found by --gpus 1
        gpu = await found("--gpus", "1")
        assert set(gpu) == {gpu_node.peer_id}
        assert gpu[gpu_node.peer_id]["gpus"][0]["model"] == "NVIDIA GeForce RTX 4090"
        assert set(await found("--gpus", "1", "--gpu-model", "4090")) == {gpu_node.peer_id}
        assert await found("--gpus", "1", "--gpu-model", "a100") == {}

        # a killed provider disappears from `node find` within the expiry window: once its last ad (published
        # at the latest when it was killed) has expired, beyond the allowed skew, no find lists it
        victim_id = victim.peer_id
        victim.kill()
        await victim.process.wait()
        await trio.sleep_until(trio.current_time() + TTL + SKEW)  # what we wait for is the expiry time itself
        assert victim_id not in await found("--cpus", "1")
        assert set(await found("--cpus", "1")) == set(ids) - {victim_id}

        # a restarted node keeps its peer id and is found again
        await launcher.start(victim)
        assert victim.peer_id == victim_id
        await wait_until(lambda: _when(found("--cpus", "1"), lambda f: victim_id in f))

        # the API refuses requests without the token
        info = last.api_info()
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(info["url"] + "/v1/peers")).status_code == 401

        # SIGTERM shuts every node down cleanly within a few seconds
        with trio.fail_after(15):
            codes = []
            for node in nodes:
                codes.append(await node.stop())
        assert codes == [0] * 5
        assert not any((n.data_dir / "api.json").exists() for n in nodes)
        assert all("coop: stopped" in n.lines for n in nodes)
        # pytest's tmp dirs are 0700, so as root these nodes' job work dirs went under /tmp: nothing left there
        assert not [
            p for n in nodes if (p := work_root_for(n.data_dir)).parent == Path(tempfile.gettempdir()) and p.exists()
        ]


async def _when(awaitable, check):
    value = await awaitable
    return value if check(value) else None


async def test_unreachable_bootstrap_peer_is_reported_and_retried(launcher):
    with trio.fail_after(60):
        # a valid peer id on a port nobody listens on
        dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWFaojNb5M7ECLMNn3J9PgftmHvrzrhrvkQeVQBUHaLQqq"
        node = launcher.make("lonely", bootstrap=[dead])
        await launcher.start(node)

        async def retried_twice():
            status = await node.cli("status")
            (boot,) = status["bootstrap"]
            return boot["state"] == "unreachable" and boot["attempts"] >= 2

        await wait_until(retried_twice)
        assert any("bootstrap peer unreachable, retrying in" in line for line in node.lines)
        node.process.send_signal(signal.SIGINT)
        assert await node.process.wait() == 0


async def test_bad_config_file_fails_clearly(tmp_path):
    with trio.fail_after(30):
        bad = tmp_path / "bad.toml"
        bad.write_text("[network]\nlisten = 5\n")
        import sys

        result = await trio.run_process(
            [sys.executable, "-m", "node", "start", "--data-dir", str(tmp_path / "d"), "--config", str(bad)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 2
        assert f"{bad}: network.listen: expected a list" in result.stderr.decode()
