import stat

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from protocol.errors import InvalidKey, LocalProtocolError
from protocol.identity import (
    Identity,
    load_identity,
    load_or_create_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    save_identity,
    verify_signature,
)


def test_peer_id_is_the_one_libp2p_derives():
    for _ in range(5):
        identity = Identity.generate()
        key_pair = create_new_key_pair(identity.seed())
        assert ID.from_pubkey(key_pair.public_key).to_base58() == identity.peer_id
        assert public_key_from_peer_id(identity.peer_id) == identity.public_key


def test_sign_and_verify():
    identity = Identity.generate()
    signature = identity.sign(b"hello")
    assert verify_signature(identity.public_key, signature, b"hello")
    assert not verify_signature(identity.public_key, signature, b"hellO")
    assert not verify_signature(Identity.generate().public_key, signature, b"hello")
    assert not verify_signature(identity.public_key, signature[:-1], b"hello")


@pytest.mark.parametrize("text", ["", "not-base58-0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "1" * 200])
def test_bad_peer_ids_raise_invalid_key(text):
    with pytest.raises(InvalidKey):
        public_key_from_peer_id(text)


def test_public_key_length_checked():
    with pytest.raises(InvalidKey):
        peer_id_from_public_key(b"x" * 31)


def test_key_file_is_private_and_stable(tmp_path):
    path = tmp_path / "key"
    identity, created = load_or_create_identity(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create_identity(path)
    assert not created_again
    assert again.peer_id == identity.peer_id


def test_key_file_with_loose_permissions_is_refused(tmp_path):
    path = tmp_path / "key"
    save_identity(Identity.generate(), path)
    path.chmod(0o644)
    with pytest.raises(LocalProtocolError, match="chmod 600"):
        load_identity(path)


def test_key_file_of_wrong_size_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(LocalProtocolError, match="expected 32"):
        load_identity(path)
