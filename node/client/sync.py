"""``Client`` and ``Job``: the synchronous client of one node's local API."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from node import functions
from node.client._common import (
    DEFAULT_DISK,
    DEFAULT_MEMORY,
    KEEPALIVE_EXPIRY_S,
    READ_SLACK_S,
    TERMINAL_STATES,
    WAIT_POLL_S,
    ApiError,
    Commands,
    InputSource,
    JobFailed,
    JobResult,
    Size,
    _advance,
    _check,
    _commands,
    _items,
    _job_result,
    _output_names,
    _path,
    _read_api_file,
    _timeout,
    _transport_error,
    progress_bar,
    submission_body,
)


class Client:
    """Synchronous client of one node's local API."""

    def __init__(
        self, url: str, token: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            trust_env=False,
            transport=transport,
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    @classmethod
    def from_data_dir(cls, data_dir: Path | None = None, **kwargs: Any) -> Client:
        """A client of the node whose data dir is ``data_dir`` (default: $COOP_HOME, else the XDG data dir)."""
        url, token = _read_api_file(data_dir)
        return cls(url, token, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, read_timeout: float | None = None, **kwargs: Any) -> httpx.Response:
        if read_timeout is not None:
            kwargs["timeout"] = _timeout(self._timeout, read=read_timeout)
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc
        _check(response, path)
        return response

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request("GET", f"/v1/{path}", params=params).json()

    # node

    def id(self) -> dict[str, Any]:
        return self._get("id")  # type: ignore[no-any-return]

    def peers(self) -> list[dict[str, Any]]:
        return self._get("peers")["peers"]  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return self._get("status")  # type: ignore[no-any-return]

    def dashboard_link(self) -> dict[str, Any]:
        """A one-time dashboard login link: ``{url, expires_in_s}`` (see node.api_dashboard)."""
        return self._request("POST", "/v1/dashboard/link").json()  # type: ignore[no-any-return]

    def metrics(self) -> str:
        """This node's Prometheus metrics, in the text exposition format."""
        return self._request("GET", "/metrics").text

    def find(self, *, cpus: int = 1, memory_bytes: int = 0, gpus: int = 0, gpu_model: str = "") -> list[dict[str, Any]]:
        params = {"cpus": cpus, "memory": memory_bytes, "gpus": gpus, "gpu_model": gpu_model}
        return self._get("find", params)["providers"]  # type: ignore[no-any-return]

    # jobs

    def submit(
        self,
        command: Sequence[str] | Callable[..., Any],
        /,
        *args: Any,
        cpus: int = 1,
        memory: Size = DEFAULT_MEMORY,
        disk: Size = DEFAULT_DISK,
        gpus: int = 0,
        gpu_model: str = "",
        timeout: int = 600,
        max_price: int | None = None,
        inputs: Mapping[str, InputSource] | None = None,
        outputs: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        job_id: str | None = None,
        cpu_seconds: int | None = None,
        output_bytes: Size | None = None,
        runtime: str = "",
        runtime_sha256: str = "",
        **function_options: Any,
    ) -> Any:
        """Submit a job; returns at once with its handle. The options are those of ``submission_body``.

        ``submit(["cmd", ...])`` runs a command and returns a ``Job``; ``submit(fn, *args)`` runs ``fn(*args)``
        in a Python runtime (default ``python``, the provider's own) and returns a future, ``FunctionJob``
        (``max_payload=``/``max_result=`` cap the pickles; see ``node.functions``).

        Raises:
            ApiError: the node refused the submission (the message says which field and why).
            TypeError, ValueError: an argument has the wrong type or value.
        """
        options = {"cpus": cpus, "memory": memory, "disk": disk, "gpus": gpus, "gpu_model": gpu_model,
                   "timeout": timeout, "max_price": max_price, "inputs": inputs, "outputs": outputs, "env": env,
                   "job_id": job_id, "cpu_seconds": cpu_seconds, "output_bytes": output_bytes, "runtime": runtime,
                   "runtime_sha256": runtime_sha256}  # fmt: skip
        if callable(command):
            return functions.submit(self, command, args, **options, **function_options)
        if args or function_options:
            raise TypeError("submit(command) takes only options; submit(fn, *args) runs a Python function")
        body = submission_body(command, **options)
        return Job(self, self._request("POST", "/v1/jobs", json=body).json()["job_id"])

    def job(self, job_id: str) -> Job:
        """A handle on a job by id (no request is made until it is used)."""
        return Job(self, job_id)

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest jobs first, submitted by this node or run by it for others (``role`` says which)."""
        return self._get("jobs", {"limit": limit})["jobs"]  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> bool:
        """Cancel a job this node submitted; returns once it stopped. False when it had ended or was paid for."""
        return bool(self._request("POST", _path("jobs", job_id, "cancel")).json()["cancelled"])

    def market(self) -> dict[str, Any]:
        """``{"summary": [per resource class], "recent": [quotes, newest first]}``; costs in milli-credits."""
        return self._get("market")  # type: ignore[no-any-return]

    def ledger(self) -> dict[str, Any]:
        """``{"peer_id", "earned", "spent", "balance", "entries": [...]}``; amounts in milli-credits."""
        return self._get("ledger")  # type: ignore[no-any-return]

    def reputation(self, peer: str | None = None, *, top: int = 20) -> dict[str, Any]:
        """A peer's trust score, how it was computed and the records behind it; or the ``top`` peers."""
        if peer is None:
            return self._get("reputation", {"top": top})  # type: ignore[no-any-return]
        return self._request("GET", _path("reputation", peer)).json()  # type: ignore[no-any-return]

    def rate(self, job_id: str, score: int, comment: str = "") -> dict[str, Any]:
        """Add your own rating (0-5 stars) of the other side of a finished job, bound to its receipt."""
        body = {"score": score, "comment": comment}
        return self._request("POST", _path("jobs", job_id, "rate"), json=body).json()  # type: ignore[no-any-return]

    def logs(self, job_id: str, stream: str = "stdout", *, follow: bool = False) -> Iterator[bytes]:
        """Yield a job's stdout or stderr in chunks; with ``follow``, keep yielding until the job ends."""
        path = _path("jobs", job_id, "logs")
        params = {"stream": stream, **({"follow": "1"} if follow else {})}
        timeout = _timeout(self._timeout, read=None if follow else self._timeout)
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if not response.is_success:
                    response.read()
                    _check(response, path)
                yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc

    def output(self, job_id: str, name: str) -> bytes:
        """The bytes of one output file of a completed job."""
        return self._request("GET", _path("jobs", job_id, "outputs", name)).content

    def map(
        self, commands: Commands, items: Iterable[Any] | None = None, /, *, progress: bool | None = None, **options: Any
    ) -> list[JobResult]:
        """Run many jobs at once: commands, ``map([cmd, ...])``, or a Python function, ``map(fn, items)``.

        ``map(fn, items)`` runs ``fn(item)`` for each item as a function job (see ``node.functions``) and returns
        the values in input order, raising the first remote exception (the other jobs are cancelled); the rest
        of this docstring is about commands.

        Every job is submitted before any is waited for. Results come in input order, failed jobs included
        (their ``state`` and ``error`` say why); nothing is raised for a job's failure.

        Args:
            progress: a progress bar of finished jobs on stderr; None (default): only when stderr is a terminal.
            options: submit options, the same for every job (see ``submission_body``).

        Raises:
            ApiError: a submission was refused; the jobs submitted before it are cancelled.
            TypeError, ValueError: a command or option is wrong (found before anything is submitted).
        """
        if callable(commands):  # Python functions: values in order, the first remote exception raised
            return functions.map_functions(self, commands, _items(items), progress=progress, **options)
        submitted: list[Job] = []
        all_commands = _commands(commands, items)
        for command in all_commands:  # check every command and option before submitting any
            submission_body(command, **options)
        try:
            for command in all_commands:
                submitted.append(self.submit(command, **options))
        except ApiError:
            for job in submitted:
                with contextlib.suppress(ApiError):  # best effort: the first error is the one to report
                    job.cancel()
            raise
        with progress_bar(len(submitted), progress) as bar:
            return [_advance(bar, job.result(check=False)) for job in submitted]

    # used by Job

    def _poll(self, job_id: str, seconds: float) -> dict[str, Any]:
        seconds = max(0.0, seconds)
        response = self._request(
            "GET",
            _path("jobs", job_id, "wait"),
            params={"timeout": f"{seconds:.3f}"},
            read_timeout=seconds + READ_SLACK_S,
        )
        return response.json()  # type: ignore[no-any-return]

    def _read_log(self, job_id: str, stream: str) -> bytes:
        return b"".join(self.logs(job_id, stream))


class Job:
    """A handle on one job submitted through a ``Client``."""

    def __init__(self, client: Client, job_id: str) -> None:
        self._client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def status(self) -> dict[str, Any]:
        """The job's JSON now (state, provider, attempts, result, receipt, ...)."""
        return self._client._request("GET", _path("jobs", self.job_id)).json()  # type: ignore[no-any-return]

    def poll(self, timeout: float) -> dict[str, Any]:
        """One long-poll: the job's JSON as soon as it is terminal, or after ``timeout`` seconds (max 300)."""
        return self._client._poll(self.job_id, timeout)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the job is completed, failed or cancelled; returns its JSON.

        Raises:
            TimeoutError: the job is still going after ``timeout`` seconds (None: wait as long as it takes).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_POLL_S if deadline is None else min(WAIT_POLL_S, deadline - time.monotonic())
            job = self.poll(left)
            if job["state"] in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.job_id} is still {job['state']} after {timeout} s")

    def result(self, timeout: float | None = None, *, check: bool = True) -> JobResult:
        """Wait for the job, then fetch its stdout, stderr and outputs.

        Args:
            timeout: seconds to wait (None: as long as it takes).
            check: raise JobFailed for a failed or cancelled job; with False, return a JobResult with its error.

        Raises:
            JobFailed: the job failed or was cancelled (``check``); not raised for a non-zero exit.
            TimeoutError: still going after ``timeout`` seconds.
        """
        job = self.wait(timeout)
        if check and job["state"] != "completed":
            raise JobFailed(job)
        c = self._client
        return _job_result(
            job,
            stdout=c._read_log(self.job_id, "stdout"),
            stderr=c._read_log(self.job_id, "stderr"),
            outputs={name: c.output(self.job_id, name) for name in _output_names(job)},
        )

    def cancel(self) -> bool:
        return self._client.cancel(self.job_id)

    def logs(self, stream: str = "stdout", *, follow: bool = False) -> Iterator[bytes]:
        return self._client.logs(self.job_id, stream, follow=follow)
