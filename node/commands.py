"""The implemented subcommands of `node` / `coop`: argument definitions and handlers."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from node.client import ApiError, Client, parse_size
from node.config import (
    CONFIG_FILE,
    ConfigError,
    NodeConfig,
    default_data_dir,
    ensure_data_dir,
    load_config_file,
    load_identity_from,
    parse_host_port,
    write_default_config,
)


def size_arg(text: str) -> int:
    """argparse type for sizes: '512MiB', '2G', '1000000' -> bytes (see ``node.client.parse_size``)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the node's data dir (default: $COOP_HOME, else the XDG data dir: ~/.local/share/coop)",
    )


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "start",
        help="start a node: join the network, advertise capacity, serve the local API",
        description="Start a Coop node in the foreground. Stop it with Ctrl-C (SIGINT) or SIGTERM.",
    )
    _data_dir_arg(p)
    p.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="listen address (repeatable; default /ip4/0.0.0.0/tcp/4001); port 0 picks a free port",
    )
    p.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="a peer to join through, /ip4/HOST/tcp/PORT/p2p/PEER_ID (repeatable)",
    )
    p.add_argument("--api", metavar="HOST:PORT", help="local API address (default 127.0.0.1:7410; port 0 = any)")
    p.add_argument("--no-provide", action="store_true", help="do not offer this machine's capacity or run jobs")
    p.add_argument("--no-mdns", action="store_true", help="do not look for (or announce to) nodes on the LAN by mDNS")
    p.add_argument("--relay-service", action="store_true", help="relay circuits for nodes that cannot be dialled")
    p.add_argument(
        "--relay",
        action="append",
        metavar="MULTIADDR",
        help="stay reachable through this relay, /ip4/HOST/tcp/PORT/p2p/PEER_ID (repeatable; it needs --relay-service)",
    )
    p.add_argument(
        "--allow-unsandboxed",
        action="store_true",
        help="DANGEROUS: run others' jobs without a sandbox where none is available (trusted single-user setups)",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="config file (default DATA_DIR/config.toml)")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines on stderr as text (default) or one JSON object per line")  # fmt: skip
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="count", default=0,
                          help="log more: INFO (twice: DEBUG); the default is WARNING or $COOP_LOG_LEVEL")  # fmt: skip
    loudness.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    p.set_defaults(handler=cmd_start)

    p = sub.add_parser("id", help="print this node's peer id and addresses")
    _data_dir_arg(p)
    _json_arg(p)
    p.set_defaults(handler=cmd_id)

    p = sub.add_parser("peers", help="list the peers this node knows and is connected to")
    _data_dir_arg(p)
    _json_arg(p)
    p.set_defaults(handler=cmd_peers)

    p = sub.add_parser("status", help="show the node's capacity, advertisement and bootstrap state")
    _data_dir_arg(p)
    _json_arg(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser(
        "find",
        help="find providers whose signed capacity ads fit the resources asked for",
        description="Look up providers in the DHT and verify their signed, unexpired capacity ads.",
    )
    _data_dir_arg(p)
    _json_arg(p)
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="at least N CPUs (default 1)")
    p.add_argument("--memory", type=size_arg, default=0, metavar="SIZE", help="at least SIZE memory, e.g. 4GiB")
    p.add_argument("--gpus", type=int, default=0, metavar="N", help="at least N GPUs")
    p.add_argument("--gpu-model", default="", metavar="NAME", help="GPU model substring, e.g. 'rtx 4090' or A100")
    p.set_defaults(handler=cmd_find)

    from node import job_commands  # here, not at the top: job_commands imports this module's helpers

    job_commands.register(sub)

    from node import dashboard_commands, reputation_commands, sandbox_commands

    sandbox_commands.register(sub)
    reputation_commands.register(sub)

    from node import runtime_commands

    runtime_commands.register(sub)
    from node import owner_commands

    owner_commands.register(sub)
    dashboard_commands.register(sub)


def build_config(args: argparse.Namespace) -> NodeConfig:
    data_dir = (args.data_dir or default_data_dir()).expanduser().resolve()
    ensure_data_dir(data_dir)
    config = NodeConfig(data_dir=data_dir)
    config_path = args.config or data_dir / CONFIG_FILE
    if args.config is None and not config_path.exists():
        write_default_config(config_path)
    elif args.config is not None and not config_path.exists():
        raise ConfigError(f"config file {config_path} does not exist")
    config = load_config_file(config_path, config)
    if args.listen:
        config = replace(config, listen=tuple(args.listen))
    if args.bootstrap:
        config = replace(config, bootstrap=tuple(args.bootstrap))
    if args.api:
        host, port = parse_host_port(args.api, what="--api")
        config = replace(config, api_host=host, api_port=port)
    if args.no_provide:
        config = replace(config, provide=False)
    if args.no_mdns:
        config = replace(config, mdns=False)
    if args.relay_service:
        config = replace(config, relay_service=True)
    if args.relay:
        config = replace(config, relays=tuple(args.relay))
    if args.allow_unsandboxed:
        config = replace(config, allow_unsandboxed=True)
    return config


