"""Shared pieces of the libp2p adapter: limits, typed errors, counters."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, final

import trio
from libp2p.io.exceptions import IOException
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamError

from protocol.errors import OversizedFrame

logger = logging.getLogger("node.net")

COOP_DHT_NAMESPACE: Final = "coop"
MAX_DHT_KEY_BYTES: Final = 50  # FIND_NODE ignores longer targets that are not multihashes (trap 3)
MIN_DHT_KEY_BYTES: Final = 2  # ... and shorter ones
FRAME_HEADER: Final = struct.Struct(">I")  # 4-byte big-endian body length
MAX_FRAME_BYTES: Final = (1 << 32) - 1  # what the header can express
DEFAULT_READ_BYTES: Final = 64 * 1024  # 64 KiB
PROVIDER_QUERY_TIMEOUT_S: Final = 5.0
PROVIDER_ADDR_TTL_S: Final = 600  # how long a provider's advertised addresses stay dialable
DHT_INBOUND_HANDLERS: Final = 64  # inbound DHT streams served at once; past it they are reset (py-libp2p: 12)
_RESET_TIMEOUT_S: Final = 1.0  # bound on the shielded reset after a failed or cancelled handler
_CLOSE_TIMEOUT_S: Final = 2.0  # bound on closing every connection at shutdown
MAX_GOSSIP_BYTES: Final = 64 * 1024  # 64 KiB per published message (libp2p silently drops RPCs over 1 MiB)
GOSSIP_INBOX_LEN: Final = 256  # messages buffered per topic for a slow consumer; beyond it the oldest are dropped
GOSSIP_PEER_QUEUE_LEN: Final = 128  # outbound RPCs queued per peer (libp2p: 32); bounds memory to ~8 MiB per peer
_GOSSIP_HEARTBEAT_S: Final = 1
_GOSSIP_DEGREE: Final = 6  # D: mesh peers per topic
_GOSSIP_DEGREE_LOW: Final = 5
_GOSSIP_DEGREE_HIGH: Final = 12
_GOSSIP_RATE_PER_S: Final = 200.0  # messages per second per topic per forwarder before the router stops forwarding
_GOSSIP_PRUNE_BACKOFF_S: Final = 10

# Errors py-libp2p raises on stream I/O when the peer or the connection goes away or misbehaves.
_STREAM_ERRORS: Final = (IOException, MuxedStreamError, MuxedConnError)

Validate = Callable[[str, bytes], None]
Select = Callable[[str, list[bytes]], int]
TopicValidator = Callable[[str, bytes], bool]  # (source peer id, data) -> accept?


class NetError(Exception):
    """Base of the errors this module raises."""


class DialError(NetError):
    """A peer could not be reached: no route, refused, failed handshake or wrong identity. Not our bug."""


class InvalidAddress(NetError, ValueError):
    """A multiaddr or peer id string could not be parsed (bad input, from a caller or a peer)."""


class ListenError(NetError):
    """The host could not listen on a requested address (in use, not ours, unsupported)."""


class StreamOpenError(NetError):
    """We reached the peer but it did not accept a stream for the protocol (or the connection broke)."""


class StreamClosed(NetError, trio.BrokenResourceError):
    """The stream ended under us: the peer closed or reset it, or the connection dropped."""


class FrameTooLarge(NetError, OversizedFrame):
    """A peer announced a frame over the receiver's cap. The peer's fault; the stream has been reset."""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class NetStatistics:
    """A snapshot of a :class:`NetHost`'s counters."""

    connected_peers: int
    routing_table_size: int
    dials_failed: int
    streams_opened: int
    streams_accepted: int
    streams_dropped: int  # inbound streams whose handler raised NetError/RemoteProtocolError
    frames_too_large: int
    dht_records_rejected: int  # records dht_get refused on re-validation
    refused: dict[str, int]  # inbound streams dropped, by error code (oversized, malformed, bad-signature...)
    gossip_received: int  # messages from others that passed validation
    gossip_rejected: int  # messages our validator refused (or raised on), ours included
    gossip_dropped: int  # accepted messages dropped, oldest first, because a topic's consumer fell behind
    gossip_published: int
    streams_limited: int  # inbound streams reset because their peer was over a per-peer stream limit
    connections_refused: int  # connections libp2p's resource manager refused (limits, rate)


@dataclass(slots=True)
class _Counters:
    dials_failed: int = 0
    streams_opened: int = 0
    streams_accepted: int = 0
    streams_dropped: int = 0
    frames_too_large: int = 0
    dht_records_rejected: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    gossip_received: int = 0
    gossip_rejected: int = 0
    gossip_dropped: int = 0
    gossip_published: int = 0
    streams_limited: int = 0
