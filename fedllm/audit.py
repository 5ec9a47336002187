"""Tamper-evident audit log: an append-only hash chain of what happened in a run.

Each entry commits to its content and to the previous entry::

    payload_hash = SHA-256(canonical JSON of the payload)
    hash         = SHA-256(canonical JSON of {seq, time, actor, event, payload_hash, prev_hash})

so changing any byte of a stored entry (its payload, its fields or its hash) breaks the chain at
that entry, and removing or reordering entries breaks it at the next one. The chain proves
integrity relative to its head: publish ``head`` (the CLI prints it when a run ends, the model
card carries it) to detect a wholesale rewrite by someone with write access to the store.

Pure functions; the run store (``store.py``) persists entries and calls :func:`next_entry`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64  # prev_hash of a run's first entry


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace, finite floats only)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=str)


def sha256_hex(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    seq: int  # 1, 2, ... within a run
    time: float
    actor: str  # "coordinator", a node name, or "operator"
    event: str  # e.g. "run_started", "round_completed", "node_refused"
    payload_json: str  # canonical JSON as stored
    payload_hash: str
    prev_hash: str
    hash: str

    @property
    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.payload_json)
        return out


def _entry_hash(seq: int, time: float, actor: str, event: str, payload_hash: str,
                prev_hash: str) -> str:
    return sha256_hex(canonical_json({"seq": seq, "time": repr(float(time)), "actor": actor,
                                      "event": event, "payload_hash": payload_hash,
                                      "prev_hash": prev_hash}))


def next_entry(prev: AuditEntry | None, *, actor: str, event: str,
               payload: Mapping[str, Any], time: float) -> AuditEntry:
    """The entry that follows ``prev`` (None: the run's first entry)."""
    payload_json = canonical_json(dict(payload))
    p_hash = sha256_hex(payload_json)
    seq = 1 if prev is None else prev.seq + 1
    prev_hash = GENESIS if prev is None else prev.hash
    return AuditEntry(seq, float(time), actor, event, payload_json, p_hash, prev_hash,
                      _entry_hash(seq, time, actor, event, p_hash, prev_hash))


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    entries: int
    head: str  # hash of the last entry that verified
    first_bad_seq: int | None = None
    reason: str | None = None


def verify_chain(entries: Iterable[AuditEntry]) -> ChainCheck:
    """Recompute every hash in order; report the first entry that does not verify."""
    prev_hash, expected_seq, n = GENESIS, 1, 0
    for e in entries:
        problem = None
        if e.seq != expected_seq:
            problem = f"sequence number {e.seq}, expected {expected_seq} (entry missing?)"
        elif e.prev_hash != prev_hash:
            problem = "prev_hash does not match the previous entry's hash"
        elif sha256_hex(e.payload_json) != e.payload_hash:
            problem = "payload does not match its payload_hash (payload altered)"
        elif _entry_hash(e.seq, e.time, e.actor, e.event, e.payload_hash, e.prev_hash) != e.hash:
            problem = "entry fields do not match its hash (entry altered)"
        if problem:
            return ChainCheck(False, n, prev_hash, e.seq, problem)
        prev_hash, expected_seq, n = e.hash, expected_seq + 1, n + 1
    return ChainCheck(True, n, prev_hash)
