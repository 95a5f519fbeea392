"""`node doctor` and `node run-local`: the sandbox as a user sees it, without a running daemon."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from node.sandbox.doctor import collect_facts, render_report
from node.sandbox.errors import AdmissionRefused, SandboxUnavailable, WorkDirError
from node.sandbox.spec import ExecResult, ExecSpec, InputFile, Limits, Tier


def _size(text: str) -> int:
    from node.client import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="show which sandbox layers this machine supports and how to fix missing ones",
        description="Probe bubblewrap, user namespaces, seccomp, Landlock, cgroups, rlimits and NVML; say which "
        "sandbox tier jobs would get here and how to fix each missing layer.",
    )
    p.add_argument("--allow-unsandboxed", action="store_true", help="report as a node started with this flag would")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(handler=cmd_doctor)

    p = sub.add_parser(
        "run-local",
        help="run a command through the local sandbox executor, to try it",
        description="Run CMD in the same sandbox and with the same limits a provider applies to others' jobs. "
        "Prints the job's output, then how it ended and what it used; exits with the job's exit status.",
    )
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="wall-clock limit (default 60 s)")
    p.add_argument("--cpu-seconds", type=float, default=60.0, metavar="S", help="CPU time limit (default 60 s)")
    p.add_argument("--memory", type=_size, default=512 << 20, metavar="SIZE", help="memory limit (default 512MiB)")
    p.add_argument("--disk", type=_size, default=1 << 30, metavar="SIZE", help="work dir size limit (default 1GiB)")
    p.add_argument("--output-limit", type=_size, default=1 << 20, metavar="SIZE", help="stdout+stderr cap (1MiB)")
    p.add_argument("--input", action="append", default=[], metavar="PATH[:NAME]", help="copy a file into the job")
    p.add_argument("--output", action="append", default=[], metavar="NAME", help="a file to bring back")
    p.add_argument("--out-dir", type=Path, default=Path("."), metavar="DIR", help="where outputs go (default .)")
    p.add_argument("--tier", choices=[t.value for t in Tier], help="insist on one sandbox tier")
    p.add_argument("--allow-unsandboxed", action="store_true", help="DANGEROUS: run without a sandbox if none")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    p.set_defaults(handler=cmd_run_local)


def cmd_doctor(args: argparse.Namespace) -> int:
    facts = collect_facts()
    if args.json:
        from node.sandbox.detect import choose_tier

        decision = choose_tier(facts, allow_unsandboxed=args.allow_unsandboxed)
        print(json.dumps({"tier": decision.tier, "reason": decision.reason, "layers": list(decision.layers),
                          "fixes": list(decision.fixes)}, indent=2))  # fmt: skip
    else:
        print(render_report(facts, allow_unsandboxed=args.allow_unsandboxed), end="")
    return 0


def _inputs(specs: list[str]) -> tuple[InputFile, ...]:
    out = []
    for item in specs:
        path_text, _, name = item.partition(":")
        path = Path(path_text)
        if not path.is_file():
            raise SystemExit(f"node run-local: --input {item}: {path} is not a file")
        out.append(InputFile(name=name or path.name, source=path.resolve()))
    return tuple(out)


def cmd_run_local(args: argparse.Namespace) -> int:
    import trio

    from node.sandbox.executor import Executor

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("node run-local: give a command after --, e.g. node run-local -- python3 -c 'print(1)'", file=sys.stderr)
        return 2
    limits = Limits(cpu_seconds=args.cpu_seconds, wall_seconds=args.timeout, memory_bytes=args.memory,
                    disk_bytes=args.disk, output_bytes=args.output_limit)  # fmt: skip
    facts = collect_facts()
    executor = Executor(
        facts=facts, allow_unsandboxed=args.allow_unsandboxed, tier=Tier(args.tier) if args.tier else None
    )
    root = Path(tempfile.mkdtemp(prefix="coop-run-local-"))
    root.chmod(0o711)
    spec = ExecSpec(command=tuple(command), work_dir=root / "work", inputs=_inputs(args.input),
                    outputs=tuple(args.output), limits=limits)  # fmt: skip

    async def on_output(stream: str, data: bytes) -> None:
        if not args.json:
            target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
            target.write(data)
            target.flush()

    try:
        result: ExecResult = trio.run(lambda: executor.run(spec, on_output=on_output))
    except (SandboxUnavailable, AdmissionRefused, WorkDirError) as exc:
        print(f"node run-local: {exc}", file=sys.stderr)
        return 2
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for out in result.outputs:
            shutil.copyfile(spec.work_dir / out.name, args.out_dir / Path(out.name).name)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    usage = result.usage
    if args.json:
        print(json.dumps({
            "termination": result.termination.value, "exit_status": result.exit_status, "detail": result.detail,
            "tier": result.tier.value, "stdout": result.stdout.decode(errors="replace"),
            "stderr": result.stderr.decode(errors="replace"),
            "outputs": [{"name": o.name, "sha256": o.sha256, "size": o.size} for o in result.outputs],
            "missing_outputs": list(result.missing_outputs),
            "usage": {"cpu_seconds": usage.cpu_seconds, "wall_seconds": usage.wall_seconds,
                      "peak_memory_bytes": usage.peak_memory_bytes},
        }, indent=2))  # fmt: skip
    else:
        print(f"-- {result.termination.value} (exit {result.exit_status}) in tier {result.tier.value}: "
              f"{usage.cpu_seconds:.2f} CPU-s, {usage.wall_seconds:.2f} s wall, "
              f"{usage.peak_memory_bytes / (1 << 20):.1f} MiB peak; {result.detail}", file=sys.stderr)  # fmt: skip
    if result.exit_status is None:
        return 1
    return result.exit_status
