"""Aggregation: validate node updates and FedAvg them over the adapter tensors only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


class UpdateRejected(ValueError):
    """A node's update failed validation; the message says why."""


def validate_update(update: Arrays, reference: Arrays, *, max_norm: float | None = None) -> float:
    """Check names, shapes, dtype and finiteness against the global adapter.

    Returns the update's L2 norm (of the difference to ``reference``). Raises
    :class:`UpdateRejected` naming the first problem found.
    """
    if set(update) != set(reference):
        missing = sorted(set(reference) - set(update))[:3]
        extra = sorted(set(update) - set(reference))[:3]
        raise UpdateRejected(f"tensor names differ: missing {missing}, unexpected {extra}")
    sq = 0.0
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            raise UpdateRejected(f"{name}: shape {arr.shape}, expected {ref.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise UpdateRejected(f"{name}: dtype {arr.dtype}, expected floating point")
        if not np.isfinite(arr).all():
            raise UpdateRejected(f"{name}: contains NaN or Inf")
        sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = float(np.sqrt(sq))
    if max_norm is not None and norm > max_norm:
        raise UpdateRejected(f"update L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return norm


def fedavg(updates: Sequence[tuple[Arrays, float]]) -> dict[str, np.ndarray]:
    """Weighted average ``sum_i w_i x_i / sum_i w_i`` per tensor (weights = examples).

    Accumulates in float64 and returns float32, the wire dtype.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    names = list(updates[0][0])
    out: dict[str, np.ndarray] = {}
    for name in names:
        acc = np.zeros(updates[0][0][name].shape, dtype=np.float64)
        for arrays, w in updates:
            acc += arrays[name].astype(np.float64) * (w / total)
        out[name] = acc.astype(np.float32)
    return out