def cmd_start(args: argparse.Namespace) -> int:
    import trio

    from node.daemon import data_dir_lock, run_node
    from node.logs import level_for, setup_logging

    try:
        config = build_config(args)
        identity, created = load_identity_from(config.data_dir)
        data_dir_lock(config.data_dir)
    except (ConfigError, RuntimeError) as exc:
        print(f"node start: {exc}", file=sys.stderr)
        return 2
    setup_logging(level_for(verbose=args.verbose, quiet=args.quiet), fmt=args.log_format)
    print(f"coop: {'created a new identity' if created else 'loaded identity'} in {config.data_dir}", flush=True)
    from node import net

    try:
        trio.run(run_node, config, identity)
    except (net.ListenError, net.InvalidAddress, OSError) as exc:
        print(f"node start: {exc}", file=sys.stderr)
        return 1
    return 0


def _client(args: argparse.Namespace) -> Client:
    return Client.from_data_dir(args.data_dir)


def _run_client(args: argparse.Namespace, fn: Any) -> int:
    try:
        with _client(args) as client:
            return int(fn(client))
    except ApiError as exc:
        print(f"node {args.command}: {exc}", file=sys.stderr)
        return 1


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_id(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        info = client.id()
        if args.json:
            _print_json(info)
        else:
            print(info["peer_id"])
            for addr in info["addrs"]:
                print(f"  {addr}")
        return 0

    return _run_client(args, show)


def cmd_peers(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        peers = client.peers()
        if args.json:
            _print_json(peers)
        elif not peers:
            print("no peers yet (is a bootstrap peer reachable? see `node status`)")
        else:
            rows = [
                [p["peer_id"], "yes" if p["connected"] else "no", "yes" if p["in_routing_table"] else "no"]
                for p in peers
            ]
            print_table(["PEER", "CONNECTED", "IN ROUTING TABLE"], rows)
        return 0

    return _run_client(args, show)


def cmd_status(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        st = client.status()
        if args.json:
            _print_json(st)
            return 0
        print(f"peer id    {st['peer_id']}")
        for addr in st["addrs"]:
            print(f"address    {addr}")
        print(f"uptime     {st['uptime_s']}s")
        print(f"peers      {st['connected_peers']} connected, {st['routing_table_size']} in routing table")
        cap = st["capacity"]
        if cap:
            print(
                f"capacity   {cap['cpus']} CPUs, {format_bytes(cap['memory_bytes'])} memory, "
                f"{format_bytes(cap['disk_free_bytes'])} disk free, load {cap['load_permille'] / 10:.0f}%"
            )
            print(f"gpu        {cap['gpu_status']}")
        owner = st.get("owner")
        if owner:
            jobs = owner["jobs"]
            print(
                f"owner      {'sharing' if owner['sharing'] else 'NOT sharing'}: {owner['reason']} "
                f"(mode {owner['policy']['mode']}; {jobs['running']} jobs running, {jobs['suspended']} suspended)"
            )
        ad = st["ad"]
        if ad is None:
            print("providing  no (--no-provide)")
        else:
            print(
                f"providing  yes: ad seq {ad['seq']}, classes {', '.join(ad['classes']) or '-'}"
                + (f" (last error: {ad['last_error']})" if ad["last_error"] else "")
            )
        for b in st["bootstrap"]:
            err = f" ({b['last_error']})" if b["last_error"] else ""
            print(f"bootstrap  {b['address']}: {b['state']} after {b['attempts']} attempt(s){err}")
        if "mdns" in st:
            lan = st["mdns"]
            joined = sum(p["state"] == "joined" for p in lan["peers"])
            print(f"mdns       {lan['state']}: {joined} LAN peer(s) joined, {lan['announcements']} announcement(s)")
        if "reach" in st:
            reach = st["reach"]
            relays = ", ".join(f"{r['address']}: {r['state']}" for r in reach["relays"]) or "no relay configured"
            service = ", offers relay service" if reach["relay_service"] else ""
            print(f"reach      {reach['reachability']} ({relays}){service}")
        if "limits" in st:
            lim = st["limits"]
            reset, refused = lim["streams_limited"], lim["connections_refused"]
            print(f"limits     {reset} streams reset, {refused} connections refused")
        return 0

    return _run_client(args, show)


def cmd_find(args: argparse.Namespace) -> int:
    def show(client: Client) -> int:
        providers = client.find(cpus=args.cpus, memory_bytes=args.memory, gpus=args.gpus, gpu_model=args.gpu_model)
        if args.json:
            _print_json(providers)
        elif not providers:
            print("no provider with a valid ad fits those resources")
        else:
            rows = []
            for p in providers:
                gpus = ", ".join(g["model"] for g in p["gpus"]) or "-"
                sheet = p["price_sheet"]
                rows.append(
                    [
                        p["peer_id"],
                        str(p["cpus"]),
                        format_bytes(p["memory_bytes"]),
                        gpus,
                        f"{p['load_permille'] / 10:.0f}%",
                        f"{sheet['per_cpu_second']}/cpu-s",
                    ]
                )
            print_table(["PEER", "CPUS", "MEMORY", "GPUS", "LOAD", "PRICE (milli-credits)"], rows)
        return 0

    return _run_client(args, show)
