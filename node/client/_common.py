"""What the sync and async clients share: sizes, the submission body, errors, results, responses."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias
from urllib.parse import quote

import httpx
from tqdm import tqdm

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


def progress_bar(total: int, show: bool | None) -> tqdm[Any]:
    """A bar of finished jobs on stderr: shown when ``show``, or (None) when stderr is a terminal; else silent."""
    enabled = sys.stderr.isatty() if show is None else show
    return tqdm(total=total, desc="jobs", unit="job", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def _advance(bar: tqdm[Any], result: JobResult) -> JobResult:
    bar.update(1)
    bar.set_postfix_str(f"last: {result.state}", refresh=False)
    return result
