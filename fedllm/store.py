"""Run store: SQLite, the only module that writes SQL.

Written as a run progresses (one transaction per round), so a crash loses at most the round in
flight. Readers (CLI, dashboard) may open it read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedllm.audit import AuditEntry, next_entry

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'finished', 'failed', 'interrupted')),
    created_at REAL NOT NULL,
    finished_at REAL,
    mode TEXT NOT NULL,                  -- 'simulation' | 'deployment'
    task TEXT NOT NULL,
    model_path TEXT NOT NULL,
    model_bytes INTEGER,                 -- every parameter of the full model
    adapter_bytes INTEGER,               -- trainable adapter (what travels)
    num_rounds INTEGER NOT NULL,
    num_nodes INTEGER NOT NULL,
    dp_enabled INTEGER NOT NULL,
    target_epsilon REAL,
    delta REAL,
    accountant TEXT,
    secure_transport INTEGER NOT NULL DEFAULT 1,   -- TLS on every link (deployment)
    secure_aggregation INTEGER NOT NULL DEFAULT 0, -- coordinator sees only masked updates
    label_names TEXT,                    -- JSON list
    config_json TEXT NOT NULL,
    adapter_path TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,              -- 0 = the initial global model, before training
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    num_nodes INTEGER NOT NULL,          -- nodes whose update was aggregated
    metrics_json TEXT NOT NULL,          -- global held-out metrics after the round
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS node_rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    status TEXT NOT NULL,                -- 'ok' | 'refused' | 'failed' | 'rejected'
    reason TEXT,
    num_examples INTEGER,
    steps INTEGER,
    noise_multiplier REAL,
    sample_rate REAL,
    epsilon REAL,                        -- cumulative ε of the node after this round
    delta REAL,
    accountant TEXT,
    epsilon_limit REAL,
    update_bytes INTEGER,
    train_loss REAL,
    seconds REAL,
    PRIMARY KEY (run_id, round, node_id)
);
CREATE TABLE IF NOT EXISTS audit_log (   -- hash chain per run, see fedllm/audit.py
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    payload_hash TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS checkpoints (  -- global adapter after the last completed round
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    adapter_npz BLOB NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS privacy_ledger (
    -- A copy of each node's own ledger as it reported it (the node's file is the authority),
    -- and the coordinator's node-level (central DP) ledger under node_id '*central*'.
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,                  -- 'example' (DP-SGD at the node) | 'node' (central DP)
    entry_run_id TEXT NOT NULL,          -- the run that spent it (earlier runs on the same data)
    entry_round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    epsilon REAL NOT NULL,               -- cumulative ε after this entry
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    PRIMARY KEY (run_id, node_id, seq)
);
CREATE TABLE IF NOT EXISTS dp_audits (    -- canary audits (`fedllm audit-dp`)
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    config_json TEXT NOT NULL,
    results_json TEXT NOT NULL           -- list of fedllm.dpaudit.AuditResult dicts
);
-- Node-side PII redaction (issue 9): replacements per entity type; counts only, never values.
CREATE TABLE IF NOT EXISTS node_redactions (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    entity TEXT NOT NULL,                -- 'email' | 'phone' | 'url' | 'ip' | ... | 'person'
    count INTEGER NOT NULL,
    PRIMARY KEY (run_id, round, node_id, entity)
);
-- Evaluation detail per round and source (issue 4). round = the global model version evaluated
-- (nodes evaluate the model they receive, so node rows of round r arrive with round r + 1).
CREATE TABLE IF NOT EXISTS evaluations (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    source TEXT NOT NULL,                -- 'coordinator' | 'federated' (sum of nodes) | 'node'
    node_id TEXT NOT NULL DEFAULT '',    -- the node for source 'node', else ''
    num_examples INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,          -- every utility metric (null = not computable)
    counts_json TEXT,                    -- the aggregate counts the metrics came from
    samples_json TEXT,                   -- causal-lm: [{prompt, text}] generated samples
    PRIMARY KEY (run_id, round, source, node_id)
);
CREATE TABLE IF NOT EXISTS bias_metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    source TEXT NOT NULL,                -- 'federated' | 'coordinator' | 'nodes' | 'probe'
    metric TEXT NOT NULL,
    grp TEXT NOT NULL DEFAULT '',        -- group / node / probe category of per-group rows
    value REAL,                          -- NULL = unavailable (see note)
    threshold REAL,
    flagged INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    PRIMARY KEY (run_id, round, source, metric, grp)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    level TEXT NOT NULL,                 -- 'info' | 'warning' | 'error'
    message TEXT NOT NULL
);
"""

