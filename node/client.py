"""Clients of one node's local API, used by the CLI and by scripts.

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

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias
from urllib.parse import quote

import anyio  # httpx's own dependency; under trio, anyio.current_time() is trio.current_time()
import httpx
from tqdm import tqdm

from node import functions
from node.config import API_FILE, default_data_dir

TERMINAL_STATES: Final = frozenset({"completed", "failed", "cancelled"})
WAIT_POLL_S: Final = 60.0  # one long-poll of /wait (the server caps it at 300 s)
READ_SLACK_S: Final = 30.0  # read timeout on top of a long-poll's own length
KEEPALIVE_EXPIRY_S: Final = 30.0  # below the API server's 75 s keep-alive timeout
DEFAULT_MEMORY: Final = "512MiB"
DEFAULT_DISK: Final = "1GiB"

SIZE_UNITS: Final = {
    "": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
    "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40,
}  # fmt: skip

Size: TypeAlias = str | int
InputSource: TypeAlias = str | os.PathLike[str] | bytes
Commands: TypeAlias = Iterable[Sequence[str]] | Callable[..., Any]  # commands, or a Python function (map)


def parse_size(text: str) -> int:
    """Parse a size with an optional unit into bytes.

    Args:
        text: e.g. ``"512MiB"``, ``"2G"``, ``"1.5 GB"`` or ``"1000000"``. K/M/G/T without ``B`` are binary units.

    Returns:
        The size in bytes.

    Raises:
        ValueError: ``text`` is not a size; the message lists the units.
    """
    raw = text.strip().lower().replace(" ", "")
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(digits) :]
    try:
        value = float(digits)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (try 512MiB or 2GiB)") from None
    if unit not in SIZE_UNITS or not 0 <= value < float(1 << 62):
        raise ValueError(f"not a size: {text!r} (units: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    return int(value * SIZE_UNITS[unit])


def _size(value: Size, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{what} must be bytes (int) or a size such as '512MiB', not {value!r}")
    size = parse_size(value) if isinstance(value, str) else value
    if size < 0:
        raise ValueError(f"{what} must not be negative")
    return size


# ----------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """The local API answered with an error, or could not be reached. The message says which and why.

    Attributes:
        status: the HTTP status, or None when the API was not reached.
        code: the API's error code (e.g. ``"not-found"``, ``"bad-submission"``), or None.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class JobFailed(ApiError):
    """The job ended without a result: nobody took it, every attempt failed, or it was cancelled.

    Not raised for a job that ran and exited non-zero: that is a result (see ``JobResult.exit_code``).

    Attributes:
        job_id, state: the job and how it ended (``"failed"`` or ``"cancelled"``).
        error: the node's explanation, e.g. why no provider took the job.
        job: the job's JSON as the API returned it.
    """

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job = dict(job)
        self.job_id: str = job["job_id"]
        self.state: str = job["state"]
        self.error: str = job.get("error") or f"the job is {self.state}"
        super().__init__(f"job {self.job_id} {self.state}: {self.error}")


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True, kw_only=True)
class JobResult:
    """What a finished job produced.

    ``exit_code`` is the job's exit status (128 + N when signal N killed it; None when it never started in the
    sandbox); ``termination`` says why it ended (``"exited"``, ``"memory-limit"``, ``"wall-timeout"``, ...).
    ``outputs`` holds the outputs the job wrote; an output it did not write is absent. ``cost`` is in
    milli-credits; ``attempts`` counts the providers tried. ``error`` is set only for a failed or cancelled job
    (see ``Job.result(check=False)``).
    """

    job_id: str
    state: str
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    outputs: dict[str, bytes]
    provider: str | None
    cost: int | None
    receipt: dict[str, Any] | None
    error: str | None
    attempts: int
    termination: str | None = None

    @property
    def ok(self) -> bool:
        """The job completed, exited on its own, with status 0."""
        return self.state == "completed" and self.exit_code == 0 and self.termination in (None, "exited")


