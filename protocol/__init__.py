"""Coop's protocol core: pure, sans-IO, no trio, no sockets, no clock, no logging.

Modules:
    errors       typed errors: LocalProtocolError (our bug) vs RemoteProtocolError (the peer's fault)
    identity     Ed25519 identities, libp2p peer ids, the key file
    codec        canonical msgpack frames with per-type size caps and strict schema decoding
    messages     every market message as a frozen, validated dataclass
    envelope     signed envelopes (domain tag, expiry, nonce), replay cache, message hashes
    cosign       two-party signatures on Agreements and Receipts
    pricing      price sheets, costs, worst-case estimates (integer milli-credits)
    negotiation  client and provider negotiation state machines
    records      DHT record keys and validation of signed capacity ads
    reputation   signed records bound to receipts, gossip bundles, pull sync messages, rater rate limits
    market       provider quoting (admission, load-aware prices), offer ranking, failure explanations
    framing      length-prefixed frames over a byte stream, reassembled from any split
"""
