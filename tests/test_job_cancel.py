"""A cancelled job stays cancelled, even when its task runs on after the cancel (node/market/jobs.py); a job that
already has its receipt cannot be cancelled.

The dial here behaves as a library may under a cancel: it swallows the cancellation and fails instead. The job's
task then sees an unreachable provider and would mark the job "queued, waiting for a free provider" before its
next checkpoint ends it. Seen in CI: four cancelled jobs left "queued" for good (test_faults' thousand jobs).
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio
import trio.testing

from node import net
from node.market.jobs import JobManager
from node.market.requests import SubmitRequest
from node.store import Store
from protocol.identity import Identity
from tests.test_store import signed_receipt

PROVIDER = Identity.generate().peer_id


class SwallowingHost:
    """A host whose dials hang until cancelled, then swallow the cancellation and fail."""

    def __init__(self) -> None:
        self.dialling = trio.Event()

    async def open_stream(self, peer_id: str, protocol: str) -> Any:
        self.dialling.set()
        with contextlib.suppress(trio.Cancelled):  # what must not happen, and does in libraries
            await trio.sleep_forever()
        raise net.NetError("the dial was abandoned")


async def test_a_job_cancelled_while_its_task_swallows_the_cancel_stays_cancelled(tmp_path) -> None:
    host = SwallowingHost()

    async def find_providers(req: dict[str, Any]) -> list[str]:
        return [PROVIDER]

    with trio.fail_after(10), Store.open(tmp_path / "coop.db") as store:
        manager = JobManager(identity=Identity.generate(), messenger=None, store=store, host=host,  # type: ignore[arg-type]
                             find_providers=find_providers, provider=None, jobs_dir=tmp_path / "jobs",
                             clock_ms=lambda: 1_780_000_000_000)  # fmt: skip
        (tmp_path / "jobs").mkdir()
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.serve)
            job_id = await manager.submit(SubmitRequest(command=("true",)))
            await host.dialling.wait()
            assert manager.cancel(job_id)
            await trio.testing.wait_all_tasks_blocked()  # the job's task has run to its end
            assert job_id not in manager._scopes
            row = store.get_job(job_id, "client")
            assert row is not None
            assert (row.state, row.error) == ("cancelled", "cancelled by the user")
            nursery.cancel_scope.cancel()


async def test_a_job_whose_receipt_is_stored_is_past_cancelling(tmp_path) -> None:
    """The receipt is stored before our signature goes back to the provider (write ahead); a cancel in that send
    used to leave a "cancelled" job holding a receipt and a ledger entry."""
    host = SwallowingHost()

    async def find_providers(req: dict[str, Any]) -> list[str]:
        return [PROVIDER]

    with trio.fail_after(10), Store.open(tmp_path / "coop.db") as store:
        manager = JobManager(identity=Identity.generate(), messenger=None, store=store, host=host,  # type: ignore[arg-type]
                             find_providers=find_providers, provider=None, jobs_dir=tmp_path / "jobs",
                             clock_ms=lambda: 1_780_000_000_000)  # fmt: skip
        (tmp_path / "jobs").mkdir()
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.serve)
            job_id = await manager.submit(SubmitRequest(command=("true",)))
            await host.dialling.wait()
            store.put_receipt(signed_receipt(job_id=job_id))  # as _exchange does before sending our signature
            assert not manager.cancel(job_id)
            row = store.get_job(job_id, "client")
            assert row is not None
            assert row.state != "cancelled"
            assert job_id in manager._scopes  # its task was left to finish
            nursery.cancel_scope.cancel()
