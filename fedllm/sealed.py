"""Sealed node state: AES-256-GCM encrypted, integrity-protected files under an operator key.

Everything a node keeps on disk between rounds and runs (its privacy ledgers; any cached data
or checkpoint a later stage adds) goes through :class:`SealedDir`:

* **Confidential and authentic**: each file is ``MAGIC | nonce | AES-GCM(key, data, aad)``; the
  associated data binds the file's *name* (its purpose), so a sealed file renamed or swapped
  for another one does not open.
* **Deletion and rollback are detected**: a sealed *manifest* in the same folder records the
  SHA-256 of the latest version of every sealed file. A file the manifest lists that is missing
  ("deleted"), or whose bytes are not the recorded latest version (an older copy restored, a
  flipped byte), does not open. This is what keeps a node from silently restarting its
  privacy ledger at zero spent ε. The manifest itself is created together with the key (by
  ``fedllm node init``, or on the first use of an auto-created simulation key), so a folder that
  has a key but no manifest is an error too.

What it cannot detect: the key, manifest and files all deleted together (in a deployment the
key file is required, so that is a node that refuses to start until re-initialised; the
operator then knowingly starts from nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"FEDLLM-SEALED-1\n"
KEY_MAGIC = b"FEDLLM-NODE-KEY-1\n"
MANIFEST = "manifest.sealed"
_NONCE = 12


class SealedError(RuntimeError):
    """Sealed state is missing, tampered with, rolled back, or the key is wrong/unsafe."""


# -- the operator key ---------------------------------------------------------------------------


def create_key_file(path: Path) -> bytes:
    """Write a new random 256-bit key to ``path`` (mode 0600, never overwriting one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SealedError(f"key file {path} already exists; refusing to overwrite it (the "
                          "node's sealed state can only be opened with that key)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(KEY_MAGIC + key.hex().encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def load_key(path: Path) -> bytes:
    """Read an operator key; refuses a missing, malformed or group/world-readable one."""
    if not path.is_file():
        raise SealedError(f"node key file {path} not found (create it with `fedllm node init`)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SealedError(f"node key file {path} is accessible by others (mode {mode:o}); "
                          f"restrict it: chmod 600 {path}")
    raw = path.read_bytes()
    try:
        if not raw.startswith(KEY_MAGIC):
            raise ValueError("no key header")
        key = bytes.fromhex(raw[len(KEY_MAGIC):].decode().strip())
    except (ValueError, UnicodeDecodeError):
        raise SealedError(f"node key file {path} is not a fedllm node key") from None
    if len(key) != 32:
        raise SealedError(f"node key file {path} holds {len(key)} bytes, expected 32")
    return key


# -- sealing one blob ---------------------------------------------------------------------------


def seal(key: bytes, data: bytes, *, purpose: str) -> bytes:
    """Encrypt and authenticate ``data``; ``purpose`` (e.g. the file name) is bound as AAD."""
    nonce = secrets.token_bytes(_NONCE)  # random 96-bit nonce: fine for far < 2^32 messages
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, data, MAGIC + purpose.encode())


def unseal(key: bytes, blob: bytes, *, purpose: str) -> bytes:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _NONCE + 16:
        raise SealedError(f"{purpose}: not a sealed fedllm file")
    nonce = blob[len(MAGIC):len(MAGIC) + _NONCE]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(MAGIC) + _NONCE:], MAGIC + purpose.encode())
    except InvalidTag:
        raise SealedError(f"{purpose}: integrity check failed (tampered with, or sealed under "
                          "another key or for another purpose)") from None


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# -- a folder of sealed files with a manifest ---------------------------------------------------


class SealedDir:
    """A node's state folder whose files are sealed under one key, tracked by a manifest.

    Each manifest entry is ``name -> [latest digest, pending digest or None]``. A write first
    records the new digest as *pending*, then replaces the file, then makes it the latest: a
    crash at any point leaves a file whose digest the manifest accepts, while an older copy
    restored later is rejected.
    """

    def __init__(self, root: Path, key: bytes) -> None:
        self.root = root
        self._key = key
        if not (root / MANIFEST).exists():
            raise SealedError(
                f"sealed-state manifest {root / MANIFEST} is missing: the node's state was "
                "deleted or never initialised (`fedllm node init`); refusing to continue "
                "rather than start again from an empty privacy ledger")

    @classmethod
    def initialise(cls, root: Path, key: bytes) -> SealedDir:
        """Create the (empty) manifest of a new state folder; an existing one is kept."""
        root.mkdir(parents=True, exist_ok=True)
        if not (root / MANIFEST).exists():
            atomic_write(root / MANIFEST, seal(key, b"{}", purpose=MANIFEST))
        return cls(root, key)

    @classmethod
    def open_or_create(cls, root: Path, key_file: Path) -> SealedDir:
        """Simulation: a per-node key auto-created in the node's own state folder."""
        if not key_file.exists():
            if (root / MANIFEST).exists():
                raise SealedError(f"node key file {key_file} was deleted but {root} holds "
                                  "sealed state; it cannot be opened any more")
            return cls.initialise(root, create_key_file(key_file))
        return cls(root, load_key(key_file))

    def _manifest(self) -> dict[str, list[str | None]]:
        blob = (self.root / MANIFEST).read_bytes()
        data: dict[str, list[str | None]] = json.loads(unseal(self._key, blob, purpose=MANIFEST))
        return data

    def _write_manifest(self, entries: dict[str, list[str | None]]) -> None:
        data = json.dumps(entries, sort_keys=True).encode()
        atomic_write(self.root / MANIFEST, seal(self._key, data, purpose=MANIFEST))

    def names(self) -> list[str]:
        return sorted(self._manifest())

    def read(self, name: str) -> bytes | None:
        """The plaintext of sealed file ``name``; None if it was never written."""
        entries = self._manifest()
        path = self.root / name
        if name not in entries:
            if path.exists():
                raise SealedError(f"{path} is not recorded in the node's sealed-state manifest "
                                  "(not written by this node, or the manifest was replaced)")
            return None
        if not path.exists():
            raise SealedError(f"{path} was deleted (the node's manifest records it)")
        blob = path.read_bytes()
        if _digest(blob) not in entries[name]:
            raise SealedError(f"{path} is not the latest version this node wrote (modified, or "
                              "an older copy restored)")
        return unseal(self._key, blob, purpose=name)

    def write(self, name: str, data: bytes) -> None:
        if "/" in name or name in (MANIFEST, "") or name.startswith("."):
            raise ValueError(f"invalid sealed file name {name!r}")
        blob = seal(self._key, data, purpose=name)
        entries = self._manifest()
        latest = entries.get(name, [None, None])[0]
        entries[name] = [latest, _digest(blob)]
        self._write_manifest(entries)  # 1. announce the new version
        atomic_write(self.root / name, blob)  # 2. replace the file
        entries[name] = [_digest(blob), None]
        self._write_manifest(entries)  # 3. make it the only accepted version


__all__ = ["MANIFEST", "SealedDir", "SealedError", "create_key_file", "load_key", "seal",
           "unseal"]
