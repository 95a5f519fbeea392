"""The libp2p adapter: the only part of the daemon that imports py-libp2p (0.8.1).

Modules:
    host     the host (Noise only, Yamux, one connection per peer), streams with frames, the Kademlia DHT,
             and :func:`open_host` (the rules and the workarounds for libp2p's traps are below)
    gossip   GossipSub tuned for 10-100 nodes, validators at the boundary, bounded inboxes
    common   limits, typed errors, counters
    lookup   :class:`LookupTrace`: a DHT lookup's queries, rounds and hops, which py-libp2p does not expose;
             :func:`keep_routing_table` refreshes a routing table that stays short after the join
    limits   :class:`NetLimits`: libp2p's resource manager configured, and the per-peer stream limits it lacks
    mdns     LAN discovery with libp2p's mDNS module: announcements validated, handed over as :class:`LanPeer`
    relay    circuit relay v2: relayed connections both ways, HOP for ``relay_service``, explicit reservations
    stream   :class:`NetStream` (typed errors) and length-prefixed frames (:func:`send_frame`, :func:`receive_frame`)

Everything the rest of ``node/`` needs is re-exported here: ``from node import net`` then ``net.open_host``.

Theory of operation: :func:`open_host` builds a host from a raw Ed25519 seed, listens, runs a server-mode Kademlia
DHT beside it (and, given ``gossip_topics``, GossipSub) and yields a :class:`NetHost`, through which the rest of
``node/`` dials, opens and serves streams (:class:`NetStream`, with length-prefixed frames), uses the DHT and
publishes/receives gossip. Peer ids cross this boundary as base58 strings and addresses as multiaddr strings; no
libp2p type leaks out.

Rules:
    * Security is Noise only. The default host also accepts plaintext (a peer knowing only a victim's public key
      could pose as the victim: libp2p-facts trap 1), secio and TLS.
    * libp2p errors caused by a peer or the network are caught here, narrowly, and re-raised as the typed errors
      below. A stream handler may raise :class:`NetError` or :class:`~protocol.errors.RemoteProtocolError` to drop a
      misbehaving peer's stream; anything else is a bug and propagates (taking the connection down).
    * DHT records live under ``/coop/``, checked by the caller's ``validate``/``select``; a validator rejects by
      raising :class:`~protocol.errors.ProtocolError` or ``ValueError``. ``strict_validation`` refuses every other
      namespace except libp2p's built-in ``pk``/``ipns``.
    * DHT keys are 2-50 bytes of UTF-8: FIND_NODE ignores longer non-multihash targets, silently confining records
      to direct neighbours (trap 3). Callers hash long names.

Deviations and workarounds:
    * ``KadDHT.get_value`` returns a local copy first, unvalidated (trap 5): :meth:`NetHost.dht_get` re-validates.
      Nothing checks freshness: records must carry their own expiry.
    * ``KadDHT.provide``/``find_providers`` guess whether a key is a CID, hex or text; we always use its UTF-8
      bytes. ``find_providers`` repeats providers (trap 7): we dedupe, and add their addresses to the peerstore
      (libp2p does not) so :meth:`NetHost.open_stream` can reach them. ``find_providers`` also returns only the
      local records whenever there are any, so a provider never saw the others: we merge local records with a
      GET_PROVIDERS query to each of the peers closest to the key (a private helper of ``ProviderStore``).
    * The Kademlia protocol id is fixed at ``/ipfs/kad/1.0.0`` (trap 14): never bootstrap from public IPFS peers.
    * ``KadDHT`` serves at most 12 inbound DHT streams at once and resets every stream past that, unlogged. When
      30 nodes start on two cores, handlers wait for a CPU and ADD_PROVIDERs, PUT_VALUEs and FIND_NODEs are reset
      in bursts. We allow :data:`DHT_INBOUND_HANDLERS` (each handler is a parse, a table lookup and a write; the
      per-peer inbound stream limit still applies, node/net/limits.py).
    * GossipSub's defaults drop or delay messages (trap 10). What we set, for a 10-100 node network:
        - ``heartbeat_interval`` 1 s (default 120 s: mesh repair and IHAVE gossip every two minutes).
        - ``degree``/``degree_low``/``degree_high`` 6/5/12: go-libp2p's defaults (0.8.1 has none).
        - ``max_messages_per_topic_per_second`` 200 (default 10: past it the router silently stops *forwarding*,
          per topic per forwarder, our own publishes included).
        - ``prune_back_off`` 10 s (default 60 s, during which a leaf pruned by a full hub starved).
        - ``adaptive_gossip_enabled`` off: every 30 s it rescales the heartbeat assuming a 120 s base, to 30-60 s
          whenever its health score is under 0.7.
        - No peer scorer (``router.scorer = None``; no constructor option). Default scores are all 0, so it gated
          nothing, but it drove 0.8.1's opportunistic grafting, which re-grafted the peers pruned a heartbeat
          before; they took that for a GRAFT flood and pruned back, and their hub then stopped gossiping to them
          (15-node star, a leaf publishing 20: several leaves got none or half; without it every leaf got all 20
          in 5 runs of 6).
        - Only ``/meshsub/1.1.0``: from 1.2, 0.8.1 sends an IDONTWANT to each mesh peer for *every* message
          (go-libp2p: over 1 KiB only), doubling the RPCs in each outbound queue.
        - Per-peer outbound queues of :data:`GOSSIP_PEER_QUEUE_LEN` RPCs (fixed at 32, dropping the newest: 16 of a
          30-message burst arrived): ``_CoopPubsub`` resizes each one as libp2p stores it.
        - Flood publish (go-libp2p's default; absent in 0.8.1): ``_CoopGossipSub`` sends our own messages to every
          peer in the topic, not just the mesh, which is empty on a node its peers have just pruned.
        - Delivery bypasses libp2p's 32-entry subscription channel (which silently drops the newest) for our own
          bounded inbox per topic, which drops the oldest and counts it. Remote subscriptions are limited to our
          topics (``allowed_topics``).
      Left as they are: gossip window/history (3/5 heartbeats), IHAVE/IWANT limits (10/s per peer; a 1 s heartbeat
      sends about one), eclipse protection (inert without a scorer), peer exchange (off: it would dial whoever a
      PRUNE names), the 1 MiB inbound RPC cap (we publish at most :data:`MAX_GOSSIP_BYTES`). A peer that shrinks
      below ``degree_low`` re-grafts peers it pruned within their back-off (0.8.1 records none for its own
      prunes); they prune back and are not gossiped to for 10 s. Gossip stays best effort: anything that must
      arrive also needs a pull path over a stream.
"""

