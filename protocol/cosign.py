"""Two-party signatures for Agreements and Receipts.

Both parties sign the same bytes: a per-type prefix plus the canonical frame of the message with both signature
fields emptied. Each side adds its signature with :func:`sign_as`; :func:`verify_both` recovers both public keys
from the peer ids named in the message (Ed25519 peer ids embed the key) and checks both signatures.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal, TypeVar

from protocol import codec
from protocol.errors import BadSignature, LocalProtocolError
from protocol.identity import Identity, public_key_from_peer_id, verify_signature
from protocol.messages import Agreement, Receipt

Cosigned = TypeVar("Cosigned", Agreement, Receipt)
Role = Literal["client", "provider"]


def unsigned(message: Cosigned) -> Cosigned:
    return dataclasses.replace(message, client_signature=b"", provider_signature=b"")


def signing_bytes(message: Agreement | Receipt) -> bytes:
    bare = dataclasses.replace(message, client_signature=b"", provider_signature=b"")
    return f"coop-cosign/{message.TYPE}/v1\x00".encode() + codec.encode(bare)


def terms_hash(message: Agreement | Receipt) -> bytes:
    """Hash of the terms, independent of which signatures are present (what receipts and records point at)."""
    return hashlib.sha256(signing_bytes(message)).digest()


def sign_as(identity: Identity, message: Cosigned, role: Role) -> Cosigned:
    """Add ``identity``'s signature in ``role``; the identity must be the party the message names."""
    if getattr(message, role) != identity.peer_id:
        raise LocalProtocolError(f"this identity is not the {role} of {message.TYPE} {message.job_id}")
    signature = identity.sign(signing_bytes(message))
    if role == "client":
        return dataclasses.replace(message, client_signature=signature)
    return dataclasses.replace(message, provider_signature=signature)


def verify_role(message: Agreement | Receipt, role: Role) -> None:
    """Raise :class:`BadSignature` unless ``role``'s signature is present and valid."""
    public_key = public_key_from_peer_id(getattr(message, role))
    signature: bytes = getattr(message, f"{role}_signature")
    if not verify_signature(public_key, signature, signing_bytes(message)):
        raise BadSignature(f"{message.TYPE} {message.job_id}: {role} signature missing or invalid")


def verify_both(message: Agreement | Receipt) -> None:
    verify_role(message, "client")
    verify_role(message, "provider")
