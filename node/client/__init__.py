"""Clients of one node's local API, used by the CLI and by scripts.

The package: ``_common`` (sizes, the submission body, errors, results), ``sync`` (``Client``, ``Job``) and
``aio`` (``AsyncClient``, ``AsyncJob``); everything a user needs is importable from ``node.client``.

``Client`` is synchronous; ``AsyncClient`` has the same methods as coroutines (httpx runs under trio, and under
asyncio, through anyio). ``from_data_dir()`` reads api.json (URL and token) from the node's data dir.

Theory of operation for jobs: ``submit()`` posts the job and returns a handle (``Job`` / ``AsyncJob``).
``wait()`` repeats long-polls of ``/v1/jobs/{id}/wait`` (each one ends when the job is terminal or the poll
times out) until the job is terminal or the caller's own timeout passes. ``result()`` waits, then fetches
stdout, stderr and the named outputs into a ``JobResult``. Rules:

- A job that ran and exited non-zero is a result, not a failure (``JobResult.exit_code`` says how it ended).
  Only a job that never ran to the end (nobody took it, every attempt failed, or it was cancelled) raises
  ``JobFailed``, which carries the node's explanation (e.g. the aggregated reasons why nobody took it).
- ``map()`` submits every job before it waits for any, so they run at once, and returns results in input order.
"""

from node.client._common import (
    DEFAULT_DISK,
    DEFAULT_MEMORY,
    KEEPALIVE_EXPIRY_S,
    TERMINAL_STATES,
    ApiError,
    JobFailed,
    JobResult,
    parse_size,
    progress_bar,
    submission_body,
)
from node.client.aio import AsyncClient, AsyncJob
from node.client.sync import Client, Job

__all__ = [
    "DEFAULT_DISK",
    "DEFAULT_MEMORY",
    "KEEPALIVE_EXPIRY_S",
    "TERMINAL_STATES",
    "ApiError",
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Job",
    "JobFailed",
    "JobResult",
    "parse_size",
    "progress_bar",
    "submission_body",
]