from node.net.common import (
    DHT_INBOUND_HANDLERS,
    FRAME_HEADER,
    GOSSIP_INBOX_LEN,
    MAX_DHT_KEY_BYTES,
    MAX_GOSSIP_BYTES,
    DialError,
    FrameTooLarge,
    InvalidAddress,
    ListenError,
    NetError,
    NetStatistics,
    StreamClosed,
    StreamOpenError,
    TopicValidator,
    _Counters,
)
from node.net.gossip import _GossipInbox
from node.net.host import NetHost, configure_libp2p_logging, open_host
from node.net.limits import NetLimits
from node.net.lookup import LookupTrace, keep_routing_table
from node.net.mdns import LanDiscovery, LanPeer, MdnsStatistics
from node.net.stream import NetStream, receive_frame, send_frame

__all__ = [
    "DHT_INBOUND_HANDLERS",
    "FRAME_HEADER",
    "GOSSIP_INBOX_LEN",
    "MAX_DHT_KEY_BYTES",
    "MAX_GOSSIP_BYTES",
    "DialError",
    "FrameTooLarge",
    "InvalidAddress",
    "LanDiscovery",
    "LanPeer",
    "ListenError",
    "LookupTrace",
    "MdnsStatistics",
    "NetError",
    "NetHost",
    "NetLimits",
    "NetStatistics",
    "NetStream",
    "StreamClosed",
    "StreamOpenError",
    "TopicValidator",
    "_Counters",
    "_GossipInbox",
    "configure_libp2p_logging",
    "keep_routing_table",
    "open_host",
    "receive_frame",
    "send_frame",
]
