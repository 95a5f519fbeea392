"""Python functions as jobs: ``client.submit(fn, *args)`` returns a future, ``client.map(fn, items)`` fans out.

Theory of operation: the call ``(fn, args, kwargs)`` is serialised on the client with cloudpickle (functions
defined in ``__main__``, lambdas and closures travel by value), checked against a size cap, and sent as the input
``coop_call.pkl`` of an ordinary job, with :mod:`node.function_runner` as ``coop_runner.py`` beside it. The job
runs ``python3 -m coop_runner`` in a runtime the provider declares (``python``, its own Python, unless
``runtime=`` names another): only there, inside the sandbox, is the pickle loaded. The runner writes the pickled
return value, or the exception with its formatted traceback, to the output ``coop_result.pkl``.

Rules:

- Values that cannot be pickled, and calls over ``max_payload`` bytes, are refused at submit time, before
  anything is sent (:class:`SerializationError`, :class:`PayloadTooLarge`).
- ``result()`` unpickles the return value on the client. A remote exception is re-raised locally as itself,
  chained (``__cause__``) to a :class:`RemoteTraceback` holding the remote traceback, as
  ``concurrent.futures.ProcessPoolExecutor`` does; an exception that did not pickle becomes a
  :class:`RemoteError` with the remote type, message and traceback.
- Trust: the result is a pickle made by the provider, and unpickling runs code. The client trusts it as far as
  verification allows: a new or low-trust provider's job is replicated and the result digests compared
  (``[trust] verify_below``), but a provider you trust can still send a malicious result. Only use providers
  you would let run code on your machine, or keep ``replicas`` on.
- The runtime's Python must be the client's (major.minor): pickles do not cross versions; the runner says so.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import sys
import sysconfig
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import cloudpickle

from node import function_runner as runner

if TYPE_CHECKING:
    from node.client import AsyncClient, AsyncJob, Client, Job, JobResult

DEFAULT_RUNTIME: Final = "python"
MAX_PAYLOAD_BYTES: Final = 32 << 20  # 32 MiB: under the API's 64 MiB inline input cap
MAX_RESULT_BYTES: Final = 32 << 20
RUNNER_NAME: Final = "coop_runner.py"
COMMAND: Final = ("python3", "-m", "coop_runner")
RUNNER_SOURCE: Final = Path(runner.__file__).read_bytes()
# map()'s progress: a callable (done, total) called as each job finishes, or as for command jobs, True/False/None:
# a bar on stderr, shown (None) when stderr is a terminal (node.client.progress_bar).
Progress = Callable[[int, int], None] | bool | None


class SerializationError(TypeError):
    """The function or an argument cannot be pickled (the caller's to fix; raised before anything is sent)."""


class PayloadTooLarge(ValueError):
    """The pickled call is over the size cap (raised before anything is sent)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a job, as text: the ``__cause__`` of the re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class RemoteError(Exception):
    """A job's function failed and its exception could not be rebuilt here, or the runner could not run.

    Attributes:
        type_name: the remote exception's type (``module.Name``), or ``""`` when the runner did not run.
        remote_traceback: the remote traceback text (or the job's stderr).
        job_id: the job.
    """

    def __init__(self, message: str, *, type_name: str = "", remote_traceback: str = "", job_id: str = "") -> None:
        super().__init__(message + (f"\n\nRemote traceback:\n{remote_traceback}" if remote_traceback else ""))
        self.type_name = type_name
        self.remote_traceback = remote_traceback
        self.job_id = job_id


def _installed(path: str) -> bool:
    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]}
    return any(path.startswith(root + os.sep) for root in roots)


def _by_value(fn: Callable[..., Any]) -> None:
    """Send the code of the caller's own modules with the function: a provider has only installed packages.

    cloudpickle pickles functions of importable modules by reference (module + name); a module of the caller's
    own (a script's sibling, a project not installed in the runtime) is registered to travel by value instead.
    """
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if module is None or module.__name__ == "__main__" or path is None or _installed(os.path.abspath(path)):
        return
    with contextlib.suppress(ValueError):  # already registered
        cloudpickle.register_pickle_by_value(module)


def encode_call(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], *, max_bytes: int) -> bytes:
    """The bytes of ``coop_call.pkl`` for ``fn(*args, **kwargs)``.

    Raises:
        SerializationError: something in the call cannot be pickled.
        PayloadTooLarge: the call pickles to more than ``max_bytes``.
    """
    if not callable(fn):
        raise TypeError(f"submit() needs a function or a command, not {type(fn).__name__}")
    _by_value(fn)
    try:
        body = cloudpickle.dumps((fn, tuple(args), dict(kwargs)))
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SerializationError(f"cannot send {name}(...) to a provider: {type(exc).__name__}: {exc}") from exc
    if len(body) > max_bytes:
        raise PayloadTooLarge(
            f"the call pickles to {len(body)} bytes, over the cap of {max_bytes}: pass large data as job inputs, "
            "or raise max_payload"
        )
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return json.dumps({"format": runner.FORMAT, "python": version}).encode() + b"\n" + body


def decode_result(result: JobResult) -> Any:
    """The return value of a finished function job, or raise its exception (see the module docstring)."""
    data = result.outputs.get(runner.RESULT_FILE)
    if data is None:
        why = result.termination or "exited"
        tail = result.stderr.decode(errors="replace")[-4000:]
        raise RemoteError(
            f"job {result.job_id}: the function runner wrote no result ({why}, exit status {result.exit_code})",
            remote_traceback=tail,
            job_id=result.job_id,
        )
    head, _, body = data.partition(b"\n")
    try:
        meta = json.loads(head)
        ok = meta["ok"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"job {result.job_id}: malformed result header", job_id=result.job_id) from exc
    if ok:
        return cloudpickle.loads(body)  # trust: see the module docstring
    text = str(meta.get("traceback", ""))
    if meta.get("pickled"):
        try:
            exc = cloudpickle.loads(body)
        except Exception:  # e.g. its class exists only remotely: fall through to RemoteError
            exc = None
        if isinstance(exc, BaseException):
            raise exc from RemoteTraceback(text)
    type_name = str(meta.get("type", ""))
    raise RemoteError(
        f"{type_name}: {meta.get('message', '')}", type_name=type_name, remote_traceback=text, job_id=result.job_id
    )


def job_options(
    fn: Callable[..., Any],
    args: Sequence[Any],
    options: dict[str, Any],
    *,
    max_payload: int = MAX_PAYLOAD_BYTES,
    max_result: int = MAX_RESULT_BYTES,
) -> dict[str, Any]:
    """The ``submit()`` options of the command job that runs ``fn(*args)``."""
    if options.get("inputs") or options.get("outputs"):
        raise TypeError("a function job takes its data as arguments: inputs= and outputs= are for command jobs")
    payload = encode_call(fn, args, {}, max_bytes=max_payload)
    env = dict(options.get("env") or {}) | {runner.RESULT_CAP_ENV: str(max_result)}
    return options | {
        "runtime": options.get("runtime") or DEFAULT_RUNTIME,
        "inputs": {RUNNER_NAME: RUNNER_SOURCE, runner.CALL_FILE: payload},
        "outputs": [runner.RESULT_FILE],
        "env": env,
    }


# ----------------------------------------------------------------------------------------------- sync


class FunctionJob:
    """A future for one function call submitted through a ``Client`` (``result()``, ``done()``, ``cancel()``)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.job_id = job.job_id

    def __repr__(self) -> str:
        return f"FunctionJob({self.job_id!r})"

    def done(self) -> bool:
        """The job has ended (completed, failed or cancelled); ``result()`` will not wait."""
        from node.client import TERMINAL_STATES

        return self.job.poll(0)["state"] in TERMINAL_STATES

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        return self.job.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The function's return value; raises its exception (or JobFailed when the job never ran to the end).

        Raises:
            JobFailed: nobody took the job, every attempt failed, or it was cancelled.
            RemoteError: the remote exception could not be rebuilt here, or the runner could not run.
            TimeoutError: still going after ``timeout`` seconds.
        """
        return decode_result(self.job.result(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except Exception as exc:  # the future's exception, whatever it is
            return exc
        return None

    def cancel(self) -> bool:
        return self.job.cancel()


def submit(client: Client, fn: Callable[..., Any], args: Sequence[Any], **options: Any) -> FunctionJob:
    """``client.submit(fn, *args, **options)``: see the module docstring and ``Client.submit``."""
    limits = {k: options.pop(k) for k in ("max_payload", "max_result") if k in options}
    return FunctionJob(client.submit(list(COMMAND), **job_options(fn, args, options, **limits)))


def as_completed(futures: Iterable[FunctionJob | Job], *, timeout: float | None = None) -> Iterator[Any]:
    """Yield the futures (``FunctionJob`` or ``Job``) as their jobs end, first finished first.

    One thread per 16 futures waits on the node's long-polls (the HTTP client is thread-safe).
    """
    pending = list(futures)
    if not pending:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(pending))) as pool:
        waits = {pool.submit(f.wait, timeout): f for f in pending}
        try:
            for done in concurrent.futures.as_completed(waits):
                done.result()  # a TimeoutError or ApiError from the wait surfaces here
                yield waits[done]
        finally:
            for w in waits:
                w.cancel()


def _progress_callback(progress: Progress, total: int, stack: contextlib.ExitStack) -> Callable[[int, int], None]:
    if callable(progress):
        return progress
    from node.client import progress_bar

    bar = stack.enter_context(progress_bar(total, progress))
    return lambda done, _total: bar.update(1)


def map_results(jobs: list[FunctionJob], progress: Progress) -> list[Any]:
    """Results in input order; the first failure (in input order) is raised and the unfinished jobs cancelled."""
    with contextlib.ExitStack() as stack:
        report = _progress_callback(progress, len(jobs), stack)
        for n, _ in enumerate(as_completed(jobs), 1):
            report(n, len(jobs))
    try:
        return [job.result() for job in jobs]
    except BaseException:
        for job in jobs:
            with contextlib.suppress(Exception):  # best effort: the first error is the one to report
                job.cancel()
        raise


def map_functions(
    client: Client, fn: Callable[..., Any], items: Iterable[Any], *, progress: Progress = None, **options: Any
) -> list[Any]:
    """``client.map(fn, items)``: ``fn(item)`` for each item as its own job, all at once; values in order."""
    calls = [job_options(fn, (item,), dict(options)) for item in items]  # every pickle checked before any submit
    jobs: list[FunctionJob] = []
    try:
        for call in calls:
            jobs.append(FunctionJob(client.submit(list(COMMAND), **call)))
    except BaseException:
        for job in jobs:
            with contextlib.suppress(Exception):
                job.cancel()
        raise
    return map_results(jobs, progress)


# ----------------------------------------------------------------------------------------------- async


class AsyncFunctionJob:
    """The async future of ``AsyncClient.submit(fn, ...)``: ``await result()``, ``done()``, ``cancel()``."""

    def __init__(self, job: AsyncJob) -> None:
        self.job = job
        self.job_id = job.job_id

    def __repr__(self) -> str:
        return f"AsyncFunctionJob({self.job_id!r})"

    async def done(self) -> bool:
        from node.client import TERMINAL_STATES

        return (await self.job.poll(0))["state"] in TERMINAL_STATES

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109 (the server's polls)
        return await self.job.wait(timeout)

    async def result(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 (the server's long-polls)
        """See ``FunctionJob.result``."""
        return decode_result(await self.job.result(timeout))

    async def cancel(self) -> bool:
        return await self.job.cancel()


async def submit_async(
    client: AsyncClient, fn: Callable[..., Any], args: Sequence[Any], **options: Any
) -> AsyncFunctionJob:
    limits = {k: options.pop(k) for k in ("max_payload", "max_result") if k in options}
    job = await client.submit(list(COMMAND), **job_options(fn, args, options, **limits))
    return AsyncFunctionJob(job)


async def as_completed_async(futures: Iterable[AsyncFunctionJob | AsyncJob]) -> AsyncIterator[Any]:
    """Yield the futures as their jobs end (trio or asyncio). Wrap in ``contextlib.aclosing`` to stop early."""
    pending = list(futures)
    send, receive = anyio.create_memory_object_stream[Any](len(pending) or 1)

    async def watch(future: AsyncFunctionJob | AsyncJob) -> None:
        await future.wait()
        await send.send(future)

    async with anyio.create_task_group() as tg:
        for future in pending:
            tg.start_soon(watch, future)
        for _ in pending:
            yield await receive.receive()
    send.close()
    receive.close()


async def map_functions_async(
    client: AsyncClient,
    fn: Callable[..., Any],
    items: Iterable[Any],
    *,
    progress: Progress = None,
    **options: Any,
) -> list[Any]:
    """See ``map_functions``."""
    calls = [job_options(fn, (item,), dict(options)) for item in items]
    jobs: list[AsyncFunctionJob] = []
    try:
        for call in calls:
            jobs.append(AsyncFunctionJob(await client.submit(list(COMMAND), **call)))
        with contextlib.ExitStack() as stack:
            report = _progress_callback(progress, len(jobs), stack)
            n = 0
            async with contextlib.aclosing(as_completed_async(jobs)) as finished:
                async for _ in finished:
                    n += 1
                    report(n, len(jobs))
        return [await job.result() for job in jobs]
    except BaseException:
        with anyio.CancelScope(shield=True):
            for job in jobs:
                with contextlib.suppress(Exception):
                    await job.cancel()
        raise
