"""Data stage: read a node's local text file, validate it, partition, tokenise, batch.

Everything that parses CSV/TSV/JSONL lives here. Errors name the file and the line or column
so an operator can fix their data without reading a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from fedllm.errors import DataError

Task = Literal["seq-cls", "causal-lm"]


MISSING_GROUP = "(missing)"


@dataclass(frozen=True)
class TextTable:
    """Raw rows read from one file: texts, raw label strings (None for causal-lm) and the
    1-based line number of each row in the file (for error messages)."""

    path: str
    texts: list[str]
    raw_labels: list[str] | None
    lines: list[int]
    # Each row's user/customer id when a user column was read (per-user contribution bounds).
    user_ids: list[str] | None = None
    # Sensitive-attribute value per row when a group column was asked for *and* the file has
    # it; None otherwise (the caller reports group metrics as unavailable, never as 0).
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def _rows(path: Path) -> tuple[list[str] | None, list[tuple[int, dict[str, Any]]]]:
    """(header or None for JSONL, [(line_no, row dict)])."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object per line")
                rows.append((i, obj))
        return None, rows
    if suffix not in (".tsv", ".csv", ".txt"):
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)")
    with path.open(encoding="utf-8", newline="") as f:
        if suffix == ".csv":
            reader = csv.reader(f, delimiter=",", quoting=csv.QUOTE_MINIMAL)
        else:  # TSV as GLUE ships it: no quoting at all
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: file is empty (expected a header line)") from None
        header = [h.strip() for h in header]
        table_rows: list[tuple[int, dict[str, Any]]] = []
        for row in reader:
            line_no = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{line_no}: expected {len(header)} fields, found {len(row)}"
                )
            table_rows.append((line_no, dict(zip(header, row, strict=True))))
    return header, table_rows


