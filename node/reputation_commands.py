"""`node reputation` and `node rate`: trust as a user sees it."""

from __future__ import annotations

import argparse
from typing import Any

from node.client import Client
from node.commands import _data_dir_arg, _json_arg, _print_json, _run_client, print_table


def register(sub: Any) -> None:
    p = sub.add_parser(
        "reputation",
        help="a peer's trust score and the records behind it; --top lists providers by trust",
        description="Trust is computed by this node from its own receipts first, then transitively from peers it "
        "has dealt with (EigenTrust, personalised); records without a two-party receipt carry no weight.",
    )
    _data_dir_arg(p)
    _json_arg(p)
    p.add_argument("peer", nargs="?", metavar="PEER", help="a peer id (default: list the most trusted peers)")
    p.add_argument("--top", type=int, default=20, metavar="N", help="how many peers to list (default 20)")
    p.set_defaults(handler=cmd_reputation)

    p = sub.add_parser("rate", help="add your own rating to a finished job (bound to its receipt)")
    _data_dir_arg(p)
    _json_arg(p)
    p.add_argument("job_id", metavar="JOB", help="the job's id")
    p.add_argument("--score", type=int, required=True, choices=range(6), metavar="N", help="0 (worst) to 5 stars")
    p.add_argument("--comment", default="", metavar="TEXT", help="a short comment (at most 280 characters)")
    p.set_defaults(handler=cmd_rate)


def cmd_reputation(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        if args.peer is None:
            data = client.reputation(top=args.top)
            if args.json:
                _print_json(data)
                return 0
            rows = [[p["peer_id"], f"{p['score']:.2f}", "-" if p["direct"] is None else f"{p['direct']:.2f}",
                     f"{p['transitive']:.2f}", str(p["evidence_count"])] for p in data["peers"]]  # fmt: skip
            if rows:
                print_table(["PEER", "TRUST", "DIRECT", "TRANSITIVE", "RECORDS"], rows)
            else:
                print("no reputation records yet: trust grows from finished jobs")
            stats = data["statistics"]
            print(f"\n{stats['records']} records held; refused: {stats['rejected'] or 'none'}")
            return 0
        data = client.reputation(args.peer)
        if args.json:
            _print_json(data)
            return 0
        print(f"{data['peer_id']}: trust {data['score']:.2f}")
        print(f"  {data['explanation']}")
        for r in data["records"][:20]:
            print(f"  {r['rater'][:16]}… → {r['ratee'][:16]}…  {r['outcome']:<16} {r['score']:>3}  "
                  f"cost {r['cost']}  {r['comment']}")  # fmt: skip
        return 0

    return _run_client(args, show)


def cmd_rate(args: argparse.Namespace) -> int:
    def send(client: Client) -> int:
        data = client.rate(args.job_id, args.score, args.comment)
        if args.json:
            _print_json(data)
        else:
            print(f"rated {data['ratee']} {args.score}/5 for job {args.job_id} ({data['outcome']})")
        return 0

    return _run_client(args, send)
