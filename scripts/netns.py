"""Network namespaces for a local cluster: each node behind its own interface, as if on its own machine.

Theory of operation (iproute2 only; needs root or CAP_NET_ADMIN). A cluster with prefix P gets:

* a *hub* namespace ``P-hub`` holding two bridges: ``data0``, the cluster's network (10.77.0.0/16: node I is
  10.77.I//250.I%250+1), and ``mgmt``, the harness's path to each node's local API;
* per node a namespace ``P-nI`` with ``lo``, ``eth0`` on ``data0`` (its libp2p address) and ``mgmt0`` on ``mgmt``
  (its API address, 10.78.K.I+1, K picked per cluster so that parallel clusters don't clash in the root
  namespace); the hub-side ends are ``dI`` and ``mI``;
* in the root namespace one veth, ``coop`` + P's hash (its peer in the hub is ``root``, on ``mgmt``), with
  10.78.K.254/24, so the harness, ``coop`` commands and ``node.client`` reach every node's API from here.

Nodes listen for libp2p only on their ``eth0`` address, so peer traffic crosses real interfaces and the bridge;
the ``mgmt`` network carries only the harness's API calls (the root namespace does not forward between the two).
:meth:`Netns.partition` cuts ``data0`` into groups by moving the hub-side ends of each group's nodes onto a bridge
of its own (``data1``, ...): packets between groups are silently lost, as when a cable is pulled, and each group
keeps talking inside itself. :meth:`Netns.heal` moves them back. :meth:`Netns.destroy` deletes the namespaces
(which deletes every veth and bridge in them, and the root-side veth with its hub peer).

Everything is named from the prefix, so a crashed run's leftovers are found and removed by the next ``create``
(or :func:`destroy_prefix`) with the same prefix, and two clusters with different prefixes never touch each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

MAX_NODES: Final = 250 * 4  # data addresses 10.77.0.1 .. 10.77.3.250; the mgmt /24 below is the tighter limit
MAX_MGMT_NODES: Final = 250  # 10.78.K.1 .. 10.78.K.250; .254 is the root namespace's end
DATA_PREFIX_LEN: Final = 16
MGMT_PREFIX_LEN: Final = 24
LOCK_FILE: Final = Path("/run/coop-netns.lock")  # serialises picking K between clusters started at once
IP_TIMEOUT_S: Final = 30.0


class NetnsError(Exception):
    """Namespaces could not be created or changed (no CAP_NET_ADMIN, no iproute2, ...). The message says why."""


@dataclass(frozen=True, slots=True)
class NodeNet:
    """Where one node lives: its namespace, its libp2p (``eth0``) address and its API (``mgmt0``) address."""

    namespace: str
    address: str
    api_host: str

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this node's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise NetnsError("the `ip` command (iproute2) is not installed: apt-get install iproute2") from None
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip() or f'exit status {result.returncode}'}")
    return result


def unavailable_reason() -> str | None:
    """Why this process cannot build namespaces (None if it can): tried for real with a throwaway namespace."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"coop-probe-{os.getpid()}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace (needs root or CAP_NET_ADMIN): {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def prefix_for(key: str) -> str:
    """A short per-cluster prefix (``coop-`` + 6 hex digits) derived from ``key``, e.g. the cluster's dir."""
    return "coop-" + hashlib.sha256(key.encode()).hexdigest()[:6]


def namespaces(prefix: str) -> list[str]:
    """The namespaces that exist now whose names start with ``prefix-``."""
    listed = _ip("netns", "list").stdout.splitlines()
    return [line.split()[0] for line in listed if line.split() and line.split()[0].startswith(prefix + "-")]


def destroy_prefix(prefix: str) -> None:
    """Delete every namespace and the root-side veth of the cluster with this prefix (whatever is left of it)."""
    _ip("link", "del", _root_link(prefix), check=False)  # absent after a clean run: its hub peer went with the hub
    for name in namespaces(prefix):
        _ip("netns", "del", name, check=False)
    if namespaces(prefix):
        raise NetnsError(f"could not delete namespaces {namespaces(prefix)}")


def _root_link(prefix: str) -> str:
    return "coop" + prefix.removeprefix("coop-")  # at most 15 characters (IFNAMSIZ)


def _data_address(index: int) -> str:
    return f"10.77.{index // 250}.{index % 250 + 1}"


def _used_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of the root namespace's addresses."""
    lines = _ip("-4", "-o", "addr", "show").stdout.splitlines()
    found = []
    for line in lines:
        parts = line.split()
        if "inet" in parts:
            found.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    return found


@dataclass(frozen=True, slots=True)
class Netns:
    """The namespaces of one cluster of ``size`` nodes. Build with :meth:`create`; rebuild from saved fields."""

    prefix: str
    size: int
    mgmt_subnet: int  # K in 10.78.K.0/24

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    @property
    def root_link(self) -> str:
        return _root_link(self.prefix)

    def node(self, index: int) -> NodeNet:
        if not 0 <= index < self.size:
            raise IndexError(f"node {index} is not in this {self.size}-node network")
        return NodeNet(
            namespace=f"{self.prefix}-n{index}",
            address=_data_address(index),
            api_host=f"10.78.{self.mgmt_subnet}.{index + 1}",
        )

    @classmethod
    def create(cls, prefix: str, size: int) -> Netns:
        """Build the hub, ``size`` node namespaces and the root veth; remove leftovers with this prefix first.

        Raises:
            NetnsError: too many nodes, no free 10.78.K.0/24, or an ``ip`` command failed (the message says which;
                whatever was built is removed again).
        """
        if not 1 <= size <= MAX_MGMT_NODES:
            raise NetnsError(f"--netns supports 1 to {MAX_MGMT_NODES} nodes, not {size}")
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        destroy_prefix(prefix)
        with _lock():
            used = _used_networks()
            start = int(prefix.removeprefix("coop-"), 16) % 250
            free = [
                k for k in (*range(start, 250), *range(start)) if ipaddress.ip_network(f"10.78.{k}.0/24") not in used
            ]
            if not free:
                raise NetnsError("no free 10.78.K.0/24 in the root namespace for the API network")
            net = cls(prefix=prefix, size=size, mgmt_subnet=free[0])
            try:
                net._build()
            except BaseException:
                destroy_prefix(prefix)
                raise
        return net

    def _build(self) -> None:
        hub = self.hub
        _ip("netns", "add", hub)
        _ip("-n", hub, "link", "set", "lo", "up")
        for bridge in ("data0", "mgmt"):
            _ip("-n", hub, "link", "add", bridge, "type", "bridge")
            _ip("-n", hub, "link", "set", bridge, "up")
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "root", "netns", hub)
        _ip("addr", "add", f"10.78.{self.mgmt_subnet}.254/{MGMT_PREFIX_LEN}", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")
        _ip("-n", hub, "link", "set", "dev", "root", "master", "mgmt", "up")
        for i in range(self.size):
            node = self.node(i)
            ns = node.namespace
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            for hub_end, node_end, bridge, addr, plen in (
                (f"d{i}", "eth0", "data0", node.address, DATA_PREFIX_LEN),
                (f"m{i}", "mgmt0", "mgmt", node.api_host, MGMT_PREFIX_LEN),
            ):
                _ip("-n", hub, "link", "add", hub_end, "type", "veth", "peer", "name", node_end, "netns", ns)
                _ip("-n", hub, "link", "set", hub_end, "master", bridge, "up")
                _ip("-n", ns, "addr", "add", f"{addr}/{plen}", "dev", node_end)
                _ip("-n", ns, "link", "set", node_end, "up")

    def partition(self, groups: list[list[int]]) -> None:
        """Cut the data bridge: group 0 stays on ``data0``, group G > 0 moves to a bridge ``dataG`` of its own.

        Nodes in no group stay on ``data0``. The API network is untouched.
        """
        for g, members in enumerate(groups):
            bridge = f"data{g}"
            if g > 0 and _ip("-n", self.hub, "link", "show", bridge, check=False).returncode != 0:
                _ip("-n", self.hub, "link", "add", bridge, "type", "bridge")
                _ip("-n", self.hub, "link", "set", bridge, "up")
            for i in members:
                self.node(i)  # range check
                _ip("-n", self.hub, "link", "set", f"d{i}", "master", bridge)

    def heal(self) -> None:
        """Put every node back on ``data0`` and delete the other data bridges."""
        for i in range(self.size):
            _ip("-n", self.hub, "link", "set", f"d{i}", "master", "data0")
        for line in _ip("-n", self.hub, "-o", "link", "show", "type", "bridge").stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith("data") and name != "data0":
                _ip("-n", self.hub, "link", "del", name)
        for i in range(self.size):  # ARP entries that failed during the cut would delay the first packets
            _ip("-n", self.node(i).namespace, "neigh", "flush", "dev", "eth0", check=False)

    def destroy(self) -> None:
        """Delete everything this network created (also fine if part or all of it is already gone)."""
        destroy_prefix(self.prefix)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    try:
        handle = LOCK_FILE.open("a")
    except OSError:  # no /run to write to: parallel `up`s may then race for the same K; ip will refuse one
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield
