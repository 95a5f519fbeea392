"""node.market.queue: the cap on a node's unfinished jobs and the slots that let only a few negotiate at once."""

import pytest
import trio
import trio.testing

from node.config import ConfigError, NodeConfig, load_config_file
from node.market.queue import JobQueue, QueueFull, SlotWaiters


def test_admission_is_capped_and_done_frees_room_but_a_resumed_job_is_never_refused():
    queue = JobQueue(max_unfinished=2, max_active=1)
    queue.admit("a")
    queue.admit("b")
    with pytest.raises(QueueFull, match=r"already has 2 unfinished jobs \(the limit, \[jobs\] max_unfinished\)"):
        queue.admit("c")
    queue.admit("r", resumed=True)  # admitted before the restart
    assert queue.statistics().unfinished == 3
    queue.done("a")
    queue.done("r")
    queue.admit("c")
    assert queue.statistics().unfinished == 2


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        JobQueue(max_unfinished=0, max_active=1)
    with pytest.raises(ValueError, match="at least 1"):
        JobQueue(max_unfinished=1, max_active=0)


async def test_only_max_active_jobs_hold_a_slot_and_the_rest_start_in_submission_order(autojump_clock):
    queue = JobQueue(max_unfinished=100, max_active=2)
    started: list[int] = []
    holding = 0
    most = 0

    async def job(n: int) -> None:
        nonlocal holding, most
        async with queue.slot():
            started.append(n)
            holding += 1
            most = max(most, holding)
            await trio.sleep(n + 1)  # distinct lengths: slots free one at a time, in a known order
            holding -= 1

    async with trio.open_nursery() as nursery:
        for n in range(6):
            nursery.start_soon(job, n)
            await trio.sleep(0.01)  # a fixed submission order (virtual time)
        await trio.sleep(0.5)
        stats = queue.statistics()
        assert (started, stats.active, stats.waiting, stats.max_active) == ([0, 1], 2, 4, 2)
        assert not queue.slot_free
    assert started == [0, 1, 2, 3, 4, 5]
    assert most == 2
    assert queue.slot_free


def test_jobs_section_of_the_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[jobs]\nmax_active = 4\nmax_unfinished = 50\n")
    config = load_config_file(path, NodeConfig(data_dir=tmp_path))
    assert (config.max_active_jobs, config.max_unfinished_jobs) == (4, 50)
    path.write_text("[jobs]\nmax_unfinished = 0\n")
    with pytest.raises(ConfigError, match=r"jobs\.max_unfinished: must be at least 1, got 0"):
        load_config_file(path, NodeConfig(data_dir=tmp_path))
    assert config.busy_patience_seconds == 600  # the default: a job waits 10 minutes for a busy provider
    path.write_text("[jobs]\nbusy_patience_seconds = 2.5\n")
    assert load_config_file(path, NodeConfig(data_dir=tmp_path)).busy_patience_seconds == 2.5
    path.write_text("[jobs]\nbusy_patience_seconds = 0\n")
    with pytest.raises(ConfigError, match=r"jobs\.busy_patience_seconds"):
        load_config_file(path, NodeConfig(data_dir=tmp_path))


async def test_a_freed_slot_wakes_the_longest_waiting_job_at_once_and_the_others_keep_their_timeout(autojump_clock):
    waiters = SlotWaiters()
    woke: dict[str, tuple[bool, float]] = {}

    async def job(name: str) -> None:
        woken = await waiters.wait(5.0)
        woke[name] = (woken, trio.current_time())

    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(job, name)
            await trio.testing.wait_all_tasks_blocked()
        assert len(waiters) == 3
        await trio.sleep(1.0)
        waiters.freed()  # one of our runs ended: one slot, one job
        await trio.testing.wait_all_tasks_blocked()
        assert woke == {"a": (True, 1.0)}
    assert woke == {"a": (True, 1.0), "b": (False, 5.0), "c": (False, 5.0)}
    assert len(waiters) == 0  # the ones that timed out left the line
    waiters.freed()  # nobody waiting: nothing happens, nothing is kept for later
    assert await waiters.wait(0.5) is False
