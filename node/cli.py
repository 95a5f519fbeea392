"""The `node` / `coop` command line.

Every subcommand is listed here, including those later work adds; a command that is not built yet says so
and exits with status 2, so `--help` always shows the whole shape of the tool.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Final

PROG_HELP: Final = """\
Coop: share idle compute with peers, and run jobs on theirs.

Start a node with `node start`; it joins the network through bootstrap peers, advertises what this machine
can run, and serves a local API that the other commands use. (`coop` is the same program: use it where
`node` clashes with Node.js.)"""

Handler = Callable[[argparse.Namespace], int]

# command -> (help line, issue that builds it); filled below and by _command()
_PLANNED: Final[dict[str, tuple[str, str]]] = {}


def _not_built(name: str, what: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        print(f"node {name}: not available in this version yet (it arrives with {what}).", file=sys.stderr)
        return 2

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="node",
        description=PROG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    from node import commands

    commands.register(sub)
    for name, (help_text, what) in _PLANNED.items():
        p = sub.add_parser(name, help=f"{help_text} [coming with {what}]", add_help=True)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(handler=_not_built(name, what))
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coop")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+source"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
