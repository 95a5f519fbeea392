"""Typed errors of the protocol layer.

The split follows h11: :class:`LocalProtocolError` means *we* misused the protocol (a bug on this side, never
the peer's fault); :class:`RemoteProtocolError` means the bytes or message came from a peer that broke the rules,
and should be counted against that peer. Each subclass is one distinct outcome, so callers and tests can tell
"tampered" from "expired" from "replayed" without parsing messages.

Every remote error has a short machine-readable ``code``; that code (never the local detail) is what a node may
send back to a peer.
"""

from __future__ import annotations

from typing import ClassVar


class ProtocolError(Exception):
    """Base of every error raised by :mod:`protocol`."""

    code: ClassVar[str] = "protocol-error"


class LocalProtocolError(ProtocolError):
    """We tried to build or send something the protocol forbids. Our bug, not the peer's."""

    code = "local-error"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids. Count it against the peer."""

    code = "remote-error"


class OversizedFrame(RemoteProtocolError):
    """A frame is larger than the hard cap for its message type."""

    code = "oversized"


class MalformedMessage(RemoteProtocolError):
    """Bytes that are not valid msgpack, or a message with missing, unknown or wrongly typed fields."""

    code = "malformed"


class UnknownVersion(RemoteProtocolError):
    """The frame names a wire version this node does not speak."""

    code = "unknown-version"


class UnknownMessageType(RemoteProtocolError):
    """The frame names a message type this node does not know, or not the one expected here."""

    code = "unknown-type"


class BadSignature(RemoteProtocolError):
    """A signature does not verify over the signed bytes (tampering or a wrong key)."""

    code = "bad-signature"


class WrongSigner(RemoteProtocolError):
    """The signature is valid but the signer is not the peer the message claims to come from."""

    code = "wrong-signer"


class WrongDomain(RemoteProtocolError):
    """An envelope signed for one message type was presented as another (cross-protocol replay)."""

    code = "wrong-domain"


class Expired(RemoteProtocolError):
    """The message's validity ended (beyond the allowed clock skew)."""

    code = "expired"


class NotYetValid(RemoteProtocolError):
    """The message is dated in the future beyond the allowed clock skew."""

    code = "future-dated"


class Replayed(RemoteProtocolError):
    """The (signer, nonce) pair was seen before, or is too old for the replay window to vouch for it."""

    code = "replayed"


class InvalidKey(RemoteProtocolError):
    """A public key or peer id that cannot be parsed as an Ed25519 identity."""

    code = "invalid-key"
