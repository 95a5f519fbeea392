"""Bounds on the jobs a node submits: how many may be unfinished, and how many negotiate or run at once.

Theory of operation
-------------------
A submission is admitted only while fewer than ``max_unfinished`` of this node's jobs are unfinished; beyond that
:meth:`JobQueue.admit` raises :class:`QueueFull` and the local API answers 429. Each admitted job then waits for
one of ``max_active`` slots before it looks for providers. Only jobs holding a slot touch the network, so a queue
of thousands of jobs costs a trio task and a database row each, not a DHT walk and ``k`` quote requests every few
seconds per job (which is what made a 1,000-job queue swamp the client and every provider it asked). Slots go
first come, first served (``trio.CapacityLimiter`` is FIFO), so jobs start in the order they were submitted.
Jobs resumed after a restart were admitted before it and are not refused.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import trio

DEFAULT_MAX_UNFINISHED: Final = 10_000  # jobs; each costs a task (a few KiB) and a row while it waits
DEFAULT_MAX_ACTIVE: Final = 16  # jobs negotiating or running at once (each holds one provider slot at a time)


class QueueFull(Exception):
    """This node already holds ``max_unfinished`` unfinished jobs. The user's to wait for or cancel (HTTP 429)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStatistics:
    unfinished: int
    active: int
    waiting: int
    max_unfinished: int
    max_active: int


class JobQueue:
    """Admission (a cap on unfinished jobs) and the slots that let a job negotiate and run."""

    def __init__(self, *, max_unfinished: int = DEFAULT_MAX_UNFINISHED, max_active: int = DEFAULT_MAX_ACTIVE) -> None:
        if max_unfinished < 1 or max_active < 1:
            raise ValueError("max_unfinished and max_active must be at least 1")
        self.max_unfinished = max_unfinished
        self._slots = trio.CapacityLimiter(max_active)
        self._unfinished: set[str] = set()

    def admit(self, job_id: str, *, resumed: bool = False) -> None:
        """Count ``job_id`` as unfinished until :meth:`done`.

        Raises:
            QueueFull: ``max_unfinished`` jobs are unfinished already (never for a ``resumed`` job).
        """
        if not resumed and len(self._unfinished) >= self.max_unfinished:
            raise QueueFull(
                f"this node already has {len(self._unfinished)} unfinished jobs (the limit, [jobs] max_unfinished); "
                "wait for some to finish or cancel some, then submit again"
            )
        self._unfinished.add(job_id)

    def done(self, job_id: str) -> None:
        self._unfinished.discard(job_id)

    @property
    def slot_free(self) -> bool:
        return self._slots.available_tokens > 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``max_active`` slots (waiting, first come first served, while none is free)."""
        async with self._slots:
            yield

    def statistics(self) -> QueueStatistics:
        limiter = self._slots.statistics()
        return QueueStatistics(
            unfinished=len(self._unfinished),
            active=limiter.borrowed_tokens,
            waiting=limiter.tasks_waiting,
            max_unfinished=self.max_unfinished,
            max_active=int(limiter.total_tokens),
        )


class SlotWaiters:
    """Jobs waiting because every fitting provider was busy, oldest first.

    Each run of ours that ends on a provider frees a slot there: :meth:`freed` wakes the job that has waited
    longest, so the slot does not sit idle until some job's retry backoff runs out, and ten waiting jobs do not
    all ask every provider for a quote at once. :meth:`wait` still gives up after ``seconds``, for the slots other
    clients free (this node does not hear of those).
    """

    def __init__(self) -> None:
        self._waiters: collections.deque[trio.Event] = collections.deque()

    def __len__(self) -> int:
        return len(self._waiters)

    async def wait(self, seconds: float) -> bool:
        """Sleep until woken or until ``seconds`` pass; True if woken."""
        woken = trio.Event()
        self._waiters.append(woken)
        try:
            with trio.move_on_after(seconds):
                await woken.wait()
        finally:
            if not woken.is_set():
                self._waiters.remove(woken)
        return woken.is_set()

    def freed(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()
