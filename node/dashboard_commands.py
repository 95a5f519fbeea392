"""`node dashboard`: print (or open) a one-time link to the web dashboard on the local API port."""

from __future__ import annotations

import argparse
import sys
import webbrowser
from typing import Any

from node.client import Client
from node.commands import _data_dir_arg, _json_arg, _print_json, _run_client


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dashboard",
        help="print a one-time link to the web dashboard",
        description="Print a link that logs a browser into this node's dashboard once, within two minutes. "
        "The code is in the link's #fragment, which browsers never send to a server: it stays out of logs.",
    )
    _data_dir_arg(p)
    _json_arg(p)
    p.add_argument("--open", action="store_true", help="also open the link in this machine's web browser")
    p.set_defaults(handler=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        link = client.dashboard_link()
        if args.json:
            _print_json(link)
        else:
            print(link["url"])
            print(f"(works once, for {link['expires_in_s']:.0f} s; or open {client.url}/dashboard and paste the token"
                  " from api.json)", file=sys.stderr)  # fmt: skip
        if args.open:
            webbrowser.open(link["url"])
        return 0

    return _run_client(args, show)
