"""`node runtime add|list|build`: the Python runtimes this node offers to function jobs (see node.runtimes).

These edit and read the data dir's config.toml directly (no running node needed); a running node picks up a
change when it restarts.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from node.commands import _data_dir_arg, _json_arg, _print_json, print_table
from node.config import CONFIG_FILE, NodeConfig, default_data_dir, ensure_data_dir, load_config_file
from node.runtimes import RuntimeError_, build_venv, check_name, job_uid_gid, resolve_all, resolve_venv


def register(sub: Any) -> None:
    p = sub.add_parser("runtime", help="Python runtimes offered to function jobs: add, list, build")
    rsub = p.add_subparsers(dest="runtime_command", metavar="ACTION", required=True)

    a = rsub.add_parser("add", help="declare a venv as a runtime (written to config.toml; restart the node)")
    _data_dir_arg(a)
    a.add_argument("name", metavar="NAME", help="the runtime's name: 1-32 of a-z, 0-9, '.', '_', '-'")
    a.add_argument("--venv", type=Path, required=True, metavar="PATH", help="the venv (it needs cloudpickle)")
    a.set_defaults(handler=cmd_add)

    ls = rsub.add_parser("list", help="the runtimes, their interpreter and lock hash, and whether they are offered")
    _data_dir_arg(ls)
    _json_arg(ls)
    ls.set_defaults(handler=cmd_list)

    b = rsub.add_parser("build", help="build a venv from a requirements file (plus cloudpickle) and declare it")
    _data_dir_arg(b)
    b.add_argument("name", metavar="NAME")
    b.add_argument("-r", "--requirements", type=Path, default=None, metavar="FILE", help="pip requirements")
    b.add_argument("--dir", type=Path, default=None, metavar="PATH", help="where (default: DATA_DIR/runtimes/NAME)")
    b.add_argument("--python", default=None, metavar="EXE", help="the interpreter (default: /usr/bin/python3.X)")
    b.set_defaults(handler=cmd_build)


def _config_path(args: argparse.Namespace) -> Path:
    return (args.data_dir or default_data_dir()) / CONFIG_FILE


def add_runtime(config: Path, name: str, venv: Path) -> None:
    """Write ``name = "venv"`` into the ``[runtimes]`` table of ``config`` (replacing an entry of that name)."""
    text = config.read_text() if config.exists() else ""
    line = f'{name} = "{venv}"'
    entry = re.compile(rf"^{re.escape(name)}\s*=.*$", re.MULTILINE)
    section = re.search(r"^\[runtimes\][^\n]*\n", text, re.MULTILINE)
    if section is None:
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"[runtimes]\n{line}\n"
    else:
        start = section.end()
        nxt = re.search(r"^\[", text[start:], re.MULTILINE)
        end = start + nxt.start() if nxt else len(text)
        body = text[start:end]
        body = entry.sub(line, body) if entry.search(body) else body.rstrip("\n") + f"\n{line}\n"
        text = text[:start] + body.lstrip("\n") + ("\n" if nxt else "") + text[end:]
    tomllib.loads(text)  # never leave a config the node cannot read
    config.write_text(text)


def cmd_add(args: argparse.Namespace) -> int:
    try:
        check_name(args.name)
        venv = args.venv.expanduser().absolute()
        uid, gid = job_uid_gid()
        runtime = resolve_venv(args.name, venv, job_uid=uid, job_gid=gid)
        if not runtime.usable:
            raise RuntimeError_(runtime.error)
        config = _config_path(args)
        ensure_data_dir(config.parent)
        add_runtime(config, args.name, venv)
    except RuntimeError_ as exc:
        print(f"node runtime add: {exc}", file=sys.stderr)
        return 1
    print(f"runtime {args.name}: {runtime.interpreter}, lock {runtime.lock_sha256.hex()[:16]}… in {config}")
    print("restart the node to offer it")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or default_data_dir()
    config = data_dir / CONFIG_FILE
    loaded = NodeConfig(data_dir=data_dir)
    if config.exists():
        loaded = load_config_file(config, loaded)
    uid, gid = job_uid_gid()
    runtimes = resolve_all(dict(loaded.runtimes), job_uid=uid, job_gid=gid)
    if args.json:
        _print_json({"runtimes": [r.to_json() for r in runtimes]})
        return 0
    rows = [[r.name, r.interpreter or "-", r.lock_sha256.hex()[:16] or "-", "yes" if r.usable else "no", r.path]
            for r in runtimes]  # fmt: skip
    print_table(["NAME", "INTERPRETER", "LOCK", "OFFERED", "PATH"], rows)
    for r in runtimes:
        if not r.usable:
            print(f"  {r.name}: {r.error}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or default_data_dir()
    target = (args.dir or data_dir / "runtimes" / args.name).expanduser().absolute()
    try:
        check_name(args.name)
        print(f"building {target} ...", flush=True)
        build_venv(target, requirements=args.requirements, python=args.python)
    except RuntimeError_ as exc:
        print(f"node runtime build: {exc}", file=sys.stderr)
        return 1
    args.venv = target
    return cmd_add(args)
