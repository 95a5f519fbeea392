"""`node pause`, `node resume` and `node policy`: the machine's owner stays in control (docs/owner.md)."""

from __future__ import annotations

import argparse
from typing import Any

from node.client import Client
from node.commands import _data_dir_arg, _json_arg, _print_json, _run_client, format_bytes, size_arg


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pause",
        help="stop offering this machine: running jobs are suspended or preempted (--drain: they finish)",
        description="Stop taking jobs now and withdraw the capacity ad. Running jobs are suspended or preempted "
        "as [owner] on_reclaim says, or with --drain allowed to finish. Lasts until `node resume` or a restart.",
    )
    _data_dir_arg(p)
    _json_arg(p)
    p.add_argument("--drain", action="store_true", help="let running jobs finish; take no new ones")
    p.set_defaults(handler=cmd_pause)

    p = sub.add_parser("resume", help="offer this machine again (per the owner policy) and resume suspended jobs")
    _data_dir_arg(p)
    _json_arg(p)
    p.set_defaults(handler=cmd_resume)

    p = sub.add_parser(
        "policy",
        help="show or change the owner policy (mode, caps, windows) of the running node",
        description="With no options, show the policy and what it decides now. Options change it at once "
        "(until the node restarts; edit [owner] in config.toml to keep a change).",
    )
    _data_dir_arg(p)
    _json_arg(p)
    p.add_argument("--mode", choices=["always", "idle-only", "schedule"])
    p.add_argument("--cpus", type=int, metavar="N", help="offer at most N CPU cores (0 = all)")
    p.add_argument("--memory", type=size_arg, metavar="SIZE", help="offer at most SIZE memory (0 = all)")
    p.add_argument("--disk", type=size_arg, metavar="SIZE", help="at most SIZE disk for work dirs (0 = all)")
    p.add_argument("--gpus", metavar="LIST", help="GPU indices to offer: 'all', 'none' or e.g. '0,2'")
    p.add_argument("--max-jobs", type=int, metavar="N", help="jobs at once")
    p.add_argument("--window", action="append", metavar="WINDOW",
                   help="a sharing window, e.g. 'mon-fri 18:00-08:00' (repeatable; replaces the list)")  # fmt: skip
    p.add_argument("--no-windows", action="store_true", help="clear the windows")
    p.add_argument("--idle-cpu-percent", type=float, metavar="P", help="idle-only: owner CPU use that counts as idle")
    p.add_argument("--idle-seconds", type=float, metavar="S", help="idle-only: how long idle before sharing")
    p.add_argument("--reclaim-seconds", type=float, metavar="S", help="idle-only: how long busy before reclaiming")
    p.add_argument("--on-reclaim", choices=["suspend", "preempt"], help="what happens to running jobs")
    p.add_argument("--max-suspend-seconds", type=float, metavar="S", help="preempt jobs suspended longer than S")
    p.set_defaults(handler=cmd_policy)


def _gpus(text: str) -> list[int] | None:
    if text == "all":
        return None
    if text == "none":
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"node policy: --gpus: expected 'all', 'none' or indices like 0,2, got {text!r}") from None


def policy_changes(args: argparse.Namespace) -> dict[str, object]:
    changes: dict[str, object] = {}
    for key in ("mode", "cpus", "max_jobs", "idle_cpu_percent", "idle_seconds", "reclaim_seconds", "on_reclaim",
                "max_suspend_seconds"):  # fmt: skip
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    for key in ("memory", "disk"):
        if getattr(args, key) is not None:
            changes[f"{key}_bytes"] = getattr(args, key)
    if args.gpus is not None:
        changes["gpus"] = _gpus(args.gpus)
    if args.window or args.no_windows:
        changes["windows"] = list(args.window or [])
    return changes


def show_state(state: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        _print_json(state)
        return
    print(f"{'sharing' if state['sharing'] else 'NOT sharing'}: {state['reason']}")
    offer = state["offer"]
    if offer and state["sharing"]:
        gpus = ",".join(str(g) for g in offer["gpus"]) or "none"
        print(f"offering  {offer['cpus']} CPUs, {format_bytes(offer['memory_bytes'])} memory, "
              f"{format_bytes(offer['disk_bytes'])} disk, GPUs {gpus}, {offer['max_jobs']} job(s) at once")  # fmt: skip
    if state["owner_gpus"]:
        print(f"owner is using GPU(s) {', '.join(str(g) for g in state['owner_gpus'])}: not offered")
    load = state["owner_cpu_percent"]
    print(f"owner CPU {'unknown' if load is None else f'{load:.0f}%'} (not counting Coop jobs)")
    jobs = state["jobs"]
    print(f"jobs      {jobs['running']} running, {jobs['suspended']} suspended")
    p = state["policy"]
    caps = ", ".join(
        f"{k}={'all' if not v and v != [] else v}"
        for k, v in p.items()
        if k in ("cpus", "memory_bytes", "disk_bytes", "gpus")
    )
    print(f"policy    mode {p['mode']}, on_reclaim {p['on_reclaim']}, max_jobs {p['max_jobs']}; caps {caps}")
    if p["windows"]:
        print(f"windows   {'; '.join(p['windows'])}")
    if p["mode"] == "idle-only":
        print(f"idle      below {p['idle_cpu_percent']}% for {p['idle_seconds']} s; "
              f"reclaim after {p['reclaim_seconds']} s above")  # fmt: skip


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, object] | None = None) -> int:
    def go(client: Client) -> int:
        # The owner routes are few and CLI-only, so they go through the client's generic request.
        response = client._request(method, path, json=body) if method == "POST" else client._request(method, path)
        show_state(response.json(), as_json=args.json)
        return 0

    return _run_client(args, go)


def cmd_pause(args: argparse.Namespace) -> int:
    return _call(args, "POST", "/v1/owner/pause", {"drain": args.drain})


def cmd_resume(args: argparse.Namespace) -> int:
    return _call(args, "POST", "/v1/owner/resume", {})


def cmd_policy(args: argparse.Namespace) -> int:
    changes = policy_changes(args)
    if not changes:
        return _call(args, "GET", "/v1/owner")
    return _call(args, "POST", "/v1/owner/policy", changes)
