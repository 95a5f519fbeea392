"""The data dir, the identity key and the commented TOML config.

Precedence: command-line flags, then the config file, then the defaults written here. The first start writes
the config file with every default and a comment on each, so a user can read what can be changed.
Errors in the file are reported as :class:`ConfigError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from protocol.errors import LocalProtocolError
from protocol.identity import Identity, load_or_create_identity
from protocol.messages import PriceSheet
from protocol.owner import OwnerPolicy

DEFAULT_LISTEN: Final = "/ip4/0.0.0.0/tcp/4001"
DEFAULT_API: Final = "127.0.0.1:7410"
KEY_FILE: Final = "key"
CONFIG_FILE: Final = "config.toml"
API_FILE: Final = "api.json"
DB_FILE: Final = "coop.db"
# [limits] keys: the fields of node.net.NetLimits (not imported here: that would load libp2p for every command).
LIMIT_KEYS: Final = {
    "max_connections": int,
    "max_streams": int,
    "connections_per_peer_per_second": float,
    "connection_burst_per_peer": float,
    "max_inbound_streams_per_peer": int,
    "inbound_streams_per_peer_per_second": float,
    "inbound_stream_burst_per_peer": float,
}


class ConfigError(Exception):
    """The config file or a flag holds a value the node cannot use. The user's to fix; the message says how."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    data_dir: Path
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True
    relays: tuple[str, ...] = ()  # relays to stay reachable through (circuit relay v2)
    relay_service: bool = False  # relay circuits for others
    net_limits: tuple[tuple[str, float], ...] = ()  # [limits] overrides of node.net.NetLimits' defaults
    api_host: str = "127.0.0.1"
    api_port: int = 7410
    provide: bool = True
    max_jobs: int = 2
    allow_unsandboxed: bool = False
    price_sheet: PriceSheet = field(default_factory=lambda: PriceSheet(per_cpu_second=10, per_gib_second=2))
    ad_refresh_seconds: float = 60.0
    ad_ttl_seconds: float = 120.0
    clock_skew_seconds: float = 30.0
    bootstrap_retry_max_seconds: float = 60.0
    routing_refresh_seconds: float = 300.0
    verify_below: float = 0.7
    replicas: int = 2
    sync_interval_seconds: float = 30.0
    max_active_jobs: int = 16  # [jobs]: see node/market/queue.py
    max_unfinished_jobs: int = 10_000
    busy_patience_seconds: float = 600.0  # [jobs]: how long a job waits while every fitting provider is busy
    owner: OwnerPolicy = field(default_factory=OwnerPolicy)  # [owner]; max_jobs comes from [provide]
    owner_check_seconds: float = 5.0
    runtimes: tuple[tuple[str, str], ...] = ()  # (name, venv path) from [runtimes]; see node.runtimes
    config_file: Path | None = None


