"""A cancelled job stays cancelled, even when its task runs on after the cancel (node/market/jobs.py); a job that
already has its receipt cannot be cancelled.

The dial here behaves as a library may under a cancel: it swallows the cancellation and fails instead. The job's
task then sees an unreachable provider and would mark the job "queued, waiting for a free provider" before its
next checkpoint ends it. Seen in CI: four cancelled jobs left "queued" for good (test_faults' thousand jobs).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from node import net
from node.market.jobs import JobManager
from node.market.requests import SubmitRequest
from node.market.wire import MemoryChannel, loopback_pair
from node.store import Store
from protocol import codec
from protocol.identity import Identity
from protocol.messages import Receipt
from tests.fuzz_world import one_node_market, run_to_the_end
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


@asynccontextmanager
async def job_in_a_hanging_dial(tmp_path: Path) -> AsyncIterator[tuple[JobManager, Store, str]]:
    """A client-only JobManager running one job whose dial to its only provider hangs (``SwallowingHost``)."""
    host = SwallowingHost()

    async def find_providers(req: dict[str, Any]) -> list[str]:
        return [PROVIDER]

    (tmp_path / "jobs").mkdir()
    with trio.fail_after(10), Store.open(tmp_path / "coop.db") as store:
        manager = JobManager(identity=Identity.generate(), messenger=None, store=store, host=host,  # type: ignore[arg-type]
                             find_providers=find_providers, provider=None, jobs_dir=tmp_path / "jobs",
                             clock_ms=lambda: 1_780_000_000_000)  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.serve)
            job_id = await manager.submit(SubmitRequest(command=("true",)))
            await host.dialling.wait()
            yield manager, store, job_id
            nursery.cancel_scope.cancel()


async def test_a_job_cancelled_while_its_task_swallows_the_cancel_stays_cancelled(tmp_path) -> None:
    async with job_in_a_hanging_dial(tmp_path) as (manager, store, job_id):
        assert await manager.cancel(job_id)
        await trio.testing.wait_all_tasks_blocked()  # the job's task has run to its end
        assert job_id not in manager._scopes
        row = store.get_job(job_id, "client")
        assert row is not None
        assert (row.state, row.error) == ("cancelled", "cancelled by the user")


async def test_a_job_whose_receipt_is_stored_is_past_cancelling(tmp_path) -> None:
    """The receipt is stored before our signature goes back to the provider (write ahead); a cancel in that send
    used to leave a "cancelled" job holding a receipt and a ledger entry."""
    async with job_in_a_hanging_dial(tmp_path) as (manager, store, job_id):
        store.put_receipt(signed_receipt(job_id=job_id))  # as _exchange does before sending our signature
        assert not await manager.cancel(job_id)
        row = store.get_job(job_id, "client")
        assert row is not None
        assert row.state != "cancelled"
        assert job_id in manager._scopes  # its task was left to finish


async def test_a_cancel_between_the_receipt_arriving_and_its_storing_completes_the_job(
    tmp_path, monkeypatch, autojump_clock
) -> None:
    """The client's task is woken with the provider's receipt; before it runs, the user cancels. The task still
    stores the receipt (no checkpoint on the way), so the run is paid for: the provider must get our signature and
    the job must end completed. It used to end "cancelled" holding a receipt, with the provider's copy unsigned.

    A node that provides runs its own job over a loopback channel; that channel calls cancel() the moment a receipt
    frame reaches the client, which is the window a cancel from the API can land in.
    """
    manager: JobManager
    nursery: trio.Nursery
    cancelled: list[bool] = []

    class CancellingOnReceipt:
        def __init__(self, inner: MemoryChannel) -> None:
            self.inner = inner
            self.remote_peer = inner.remote_peer

        async def receive(self, max_bytes: int) -> bytes:
            data = await self.inner.receive(max_bytes)
            with contextlib.suppress(Exception):
                receipt = codec.decode(data, Receipt)
                nursery.start_soon(cancel, receipt.job_id)
                with trio.CancelScope(shield=True):  # the cancel runs now, while this task holds the receipt
                    await trio.testing.wait_all_tasks_blocked()
            return data  # no checkpoint from here to the receipt's storing

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    async def cancel(job_id: str) -> None:
        cancelled.append(await manager.cancel(job_id))

    def pair(peer_id: str) -> tuple[Any, MemoryChannel]:
        mine, theirs = loopback_pair(peer_id)
        return CancellingOnReceipt(mine), theirs

    monkeypatch.setattr("node.market.jobs.loopback_pair", pair)
    with trio.fail_after(60), Store.open(tmp_path / "client.db") as store, Store.open(tmp_path / "p.db") as theirs:
        manager = one_node_market(tmp_path, store, theirs)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.serve)
            job_id = await manager.submit(SubmitRequest(command=("echo", "42")))
            row = await run_to_the_end(manager, job_id)
            nursery.cancel_scope.cancel()
        assert cancelled == [False]  # too late: the run was paid for
        assert (row.state, row.error) == ("completed", None), row
        assert row.result is not None
        assert row.result["verification"] == "unverified: cancelled"
        assert [(a.outcome, a.reason) for a in store.attempts(job_id)] == [("completed", "its receipt was stored")]
        ours, provider_copy = store.get_receipt(job_id), theirs.get_receipt(job_id)
        assert ours is not None
        assert provider_copy is not None
        assert ours == provider_copy  # the same receipt, both signatures
        run = theirs.get_job(job_id, "provider")
        assert run is not None
        assert (run.state, run.error) == ("completed", None)
