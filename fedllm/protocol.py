"""What coordinator and nodes say to each other, as plain data (no Flower types).

The Flower adapters in ``server/`` and ``client/`` translate these to and from Flower
Messages; everything else in fedllm works with these dataclasses. Only adapter tensors
(``name -> float32 array``) travel; the frozen base model never does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedllm.config import RunConfig

STATUS_OK = "ok"
STATUS_REFUSED = "refused"  # the node declined (e.g. its privacy budget would be exceeded)

# Numeric fields of a train reply (sent as a Flower MetricRecord).
REPLY_METRICS = ("num_examples", "steps", "noise_multiplier", "sample_rate", "epsilon", "delta",
                 "epsilon_limit", "train_loss", "seconds")


def state_bytes(state: dict[str, np.ndarray]) -> int:
    """Bytes an adapter state takes on the wire (the update size recorded per node)."""
    return int(sum(a.nbytes for a in state.values()))


@dataclass(frozen=True)
class TrainRequest:
    run_id: str
    round: int
    config: RunConfig
    label_names: tuple[str, ...]
    arrays: dict[str, np.ndarray]


@dataclass
class TrainReply:
    node: str  # the node's stable name (e.g. "node-0"), used in the store and ledger
    status: str
    reason: str = ""
    accountant: str = ""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
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
            if v is not None:
                out[k] = int(v) if k in ("num_examples", "steps") else float(v)
        return out