CONFIG_TEMPLATE: Final = """\
# Coop node configuration. Every value below is the default; edit and restart the node.
# Command-line flags (node start --help) override what is written here.

[network]
# libp2p multiaddrs to listen on. Port 0 picks a free port.
listen = ["{listen}"]
# Peers to join the network through, as full multiaddrs ending in /p2p/<peer id>.
# A node with no bootstrap peers is a valid one-node network that others can join.
bootstrap = []
# Longest wait between retries of an unreachable bootstrap peer (seconds; the wait doubles up to this).
bootstrap_retry_max_seconds = 60
# How often to refresh the Kademlia routing table (seconds).
routing_refresh_seconds = 300
# Find other Coop nodes on the local network by mDNS (same as not passing --no-mdns). Off by itself when every
# listen address is loopback. Announcements are unauthenticated: a found peer is dialled (Noise proves its id)
# only at a private or link-local address, and at most 32 of them.
mdns = true
# Relays to stay reachable through when others cannot dial this node directly (behind NAT), as full multiaddrs
# ending in /p2p/<peer id>; they must run with relay_service. docs/nat.md.
relays = []
# Relay circuits for nodes that cannot be dialled directly (same as --relay-service). Costs bandwidth.
relay_service = false

[limits]
# What one peer, and all peers together, may hold of this node (node/net/limits.py: libp2p's resource manager,
# and per-peer stream limits). A connection or stream over a limit is refused at once; other peers are served.
max_connections = 512
max_streams = 8192
# New connections from one peer id: a token bucket refilled at this rate, holding up to the burst.
connections_per_peer_per_second = 2
connection_burst_per_peer = 20
# Streams one peer may hold open to us at once, and open per second (token bucket with a burst).
max_inbound_streams_per_peer = 64
inbound_streams_per_peer_per_second = 100
inbound_stream_burst_per_peer = 400

[api]
# The local HTTP API (and later the dashboard). Keep it on 127.0.0.1: it is protected by the token in api.json.
listen = "{api}"

[provide]
# Offer this machine's capacity to the network. false = only use others' (same as --no-provide).
enabled = true
# Jobs run at once for other peers (each in its own sandbox).
max_jobs = 2
# Re-publish the signed capacity ad this often, and let each ad expire after ad_ttl_seconds (Petals: 60/120).
ad_refresh_seconds = 60
ad_ttl_seconds = 120
# Clock disagreement tolerated on signed expiry times (seconds).
clock_skew_seconds = 30

[trust]
# Results of providers this node trusts less than verify_below (0..1; every new provider starts at 0.5) are
# checked by running the job on `replicas` providers and comparing output digests; a provider outvoted by the
# others gets a bad-result record. replicas = 1 turns verification off. The cost of replicas is yours.
verify_below = 0.7
replicas = 2
# How often to pull reputation records that gossip missed from a few connected peers (seconds).
sync_interval_seconds = 30

[jobs]
# Jobs this node submits: at most max_unfinished wait or run at once (more are refused with HTTP 429), and
# only max_active of them look for providers or run at a time; the rest wait in the queue, in order.
max_active = 16
max_unfinished = 10000
# A job whose every fitting provider is busy waits (state "queued") and asks again; after this many seconds of
# nothing but "busy" it fails, saying so.
busy_patience_seconds = 600

[pricing]
# Prices in milli-credits (1 credit = 1000). The cost of a job is
#   start_fee + CPU-seconds * per_cpu_second + GiB-seconds of memory * per_gib_second + GPU-seconds * per_gpu_second
start_fee = 0
per_cpu_second = 10
per_gib_second = 2
per_gpu_second = 0

[owner]
# When and how much of this machine is shared (docs/owner.md). Change it live with `node policy`,
# `node pause [--drain]` and `node resume`; those last until the node restarts.
# mode: "always", "idle-only" (only while your own CPU use, not counting Coop jobs, stays below
# idle_cpu_percent for idle_seconds; stops once it stays above for reclaim_seconds), or "schedule" (only
# inside `windows`, local time, e.g. ["mon-fri 18:00-08:00", "sat,sun 00:00-24:00"]).
mode = "always"
idle_cpu_percent = 25
idle_seconds = 120
reclaim_seconds = 5
windows = []
# When you need the machine back: "suspend" running jobs (frozen; resumed when sharing again, handed back
# to their clients after max_suspend_seconds) or "preempt" them (stopped now; their clients retry elsewhere).
on_reclaim = "suspend"
max_suspend_seconds = 600
# Caps on what is offered (0 = the whole machine): CPU cores, memory and work-dir disk (e.g. "8GiB"), and which
# GPUs by index ("all" or a list such as [0, 1]). Jobs at once is [provide] max_jobs.
cpus = 0
memory = 0
disk = 0
gpus = "all"
# A GPU you are using (utilisation above gpu_busy_percent, or memory above gpu_busy_memory, by anything but
# Coop jobs) is not offered.
gpu_busy_percent = 10
gpu_busy_memory = "512MiB"
# How often to measure and apply the policy (seconds).
check_seconds = 5

[runtimes]
# Python environments offered to function jobs, as NAME = "/path/to/venv" (bound read-only into the sandbox;
# the venv needs cloudpickle). The runtime `python` (this node's own Python) is always offered.
# Add one with `node runtime add NAME --venv PATH`; build one with `node runtime build NAME -r requirements.txt`.
"""


def default_data_dir(environ: dict[str, str] | None = None) -> Path:
    """``$COOP_HOME``, else ``$XDG_DATA_HOME/coop``, else ``~/.local/share/coop``."""
    env = os.environ if environ is None else environ
    if env.get("COOP_HOME"):
        return Path(env["COOP_HOME"]).expanduser()
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "coop"


def ensure_data_dir(data_dir: Path) -> None:
    # 0711: others may traverse (the unprivileged uid that runs jobs must reach DATA_DIR/work) but not list;
    # the secrets in it (key, api.json, coop.db) are 0600 themselves.
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    if not os.access(data_dir, os.W_OK):
        raise ConfigError(f"data dir {data_dir} is not writable")


def load_identity_from(data_dir: Path) -> tuple[Identity, bool]:
    try:
        return load_or_create_identity(data_dir / KEY_FILE)
    except OSError as exc:
        raise ConfigError(f"cannot read or create the key file {data_dir / KEY_FILE}: {exc.strerror}") from exc
    except LocalProtocolError as exc:
        raise ConfigError(str(exc)) from exc


