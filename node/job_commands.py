"""`node submit`, `jobs`, `job`, `logs`, `cancel`, `market` and `ledger`: the client side of the market.

`submit` runs under trio with an ``AsyncClient``: one task long-polls the job's state (shown on stderr; a
spinner only when stderr is a terminal), another follows the job's stdout and stderr onto ours while it runs.
If an attempt fails after printing output and the job moves to another provider, the live output stops and
the final attempt's output is printed whole at the end, after a note that says so. The other commands are
plain synchronous requests.

The handlers take the client factory as a keyword (``connect``), so tests can hand them a fake API.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, TextIO

from node.client import TERMINAL_STATES, ApiError, AsyncClient, AsyncJob, Client
from node.commands import _data_dir_arg, _json_arg, _print_json, _run_client, format_bytes, print_table, size_arg
from node.market.requests import DEFAULT_MAX_PRICE

if TYPE_CHECKING:
    import trio  # imported where used: trio costs `node --help` a fifth of a second

AsyncConnect = Callable[[argparse.Namespace], AsyncClient]

STATE_POLL_S: Final = 0.5  # how often `submit` looks at the job's state (a long-poll: it ends early when done)
SPIN_S: Final = 0.1
LOG_TAIL_S: Final = 5.0  # after the job ends, how long the log followers may take to deliver the last bytes
SPINNER: Final = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
STREAMS: Final = ("stdout", "stderr")


class UsageError(Exception):
    """The command line asks for something that cannot work (a missing input file, a bad --env). The user's to fix."""


