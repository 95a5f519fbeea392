"""Staying reachable through relays (``[network] relays``) and saying how this node can be reached.

Theory of operation: one :meth:`RelayKeeper.keep` task per configured relay connects to it, reserves a slot
(``NetHost.reserve_relay``: circuit relay v2, ``node/net/relay.py``) and joins the DHT through it as through a
bootstrap peer; our relayed address then appears in ``NetHost.addrs()`` and so in the next capacity ad, where
clients learn it (``NetHost.learn_circuits``) and fall back to it when a direct dial fails. When the relay drops,
the task reserves again, backing off up to ``bootstrap_retry_max_seconds``. The library refreshes a live
reservation itself.

Reachability in ``node status``: "private via relay" while a reservation is held; otherwise "unknown". AutoNAT
(which would tell "public" from "private") is not wired yet: docs/nat.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from node import net

RELAY_CHECK_S: Final = 5.0


@dataclass
class RelayState:
    address: str
    state: str = "connecting"  # connecting, reserved, unreachable, invalid
    peer_id: str = ""
    circuit: str = ""
    attempts: int = 0
    last_error: str = ""


class RelayKeeper:
    def __init__(
        self, host: net.NetHost, relays: tuple[str, ...], *, retry_max_s: float, say: Callable[[str], None]
    ) -> None:
        self.host = host
        self.states = [RelayState(a) for a in relays]
        self.retry_max_s = retry_max_s
        self.say = say

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            for state in self.states:
                nursery.start_soon(self.keep, state)

    async def keep(self, state: RelayState) -> None:
        delay = 1.0
        while True:
            if state.state != "reserved" or state.peer_id not in self.host.connected_peers():
                state.attempts += 1
                try:
                    state.circuit = await self.host.reserve_relay(state.address)
                    state.peer_id = state.circuit.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[-1]
                    await self.host.bootstrap([state.address])
                except net.InvalidAddress as exc:
                    state.state, state.last_error = "invalid", str(exc)
                    self.say(f"relay address {state.address} is not usable: {exc}")
                    return
                except net.NetError as exc:
                    state.state, state.last_error = "unreachable", str(exc)
                    self.say(f"no reservation at relay {state.address}, retrying in {delay:.0f}s: {exc}")
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                state.state, state.last_error, delay = "reserved", "", 1.0
                self.say(f"reachable through relay {state.peer_id}: {state.circuit}")
            await trio.sleep(RELAY_CHECK_S)

    def status(self, *, relay_service: bool) -> dict[str, Any]:
        """The reachability part of ``node status``."""
        reserved = [s for s in self.states if s.state == "reserved"]
        return {
            "reachability": "private via relay" if reserved else "unknown",
            "relay_service": relay_service,
            "relays": [
                {
                    "address": s.address,
                    "state": s.state,
                    "circuit": s.circuit,
                    "attempts": s.attempts,
                    "last_error": s.last_error,
                }
                for s in self.states
            ],
        }
