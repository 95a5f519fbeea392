"""The owner mechanism in one process: the service's timers (autojump clock), the real CPU measurement, the load
file hook, GPU use through the fake NVML, and the [owner] config section."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import trio

from node.capacity.fake_nvml import FakeGpu, FakeNvml
from node.capacity.probe import probe
from node.config import ConfigError, NodeConfig, load_config_file, write_default_config
from node.owner import CpuLoad, FileLoad, OwnerService, busy_and_total, owner_permille
from protocol.owner import Mode, OwnerPolicy, Reclaim, policy_with

GIB = 1 << 30


class FakeExecutor:
    """Counts and actions only: the real executor's suspend/resume is tested in test_owner_suspend.py."""

    def __init__(self):
        from node.sandbox.policy import Capacity

        self.capacity = Capacity(max_concurrent=2, gpus=(0, 1))
        self.running, self.suspended = 0, 0

    def job_counts(self):
        return self.running, self.suspended

    def gpus_in_use(self):
        return set()

    def suspend_all(self):
        n, self.running, self.suspended = self.running, 0, self.suspended + self.running
        return ["cgroup"] * n

    def resume_all(self):
        n, self.running, self.suspended = self.suspended, self.running + self.suspended, 0
        return n


class FakeProvider:
    def __init__(self):
        self.max_concurrent, self.offered_gpus, self.owner_refusal, self.preempted_with = 2, None, None, []

    def preempt_all(self, reason):
        self.preempted_with.append(reason)
        return 1


def service(policy, load, *, nvml=None, executor=None, provider=None):
    published = []

    async def publish():
        published.append(trio.current_time())

    svc = OwnerService(
        policy=policy, probe=lambda: probe(disk_path=Path("/"), nvml=nvml or FakeNvml([])), load=load,
        executor=executor, provider=provider, publish=publish, clock_ms=lambda: int(trio.current_time() * 1000),
        check_seconds=1.0, local_minute=lambda: 600,
    )  # fmt: skip
    return svc, published


async def test_idle_only_timers_and_the_ad_follow_the_owner(autojump_clock):
    owner_load = [None]
    executor, provider = FakeExecutor(), FakeProvider()
    policy = OwnerPolicy(mode=Mode.IDLE_ONLY, idle_ms=10_000, reclaim_ms=2_000)
    svc, published = service(policy, lambda: owner_load[0], executor=executor, provider=provider)
    async with trio.open_nursery() as nursery:
        owner_load[0] = 900
        await nursery.start(svc.serve)
        assert provider.owner_refusal().startswith("the owner is using the machine")
        assert svc.shape(probe(disk_path=Path("/"), nvml=FakeNvml([]))).cpus == 0
        owner_load[0] = 50
        await trio.sleep(9.5)
        assert not svc.decision.sharing
        await trio.sleep(2)  # idle for 10 s, checked every second
        assert svc.decision.sharing
        assert provider.owner_refusal() == ""
        assert len(published) == 1  # republished the moment the offer changed
        executor.running = 1
        owner_load[0] = 800
        await trio.sleep(1.5)
        assert svc.decision.sharing  # reclaim_ms not yet over
        await trio.sleep(2)
        assert not svc.decision.sharing
        assert executor.job_counts() == (0, 1)
        assert len(published) == 2
        owner_load[0] = 10
        await trio.sleep(11)
        assert executor.job_counts() == (1, 0)
        state = await svc.pause(drain=False)  # acts at once, not at the next check
        assert (state["paused"], state["jobs"]) == (True, {"running": 0, "suspended": 1})
        state = await svc.set_policy({"on_reclaim": "preempt", "cpus": 1})
        assert provider.preempted_with
        assert "owner needs the machine" in provider.preempted_with[0]
        assert state["policy"]["cpus"] == 1
        await svc.resume()
        assert svc.decision.offer.cpus == 1
        totals = svc.api_state()["totals"]  # the fake provider does not end preempted jobs, so they repeat
        assert (totals["suspended"], totals["resumed"]) == (2, 2)
        assert totals["preempted"] >= 1
        nursery.cancel_scope.cancel()


async def test_gpu_in_use_by_the_owner_is_withdrawn(autojump_clock):
    nvml = FakeNvml([FakeGpu(model="NVIDIA RTX A4000", memory_bytes=16 * GIB),
                     FakeGpu(model="NVIDIA RTX A4000", memory_bytes=16 * GIB)])  # fmt: skip
    svc, published = service(OwnerPolicy(), lambda: 0, nvml=nvml, provider=FakeProvider())
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.serve)
        raw = probe(disk_path=Path("/"), nvml=nvml)
        assert [g.index for g in svc.shape(raw).gpus] == [0, 1]
        nvml.gpus = (nvml.gpus[0], FakeGpu(model="NVIDIA RTX A4000", memory_bytes=16 * GIB, utilization_percent=80))
        await trio.sleep(1.5)
        assert svc.decision.owner_gpus == (1,)
        assert [g.index for g in svc.shape(raw).gpus] == [0]
        assert svc.provider.offered_gpus == (0,)
        assert len(published) == 1
        nursery.cancel_scope.cancel()