def read_table(
    path: str | Path,
    *,
    text_column: str,
    label_column: str | None,
    max_examples: int = 0,
    user_column: str | None = None,
    group_column: str | None = None,
) -> TextTable:
    """Read a CSV/TSV/JSONL file; ``label_column=None`` for causal-lm (text only);
    ``user_column`` names the column of user/customer ids (optional).

    ``group_column`` is optional by design: a file without it yields ``groups=None`` (some
    organisations do not record the attribute); an empty cell is the group ``MISSING_GROUP``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        header, rows = _rows(p)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    needed = [text_column] + ([label_column] if label_column else []) \
        + ([user_column] if user_column else [])
    if header is not None:
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(
                f"{p}: missing column(s) {', '.join(map(repr, missing))}; "
                f"columns present: {', '.join(header)}"
            )
    texts: list[str] = []
    labels: list[str] | None = [] if label_column else None
    lines: list[int] = []
    users: list[str] | None = [] if user_column else None
    for line, row in rows:
        if max_examples and len(texts) >= max_examples:
            break
        for c in needed:
            if c not in row:
                raise DataError(f"{p}:{line}: missing column {c!r}")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{p}:{line}: empty text in column {text_column!r}")
        texts.append(text.strip())
        if labels is not None and label_column:
            raw = row[label_column]
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                raise DataError(f"{p}:{line}: empty label in column {label_column!r}")
            labels.append(str(raw).strip())
        if users is not None and user_column:
            uid = row[user_column]
            if uid is None or not str(uid).strip():
                raise DataError(f"{p}:{line}: empty user id in column {user_column!r}")
            users.append(str(uid).strip())
        lines.append(line)
    if not texts:
        raise DataError(f"{p}: no examples (only a header or blank lines)")
    groups: list[str] | None = None
    if group_column and (header is None or group_column in header):
        # Every row before the max_examples cut was kept (bad rows raise), in read order;
        # JSONL rows may lack the key (-> missing group).
        kept = [row for _, row in rows[: len(lines)]]
        groups = [str(row.get(group_column) or "").strip() or MISSING_GROUP for row in kept]
        if header is None and all(g == MISSING_GROUP for g in groups):
            groups = None  # a JSONL file that never has the key: column absent
    return TextTable(str(p), texts, labels, lines, users, groups)


def infer_label_names(table: TextTable) -> tuple[str, ...]:
    """Sorted distinct labels (numerically when all are integers)."""
    if table.raw_labels is None:
        raise DataError(f"{table.path}: no label column read")
    distinct = set(table.raw_labels)
    if all(s.lstrip("-").isdigit() for s in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def encode_labels(table: TextTable, label_names: Sequence[str], column: str) -> np.ndarray:
    """Map raw label strings to ids; unknown labels are an error naming file:line."""
    if table.raw_labels is None:
        raise DataError(f"{table.path}: no label column read")
    index = {name: i for i, name in enumerate(label_names)}
    ids = np.empty(len(table), dtype=np.int64)
    for i, raw in enumerate(table.raw_labels):
        if raw not in index:
            raise DataError(
                f"{table.path}:{table.lines[i]}: unknown label {raw!r} in column {column!r} "
                f"(known labels: {', '.join(label_names)})"
            )
        ids[i] = index[raw]
    return ids


def fingerprint(table: TextTable, labels: np.ndarray | None = None) -> str:
    """Stable content hash of a node's data (its ledger is kept per dataset)."""
    h = hashlib.sha256()
    for t in table.texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    if labels is not None:
        h.update(labels.tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Partitioning (simulation: one shared file split across virtual organisations)


def partition_indices(
    n: int,
    num_nodes: int,
    *,
    scheme: Literal["iid", "dirichlet"],
    seed: int,
    labels: np.ndarray | None = None,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Split ``range(n)`` into ``num_nodes`` disjoint index arrays.

    ``iid``: a seeded shuffle cut into equal parts. ``dirichlet``: for each label, node shares
    drawn from Dir(alpha) (the standard label-skew benchmark of FL papers).
    """
    if num_nodes > n:
        raise DataError(f"cannot split {n} examples across {num_nodes} nodes")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        perm = rng.permutation(n)
        return [np.sort(part) for part in np.array_split(perm, num_nodes)]
    if labels is None:
        raise DataError("dirichlet partitioning needs labels")
    parts: list[list[int]] = [[] for _ in range(num_nodes)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(num_nodes, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for node, chunk in enumerate(np.split(idx, cuts)):
            parts[node].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def subset(table: TextTable, idx: np.ndarray) -> TextTable:
    return TextTable(
        table.path,
        [table.texts[i] for i in idx],
        None if table.raw_labels is None else [table.raw_labels[i] for i in idx],
        [table.lines[i] for i in idx],
        None if table.user_ids is None else [table.user_ids[i] for i in idx],
        None if table.groups is None else [table.groups[i] for i in idx],
    )


def cap_per_user(user_ids: Sequence[str], texts: Sequence[str], *, max_per_user: int,
                 secret: bytes) -> np.ndarray:
    """Indices (sorted) of the rows kept when each user contributes at most ``max_per_user``.

    Which rows of a user are kept is a pseudo-random subsample fixed by the node's ``secret``:
    each row gets the priority HMAC(secret, user, text) and a user's ``max_per_user`` rows of
    lowest priority are kept. Deterministic (the same rows every round and run, so the data
    and its ledger stay the same), unpredictable to anyone without the secret, and one user's
    rows never influence which rows of another user are kept (so adding or removing a user
    changes at most ``max_per_user`` trained examples: the group size of the user-level bound).
    """
    if max_per_user < 1:
        raise ValueError(f"max_per_user must be ≥ 1, got {max_per_user}")
    if len(user_ids) != len(texts):
        raise ValueError("user_ids and texts differ in length")
    by_user: dict[str, list[tuple[bytes, int]]] = {}
    seen: dict[tuple[str, str], int] = {}
    for i, (u, t) in enumerate(zip(user_ids, texts, strict=True)):
        # Duplicates of one user's row are told apart by their occurrence number (not the
        # global row index, which other users' rows would shift).
        n = seen[(u, t)] = seen.get((u, t), -1) + 1
        prio = hmac.new(secret, f"{u}\0{t}\0{n}".encode(), hashlib.sha256).digest()
        by_user.setdefault(u, []).append((prio, i))
    keep = [i for rows in by_user.values() for _, i in sorted(rows)[:max_per_user]]
    return np.asarray(sorted(keep), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Tokenised dataset and dynamic-padding collate


class TokenizedDataset(Dataset[dict[str, torch.Tensor]]):
    """Pre-tokenised examples, unpadded; padding happens per batch in :func:`collate`."""

    def __init__(self, input_ids: list[list[int]], labels: np.ndarray | None) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": torch.tensor(self.input_ids[i], dtype=torch.long)}
        if self.labels is not None:
            item["labels"] = torch.tensor(self.labels[i], dtype=torch.long)
        return item

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))


def tokenize(
    tokenizer: Any, texts: Sequence[str], labels: np.ndarray | None, *, max_length: int
) -> TokenizedDataset:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return TokenizedDataset(enc["input_ids"], labels)


@dataclass(frozen=True)
class Collator:
    """Pads a list of examples to the longest one in the batch (dynamic padding).

    Output: ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, optional ``labels`` (B,).
    """

    pad_token_id: int

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(int(x["input_ids"].shape[0]) for x in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for i, x in enumerate(items):
            n = int(x["input_ids"].shape[0])
            ids[i, :n] = x["input_ids"]
            mask[i, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "labels" in items[0]:
            out["labels"] = torch.stack([x["labels"] for x in items])
        return out


def check_trainable_size(n: int, batch_size: int, *, where: str) -> None:
    """DP-SGD samples each example with probability q = batch_size / n: needs n >= batch."""
    if n < batch_size:
        raise DataError(
            f"{where}: {n} examples, fewer than train.batch_size={batch_size}; "
            "lower the batch size or give this node more data"
        )