def connect_async(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient.from_data_dir(args.data_dir)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a job to the network and wait for its result",
        description=(
            "Submit CMD to the network, wait for it, print its stdout and stderr, save its outputs, and exit "
            "with its exit code (1 with the reason when no provider ran it). Put `--` before CMD. "
            "Ctrl-C cancels the job; --no-wait leaves it running."
        ),
        epilog="example: node submit --input data.csv --output out.png -- python3 plot.py data.csv out.png",
    )
    _data_dir_arg(p)
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="CPUs (default 1)")
    p.add_argument("--memory", type=size_arg, default="512MiB", metavar="SIZE", help="memory (default 512MiB)")
    p.add_argument("--disk", type=size_arg, default="1GiB", metavar="SIZE", help="scratch disk (default 1GiB)")
    p.add_argument("--gpus", type=int, default=0, metavar="N", help="GPUs (default 0)")
    p.add_argument("--gpu-model", default="", metavar="NAME", help="GPU model substring, e.g. A100")
    p.add_argument("--timeout", type=int, default=600, metavar="S", help="wall-clock limit in seconds (default 600)")
    p.add_argument(
        "--max-price",
        type=int,
        default=None,
        metavar="P",
        help=f"the most to pay, in milli-credits (1000 = 1 credit; default {DEFAULT_MAX_PRICE})",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH[:NAME]",
        help="a local file to send; the job sees it as NAME (default: its file name) in its working dir (repeatable)",
    )
    p.add_argument(
        "--output", action="append", default=[], metavar="NAME", help="a file the job writes, to fetch (repeatable)"
    )
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="an environment variable (repeatable)")
    p.add_argument("--out-dir", type=Path, default=Path(), metavar="DIR", help="where to save outputs (default .)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--json", action="store_true", help="print the final job as JSON instead of its output")
    p.add_argument("command", nargs="+", metavar="CMD", help="the command and its arguments, after `--`")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("jobs", help="list this node's jobs", description="Newest first: jobs submitted and run.")
    _data_dir_arg(p)
    _json_arg(p)
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N jobs (default 50)")
    p.set_defaults(handler=cmd_jobs)

    p = sub.add_parser("job", help="show one job: state, provider, cost, receipt")
    _data_dir_arg(p)
    _json_arg(p)
    p.add_argument("job_id", metavar="ID")
    p.set_defaults(handler=cmd_job)

    p = sub.add_parser("logs", help="show (or follow with -f) a job's stdout/stderr")
    _data_dir_arg(p)
    p.add_argument("job_id", metavar="ID")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.add_argument("--stderr", action="store_true", help="the job's stderr instead of its stdout")
    p.set_defaults(handler=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a running job")
    _data_dir_arg(p)
    p.add_argument("job_id", metavar="ID")
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser("market", help="recent quotes per resource class (the price competition)")
    _data_dir_arg(p)
    _json_arg(p)
    p.set_defaults(handler=cmd_market)

    p = sub.add_parser("ledger", help="credits earned by providing and spent by consuming")
    _data_dir_arg(p)
    _json_arg(p)
    p.set_defaults(handler=cmd_ledger)


# ----------------------------------------------------------------------------------------------- formatting


def short_peer(peer: str | None) -> str:
    if not peer:
        return "-"
    return peer if len(peer) <= 16 else peer[:16] + "…"


def format_age(ms: int | None, *, now_ms: int) -> str:
    if not ms:
        return "-"
    seconds = max(0, (now_ms - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_cost(cost: int | None) -> str:
    return "-" if cost is None else f"{cost} mc"


def exit_code_of(job: dict[str, Any]) -> int:
    """The exit code `node submit` returns for a terminal job: the job's own, else 1.

    A failed or cancelled job gives 1; a job that the sandbox ended (a limit) never gives 0.
    """
    if job["state"] != "completed":
        return 1
    status, termination = job.get("exit_status"), job.get("termination")
    if status is None:
        code = 1
    elif status < 0:  # -N: killed by signal N, shown the way shells do
        code = min(128 - status, 255)
    else:
        code = min(status, 255)
    if termination not in (None, "exited") and code == 0:
        code = 1
    return code


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------------- submit


class Progress:
    """State changes on stderr, shown only on a terminal: a spinner line redrawn in place.

    Piped, it stays quiet; the summary line and warnings are printed either way (``note``).
    """

    def __init__(self, stream: TextIO, *, tty: bool) -> None:
        self._stream = stream
        self._tty = tty
        self._text = ""
        self._frame = 0
        self._drawn = False
        self._since = time.monotonic()
        self.quiet = False  # set once the job's own output flows: from then on it is the progress

    def state(self, text: str) -> None:
        if not self._tty:
            return
        self.clear()
        if self.quiet:
            print(f"coop: {text}", file=self._stream, flush=True)
        self._text = text
        self.tick()

    def tick(self) -> None:
        if not self._tty or self.quiet or not self._text:
            return
        self._frame = (self._frame + 1) % len(SPINNER)
        elapsed = time.monotonic() - self._since
        self._stream.write(f"\r\x1b[K{SPINNER[self._frame]} {self._text} ({elapsed:.0f} s)")
        self._stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False

    def note(self, text: str) -> None:
        self.clear()
        print(f"coop: {text}", file=self._stream, flush=True)


def describe(job: dict[str, Any]) -> str:
    """A job's state in words, for the progress line."""
    state = job["state"]
    attempts = job.get("attempts") or []
    if state == "running" and job.get("provider"):
        return f"running on {short_peer(job['provider'])}"
    if state == "negotiating" and attempts:
        return f"negotiating… (attempt {len(attempts) + 1})"
    return f"{state}…" if state not in TERMINAL_STATES else state


@dataclass
class _Followed:
    """What the log followers wrote, so the end can fill in what they missed without repeating it."""

    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    complete: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(STREAMS, False))
    restarted: bool = False


@dataclass
class _Session:
    job_id: str | None = None
    done: bool = False


@dataclass
class _Sinks:
    out: BinaryIO
    err: TextIO
    progress: Progress


def _write(stream: str, data: bytes, *, out: BinaryIO, err: TextIO) -> None:
    if stream == "stdout":
        out.write(data)
        out.flush()
    else:
        err.flush()
        err.buffer.write(data)
        err.buffer.flush()


async def _follow(client: AsyncClient, job_id: str, stream: str, followed: _Followed, sinks: _Sinks) -> None:
    try:
        async for chunk in client.logs(job_id, stream, follow=True):
            sinks.progress.clear()
            sinks.progress.quiet = True
            _write(stream, chunk, out=sinks.out, err=sinks.err)
            followed.written[stream] += len(chunk)
    except ApiError:
        return  # the end fetches what was missed; a lost API shows up in the state poll
    followed.complete[stream] = True


async def _watch(job: AsyncJob, sinks: _Sinks, followed: _Followed, follow_scope: trio.CancelScope) -> dict[str, Any]:
    """Long-poll the job until it ends, showing each state; stop the live logs if a retry restarts them."""
    shown = ""
    noted: set[int] = set()
    while True:
        info = await job.poll(STATE_POLL_S)
        if info["state"] in TERMINAL_STATES:
            return info  # a failed job's error already lists every failed attempt
        for attempt in info.get("attempts") or []:
            if attempt.get("outcome") != "failed" or attempt["attempt"] in noted:
                continue
            noted.add(attempt["attempt"])
            who = short_peer(attempt["provider"])
            sinks.progress.note(f"attempt {attempt['attempt']} on {who} failed: {attempt['reason']}; trying again")
            if not followed.restarted and any(followed.written.values()):
                followed.restarted = True
                follow_scope.cancel()
                sinks.progress.note("the output above came from that attempt; the final output follows at the end")
        text = describe(info)
        if text != shown:
            sinks.progress.state(text)
            shown = text


async def _spin(progress: Progress, scope: trio.CancelScope) -> None:
    import trio

    with scope:
        while True:
            progress.tick()
            await trio.sleep(SPIN_S)


async def _follow_all(
    client: AsyncClient, job_id: str, followed: _Followed, sinks: _Sinks, scope: trio.CancelScope
) -> None:
    import trio

    with scope:
        async with trio.open_nursery() as nursery:
            for stream in STREAMS:
                nursery.start_soon(_follow, client, job_id, stream, followed, sinks)


async def _wait_and_stream(
    client: AsyncClient, job: AsyncJob, sinks: _Sinks, *, follow_logs: bool
) -> tuple[dict[str, Any], _Followed]:
    import trio

    followed = _Followed()
    spin_scope, follow_scope = trio.CancelScope(), trio.CancelScope()
    failure: ApiError | None = None
    final: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_spin, sinks.progress, spin_scope)
        if follow_logs:
            nursery.start_soon(_follow_all, client, job.job_id, followed, sinks, follow_scope)
        try:
            final = await _watch(job, sinks, followed, follow_scope)
        except ApiError as exc:  # kept, not raised here: inside the nursery it would arrive in an ExceptionGroup
            failure = exc
            nursery.cancel_scope.cancel()
        spin_scope.cancel()
        sinks.progress.clear()
        nursery.cancel_scope.deadline = trio.current_time() + LOG_TAIL_S
    if failure is not None:
        raise failure
    return final, followed


async def _print_rest(client: AsyncClient, job_id: str, followed: _Followed, sinks: _Sinks) -> None:
    """Print what the followers did not: the tail they missed, or the whole output after a retry."""
    for stream in STREAMS:
        if followed.complete[stream] and not followed.restarted:
            continue
        data = await client._read_log(job_id, stream)
        skip = 0 if followed.restarted else followed.written[stream]
        if data[skip:]:
            _write(stream, data[skip:], out=sinks.out, err=sinks.err)


async def _save_outputs(client: AsyncClient, job: dict[str, Any], out_dir: Path) -> list[str]:
    files = {name: await client.output(job["job_id"], name) for name in (job.get("result") or {}).get("outputs") or {}}
    # Plain blocking writes: by now nothing else runs in this process, so there is nobody to hold up.
    return save_files(out_dir, files)


def save_files(out_dir: Path, files: dict[str, bytes]) -> list[str]:
    """Write each file into out_dir whole or not at all (through a temporary name); returns the names."""
    if files:
        out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        dest = out_dir / name
        tmp = dest.with_name(f".{name}.coop-part")
        tmp.write_bytes(data)
        tmp.replace(dest)
    return list(files)


def summary(job: dict[str, Any], saved: list[str]) -> str:
    """The one line `submit` ends with: how the job ended, where it ran, what it cost, the receipt."""
    result = job.get("result") or {}
    parts = [f"exit {job.get('exit_status')}"]
    if job.get("termination") not in (None, "exited"):
        parts.append(f"ended by {job['termination']}")
    wall_ms = (result.get("usage") or {}).get("wall_ms")
    if wall_ms is not None:
        parts.append(f"{wall_ms / 1000:.1f} s")
    parts.append(f"cost {job.get('cost')} milli-credits")
    if result.get("receipt_hash"):
        parts.append(f"receipt {result['receipt_hash'][:16]}…")
    if saved:
        parts.append("saved " + ", ".join(saved))
    return f"job {job['job_id']} completed on {short_peer(job.get('provider'))}: " + ", ".join(parts)


def _inputs(specs: list[str]) -> dict[str, str]:
    inputs: dict[str, str] = {}
    for spec in specs:
        path, name = spec, ""
        if ":" in spec and not Path(spec).exists():
            path, name = spec.rsplit(":", 1)
        name = name or Path(path).name
        if not Path(path).is_file():
            raise UsageError(f"--input {spec}: {path} is not a file")
        if name in inputs:
            raise UsageError(f"--input {spec}: two inputs are named {name!r} (rename one with PATH:NAME)")
        inputs[name] = path
    return inputs


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {pair}: expected KEY=VALUE")
        env[key] = value
    return env


async def run_submit(args: argparse.Namespace, client: AsyncClient, session: _Session, sinks: _Sinks) -> int:
    """`node submit` once connected: submit, follow, print, save; returns the exit code."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("no command given (put it after `--`)")
    job = await client.submit(
        command,
        cpus=args.cpus,
        memory=args.memory,
        disk=args.disk,
        gpus=args.gpus,
        gpu_model=args.gpu_model,
        timeout=args.timeout,
        max_price=args.max_price,
        inputs=_inputs(args.input),
        outputs=args.output,
        env=_env(args.env),
    )
    session.job_id = job.job_id
    if args.no_wait:
        if args.json:
            _print_json({"job_id": job.job_id})
        else:
            print(job.job_id)
        return 0
    sinks.progress.state(f"submitted {job.job_id}")
    final, followed = await _wait_and_stream(client, job, sinks, follow_logs=not args.json)
    session.done = True
    if args.json:
        if final["state"] == "completed":
            await _save_outputs(client, final, args.out_dir)
        _print_json(final)
        if final["state"] != "completed":
            print(f"node submit: job {final['job_id']} {final['state']}: {final.get('error') or '-'}", file=sinks.err)
        return exit_code_of(final)
    if final["state"] != "completed":
        sinks.progress.clear()
        print(f"node submit: job {final['job_id']} {final['state']}: {final.get('error') or '-'}", file=sinks.err)
        return 1
    await _print_rest(client, job.job_id, followed, sinks)
    saved = await _save_outputs(client, final, args.out_dir)
    missing = (final.get("result") or {}).get("missing_outputs") or []
    if missing:
        sinks.progress.note(f"the job did not write {', '.join(missing)}")
    sinks.progress.note(summary(final, saved))
    return exit_code_of(final)


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (what trio's nurseries wrap), else exc."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None


def cmd_submit(args: argparse.Namespace, *, connect: AsyncConnect = connect_async) -> int:
    import trio

    session = _Session()
    sinks = _Sinks(out=sys.stdout.buffer, err=sys.stderr, progress=Progress(sys.stderr, tty=sys.stderr.isatty()))

    async def main() -> int:
        async with connect(args) as client:
            return await run_submit(args, client, session, sinks)

    async def cancel(job_id: str) -> bool:
        async with connect(args) as client:
            return await client.cancel(job_id)

    try:
        return trio.run(main)
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt) or _interrupted(exc):
            sinks.progress.clear()
            if session.job_id is None or session.done:
                return 130
            try:
                trio.run(cancel, session.job_id)
                sinks.progress.note(f"interrupted: cancelled job {session.job_id}")
            except (ApiError, KeyboardInterrupt) as again:
                sinks.progress.note(f"interrupted; could not cancel job {session.job_id}: {again}")
            return 130
        if isinstance(leaf, UsageError):
            print(f"node submit: {leaf}", file=sys.stderr)
            return 2
        if isinstance(leaf, ApiError):
            sinks.progress.clear()
            print(f"node submit: {leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, BrokenPipeError):  # e.g. `node submit ... | head`
            _silence_stdout()
            return 1
        if isinstance(leaf, OSError):  # saving an output: disk full, permission
            sinks.progress.clear()
            print(f"node submit: {leaf}", file=sys.stderr)
            return 1
        raise


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does not complain."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


# ----------------------------------------------------------------------------------------------- the rest


def cmd_jobs(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        jobs = client.jobs(limit=args.limit)
        if args.json:
            _print_json(jobs)
            return 0
        if not jobs:
            print("no jobs yet (submit one with `node submit -- CMD`)")
            return 0
        now = _now_ms()
        rows = []
        for j in jobs:
            # The other side of the job: the provider of one we submitted, the client of one we ran.
            peer = j.get("provider") if j["role"] == "client" else j.get("client")
            rows.append([
                j["job_id"], j["role"], j["state"], short_peer(peer),
                "-" if j.get("exit_status") is None else str(j["exit_status"]),
                format_cost(j.get("cost")), format_age(j.get("created_ms"), now_ms=now),
            ])  # fmt: skip
        print_table(["ID", "ROLE", "STATE", "PEER", "EXIT", "COST", "AGE"], rows)
        return 0

    return _run_client(args, show)


def _job_lines(j: dict[str, Any], *, now_ms: int) -> list[str]:
    def row(label: str, value: object) -> str:
        return f"{label:<11}{value}"

    lines = [row("job", f"{j['job_id']} ({'submitted by this node' if j['role'] == 'client' else 'run for a peer'})")]
    state = j["state"]
    if j.get("exit_status") is not None or j.get("termination"):
        state += f" (exit {j.get('exit_status')}, {j.get('termination') or '-'})"
    lines.append(row("state", state))
    if j.get("command"):
        lines.append(row("command", shlex.join(j["command"])))
    lines.append(row("created", f"{format_age(j.get('created_ms'), now_ms=now_ms)} ago"))
    lines.append(row("updated", f"{format_age(j.get('updated_ms'), now_ms=now_ms)} ago"))
    lines.append(row("provider", j.get("provider") or "-"))
    lines.append(row("client", j.get("client") or "-"))
    lines.append(row("cost", "-" if j.get("cost") is None else f"{j['cost']} milli-credits"))
    if j.get("error"):
        lines.append(row("error", j["error"]))
    result = j.get("result") or {}
    usage = result.get("usage")
    if usage:
        lines.append(row("usage", (
            f"cpu {usage.get('cpu_ms', 0) / 1000:.2f} s, wall {usage.get('wall_ms', 0) / 1000:.2f} s, "
            f"peak memory {format_bytes(usage.get('peak_memory_bytes', 0))}, gpu {usage.get('gpu_ms', 0) / 1000:.2f} s"
        )))  # fmt: skip
    for name, info in (result.get("outputs") or {}).items():
        lines.append(row("output", f"{name}  {format_bytes(info['size'])}  sha256 {info['sha256']}"))
    for name in result.get("missing_outputs") or []:
        lines.append(row("missing", f"{name} (the job did not write it)"))
    for a in j.get("attempts") or []:
        outcome = a.get("outcome") or "running"
        reason = f": {a['reason']}" if a.get("reason") else ""
        lines.append(row(f"attempt {a['attempt']}", f"{a['provider']} {outcome}{reason}"))
    receipt = j.get("receipt")
    if receipt:
        lines.append(row("receipt", result.get("receipt_hash") or "-"))
        signed = [side for side in ("provider", "client") if receipt.get(f"{side}_signature")]
        lines.append(row("", f"signed by {' and '.join(signed) or 'nobody'}; `--json` shows it whole (wire_b64)"))
    return lines


def cmd_job(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        j = client.job(args.job_id).status()
        if args.json:
            _print_json(j)
        else:
            print("\n".join(_job_lines(j, now_ms=_now_ms())))
        return 0

    return _run_client(args, show)


def cmd_logs(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        out = sys.stdout.buffer
        try:
            for chunk in client.logs(args.job_id, "stderr" if args.stderr else "stdout", follow=args.follow):
                out.write(chunk)
                out.flush()
        except BrokenPipeError:  # e.g. `node logs ID | head`
            _silence_stdout()
        return 0

    return _run_client(args, show)


def cmd_cancel(args: argparse.Namespace) -> int:
    def run(client: Client) -> int:
        if client.cancel(args.job_id):
            print(f"cancelled job {args.job_id}")
            return 0
        state = client.job(args.job_id).status()["state"]
        print(f"node cancel: job {args.job_id} is already {state}; nothing to cancel", file=sys.stderr)
        return 1

    return _run_client(args, run)


def cmd_market(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        market = client.market()
        if args.json:
            _print_json(market)
            return 0
        if not market["summary"]:
            print("no quotes yet: the market fills in as this node asks providers for prices (node submit)")
            return 0
        print("quotes per resource class (costs in milli-credits):")
        print_table(
            ["CLASS", "QUOTES", "ACCEPTED", "MIN", "MEDIAN", "MAX", "PROVIDERS"],
            [
                [s["resource_class"], str(s["count"]), str(s["accepted"]), str(s["min_cost"]),
                 str(s["median_cost"]), str(s["max_cost"]), str(s["providers"])]
                for s in market["summary"]
            ],
        )  # fmt: skip
        now = _now_ms()
        print("\nmost recent quotes:")
        print_table(
            ["AGE", "JOB", "PROVIDER", "CLASS", "COST", "LOAD", "OUTCOME"],
            [
                [format_age(q["received_ms"], now_ms=now), q["job_id"], short_peer(q["provider"]),
                 q["resource_class"], str(q["cost"]), f"{q['load_permille'] / 10:.0f}%", q["outcome"]]
                for q in market["recent"][:10]
            ],
        )  # fmt: skip
        return 0

    return _run_client(args, show)


def cmd_ledger(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        led = client.ledger()
        if args.json:
            _print_json(led)
            return 0
        print(f"peer id  {led['peer_id']}")
        print(f"earned   {led['earned']} milli-credits (providing)")
        print(f"spent    {led['spent']} milli-credits (consuming)")
        print(f"balance  {led['balance']} milli-credits")
        if led["entries"]:
            now = _now_ms()
            print()
            print_table(
                ["AGE", "JOB", "DIRECTION", "COUNTERPARTY", "COST"],
                [
                    [format_age(e["issued_ms"], now_ms=now), e["job_id"], e["direction"],
                     short_peer(e["counterparty"]), str(e["cost"])]
                    for e in led["entries"]
                ],
            )  # fmt: skip
        return 0

    return _run_client(args, show)
