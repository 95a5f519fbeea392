"""``AsyncClient`` and ``AsyncJob``: the same as ``Client`` and ``Job``, with coroutines."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio  # httpx's own dependency; under trio, anyio.current_time() is trio.current_time()
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
