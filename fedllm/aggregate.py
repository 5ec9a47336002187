"""Aggregation: validate node updates and FedAvg them over the adapter tensors only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Arrays = Mapping[str, np.ndarray]
# The classification head's module name in adapter-state keys (fedllm.model.HEAD_MODULE; not
# imported: this module stays free of torch).
HEAD_PREFIX = "head"


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


ServerOptimizerKind = Literal["fedavg", "fedavgm", "fedadam"]


@dataclass(frozen=True)
class ServerOptState:
    """A server optimizer's state between rounds: its step count, moment estimates per adapter
    tensor (float64) and, with ``server_optimizer.ema_decay``, the moving average of the
    global adapter (float32). Small (at most three times the adapter) and carried across
    rounds in the round checkpoint, so a resumed run continues the same trajectory."""

    step: int = 0
    m: Mapping[str, np.ndarray] = field(default_factory=dict)  # fedavgm: momentum buffer
    v: Mapping[str, np.ndarray] = field(default_factory=dict)  # fedadam: second moment
    ema: Mapping[str, np.ndarray] = field(default_factory=dict)  # ema_update's average

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat form for a checkpoint (names prefixed ``m/``, ``v/`` and ``ema/``)."""
        out = {"step": np.asarray([self.step], np.int64)}
        out.update({f"m/{k}": a for k, a in self.m.items()})
        out.update({f"v/{k}": a for k, a in self.v.items()})
        out.update({f"ema/{k}": a for k, a in self.ema.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ServerOptState:
        if "step" not in arrays:
            raise ValueError("server optimizer state has no step count")

        def part(prefix: str, dtype: type) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: np.asarray(a, dtype) for k, a in arrays.items()
                    if k.startswith(prefix)}

        return cls(step=int(np.asarray(arrays["step"]).reshape(-1)[0]),
                   m=part("m/", np.float64), v=part("v/", np.float64),
                   ema=part("ema/", np.float32))

    def output(self, global_state: Arrays) -> dict[str, np.ndarray]:
        """The run's output model: the moving average when one is kept, else the global
        adapter itself."""
        return dict(self.ema if self.ema else global_state)


def server_step(global_state: Arrays, aggregate: Arrays, state: ServerOptState, *,
                kind: ServerOptimizerKind, learning_rate: float = 1.0, beta1: float = 0.9,
                beta2: float = 0.99, eps: float = 1e-8,
                head_learning_rate: float | None = None
                ) -> tuple[dict[str, np.ndarray], ServerOptState]:
    """The coordinator's step from the nodes' aggregate (FedAvg of their adapters).

    The pseudo-gradient is Δ = aggregate − global, the direction the nodes moved on average
    (Reddi et al. 2021, "Adaptive Federated Optimization"):

    - ``fedavg``: global + lr · Δ (lr = 1: the aggregate itself, plain FedAvg);
    - ``fedavgm``: m ← β1 m + Δ, global + lr · m (server momentum, Hsu et al. 2019);
    - ``fedadam``: Adam on −Δ with bias correction, so the step equals ``torch.optim.Adam``'s
      with gradient −Δ: m ← β1 m + (1 − β1) Δ, v ← β2 v + (1 − β2) Δ², global + lr · m̂ /
      (√v̂ + eps).

    Post-processing of the nodes' DP releases, so it costs no ε. Measured under DP (README
    "Performance", --quick at ε = 8): DP-FedSGD with FedAdam matched, but did not beat, the
    default local AdamW rounds (0.8039 vs 0.8028): over many rounds the sum of the first
    moments carries the noise of the sum of the gradients, so a coordinate's signal-to-noise
    is what DP-SGD gives it. Server momentum is the usual remedy for client drift on
    heterogeneous nodes; on --quick's 3 nodes it did not help either (0.8268 vs 0.828).

    ``head_learning_rate`` (None: ``learning_rate``) is the classification head's rate: its
    useful steps are larger than LoRA's (fedllm.train.make_optimizer). Only tensors in
    ``global_state`` are stepped; returns (new global state as float32, new state).
    """
    if learning_rate <= 0 or (head_learning_rate is not None and head_learning_rate <= 0):
        raise ValueError("server learning rates must be positive")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1) or eps <= 0:
        raise ValueError("server optimizer needs 0 <= beta1, beta2 < 1 and eps > 0")
    if kind == "fedavg" and learning_rate == 1.0 and head_learning_rate in (None, 1.0):
        return {k: np.asarray(aggregate[k], np.float32) for k in global_state}, state
    t = state.step + 1
    new: dict[str, np.ndarray] = {}
    m_out: dict[str, np.ndarray] = {}
    v_out: dict[str, np.ndarray] = {}
    for name, ref in global_state.items():
        ref64 = np.asarray(ref, np.float64)
        delta = np.asarray(aggregate[name], np.float64) - ref64
        lr = (head_learning_rate if head_learning_rate is not None
              and f".{HEAD_PREFIX}." in f".{name}" else learning_rate)
        if kind == "fedavg":
            step = delta
        elif kind == "fedavgm":
            m = beta1 * state.m.get(name, np.zeros_like(delta)) + delta
            m_out[name] = m
            step = m
        elif kind == "fedadam":
            m = beta1 * state.m.get(name, np.zeros_like(delta)) + (1 - beta1) * delta
            v = beta2 * state.v.get(name, np.zeros_like(delta)) + (1 - beta2) * delta * delta
            m_out[name], v_out[name] = m, v
            step = (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
        else:
            raise ValueError(f"unknown server optimizer {kind!r}")
        new[name] = (ref64 + lr * step).astype(np.float32)
    return new, ServerOptState(step=t, m=m_out, v=v_out, ema=state.ema)


def ema_update(average: Arrays | None, state: Arrays, *, decay: float) -> dict[str, np.ndarray]:
    """One step of an exponential moving average of the global adapter over rounds:
    ``decay · average + (1 − decay) · state`` per tensor, ``state`` itself on the first round
    (``average`` None).

    Averaging iterates (Polyak–Ruppert; De et al. 2022 for DP-SGD) damps the random walk that
    each round's noisy step adds, at no privacy cost: it only post-processes the global
    adapters every party already sees. Accumulates in float64, returns float32.
    """
    if not 0 <= decay < 1:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    if average is None:
        return {k: np.asarray(v, np.float32) for k, v in state.items()}
    if set(average) != set(state):
        raise ValueError("EMA and adapter state name different tensors")
    return {k: (decay * np.asarray(average[k], np.float64)
                + (1 - decay) * np.asarray(v, np.float64)).astype(np.float32)
            for k, v in state.items()}


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


# How a class-statistics release (fedllm.train.private_class_stats) splits its unit
# sensitivity: example i adds [a x_i, b C] to its class's row, a² + b² = 1, b² this share. A
# class count of thousands needs little of it (noise σ/b ≈ 13 at σ = 4, b² = 0.1), the sums,
# H = 384 coordinates whose class means give the head's direction, need the rest. An even split
# (b² = 0.5) wasted it: on exact SST-2 --quick features, 60 simulated releases per seed at σ = 4
# through estimate_class_stats, the nearest-class-mean start scored 0.7777 at b² = 0.5, 0.7794
# at 0.2 and 0.1, 0.7795 at 0.05 (exact statistics: 0.7817; README "Performance").
CLASS_STATS_COUNT_SHARE = 0.1


def class_stats_weights() -> tuple[float, float]:
    """(a, b): the weights of an example's features and of its count in its class's row of a
    class-statistics release, a² + b² = 1 (see CLASS_STATS_COUNT_SHARE)."""
    return float(np.sqrt(1.0 - CLASS_STATS_COUNT_SHARE)), float(np.sqrt(CLASS_STATS_COUNT_SHARE))


def released_counts(stats: np.ndarray, *, num_examples: float, clip_norm: float = 1.0
                    ) -> np.ndarray:
    """The per-class example counts in a class-statistics release ``stats`` (C, H + 1) of
    ``num_examples`` examples (1: the class shares n_c / N): its count column, scaled back by
    b C_clip. Noisy (DP; reading them is post-processing), unbiased, possibly negative or
    fractional."""
    _, b = class_stats_weights()
    return np.asarray(stats, np.float64)[:, -1] * num_examples / (b * clip_norm)


# A noisy centre is used only when its estimated signal is at least this many times the
# expected norm of its noise: centring on (mean + noise) leaves the head an offset of -noise
# instead of the mean, so a centre dominated by noise would be no better than none and could
# be worse (3 nodes × 64 examples at σ = 20: noise norm ~3.5 against a mean of ~0.4).
MIN_CENTER_SNR = 2.0
# The head starts from the class means only when their spread around the centre is at least
# this many times the noise in them (both sides as norms, Σ_c p_c ‖·‖², debiased). Accuracy
# depends on the direction μ_1 − μ_0, which stays useful at lower SNR than the centre's offset:
# SST-2 at SNR ~1.3 (σ = 8) still gives 0.766 against 0.741 for a head trained from scratch.
MIN_HEAD_SNR = 0.5
# ... and when every class's noisy count is at least this many times its noise: a class seen
# by almost nobody has no usable mean (and log p_c needs p_c > 0).
MIN_COUNT_SNR = 4.0


@dataclass(frozen=True)
class ClassStatsEstimate:
    """What the nodes' DP class statistics (fedllm.train.private_class_stats) say, combined.

    From the example-weighted mean M (C, H+1) of the releases, with (a, b) =
    :func:`class_stats_weights`: A = M[:, :H] / a ≈ S_c / N (class feature sums over all
    examples) and p = M[:, H] / (b C_clip) ≈ n_c / N (class shares).
    Post-processing only: no privacy cost.
    """

    center: np.ndarray  # (H,) float32: Σ_c A_c / Σ_c p_c, the mean feature vector
    class_means: np.ndarray  # (C, H) float64: A_c / p_c
    shares: np.ndarray  # (C,) float64: p_c, noisy class shares (projected to sum 1 when σ > 0)
    nodes: int  # nodes whose release went into it
    examples: int  # N = Σ_i n_i
    expected_noise_norm: float  # of the centre: sqrt(C H nodes) σ C_clip / (a N)
    signal_norm: float  # estimated ‖true centre‖: sqrt(max(‖centre‖² − E‖noise‖², 0))
    count_snr: float  # min_c p_c / std(p_c)
    spread_signal: float  # sqrt(max(Σ_c p_c ‖μ_c − μ‖² − noise part, 0))
    spread_noise: float  # sqrt(Σ_c p_c E‖noise in μ_c‖² − E‖noise in μ‖²)
    within_var: float  # s² = (C_clip² − Σ_c p_c ‖μ_c‖², debiased) / H, per coordinate

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.center))

    @property
    def usable(self) -> bool:
        """The centre may be used (see MIN_CENTER_SNR)."""
        return self.signal_norm >= MIN_CENTER_SNR * self.expected_noise_norm

    @property
    def head_usable(self) -> bool:
        """The class means may initialise the head (centre usable, every class present)."""
        return (self.usable and self.count_snr >= MIN_COUNT_SNR
                and self.spread_signal >= MIN_HEAD_SNR * self.spread_noise)

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The nearest-class-mean head (LDA with an isotropic within-class covariance s² I)
        on centred features x − μ: W_c = (μ_c − μ) / s², b_c = log p_c − ‖μ_c − μ‖² / (2 s²).
        Returns (W (C, H), b (C,)) as float32, for the centred form the head trains in."""
        if not self.head_usable:
            raise ValueError("the class statistics are too noisy to initialise the head")
        d = self.class_means - self.center.astype(np.float64)[None, :]  # (C, H)
        w = d / self.within_var
        b = np.log(self.shares) - 0.5 * np.sum(d * d, axis=1) / self.within_var
        return w.astype(np.float32), b.astype(np.float32)

    def summary(self) -> dict[str, float | int | bool]:
        return {"nodes": self.nodes, "examples": self.examples, "norm": round(self.norm, 6),
                "expected_noise_norm": round(self.expected_noise_norm, 6),
                "signal_norm": round(self.signal_norm, 6), "used": self.usable,
                "count_snr": round(self.count_snr, 3),
                "spread_signal": round(self.spread_signal, 6),
                "spread_noise": round(self.spread_noise, 6),
                "head_init": self.head_usable}


def class_stats_noise_norm(*, nodes: int, examples: int, classes: int, hidden: int,
                           noise_multiplier: float, clip_norm: float = 1.0) -> float:
    """Expected norm of the noise in the feature centre that ``nodes`` nodes' class-statistics
    releases (``examples`` in all) give: sqrt(C H nodes) σ C_clip / (a N) (see
    :func:`estimate_class_stats`). Public counts suffice: the coordinator knows it before any
    node releases anything."""
    if nodes < 1 or examples < 1:
        raise ValueError("class statistics need at least one node and one example")
    a, _ = class_stats_weights()
    return float(np.sqrt(classes * hidden * nodes) * noise_multiplier * clip_norm
                 / (a * examples))


def class_stats_can_help(*, nodes: int, examples: int, classes: int, hidden: int,
                         noise_multiplier: float, clip_norm: float = 1.0) -> bool:
    """Whether the releases could give a usable centre at all: the centre is a mean of vectors
    of norm ≤ C_clip, so its signal is at most C_clip, and it is used only at MIN_CENTER_SNR
    times its expected noise. False = the release would spend the nodes' ε for certain
    nothing (many small nodes, e.g. 100 nodes × 18 examples at σ = 4: noise norm 0.65)."""
    return MIN_CENTER_SNR * class_stats_noise_norm(
        nodes=nodes, examples=examples, classes=classes, hidden=hidden,
        noise_multiplier=noise_multiplier, clip_norm=clip_norm) <= clip_norm


def estimate_class_stats(mean: np.ndarray, *, nodes: int, examples: int,
                         noise_multiplier: float, clip_norm: float = 1.0) -> ClassStatsEstimate:
    """Judge the example-weighted mean (C, H+1) of ``nodes`` nodes' class-statistics releases.

    Node i released ([a S_i, b C_clip n_i] + Z_i) / n_i with Z_i ~ N(0, (σ C_clip)²) per
    coordinate, so the example-weighted mean is the true statistic plus Σ_i Z_i / N: per
    coordinate a variance of nodes (σ C_clip)² / N², i.e. nodes (σ C_clip)² / (a N)² in the
    sums once scaled back by 1 / a (and / (b C_clip)² in the shares).
    """
    if nodes < 1 or examples < 1:
        raise ValueError("class statistics need at least one node and one example")
    m = np.asarray(mean, np.float64)
    if m.ndim != 2 or m.shape[0] < 2 or m.shape[1] < 2:
        raise ValueError(f"class statistics must be (classes >= 2, H + 1), got {m.shape}")
    classes, hidden = m.shape[0], m.shape[1] - 1
    a, b = class_stats_weights()
    raw_var = nodes * (noise_multiplier * clip_norm) ** 2 / examples ** 2  # per coord of M
    var = raw_var / a ** 2  # per coordinate of A
    sums = m[:, :hidden] / a  # (C, H) ≈ S_c / N
    shares = released_counts(m, num_examples=1, clip_norm=clip_norm)  # (C,) ≈ n_c / N
    share_std = np.sqrt(raw_var) / (b * clip_norm)
    # The class shares sum to exactly 1 (Σ_c n_c = N, the public number of examples): project
    # the noisy ones onto that plane (least squares; halves their noise at C = 2), and take the
    # centre as Σ_c S_c / N instead of dividing by the noisy total share.
    if noise_multiplier > 0:  # (σ = 0: exact shares; an absent class stays at exactly 0)
        shares = shares + (1.0 - float(shares.sum())) / classes
        share_std *= np.sqrt(1.0 - 1.0 / classes)
    center = sums.sum(axis=0)  # (H,)
    # E‖Σ_c noise_c‖² = C H var (the centre is Σ_c A_c): the same prediction the coordinator
    # makes from public counts before asking for the release, so the two judgements cannot
    # drift apart.
    noise_sq = class_stats_noise_norm(nodes=nodes, examples=examples, classes=classes,
                                      hidden=hidden, noise_multiplier=noise_multiplier,
                                      clip_norm=clip_norm) ** 2
    signal_sq = max(float(np.sum(center ** 2)) - noise_sq, 0.0)
    count_snr = float(shares.min() / share_std) if share_std > 0 else (
        float("inf") if shares.min() > 0 else 0.0)  # σ = 0: exact statistics
    if count_snr > 0:
        means = sums / shares[:, None]  # (C, H)
        mean_noise_sq = hidden * var / shares ** 2  # (C,) E‖noise in μ_c‖²
        spread = float(np.sum(shares * np.sum((means - center) ** 2, axis=1)))
        # The centre's noise is Σ_c p_c (noise in μ_c), so the spread's noise is
        # Σ_c p_c E‖noise_c‖² − E‖noise in μ‖² (the variance identity).
        spread_noise_sq = max(float(np.sum(shares * mean_noise_sq)) - noise_sq, 0.0)
        norms = np.sum(means ** 2, axis=1) - mean_noise_sq
        within = (clip_norm ** 2 - float(np.sum(shares * norms))) / hidden
    else:  # a class with no (noisy) examples: no class means, no head
        means = np.full((classes, hidden), np.nan)
        spread = spread_noise_sq = within = float("nan")
    # The within-class variance assumes ‖x‖ = C_clip (exact for mean-norm pooling, an upper
    # bound otherwise: a softer head); floor it so noise cannot make it vanish.
    within = max(within, 0.05 * clip_norm ** 2 / hidden) if np.isfinite(within) else within
    return ClassStatsEstimate(
        center=center.astype(np.float32), class_means=means, shares=shares, nodes=nodes,
        examples=examples, expected_noise_norm=float(np.sqrt(noise_sq)),
        signal_norm=float(np.sqrt(signal_sq)), count_snr=count_snr,
        spread_signal=float(np.sqrt(max(spread - spread_noise_sq, 0.0)))
        if np.isfinite(spread) else 0.0,
        spread_noise=float(np.sqrt(spread_noise_sq)) if np.isfinite(spread_noise_sq) else 0.0,
        within_var=float(within))