def test_owner_load_from_psutil_takes_our_jobs_out():
    """The real measurement: a CPU burner counted as our job is not the owner's load."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        proc = psutil.Process(burner.pid)

        def burner_cpu():
            t = proc.cpu_times()
            return t.user + t.system

        ours, theirs = CpuLoad(burner_cpu), CpuLoad(lambda: 0.0)
        assert ours() is None  # the first call only takes a snapshot
        assert theirs() is None
        start = burner_cpu()
        while burner_cpu() - start < 0.3:  # until the burner has had some CPU (however busy the machine)
            psutil.cpu_percent(interval=0.1)
        with_jobs, without = ours(), theirs()
    finally:
        burner.kill()
        burner.wait()
    assert 0 <= with_jobs <= 1000
    assert 0 < without <= 1000
    assert with_jobs < without  # the burner's CPU was taken out of the owner's share


def test_owner_permille_arithmetic():
    assert owner_permille(busy=6.0, total=8.0, ours=2.0) == 500
    assert owner_permille(busy=1.0, total=8.0, ours=2.0) == 0  # sampling skew never goes negative
    assert owner_permille(busy=1.0, total=0.0, ours=0.0) == 0
    busy, total = busy_and_total(psutil.cpu_times())
    assert 0 <= busy <= total


def test_load_file_hook(tmp_path):
    path = tmp_path / "load"
    load = FileLoad(path)
    assert load() == 0  # no file: no synthetic owner
    path.write_text("37.5\n")
    assert load() == 375
    path.write_text("250")
    assert load() == 1000
    path.write_text("lots")
    assert load() is None


def test_owner_config_section(tmp_path):
    path = tmp_path / "config.toml"
    write_default_config(path)
    config = load_config_file(path, NodeConfig(data_dir=tmp_path))
    assert config.owner == policy_with(OwnerPolicy(), {"max_jobs": 2})
    assert config.owner_check_seconds == 5
    path.write_text(
        '[provide]\nmax_jobs = 3\n[owner]\nmode = "schedule"\nwindows = ["mon-fri 18:00-08:00"]\nmemory = "8GiB"\n'
        'gpus = [1]\non_reclaim = "preempt"\ncheck_seconds = 1\n'
    )
    config = load_config_file(path, NodeConfig(data_dir=tmp_path))
    assert config.owner.mode is Mode.SCHEDULE
    assert config.owner.on_reclaim is Reclaim.PREEMPT
    assert (config.owner.caps.memory_bytes, config.owner.caps.gpus, config.owner.caps.max_jobs) == (8 * GIB, (1,), 3)
    for bad, match in [('mode = "never"', "modes"), ('memory = "lots"', "owner.memory"), ("nope = 1", "unknown key"),
                       ('mode = "schedule"', "needs at least one window")]:  # fmt: skip
        path.write_text(f"[owner]\n{bad}\n")
        with pytest.raises(ConfigError, match=match):
            load_config_file(path, NodeConfig(data_dir=tmp_path))


async def test_free_disk_drifting_with_every_write_does_not_republish_the_ad_but_a_real_change_does(autojump_clock):
    real = probe(disk_path=Path("/"), nvml=FakeNvml([]))
    disk = [100 * GIB]
    published = []

    async def publish():
        published.append(trio.current_time())

    svc = OwnerService(
        policy=OwnerPolicy(), probe=lambda: dataclasses.replace(real, disk_free_bytes=disk[0]), load=lambda: 0,
        executor=FakeExecutor(), provider=FakeProvider(), publish=publish,
        clock_ms=lambda: int(trio.current_time() * 1000), check_seconds=1.0, local_minute=lambda: 600,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.serve)
        for _ in range(20):  # a job's work dir, a log line, a WAL page: every check sees another figure
            disk[0] -= 37 << 20
            await trio.sleep(1)
        assert svc.decision.offer.disk_bytes == 100 * GIB - 20 * (37 << 20)
        assert published == []  # 0.7 GiB of 100 drifted: the next regular refresh carries it
        disk[0] = 50 * GIB  # half the disk filled: clients should know now
        await trio.sleep(1)
        assert len(published) == 1
        await trio.sleep(5)
        assert len(published) == 1
        nursery.cancel_scope.cancel()