def write_default_config(path: Path) -> None:
    path.write_text(CONFIG_TEMPLATE.format(listen=DEFAULT_LISTEN, api=DEFAULT_API))


def parse_host_port(text: str, *, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT such as 127.0.0.1:7410, got {text!r}")
    return host.strip("[]"), int(port)


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}.{key}: expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {_kind_name(kind)}, got {type(value).__name__} {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return {"str": "a string", "int": "an integer", "bool": "true or false", "list": "a list"}.get(
        kind.__name__, kind.__name__
    )


def _positive(value: float, where: str) -> float:
    if value <= 0:
        raise ConfigError(f"{where}: must be positive, got {value}")
    return float(value)


def _fraction(value: float, where: str) -> float:
    if not 0 <= value <= 1:
        raise ConfigError(f"{where}: must be between 0 and 1, got {value}")
    return float(value)


OWNER_KEYS: Final = frozenset({
    "mode", "cpus", "memory", "disk", "gpus", "windows", "idle_cpu_percent", "idle_seconds", "reclaim_seconds",
    "on_reclaim", "max_suspend_seconds", "gpu_busy_percent", "gpu_busy_memory", "check_seconds",
})  # fmt: skip


def _owner(table: dict[str, Any], base: NodeConfig, path: Path, *, max_jobs: int) -> OwnerPolicy:
    from node.client import parse_size
    from protocol.owner import OwnerPolicyError, policy_with

    sizes = {"memory": "memory_bytes", "disk": "disk_bytes", "gpu_busy_memory": "gpu_busy_memory_bytes"}
    changes: dict[str, object] = {"max_jobs": max_jobs}
    for key, value in table.items():
        if key in sizes:
            try:
                changes[sizes[key]] = parse_size(value) if isinstance(value, str) else value
            except ValueError as exc:
                raise ConfigError(f"{path}: owner.{key}: {exc}") from None
        elif key == "gpus":
            changes["gpus"] = None if value == "all" else value
        elif key != "check_seconds":
            changes[key] = value
    try:
        return policy_with(base.owner, changes)
    except OwnerPolicyError as exc:
        raise ConfigError(f"{path}: [owner] {exc}") from None


def load_config_file(path: Path, base: NodeConfig) -> NodeConfig:
    """Read ``path`` over ``base``.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or holds an unknown key or a wrongly typed value.
    """
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    try:
        return _apply(raw, base, path)
    except ConfigError as exc:
        if str(path) in str(exc):
            raise
        raise ConfigError(f"{path}: {exc}") from None


def _apply(raw: dict[str, Any], base: NodeConfig, path: Path) -> NodeConfig:
    known = {
        "network": {
            "listen",
            "bootstrap",
            "bootstrap_retry_max_seconds",
            "routing_refresh_seconds",
            "mdns",
            "relays",
            "relay_service",
        },
        "api": {"listen"},
        "provide": {"enabled", "max_jobs", "ad_refresh_seconds", "ad_ttl_seconds", "clock_skew_seconds"},
        "pricing": {"start_fee", "per_cpu_second", "per_gib_second", "per_gpu_second"},
        "trust": {"verify_below", "replicas", "sync_interval_seconds"},
        "limits": set(LIMIT_KEYS),
        "jobs": {"max_active", "max_unfinished", "busy_patience_seconds"},
        "owner": OWNER_KEYS,
    }
    for section, table in raw.items():
        if section == "runtimes" and isinstance(table, dict):
            continue  # names are the user's: checked in _runtimes
        if section not in known or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(sorted(known))})")
        unknown = set(table) - known[section]
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} in [{section}]")
    net = raw.get("network", {})
    api = raw.get("api", {})
    prov = raw.get("provide", {})
    price = raw.get("pricing", {})
    trust = raw.get("trust", {})
    number = (int, float)
    listen = _get(net, "listen", list, "network", list(base.listen))
    bootstrap = _get(net, "bootstrap", list, "network", list(base.bootstrap))
    relays = _get(net, "relays", list, "network", list(base.relays))
    for name, values in (("network.listen", listen), ("network.bootstrap", bootstrap), ("network.relays", relays)):
        if not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{path}: {name} must be a list of multiaddr strings")
    api_host, api_port = base.api_host, base.api_port
    if "listen" in api:
        api_host, api_port = parse_host_port(_get(api, "listen", str, "api", ""), what=f"{path}: api.listen")
    try:
        sheet = PriceSheet(
            start_fee=_get(price, "start_fee", int, "pricing", base.price_sheet.start_fee),
            per_cpu_second=_get(price, "per_cpu_second", int, "pricing", base.price_sheet.per_cpu_second),
            per_gib_second=_get(price, "per_gib_second", int, "pricing", base.price_sheet.per_gib_second),
            per_gpu_second=_get(price, "per_gpu_second", int, "pricing", base.price_sheet.per_gpu_second),
        )
    except LocalProtocolError as exc:
        raise ConfigError(f"{path}: [pricing] {exc}") from exc
    return replace(
        base,
        listen=tuple(listen),
        bootstrap=tuple(bootstrap),
        mdns=_get(net, "mdns", bool, "network", base.mdns),
        relays=tuple(relays),
        relay_service=_get(net, "relay_service", bool, "network", base.relay_service),
        net_limits=_net_limits(raw.get("limits", {}), base.net_limits),
        api_host=api_host,
        api_port=api_port,
        provide=_get(prov, "enabled", bool, "provide", base.provide),
        max_jobs=max(1, _get(prov, "max_jobs", int, "provide", base.max_jobs)),
        price_sheet=sheet,
        ad_refresh_seconds=_positive(
            _get(prov, "ad_refresh_seconds", number, "provide", base.ad_refresh_seconds), "provide.ad_refresh_seconds"
        ),
        ad_ttl_seconds=_positive(
            _get(prov, "ad_ttl_seconds", number, "provide", base.ad_ttl_seconds), "provide.ad_ttl_seconds"
        ),
        clock_skew_seconds=float(_get(prov, "clock_skew_seconds", number, "provide", base.clock_skew_seconds)),
        bootstrap_retry_max_seconds=_positive(
            _get(net, "bootstrap_retry_max_seconds", number, "network", base.bootstrap_retry_max_seconds),
            "network.bootstrap_retry_max_seconds",
        ),
        routing_refresh_seconds=_positive(
            _get(net, "routing_refresh_seconds", number, "network", base.routing_refresh_seconds),
            "network.routing_refresh_seconds",
        ),
        verify_below=_fraction(_get(trust, "verify_below", number, "trust", base.verify_below), "trust.verify_below"),
        replicas=_get(trust, "replicas", int, "trust", base.replicas),
        sync_interval_seconds=_positive(
            _get(trust, "sync_interval_seconds", number, "trust", base.sync_interval_seconds),
            "trust.sync_interval_seconds",
        ),
        runtimes=_runtimes(raw.get("runtimes", {}), path),
        owner=_owner(
            raw.get("owner", {}), base, path, max_jobs=max(1, _get(prov, "max_jobs", int, "provide", base.max_jobs))
        ),
        owner_check_seconds=_positive(
            _get(raw.get("owner", {}), "check_seconds", number, "owner", base.owner_check_seconds),
            "owner.check_seconds",
        ),
        max_active_jobs=_at_least_one(raw.get("jobs", {}), "max_active", base.max_active_jobs),
        max_unfinished_jobs=_at_least_one(raw.get("jobs", {}), "max_unfinished", base.max_unfinished_jobs),
        busy_patience_seconds=_positive(
            _get(raw.get("jobs", {}), "busy_patience_seconds", number, "jobs", base.busy_patience_seconds),
            "jobs.busy_patience_seconds",
        ),
        config_file=path,
    )


