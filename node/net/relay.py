"""Circuit relay v2 (``libp2p.relay.circuit_v2``): reaching a node that cannot be dialled directly, through a relay.

Theory of operation: every host runs the relay *client* roles: STOP (accept a connection a relay brings us; the
connection is then upgraded like any other, so Noise authenticates the far end and rcmgr counts it) and CLIENT
(dial ``<relay addr>/p2p-circuit/p2p/<peer>``). A host opened with ``relay_service`` also runs HOP: it serves
reservations and relays circuits for others, within :data:`RELAY_LIMITS`. A private node reserves a slot at a
relay (:meth:`Relay.reserve`, refreshed by the library's refresher in our nursery) and announces the circuit
address, which :class:`~node.net.NetHost` then lists among its addresses (and so the capacity ad carries it).

Deviations, from probing 0.8.1 (tests/test_relay.py, docs/nat.md):
    * ``RelayDiscovery(auto_reserve=True)`` did not find a connected relay within 10 s (it scans on a timer): we
      reserve explicitly at the relays the user names.
    * The library's default circuit limits (2 min, 128 KiB: the spec's) would cut a job's stream short: a relay
      service here allows :data:`RELAY_LIMITS`, and a user offering relay service accepts that cost.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, final

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

logger = logging.getLogger("node.net")

RELAY_LIMITS: Final = RelayLimits(
    duration=3600,  # seconds one relayed connection may last
    data=256 << 20,  # bytes one relayed connection may carry (256 MiB)
    max_circuit_conns=64,
    max_reservations=64,
)
CIRCUIT: Final = "/p2p-circuit"


def is_circuit(address: str) -> bool:
    """Whether ``address`` is a relayed (``/p2p-circuit/``) multiaddr."""
    return f"{CIRCUIT}/" in address or address.endswith(CIRCUIT)


@final
class Relay:
    """The relay roles of one host. Valid only inside :func:`open_relay`."""

    def __init__(self, host: IHost, transport: CircuitV2Transport, nursery: trio.Nursery, *, hop: bool) -> None:
        self._host = host
        self._transport = transport
        self._nursery = nursery
        self.hop = hop
        self.reserved: dict[str, str] = {}  # relay peer id -> our circuit address through it

    async def reserve(self, relay_peer_id: str, relay_addr: str) -> str:
        """Reserve a slot at a connected relay; return our circuit address through it.

        Raises:
            ConnectionError: the relay refused (no HOP, full) or did not answer.
        """
        rid = ID.from_base58(relay_peer_id)
        stream = await self._host.new_stream(rid, [PROTOCOL_ID])
        if not await self._transport.reserve(stream, rid, self._nursery):
            raise ConnectionError(f"relay {relay_peer_id} refused a reservation")
        base = relay_addr if relay_addr.endswith(f"/p2p/{relay_peer_id}") else f"{relay_addr}/p2p/{relay_peer_id}"
        circuit = f"{base}{CIRCUIT}/p2p/{self._host.get_id().to_base58()}"
        self.reserved[relay_peer_id] = circuit
        return circuit

    async def dial(self, address: str) -> None:
        """Connect through a relay to the peer a ``.../p2p-circuit/p2p/<peer>`` address names (Noise-upgraded)."""
        await self._transport.dial(multiaddr.Multiaddr(address))


@asynccontextmanager
async def open_relay(host: IHost, *, hop: bool) -> AsyncIterator[Relay]:
    """Run the relay client roles on ``host`` (and HOP with ``hop``) until the block ends."""
    roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if hop else RelayRole(0))
    protocol = CircuitV2Protocol(host, limits=RELAY_LIMITS, allow_hop=hop)  # registers the hop/stop handlers
    async with background_trio_service(protocol), trio.open_nursery() as nursery:
        transport = CircuitV2Transport(host, protocol, RelayConfig(roles=roles, limits=RELAY_LIMITS))
        try:
            yield Relay(host, transport, nursery, hop=hop)
        finally:
            nursery.cancel_scope.cancel()  # the reservation refresher
