"""What coordinator and nodes say to each other, as plain data (no Flower types).

The Flower adapters in ``server/`` and ``client/`` translate these to and from Flower
Messages; everything else in fedllm works with these dataclasses. Only adapter tensors
(``name -> float32 array``) travel; the frozen base model never does.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedllm.config import REDACTION_ENTITIES, RunConfig

# What a request asks of a node. "center": before round 1, release DP per-class sums and counts
# of the pooled features (fedllm.train.private_class_stats) as arrays {STATS_KEY: (C, H+1)},
# divided by the node's examples, so FedAvg (or SecAgg's weighted mean) of the replies is the
# global statistic: the feature centre and the class means that initialise the head
# (fedllm.aggregate.estimate_class_stats).
# "count": before the release, only the node's number of training examples (public metadata:
# every reply and SecAgg weight carries it); no data, no ε. The coordinator skips a release the
# counts show cannot help (fedllm.aggregate.class_stats_can_help), so nobody spends ε on it.
PHASE_TRAIN = "train"
PHASE_CENTER = "center"
PHASE_COUNT = "count"
# Versioned: v2 splits the release's sensitivity unevenly (fedllm.aggregate.
# class_stats_weights); a peer still on the even split sends or expects the old key and fails
# loudly instead of misreading the statistics.
STATS_KEY = "class_feature_stats_v2"
CENTER_KEY = "feature_center"  # the centre (H,) sent with every train request (server/messages)

STATUS_OK = "ok"
STATUS_REFUSED = "refused"  # the node declined (e.g. its privacy budget would be exceeded)

# Numeric fields of a train reply (sent as a Flower MetricRecord).
REPLY_METRICS: tuple[str, ...] = (
    "num_examples", "steps", "noise_multiplier", "sample_rate", "epsilon", "delta",
    "epsilon_limit", "train_loss", "seconds",
    "replayed")  # 1 = the node re-sent its stored release of this round
# Node-side data protection (issue 9): user-level (ε, δ) (group-privacy bound of the per-user
# cap), the cap itself, the number of distinct users, and redactions per entity type (counts).
REDACTION_METRICS = tuple(f"redacted_{e}" for e in REDACTION_ENTITIES)
PROTECTION_METRICS = ("user_epsilon", "user_delta", "max_examples_per_user", "num_users",
                      *REDACTION_METRICS)
REPLY_METRICS = REPLY_METRICS + PROTECTION_METRICS


def state_bytes(state: dict[str, np.ndarray]) -> int:
    """Bytes an adapter state takes on the wire (the update size recorded per node)."""
    return int(sum(a.nbytes for a in state.values()))


@dataclass(frozen=True)
class TrainRequest:
    run_id: str
    round: int
    config: RunConfig
    label_names: tuple[str, ...]
    # PHASE_TRAIN: the global adapter. PHASE_CENTER: {STATS_KEY: zeros (C, H+1)}, the shape of the
    # reply (SecAgg masks the reply's difference to it).
    arrays: dict[str, np.ndarray]
    phase: str = PHASE_TRAIN
    # The run's feature centre (H,) the node trains the head around; None = uncentred.
    feature_center: np.ndarray | None = None


@dataclass
class TrainReply:
    node: str  # the node's stable name (e.g. "node-0"), used in the store and ledger
    status: str
    reason: str = ""
    accountant: str = ""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # The node's whole ledger for its dataset (LedgerEntry dicts), so the run store keeps a
    # copy; the node's own file remains the authority.
    ledger: list[dict[str, Any]] = field(default_factory=list)
    # The node's evaluation of the adapter it *received* on its held-out split: aggregate
    # counts only (fedllm.evaluate.EvalCounts.to_dict()), never predictions or texts.
    # None = the node has no held-out split (eval_note says why).
    eval_counts: dict[str, Any] | None = None
    eval_note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def record_fields(self) -> dict[str, Any]:
        """The node's row for the run store (``node_rounds``)."""
        update_bytes = state_bytes(self.arrays) if self.arrays else None
        out: dict[str, Any] = {"node_id": self.node, "status": self.status,
                               "reason": self.reason or None,
                               "accountant": self.accountant or None,
                               "update_bytes": update_bytes}
        for k in REPLY_METRICS:
            v = self.metrics.get(k)
            if v is None or k in REDACTION_METRICS:
                continue
            out[k] = int(v) if k in ("num_examples", "steps", "max_examples_per_user",
                                     "num_users") else float(v)
        redactions = {k.removeprefix("redacted_"): int(self.metrics[k])
                      for k in REDACTION_METRICS if k in self.metrics}
        if redactions:
            out["redactions"] = redactions  # the store keeps these in node_redactions
        return out


def state_digest(state: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes in name order: the adapter's identity in
    the audit log (independent of any file format's timestamps)."""
    h = hashlib.sha256()
    for name in sorted(state):
        a = np.ascontiguousarray(state[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def pack_state(state: dict[str, np.ndarray]) -> bytes:
    """An adapter state as .npz bytes (checkpoints in the run store)."""
    buf = io.BytesIO()
    np.savez(buf, **state)  # type: ignore[arg-type]
    return buf.getvalue()


def unpack_state(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob)) as z:
        return {k: z[k] for k in z.files}