def _at_least_one(table: dict[str, Any], key: str, default: int) -> int:
    value: int = _get(table, key, int, "jobs", default)
    if value < 1:
        raise ConfigError(f"jobs.{key}: must be at least 1, got {value}")
    return value


def _net_limits(table: dict[str, Any], base: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
    out = dict(base)
    for key, kind in LIMIT_KEYS.items():
        if key in table:
            value = _get(table, key, int if kind is int else (int, float), "limits", None)
            out[key] = _positive(value, f"limits.{key}") if kind is float else int(_positive(value, f"limits.{key}"))
    return tuple(out.items())


def _runtimes(table: dict[str, Any], path: Path) -> tuple[tuple[str, str], ...]:
    from protocol.messages import MAX_RUNTIMES, runtime_name_ok

    out = []
    for name, venv in table.items():
        if not runtime_name_ok(name):
            raise ConfigError(f"{path}: [runtimes] {name!r}: names are 1-32 of a-z, 0-9, '.', '_', '-'")
        if not isinstance(venv, str) or not venv.startswith("/"):
            raise ConfigError(f"{path}: [runtimes] {name}: expected an absolute venv path, got {venv!r}")
        out.append((name, venv))
    if len(out) >= MAX_RUNTIMES:
        raise ConfigError(f"{path}: [runtimes]: at most {MAX_RUNTIMES - 1} (the default `python` is the other)")
    return tuple(out)
