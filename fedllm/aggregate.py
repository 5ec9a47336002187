"""Aggregation: validate node updates and FedAvg them over the adapter tensors only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


def reject_outliers(norms: Mapping[str, float], *, factor: float) -> dict[str, str]:
    """Median rule: updates farther than ``factor`` × the median distance are outliers.

    ``norms`` maps a node to its update's L2 distance from the global adapter. Needs ≥ 3
    updates to have a meaningful median; returns {node: reason} for the rejected ones.
    """
    if len(norms) < 3:
        return {}
    median = float(np.median(list(norms.values())))
    bound = factor * median
    return {n: f"update L2 norm {v:.4g} exceeds {factor:g} × the round's median {median:.4g}"
            for n, v in norms.items() if median > 0 and v > bound}


def clip_update(update: Arrays, reference: Arrays, *, clip_norm: float
                ) -> tuple[dict[str, np.ndarray], float]:
    """Scale the update's difference to ``reference`` down to L2 norm ≤ ``clip_norm``.

    Node side of central (node-level) DP: bounds one node's influence on the aggregate.
    Returns (reference + clipped difference, the norm before clipping).
    """
    diff = {k: update[k].astype(np.float64) - reference[k].astype(np.float64) for k in reference}
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in diff.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return ({k: (reference[k].astype(np.float64) + d * scale).astype(np.float32)
             for k, d in diff.items()}, norm)


def central_dp_average(updates: Sequence[Arrays], reference: Arrays, *, expected_nodes: float,
                       noise_std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """DP-FedAvg: reference + Σ_i (x_i - reference) / (q·N) + N(0, noise_std²) per coordinate.

    The fixed denominator q·N (not the number of replies) keeps one node's influence bounded by
    clip_norm / (q·N) whoever is sampled, which is what the accountant assumes. With no update
    at all the release is the reference plus noise, and it still counts as a round.
    """
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        ref64 = ref.astype(np.float64)
        acc = np.zeros(ref.shape, dtype=np.float64)
        for u in updates:
            acc += u[name].astype(np.float64) - ref64
        noise = rng.normal(0.0, noise_std, size=ref.shape) if noise_std > 0 else 0.0
        out[name] = (ref64 + acc / expected_nodes + noise).astype(np.float32)
    return out


# A noisy centre is used only when its estimated signal is at least this many times the
# expected norm of its noise: centring on (mean + noise) leaves the head an offset of -noise
# instead of the mean, so a centre dominated by noise would be no better than none and could
# be worse (3 nodes × 64 examples at σ = 20: noise norm ~3.5 against a mean of ~0.4).
MIN_CENTER_SNR = 2.0


@dataclass(frozen=True)
class CenterEstimate:
    """The global feature centre from the nodes' DP feature means, and whether to use it."""

    center: np.ndarray  # (H,) float32: Σ_i n_i m_i / Σ_i n_i
    nodes: int  # nodes whose mean went into it
    examples: int  # Σ_i n_i
    expected_noise_norm: float  # sqrt(E‖noise‖²) = σ C sqrt(H · nodes) / examples
    signal_norm: float  # estimated ‖true mean‖: sqrt(max(‖centre‖² − E‖noise‖², 0))

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.center))

    @property
    def usable(self) -> bool:
        return self.signal_norm >= MIN_CENTER_SNR * self.expected_noise_norm

    def summary(self) -> dict[str, float | int | bool]:
        return {"nodes": self.nodes, "examples": self.examples, "norm": round(self.norm, 6),
                "expected_noise_norm": round(self.expected_noise_norm, 6),
                "signal_norm": round(self.signal_norm, 6), "used": self.usable}


def estimate_center(mean: np.ndarray, *, nodes: int, examples: int, noise_multiplier: float,
                    clip_norm: float = 1.0) -> CenterEstimate:
    """Judge the example-weighted mean of ``nodes`` Gaussian-mechanism feature means.

    Each node i released m_i = (S_i + Z_i) / n_i with Z_i ~ N(0, (σ C)² I_H)
    (fedllm.train.private_feature_mean), so Σ n_i m_i / N = true mean + Σ Z_i / N: noise of
    variance nodes · (σ C)² / N² per coordinate. Post-processing only: no privacy cost.
    """
    if nodes < 1 or examples < 1:
        raise ValueError("a feature centre needs at least one node and one example")
    c = np.asarray(mean, np.float32)
    noise_sq = c.size * nodes * (noise_multiplier * clip_norm) ** 2 / examples ** 2
    signal_sq = max(float(np.sum(c.astype(np.float64) ** 2)) - noise_sq, 0.0)
    return CenterEstimate(c, nodes, examples, float(np.sqrt(noise_sq)), float(np.sqrt(signal_sq)))
