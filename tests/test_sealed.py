"""Sealed node state: AES-GCM files under a 0600 operator key; tamper, deletion, rollback."""

import stat

import pytest

from fedllm.sealed import (
    MANIFEST,
    SealedDir,
    SealedError,
    create_key_file,
    load_key,
    seal,
    unseal,
)


def test_key_file_is_private_and_never_overwritten(tmp_path):
    key = create_key_file(tmp_path / "k" / "node.key")
    assert len(key) == 32
    assert stat.S_IMODE((tmp_path / "k" / "node.key").stat().st_mode) == 0o600
    assert load_key(tmp_path / "k" / "node.key") == key
    with pytest.raises(SealedError, match="already exists"):
        create_key_file(tmp_path / "k" / "node.key")
    (tmp_path / "k" / "node.key").chmod(0o644)
    with pytest.raises(SealedError, match="chmod 600"):
        load_key(tmp_path / "k" / "node.key")
    with pytest.raises(SealedError, match="not found"):
        load_key(tmp_path / "missing.key")


def test_seal_binds_purpose_and_key():
    key, other = b"k" * 32, b"o" * 32
    blob = seal(key, b"secret ledger", purpose="ledger-a.sealed")
    assert b"secret ledger" not in blob
    assert unseal(key, blob, purpose="ledger-a.sealed") == b"secret ledger"
    with pytest.raises(SealedError, match="integrity"):
        unseal(key, blob, purpose="ledger-b.sealed")  # a file swapped for another
    with pytest.raises(SealedError, match="integrity"):
        unseal(other, blob, purpose="ledger-a.sealed")


def test_flipped_byte_deleted_file_and_rollback_are_detected(tmp_path):
    box = SealedDir.initialise(tmp_path, create_key_file(tmp_path / "node.key"))
    assert box.read("ledger-x.sealed") is None  # never written
    box.write("ledger-x.sealed", b"v1")
    old = (tmp_path / "ledger-x.sealed").read_bytes()
    box.write("ledger-x.sealed", b"v2")
    assert box.read("ledger-x.sealed") == b"v2"
    # rollback: the older, validly sealed copy restored
    (tmp_path / "ledger-x.sealed").write_bytes(old)
    with pytest.raises(SealedError, match="not the latest version"):
        box.read("ledger-x.sealed")
    # one flipped byte
    box.write("ledger-x.sealed", b"v3")
    raw = bytearray((tmp_path / "ledger-x.sealed").read_bytes())
    raw[-5] ^= 0x01
    (tmp_path / "ledger-x.sealed").write_bytes(bytes(raw))
    with pytest.raises(SealedError, match="not the latest version"):
        box.read("ledger-x.sealed")
    # deleted
    (tmp_path / "ledger-x.sealed").unlink()
    with pytest.raises(SealedError, match="was deleted"):
        box.read("ledger-x.sealed")
    # a file this node never wrote
    (tmp_path / "ledger-y.sealed").write_bytes(old)
    with pytest.raises(SealedError, match="not recorded"):
        box.read("ledger-y.sealed")


def test_manifest_deleted_or_tampered_is_refused(tmp_path):
    key = create_key_file(tmp_path / "node.key")
    SealedDir.initialise(tmp_path, key).write("a.sealed", b"x")
    raw = bytearray((tmp_path / MANIFEST).read_bytes())
    raw[-1] ^= 0x80
    (tmp_path / MANIFEST).write_bytes(bytes(raw))
    with pytest.raises(SealedError, match="integrity"):
        SealedDir(tmp_path, key).read("a.sealed")
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(SealedError, match="manifest .* is missing"):
        SealedDir(tmp_path, key)
    # simulation's auto key: a deleted key with sealed state left is an error, not a new key
    (tmp_path / MANIFEST).write_bytes(bytes(raw))
    (tmp_path / "node.key").unlink()
    with pytest.raises(SealedError, match="was deleted"):
        SealedDir.open_or_create(tmp_path, tmp_path / "node.key")


def test_open_or_create_makes_a_private_key_once(tmp_path):
    box = SealedDir.open_or_create(tmp_path / "s", tmp_path / "s" / "node.key")
    box.write("f.sealed", b"data")
    again = SealedDir.open_or_create(tmp_path / "s", tmp_path / "s" / "node.key")
    assert again.read("f.sealed") == b"data"
    assert stat.S_IMODE((tmp_path / "s" / "node.key").stat().st_mode) == 0o600