def _job_result(job: Mapping[str, Any], *, stdout: bytes, stderr: bytes, outputs: dict[str, bytes]) -> JobResult:
    return JobResult(
        job_id=job["job_id"],
        state=job["state"],
        exit_code=job.get("exit_status"),
        stdout=stdout,
        stderr=stderr,
        outputs=outputs,
        provider=job.get("provider"),
        cost=job.get("cost"),
        receipt=job.get("receipt"),
        error=job.get("error") if job["state"] != "completed" else None,
        attempts=len(job.get("attempts") or ()),
        termination=job.get("termination"),
    )


def _output_names(job: Mapping[str, Any]) -> list[str]:
    return list((job.get("result") or {}).get("outputs") or {})


def submission_body(
    command: Sequence[str],
    *,
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
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/jobs`` (see ``node.market.requests.parse_submission``).

    Args:
        command: the argv to run, e.g. ``["python3", "job.py"]`` (not a shell string).
        memory, disk, output_bytes: bytes, or a size such as ``"512MiB"``.
        timeout: the job's wall-clock limit in seconds.
        max_price: the most to pay, in milli-credits; None leaves the node's default (100 credits).
        inputs: file name in the job -> a local path (sent as its absolute path; the node copies it) or bytes
            (sent inline).
        cpu_seconds: CPU-time limit; None leaves the node's default (cpus * timeout).
        runtime: run in this runtime of the provider's (``node runtime list``); only providers offering it are
            asked. ``runtime_sha256`` (hex) also pins its lock hash.

    Raises:
        TypeError, ValueError: an argument has the wrong type or value.
    """
    if isinstance(command, str | bytes) or not all(isinstance(a, str) for a in command):
        raise TypeError(f"command must be a list of strings such as ['python3', 'job.py'], not {command!r}")
    items: list[dict[str, str]] = []
    for name, source in (inputs or {}).items():
        if isinstance(source, bytes | bytearray | memoryview):
            items.append({"name": name, "data_b64": base64.b64encode(source).decode("ascii")})
        elif isinstance(source, str | os.PathLike):
            items.append({"name": name, "path": str(Path(source).expanduser().resolve())})
        else:
            raise TypeError(f"input {name!r} must be a path or bytes, not {type(source).__name__}")
    body: dict[str, Any] = {
        "command": list(command),
        "env": dict(env or {}),
        "cpus": cpus,
        "memory_bytes": _size(memory, "memory"),
        "disk_bytes": _size(disk, "disk"),
        "gpus": gpus,
        "gpu_model": gpu_model,
        "timeout": timeout,
        "inputs": items,
        "outputs": list(outputs),
    }
    if max_price is not None:
        body["max_price"] = max_price
    if job_id:
        body["job_id"] = job_id
    if cpu_seconds is not None:
        body["cpu_seconds"] = cpu_seconds
    if output_bytes is not None:
        body["output_bytes"] = _size(output_bytes, "output_bytes")
    if runtime:
        body["runtime"] = runtime
    if runtime_sha256:
        body["runtime_sha256"] = runtime_sha256
    return body


def _commands(commands: Iterable[Sequence[str]], items: Iterable[Any] | None) -> list[Sequence[str]]:
    if items is not None:
        raise TypeError("map(commands) takes no items; map(fn, items) runs a Python function on each item")
    return list(commands)


def _items(items: Iterable[Any] | None) -> Iterable[Any]:
    if items is None:
        raise TypeError("map(fn, items) needs the items")
    return items


# ----------------------------------------------------------------------------------------------- http


def _read_api_file(data_dir: Path | None) -> tuple[str, str]:
    path = (data_dir or default_data_dir()) / API_FILE
    try:
        info = json.loads(path.read_text())
        return str(info["url"]), str(info["token"])
    except FileNotFoundError:
        raise ApiError(f"no running node found: {path} does not exist (start one with `node start`)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApiError(f"cannot read {path}: {exc}") from exc


def _path(*parts: str) -> str:
    return "/v1/" + "/".join(quote(p, safe="") for p in parts)


def _check(response: httpx.Response, path: str) -> None:
    """Raise ApiError for a non-2xx response, whose body must have been read."""
    if response.is_success:
        return
    code = None
    try:
        data = response.json()
        detail = data.get("message", response.text)
        code = data.get("error")
    except (ValueError, AttributeError):
        detail = response.text
    raise ApiError(f"{response.status_code} from {path}: {detail}", status=response.status_code, code=code)


def _transport_error(url: str, exc: httpx.TransportError) -> ApiError:
    if isinstance(exc, httpx.TimeoutException):
        return ApiError(f"the node's API at {url} did not answer in time ({type(exc).__name__})")
    return ApiError(f"cannot reach the node's API at {url}: {exc} (is `node start` running?)")


def _timeout(base: float, *, read: float | None) -> httpx.Timeout:
    return httpx.Timeout(base, read=read)


# ----------------------------------------------------------------------------------------------- sync


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
        """Cancel a job this node submitted. Returns False when it had already ended."""
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


def progress_bar(total: int, show: bool | None) -> tqdm[Any]:
    """A bar of finished jobs on stderr: shown when ``show``, or (None) when stderr is a terminal; else silent."""
    enabled = sys.stderr.isatty() if show is None else show
    return tqdm(total=total, desc="jobs", unit="job", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def _advance(bar: tqdm[Any], result: JobResult) -> JobResult:
    bar.update(1)
    bar.set_postfix_str(f"last: {result.state}", refresh=False)
    return result


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


# ----------------------------------------------------------------------------------------------- async


class AsyncClient:
    """The same as ``Client``, with coroutines, for trio (or asyncio) programs."""

    def __init__(
        self, url: str, token: str, *, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            trust_env=False,
            transport=transport,
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    @classmethod
    def from_data_dir(cls, data_dir: Path | None = None, **kwargs: Any) -> AsyncClient:
        """A client of the node whose data dir is ``data_dir`` (default: $COOP_HOME, else the XDG data dir)."""
        url, token = _read_api_file(data_dir)
        return cls(url, token, **kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(
        self, method: str, path: str, *, read_timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        if read_timeout is not None:
            kwargs["timeout"] = _timeout(self._timeout, read=read_timeout)
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc
        _check(response, path)
        return response

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return (await self._request("GET", f"/v1/{path}", params=params)).json()

    # node

    async def id(self) -> dict[str, Any]:
        return await self._get("id")  # type: ignore[no-any-return]

    async def peers(self) -> list[dict[str, Any]]:
        return (await self._get("peers"))["peers"]  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        return await self._get("status")  # type: ignore[no-any-return]

    async def find(
        self, *, cpus: int = 1, memory_bytes: int = 0, gpus: int = 0, gpu_model: str = ""
    ) -> list[dict[str, Any]]:
        params = {"cpus": cpus, "memory": memory_bytes, "gpus": gpus, "gpu_model": gpu_model}
        return (await self._get("find", params))["providers"]  # type: ignore[no-any-return]

    # jobs (see Client for the docs)

    async def submit(
        self,
        command: Sequence[str] | Callable[..., Any],
        /,
        *args: Any,
        cpus: int = 1,
        memory: Size = DEFAULT_MEMORY,
        disk: Size = DEFAULT_DISK,
        gpus: int = 0,
        gpu_model: str = "",
        timeout: int = 600,  # noqa: ASYNC109 (the job's wall-clock limit, not this call's)
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
        options = {"cpus": cpus, "memory": memory, "disk": disk, "gpus": gpus, "gpu_model": gpu_model,
                   "timeout": timeout, "max_price": max_price, "inputs": inputs, "outputs": outputs, "env": env,
                   "job_id": job_id, "cpu_seconds": cpu_seconds, "output_bytes": output_bytes, "runtime": runtime,
                   "runtime_sha256": runtime_sha256}  # fmt: skip
        if callable(command):
            return await functions.submit_async(self, command, args, **options, **function_options)
        if args or function_options:
            raise TypeError("submit(command) takes only options; submit(fn, *args) runs a Python function")
        body = submission_body(command, **options)
        return AsyncJob(self, (await self._request("POST", "/v1/jobs", json=body)).json()["job_id"])

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id)

    async def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        return (await self._get("jobs", {"limit": limit}))["jobs"]  # type: ignore[no-any-return]

    async def cancel(self, job_id: str) -> bool:
        return bool((await self._request("POST", _path("jobs", job_id, "cancel"))).json()["cancelled"])

    async def market(self) -> dict[str, Any]:
        return await self._get("market")  # type: ignore[no-any-return]

    async def ledger(self) -> dict[str, Any]:
        return await self._get("ledger")  # type: ignore[no-any-return]

    async def logs(self, job_id: str, stream: str = "stdout", *, follow: bool = False) -> AsyncIterator[bytes]:
        """Yield a job's stdout or stderr in chunks; with ``follow``, until the job ends.

        An async generator: wrap it in ``contextlib.aclosing()`` when you may stop before the end.
        """
        path = _path("jobs", job_id, "logs")
        params = {"stream": stream, **({"follow": "1"} if follow else {})}
        timeout = _timeout(self._timeout, read=None if follow else self._timeout)
        try:
            async with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if not response.is_success:
                    await response.aread()
                    _check(response, path)
                async for chunk in response.aiter_bytes():
                    yield chunk
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc

    async def output(self, job_id: str, name: str) -> bytes:
        return (await self._request("GET", _path("jobs", job_id, "outputs", name))).content

    async def map(
        self, commands: Commands, items: Iterable[Any] | None = None, /, *, progress: bool | None = None, **options: Any
    ) -> list[JobResult]:
        """See ``Client.map``: submit all, then results in input order, failed jobs included; ``progress`` too."""
        if callable(commands):
            return await functions.map_functions_async(self, commands, _items(items), progress=progress, **options)
        submitted: list[AsyncJob] = []
        all_commands = _commands(commands, items)
        for command in all_commands:  # check every command and option before submitting any
            submission_body(command, **options)
        try:
            for command in all_commands:
                submitted.append(await self.submit(command, **options))
        except ApiError:
            for job in submitted:
                with contextlib.suppress(ApiError):  # best effort: the first error is the one to report
                    await job.cancel()
            raise
        # One after another is as fast as at once: the jobs already run in parallel on the network.
        with progress_bar(len(submitted), progress) as bar:
            return [_advance(bar, await job.result(check=False)) for job in submitted]

    async def _poll(self, job_id: str, seconds: float) -> dict[str, Any]:
        seconds = max(0.0, seconds)
        response = await self._request(
            "GET",
            _path("jobs", job_id, "wait"),
            params={"timeout": f"{seconds:.3f}"},
            read_timeout=seconds + READ_SLACK_S,
        )
        return response.json()  # type: ignore[no-any-return]

    async def _read_log(self, job_id: str, stream: str) -> bytes:
        return b"".join([chunk async for chunk in self.logs(job_id, stream)])


class AsyncJob:
    """A handle on one job submitted through an ``AsyncClient``; the methods of ``Job``, as coroutines."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self._client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"AsyncJob({self.job_id!r})"

    async def status(self) -> dict[str, Any]:
        return (await self._client._request("GET", _path("jobs", self.job_id))).json()  # type: ignore[no-any-return]

    # ASYNC109: these timeouts shape the server's long-polls (and Job's signature), not a local cancel scope.
    async def poll(self, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        return await self._client._poll(self.job_id, timeout)

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        """See ``Job.wait``. Reads time with anyio.current_time(), so a test's trio clock applies."""
        deadline = None if timeout is None else anyio.current_time() + timeout
        while True:
            left = WAIT_POLL_S if deadline is None else min(WAIT_POLL_S, deadline - anyio.current_time())
            job = await self.poll(left)
            if job["state"] in TERMINAL_STATES:
                return job
            if deadline is not None and anyio.current_time() >= deadline:
                raise TimeoutError(f"job {self.job_id} is still {job['state']} after {timeout} s")

    async def result(self, timeout: float | None = None, *, check: bool = True) -> JobResult:  # noqa: ASYNC109
        """See ``Job.result``."""
        job = await self.wait(timeout)
        if check and job["state"] != "completed":
            raise JobFailed(job)
        c = self._client
        return _job_result(
            job,
            stdout=await c._read_log(self.job_id, "stdout"),
            stderr=await c._read_log(self.job_id, "stderr"),
            outputs={name: await c.output(self.job_id, name) for name in _output_names(job)},
        )

    async def cancel(self) -> bool:
        return await self._client.cancel(self.job_id)

    def logs(self, stream: str = "stdout", *, follow: bool = False) -> AsyncIterator[bytes]:
        return self._client.logs(self.job_id, stream, follow=follow)