# (table, column, declaration) of columns added after schema version 1 shipped.
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("runs", "secure_aggregation", "INTEGER NOT NULL DEFAULT 0"),
    # issue 9: user-level (ε, δ) of the node (group-privacy bound of its per-user cap; NULL =
    # unknown), the cap, and the number of distinct users in its data
    ("node_rounds", "user_epsilon", "REAL"),
    ("node_rounds", "user_delta", "REAL"),
    ("node_rounds", "max_examples_per_user", "INTEGER"),
    ("node_rounds", "num_users", "INTEGER"),
    # train.center_features: what the coordinator did with the nodes' DP feature means (JSON:
    # used, nodes, examples, norms, reason; "vector" = the centre itself when used)
    ("runs", "feature_center_json", "TEXT"),
)

CENTRAL_LEDGER_ID = "*central*"  # node_id of the coordinator's node-level DP ledger

NODE_FIELDS = ("status", "reason", "num_examples", "steps", "noise_multiplier", "sample_rate",
               "epsilon", "delta", "accountant", "epsilon_limit", "update_bytes", "train_loss",
               "seconds", "user_epsilon", "user_delta", "max_examples_per_user", "num_users")


class StoreError(RuntimeError):
    pass


def fedllm_home(home: str | os.PathLike[str] | None = None) -> Path:
    """``home`` if given, else ``$FEDLLM_HOME``, else ``~/.fedllm``."""
    if home is not None:
        return Path(home).expanduser()
    return Path(os.environ.get("FEDLLM_HOME") or Path.home() / ".fedllm").expanduser()


def default_db_path(home: str | os.PathLike[str] | None = None) -> Path:
    return fedllm_home(home) / "fedllm.db"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class Store:
    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if read_only:
            if not self.path.exists():
                raise StoreError(f"run store not found: {self.path}")
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30,
                                         check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
            self._add_missing_columns()
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                               (str(SCHEMA_VERSION),))
            self._conn.commit()
        self._conn.row_factory = sqlite3.Row

    def _add_missing_columns(self) -> None:
        """Stores created by an older fedllm lack columns added since: add them (with their
        declared defaults) so old runs stay readable. Tables are created by _SCHEMA."""
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise StoreError("store opened read-only")
        with self._conn:  # commits, or rolls back on exception
            yield self._conn

    # -- writes --------------------------------------------------------------------------------

    def create_run(self, run_id: str, *, name: str, mode: str, task: str, model_path: str,
                   num_rounds: int, num_nodes: int, dp_enabled: bool,
                   target_epsilon: float | None, delta: float | None, accountant: str | None,
                   secure_transport: bool, secure_aggregation: bool = False,
                   config: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO runs (run_id, name, state, created_at, mode, task, model_path,"
                " num_rounds, num_nodes, dp_enabled, target_epsilon, delta, accountant,"
                " secure_transport, secure_aggregation, config_json)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, name, "running", time.time(), mode, task, model_path, num_rounds,
                 num_nodes, int(dp_enabled), target_epsilon, delta, accountant,
                 int(secure_transport), int(secure_aggregation),
                 json.dumps(config, sort_keys=True)),
            )

    def update_run(self, run_id: str, **fields: Any) -> None:
        allowed = {"model_bytes", "adapter_bytes", "label_names", "adapter_path", "state",
                   "error", "finished_at", "feature_center"}
        bad = set(fields) - allowed
        if bad:
            raise StoreError(f"cannot update run fields {sorted(bad)}")
        if "label_names" in fields:
            fields["label_names"] = json.dumps(list(fields["label_names"]))
        if "feature_center" in fields:
            fields["feature_center_json"] = json.dumps(fields.pop("feature_center"),
                                                       sort_keys=True)
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as c:
            cur = c.execute(f"UPDATE runs SET {cols} WHERE run_id = ?", (*fields.values(), run_id))
            if cur.rowcount != 1:
                raise StoreError(f"unknown run {run_id}")

    def finish_run(self, run_id: str, state: str, error: str | None = None) -> None:
        self.update_run(run_id, state=state, error=error, finished_at=time.time())

    def record_round(self, run_id: str, rnd: int, *, started_at: float, num_nodes: int,
                     metrics: dict[str, float | None], nodes: list[dict[str, Any]],
                     audit: Sequence[tuple[str, str, dict[str, Any]]] = (),
                     checkpoint: bytes | None = None) -> None:
        """One transaction: the round's global metrics, every node's result, the round's audit
        entries ``(actor, event, payload)`` and the new global adapter (``checkpoint``, .npz)."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?)",
                      (run_id, rnd, started_at, time.time(), num_nodes,
                       json.dumps(metrics, sort_keys=True)))
            for n in nodes:
                c.execute(
                    f"INSERT OR REPLACE INTO node_rounds (run_id, round, node_id, "
                    f"{', '.join(NODE_FIELDS)}) VALUES (?,?,?,{','.join('?' * len(NODE_FIELDS))})",
                    (run_id, rnd, n["node_id"], *(n.get(f) for f in NODE_FIELDS)),
                )
                for entity, count in (n.get("redactions") or {}).items():
                    c.execute("INSERT OR REPLACE INTO node_redactions VALUES (?,?,?,?,?)",
                              (run_id, rnd, n["node_id"], entity, int(count)))
            for actor, event, payload in audit:
                self._append_audit(c, run_id, actor, event, payload)
            if checkpoint is not None:
                c.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)",
                          (run_id, rnd, checkpoint, hashlib.sha256(checkpoint).hexdigest()))

    def record_ledger(self, run_id: str, node_id: str, *, kind: str, delta: float,
                      accountant: str, entries: list[dict[str, Any]]) -> None:
        """Replace the stored copy of one ledger with ``entries`` (dicts with run_id, round,
        noise_multiplier, sample_rate, steps, epsilon_after), as its owner reported it."""
        with self._tx() as c:
            c.execute("DELETE FROM privacy_ledger WHERE run_id = ? AND node_id = ?",
                      (run_id, node_id))
            for i, e in enumerate(entries, 1):
                c.execute("INSERT INTO privacy_ledger VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                          (run_id, node_id, i, kind, str(e["run_id"]), int(e["round"]),
                           float(e["noise_multiplier"]), float(e["sample_rate"]),
                           int(e["steps"]), float(e["epsilon_after"]), float(delta),
                           accountant))

    def record_dp_audit(self, *, config: dict[str, Any], results: list[dict[str, Any]]) -> int:
        with self._tx() as c:
            cur = c.execute("INSERT INTO dp_audits (time, config_json, results_json)"
                            " VALUES (?,?,?)", (time.time(), json.dumps(config, sort_keys=True),
                                                json.dumps(results)))
            return int(cur.lastrowid or 0)

    def dp_audits(self) -> list[dict[str, Any]]:
        return [{"id": r["id"], "time": r["time"], "config": json.loads(r["config_json"]),
                 "results": json.loads(r["results_json"])}
                for r in self._conn.execute("SELECT * FROM dp_audits ORDER BY id DESC")]

    def append_audit(self, run_id: str, *, actor: str, event: str,
                     payload: dict[str, Any]) -> AuditEntry:
        with self._tx() as c:
            return self._append_audit(c, run_id, actor, event, payload)

    def _append_audit(self, c: sqlite3.Connection, run_id: str, actor: str, event: str,
                      payload: dict[str, Any]) -> AuditEntry:
        row = c.execute("SELECT * FROM audit_log WHERE run_id = ? ORDER BY seq DESC LIMIT 1",
                        (run_id,)).fetchone()
        prev = _audit_entry(row) if row is not None else None
        e = next_entry(prev, actor=actor, event=event, payload=payload, time=time.time())
        c.execute("INSERT INTO audit_log VALUES (?,?,?,?,?,?,?,?,?)",
                  (run_id, e.seq, e.time, e.actor, e.event, e.payload_json, e.payload_hash,
                   e.prev_hash, e.hash))
        return e

    def record_evaluations(self, run_id: str, rnd: int, *, evaluations: list[dict[str, Any]],
                           bias: list[dict[str, Any]]) -> None:
        """One transaction: evaluation rows (source, node_id, num_examples, metrics, counts,
        samples) and bias metric rows (source, metric, group, value, threshold, flagged, note)
        of the global model of round ``rnd``."""
        with self._tx() as c:
            for e in evaluations:
                c.execute(
                    "INSERT OR REPLACE INTO evaluations VALUES (?,?,?,?,?,?,?,?)",
                    (run_id, rnd, e["source"], e.get("node_id") or "", int(e["num_examples"]),
                     json.dumps(e["metrics"], sort_keys=True),
                     json.dumps(e["counts"]) if e.get("counts") is not None else None,
                     json.dumps(e["samples"]) if e.get("samples") else None))
            for b in bias:
                c.execute(
                    "INSERT OR REPLACE INTO bias_metrics VALUES (?,?,?,?,?,?,?,?,?)",
                    (run_id, rnd, b["source"], b["metric"], b.get("group") or "", b.get("value"),
                     b.get("threshold"), int(bool(b.get("flagged"))), b.get("note") or None))

    def get_evaluations(self, run_id: str) -> list[dict[str, Any]]:
        run_id = self.resolve_run_id(run_id)
        if not self._has_table("evaluations"):  # a store written before issue 4, read-only
            return []
        out = []
        for r in self._conn.execute(
                "SELECT * FROM evaluations WHERE run_id = ? ORDER BY round, source, node_id",
                (run_id,)):
            out.append({"round": r["round"], "source": r["source"],
                        "node_id": r["node_id"] or None, "num_examples": r["num_examples"],
                        "metrics": json.loads(r["metrics_json"]),
                        "counts": json.loads(r["counts_json"]) if r["counts_json"] else None,
                        "samples": json.loads(r["samples_json"]) if r["samples_json"] else []})
        return out

    def get_bias(self, run_id: str) -> list[dict[str, Any]]:
        run_id = self.resolve_run_id(run_id)
        if not self._has_table("bias_metrics"):
            return []
        return [{"round": r["round"], "source": r["source"], "metric": r["metric"],
                 "group": r["grp"] or None, "value": r["value"], "threshold": r["threshold"],
                 "flagged": bool(r["flagged"]), "note": r["note"] or ""}
                for r in self._conn.execute(
                    "SELECT * FROM bias_metrics WHERE run_id = ? ORDER BY round, source, metric,"
                    " grp", (run_id,))]

    def _has_table(self, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                  (name,)).fetchone() is not None

    def add_event(self, run_id: str, level: str, message: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO events (run_id, time, level, message) VALUES (?,?,?,?)",
                      (run_id, time.time(), level, message))

    # -- reads ---------------------------------------------------------------------------------

    def resolve_run_id(self, run_id: str) -> str:
        if run_id == "latest":
            row = self._conn.execute(
                "SELECT run_id FROM runs ORDER BY created_at DESC, rowid DESC LIMIT 1").fetchone()
            if row is None:
                raise StoreError(f"no runs in {self.path}")
            return str(row["run_id"])
        row = self._conn.execute("SELECT run_id FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"unknown run {run_id!r} in {self.path}")
        return run_id

    def audit_entries(self, run_id: str) -> list[AuditEntry]:
        run_id = self.resolve_run_id(run_id)
        return [_audit_entry(r) for r in self._conn.execute(
            "SELECT * FROM audit_log WHERE run_id = ? ORDER BY seq", (run_id,))]

    def checkpoint(self, run_id: str) -> tuple[int, bytes, str] | None:
        """(round, adapter .npz bytes, sha256) of the last completed round, if any."""
        row = self._conn.execute("SELECT * FROM checkpoints WHERE run_id = ?",
                                 (run_id,)).fetchone()
        if row is None:
            return None
        return int(row["round"]), bytes(row["adapter_npz"]), str(row["sha256"])

    def feature_center_vector(self, run_id: str) -> list[float] | None:
        """The run's feature centre (train.center_features), if it used one."""
        row = self._conn.execute("SELECT feature_center_json FROM runs WHERE run_id = ?",
                                 (self.resolve_run_id(run_id),)).fetchone()
        if row is None or not row[0]:
            return None
        vector = json.loads(row[0]).get("vector")
        return None if vector is None else [float(x) for x in vector]

    def ledger(self, run_id: str) -> list[dict[str, Any]]:
        """Every stored ledger entry of a run, per node in order (central DP under
        CENTRAL_LEDGER_ID)."""
        run_id = self.resolve_run_id(run_id)
        return [dict(r) for r in self._conn.execute(
            "SELECT node_id, seq, kind, entry_run_id, entry_round, noise_multiplier, sample_rate,"
            " steps, epsilon, delta, accountant FROM privacy_ledger WHERE run_id = ?"
            " ORDER BY node_id, seq", (run_id,))]

    def list_runs(self) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            """SELECT r.*,
                 (SELECT MAX(round) FROM rounds WHERE run_id = r.run_id) AS last_round,
                 (SELECT metrics_json FROM rounds WHERE run_id = r.run_id
                    ORDER BY round DESC LIMIT 1) AS last_metrics,
                 (SELECT MAX(epsilon) FROM node_rounds WHERE run_id = r.run_id) AS max_epsilon
               FROM runs r ORDER BY created_at DESC, rowid DESC""").fetchall()
        out = []
        for row in rows:
            d = self._run_dict(row)
            d["last_round"] = row["last_round"]
            d["final_metrics"] = json.loads(row["last_metrics"]) if row["last_metrics"] else {}
            d["max_epsilon"] = row["max_epsilon"]
            out.append(d)
        return out

    def _run_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        d = {k: row[k] for k in row.keys()  # noqa: SIM118
             if k not in ("config_json", "label_names", "feature_center_json")}
        # The centring decision without the vector itself (feature_center_vector() has it).
        fc = json.loads(row["feature_center_json"]) \
            if "feature_center_json" in row.keys() and row["feature_center_json"] else None  # noqa: SIM118
        d["feature_center"] = None if fc is None else {k: v for k, v in fc.items()
                                                       if k != "vector"}
        d["dp_enabled"] = bool(d["dp_enabled"])
        d["secure_transport"] = bool(d["secure_transport"])
        d["secure_aggregation"] = bool(d["secure_aggregation"])
        d["label_names"] = json.loads(row["label_names"]) if row["label_names"] else None
        return d

    def _redactions(self, run_id: str) -> dict[tuple[int, str], dict[str, int]]:
        """(round, node) -> {entity: count} of the node-side PII redaction."""
        try:
            rows = self._conn.execute(
                "SELECT round, node_id, entity, count FROM node_redactions WHERE run_id = ?"
                " ORDER BY entity", (run_id,)).fetchall()
        except sqlite3.OperationalError:  # read-only store from before the table existed
            return {}
        out: dict[tuple[int, str], dict[str, int]] = {}
        for r in rows:
            out.setdefault((r["round"], r["node_id"]), {})[r["entity"]] = r["count"]
        return out

    def get_run(self, run_id: str) -> dict[str, Any]:
        """Everything known about a run: the shape of ``fedllm status --json``."""
        run_id = self.resolve_run_id(run_id)
        row = self._conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        run = self._run_dict(row)
        run["config"] = json.loads(row["config_json"])
        node_rows = self._conn.execute(
            "SELECT * FROM node_rounds WHERE run_id = ? ORDER BY round, node_id", (run_id,)
        ).fetchall()
        redactions = self._redactions(run_id)
        by_round: dict[int, list[dict[str, Any]]] = {}
        for nr in node_rows:
            have = nr.keys()  # a read-only store written by an older fedllm lacks new columns
            by_round.setdefault(nr["round"], []).append(
                {"node_id": nr["node_id"], **{f: nr[f] if f in have else None
                                              for f in NODE_FIELDS},
                 "redactions": redactions.get((nr["round"], nr["node_id"]))})
        rounds = []
        for rr in self._conn.execute(
                "SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,)).fetchall():
            rounds.append({
                "round": rr["round"],
                "started_at": rr["started_at"],
                "finished_at": rr["finished_at"],
                "num_nodes": rr["num_nodes"],
                "metrics": json.loads(rr["metrics_json"]),
                "nodes": by_round.get(rr["round"], []),
            })
        run["rounds"] = rounds
        run["events"] = [dict(e) for e in self._conn.execute(
            "SELECT time, level, message FROM events WHERE run_id = ? ORDER BY id", (run_id,))]
        return run


def _audit_entry(row: sqlite3.Row | tuple[Any, ...]) -> AuditEntry:
    # Columns: run_id, seq, time, actor, event, payload_json, payload_hash, prev_hash, hash.
    _, seq, t, actor, event, payload_json, payload_hash, prev_hash, h = tuple(row)
    return AuditEntry(int(seq), float(t), str(actor), str(event), str(payload_json),
                      str(payload_hash), str(prev_hash), str(h))
