"""Private local training: one node's round of DP-SGD on its LoRA adapter (explicit loop).

DP-SGD as in Abadi et al. 2016, via Opacus: Poisson sampling of logical batches with rate
q = batch_size / N, per-example gradient clipping to ``max_grad_norm``, Gaussian noise of std
``noise_multiplier * max_grad_norm`` on the summed clipped gradients. Logical batches are large
(DP needs them) and processed in length-sorted physical chunks (the protocol of Opacus'
``BatchMemoryManager``); padding is dynamic per physical chunk.

Opacus' ``secure_mode`` (a CSPRNG for noise, needing torchcsprng) is off: noise comes from
torch's default generator, as in Opacus' own examples.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import (
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)
from torch import nn
from torch.utils.data import DataLoader

from fedllm import grad_sample
from fedllm.aggregate import class_stats_weights, released_counts
from fedllm.data import Collator, TokenizedDataset
from fedllm.model import HEAD_MODULE, LoadedModel, SequenceClassifier

if TYPE_CHECKING:
    from fedllm.config import RunConfig, TrainConfig

Clipping = Literal["auto", "linear-hooks", "hooks", "ghost"]
Optimizer = Literal["sgd", "adamw"]
Precision = Literal["auto", "fp32", "bf16"]
Schedule = Literal["constant", "cosine"]

# Per-sample gradients (Opacus "hooks") hold one copy of every trainable tensor per example of a
# physical batch. Below this many bytes they are cheap (LoRA: r * (d_in + d_out) per layer) and
# hooks win: ghost clipping avoids them but pays a second backward pass through the whole frozen
# base, which costs about as much as the forward (bench/throughput.py measures both).
GHOST_ABOVE_BYTES = 512 * 1024**2

# Fixed cost of one physical forward+backward, in padded-token equivalents, that
# :func:`physical_chunks` weighs against padding. Measured on the 2-core CPU machine with
# MiniLM (1 thread): a chunk costs about 20 ms + 0.65 ms per padded token, so ~32 tokens. On
# CUDA the fixed cost (kernel launches, an under-filled GPU) dominates: there chunks are as few
# as ``physical_batch_size`` allows and only their boundaries are chosen to cut padding.
CPU_CHUNK_COST_TOKENS = 32.0


@dataclass(frozen=True)
class DPParams:
    """One node's DP-SGD parameters.

    ``max_grad_norm`` C clips each example's whole gradient (flat clipping), unless
    ``lora_max_grad_norm`` is set: then the gradient is clipped in two groups (group-wise
    clipping, McMahan et al. 2018; He et al. 2022), the classification head to C and everything
    else (LoRA) to C_l, and each group is noised in proportion to its own clip norm, group g
    with std σ C_g / a_g, a_head² = 1 − ``lora_noise_share``, a_lora² = ``lora_noise_share``.
    Scaled by a_g / C_g, an example's gradient has norm at most 1 and the noise is N(0, σ²) per
    coordinate: a Gaussian mechanism of sensitivity 1 and noise multiplier σ, accounted exactly
    as flat clipping at the same σ (see :class:`GroupedDPOptimizer`).
    """

    noise_multiplier: float
    max_grad_norm: float
    accountant: str = "prv"
    lora_max_grad_norm: float | None = None
    lora_noise_share: float = 0.5

    def __post_init__(self) -> None:
        if self.lora_max_grad_norm is not None:
            if not self.lora_max_grad_norm > 0:
                raise ValueError("lora_max_grad_norm must be positive")
            if not 0 < self.lora_noise_share < 1:
                raise ValueError("lora_noise_share must be strictly between 0 and 1")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate over the whole run, of which one call of :func:`train_local` (a node's
    round) covers the stretch of run progress ``[start, end)``.

    "cosine": the rate at run progress p ∈ [0, 1] is ``lr · (m + (1 − m) · (1 + cos πp) / 2)``
    with m = ``min_fraction``, stepped per optimizer step; "constant": ``lr`` throughout.
    Why decay in a federation: with a constant local rate, FedAvg on non-IID nodes settles at a
    distance from the optimum that grows with the rate (client drift; Li et al. 2020, "On the
    Convergence of FedAvg on Non-IID Data", prove a decaying rate is necessary). Centralised
    training with the same schedule over the same steps is the like-for-like baseline
    (bench/utility.py). Measured on full-size SST-2 over 10 label-skewed nodes (README
    "Performance", session 23): federated 0.8658 against 0.8624 constant, DP ε = 8 unchanged,
    centralised 1.7 points lower; so it is an option, not the default.
    """

    kind: Schedule = "constant"
    start: float = 0.0
    end: float = 1.0
    min_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"schedule stretch [{self.start}, {self.end}] must lie in [0, 1]")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in [0, 1], got {self.min_fraction}")

    @classmethod
    def for_round(cls, kind: Schedule, *, round: int, rounds: int,
                  min_fraction: float = 0.0) -> LRSchedule:
        """Round ``round`` (1-based) of ``rounds``: the stretch [(round−1)/rounds, round/rounds)."""
        if not 1 <= round <= rounds:
            raise ValueError(f"round {round} is outside 1..{rounds}")
        return cls(kind, (round - 1) / rounds, round / rounds, min_fraction)

    def factor(self, step: int, steps: int) -> float:
        """The multiplier of the base rate for this call's ``step``-th (0-based) of ``steps``."""
        if self.kind == "constant":
            return 1.0
        p = self.start + (self.end - self.start) * step / max(steps, 1)
        return self.min_fraction + (1.0 - self.min_fraction) * 0.5 * (1.0 + math.cos(math.pi * p))


def _scheduled(batches: Iterator[Any], optimizer: torch.optim.Optimizer, *,
               schedule: LRSchedule | None, steps: int) -> Iterator[Any]:
    """``batches``, setting every param group's rate to its base rate × the schedule's factor
    before each logical batch (one optimizer step each, empty DP draws included)."""
    if schedule is None or schedule.kind == "constant":
        yield from batches
        return
    base = [float(g["lr"]) for g in optimizer.param_groups]
    for k, batch in enumerate(batches):
        f = schedule.factor(k, steps)
        for g, lr in zip(optimizer.param_groups, base, strict=True):
            g["lr"] = lr * f
        yield batch


@dataclass
class TrainResult:
    num_examples: int
    steps: int  # optimizer steps taken (each one is one DP release)
    sample_rate: float  # q: Poisson sampling probability of each example per step
    noise_multiplier: float | None  # None when DP is off
    mean_loss: float  # mean training loss over the round's physical batches
    seconds: float
    # Opacus accountant history of this round: [(noise_multiplier, sample_rate, steps)]
    history: list[tuple[float, float, int]] = field(default_factory=list)
    samples: int = 0  # examples processed (forward + backward) this round
    tokens: int = 0  # non-padding tokens processed this round
    clipping: str | None = None  # Opacus per-sample clipping mode used; None when DP is off
    precision: str = "fp32"  # forward-pass precision used (choose_precision)


def logit_adjustment(counts: Sequence[float] | np.ndarray, *, tau: float) -> np.ndarray:
    """τ · log π, shape (C,): the offset a node adds to its logits in training so that its loss
    is the logit-adjusted cross-entropy (Menon et al. 2021, "Long-tail learning via logit
    adjustment"; for label-skewed federations Zhang et al. 2022, FedLC).

    π is the node's label prior from ``counts`` (one per class, may be noisy: negative values
    count as 0) with add-one smoothing, so a class the node never sees gets log(1 / (n + C))
    instead of −∞. Why: on a node whose labels are skewed (SST-2 over Dirichlet(0.5): one node
    of 12,156 examples is 100 % positive), plain cross-entropy spends the round pushing every
    logit towards the node's majority class, and FedAvg averages those pushes. With the prior
    added, softmax(f(x) + τ log π) already puts the node's skew in, so f learns what is left,
    p(y | x) / π(y)^τ: the node's examples move the model only by what they say beyond their
    label frequencies. Evaluation and serving use f alone (a balanced classifier).
    """
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    if c.ndim != 1 or len(c) < 2:
        raise ValueError("logit adjustment needs one count per class (at least 2 classes)")
    if not np.all(np.isfinite(c)):
        raise ValueError("logit adjustment: the class counts must be finite")
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"logit adjustment: tau must be a finite number ≥ 0, got {tau}")
    prior = (c + 1.0) / (c.sum() + len(c))
    return (tau * np.log(prior)).astype(np.float32)


def example_losses(model: nn.Module, batch: dict[str, torch.Tensor], task: str, *,
                   logit_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example loss, shape (B,).

    Computed per example (not per token across the batch) so that DP-SGD's unit of privacy,
    the example, is also the unit of the loss. ``logit_offset`` (C,) is added to every
    example's logits first (seq-cls only; :func:`logit_adjustment`).
    """
    if task == "seq-cls":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if logit_offset is not None:
            logits = logits + logit_offset  # (B, C) + (C,)
        return F.cross_entropy(logits, batch["labels"], reduction="none")  # (B,)
    if logit_offset is not None:
        raise ValueError("logit adjustment applies to seq-cls models only")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # (B, T-1, V): position t predicts token t+1; fp32 (a bf16 base or autocast gives bf16)
    logits = out.logits[:, :-1, :].float()
    targets = batch["input_ids"][:, 1:]  # (B, T-1)
    mask = batch["attention_mask"][:, 1:].to(logits.dtype)  # (B, T-1)
    tok_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(mask)
    return (tok_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B,)


def physical_chunks(lengths: np.ndarray, *, max_examples: int,
                    chunk_cost_tokens: float) -> list[np.ndarray]:
    """Cut a length-sorted logical batch into physical chunks (index ranges into it).

    ``lengths`` (n,) ascending. Each chunk holds at most ``max_examples`` examples and is padded
    to its longest; the cut minimises ``sum(chunk_cost_tokens + size * longest)`` over chunks
    (exact, by dynamic programming over cut points). Equal-count splits of a random logical
    batch of 256 into 4 waste 38 % of SST-2's tokens on padding; this cut (CPU cost) 6.5 %.
    Privacy is untouched: the chunks of one logical batch are clipped per example, summed and
    noised once, whatever the cut.
    """
    n = len(lengths)
    if n == 0:
        return []
    cost = np.full(n + 1, np.inf)  # cost[j]: best cost of the first j examples
    cost[0] = 0.0
    start = np.zeros(n + 1, dtype=np.int64)  # start[j]: where the last chunk ending at j starts
    longest = lengths.astype(np.float64)
    for j in range(1, n + 1):
        lo = max(0, j - max_examples)
        sizes = np.arange(j - lo, 0, -1)  # chunk [i, j) for i = lo .. j-1
        c = cost[lo:j] + chunk_cost_tokens + sizes * longest[j - 1]
        k = int(np.argmin(c))
        cost[j], start[j] = c[k], lo + k
    cuts, j = [], n
    while j > 0:
        cuts.append((int(start[j]), j))
        j = int(start[j])
    return [np.arange(i, j) for i, j in reversed(cuts)]


def split_logical(indices: Sequence[int] | np.ndarray, lengths: np.ndarray, *,
                  physical_batch_size: int, device: torch.device) -> list[np.ndarray]:
    """A logical batch's example indices, length-sorted and cut by :func:`physical_chunks`.

    CPU: chunk cost :data:`CPU_CHUNK_COST_TOKENS`. CUDA: a cost above all the padding the batch
    could have, so the cut uses the fewest chunks and, among those, the least padding.
    """
    ordered = np.asarray(sorted(indices, key=lengths.__getitem__), dtype=np.int64)
    if len(ordered) == 0:
        return []
    ordered_lengths = lengths[ordered]
    cost = (CPU_CHUNK_COST_TOKENS if device.type == "cpu"
            else float(len(ordered) * int(ordered_lengths.max()) + 1))
    return [ordered[c] for c in physical_chunks(ordered_lengths, max_examples=physical_batch_size,
                                                chunk_cost_tokens=cost)]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@dataclass(frozen=True)
class ClassStats:
    """A node's differentially private per-class feature statistics (a Gaussian mechanism)."""

    # (C, H + 1) float32: row c = (Σ_{i: y_i = c} [a x_i, b C_clip] + noise row c) / n, with
    # x_i the clipped pooled features and (a, b) = fedllm.aggregate.class_stats_weights();
    # column H carries the class count (times b C_clip).
    stats: np.ndarray
    num_examples: int
    noise_multiplier: float
    clip_norm: float

    def history(self) -> list[tuple[float, float, int]]:
        """The release in accountant form: one Gaussian step on the whole data (q = 1)."""
        return [(self.noise_multiplier, 1.0, 1)]

    def counts(self) -> np.ndarray:
        """The release's per-class example counts, shape (C,) (:func:`released_counts`)."""
        return released_counts(self.stats, num_examples=self.num_examples,
                               clip_norm=self.clip_norm)


@torch.no_grad()
def private_class_stats(loaded: LoadedModel, dataset: TokenizedDataset, *,
                        noise_multiplier: float, clip_norm: float = 1.0, seed: int,
                        physical_batch_size: int = 256) -> ClassStats:
    """Per-class sums and counts of the head's input features over ``dataset``, released
    together with the Gaussian mechanism (one release, one ledger entry).

    Each example contributes the vector v_i = [a x_i, b C] to the row of its label, where x_i
    is its pooled feature vector clipped to norm C = ``clip_norm`` (mean-norm pooling gives unit
    vectors, never clipped) and a² + b² = 1 (fedllm.aggregate.class_stats_weights: most of the
    sensitivity to the sums, which give the head's direction), so ‖v_i‖ ≤ C: adding or
    removing one example changes the (C, H+1) sum by at most C in Frobenius norm. The sum gets
    N(0, (σ C)²) noise per coordinate and is divided by the (public) number of examples. Under
    add/remove adjacency that is a DP-SGD step with q = 1 and noise multiplier σ, and is
    accounted as one (ClassStats.history).

    From the nodes' releases the coordinator derives the feature centre (the mean of all
    features) and the class means, which initialise the head (fedllm.aggregate.
    estimate_class_stats). At σ = 4 over 3 nodes × 3,000 examples the class means are close
    to exact (SST-2: a head from them alone scores 0.78 on dev, as a non-private nearest-mean
    classifier does) for ε ≈ 0.93 (PRV, δ = 1e-5) of the run's budget.

    ``noise_multiplier = 0`` gives the exact statistics: no DP, for non-private runs and
    benchmarks only (a node's config never asks for it: privacy.center_noise_multiplier > 0).
    """
    if noise_multiplier < 0 or clip_norm <= 0:
        raise ValueError("the class statistics need a non-negative noise multiplier and a "
                         "positive clip norm")
    if len(dataset) == 0:
        raise ValueError("the class statistics of an empty dataset are undefined")
    if dataset.labels is None:
        raise ValueError("the class statistics need a labelled dataset")
    base = loaded.model.get_base_model()
    if not isinstance(base, SequenceClassifier):
        raise ValueError("class statistics apply to seq-cls models only")
    classes = int(base.head.out_features)
    labels = np.asarray(dataset.labels, np.int64)
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels outside 0..{classes - 1} in the class statistics' dataset")
    was_training = loaded.model.training
    loaded.model.eval()  # no dropout: the statistic of the model as it will be trained
    collate = Collator(pad_token_id=int(loaded.tokenizer.pad_token_id))
    lengths = dataset.lengths()
    hidden = base.feature_center.shape[0]
    total = torch.zeros(classes, hidden + 1, dtype=torch.float64)  # (C, H + 1)
    # The frozen base's features (LoRA bypassed): the same statistic whatever adapter a cached
    # model last held, and what a fresh adapter (LoRA B = 0) computes before round 1.
    with loaded.model.disable_adapter():
        for chunk in split_logical(np.arange(len(dataset)), lengths, device=loaded.device,
                                   physical_batch_size=physical_batch_size):
            batch = _to(collate([dataset[int(i)] for i in chunk]), loaded.device)
            x = base.pooled(batch["input_ids"], batch["attention_mask"]).double()  # (B, H)
            scale = (clip_norm / x.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)  # (B,)
            x = (x * scale[:, None]).cpu()
            rows = torch.as_tensor(labels[chunk])  # (B,)
            total[:, :hidden].index_add_(0, rows, x)
            total[:, hidden].index_add_(0, rows, torch.full((len(chunk),), float(clip_norm),
                                                              dtype=torch.float64))
    loaded.enforce_frozen()  # leaving disable_adapter() made every LoRA matrix trainable
    loaded.model.train(was_training)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.normal(0.0, noise_multiplier * clip_norm, size=total.shape,
                         generator=generator, dtype=torch.float64)
    a, b = class_stats_weights()
    weights = torch.full((hidden + 1,), a, dtype=torch.float64)
    weights[hidden] = b
    stats = ((total * weights + noise) / len(dataset)).numpy().astype(np.float32)
    return ClassStats(stats, len(dataset), float(noise_multiplier), float(clip_norm))


class GroupedDPOptimizer(DPOptimizer):
    """Opacus' DP optimizer with group-wise clipping: the head and the rest (LoRA), each
    clipped to its own norm and noised in proportion to it.

    Why: flat clipping gives every trainable coordinate the same noise σC, sized for the
    largest per-example gradient. Once the head is non-trivial (started from the class means,
    ‖W‖ ≈ 40 on SST-2), LoRA's per-example gradient, which flows through the head's weights,
    reaches ~22 at the 90th percentile against the head's ~1.8, so clipping the two together
    at C = 1 scales the head's gradient down by ~12x while its noise stays; and LoRA's own
    gradient, far smaller than C for most examples, gets noise sized for C.

    The mechanism: example i's gradient g_i = (g_i^head, g_i^lora) is clipped per group,
    ĝ_i^g = g_i^g · min(1, C_g / ‖g_i^g‖), the sum gets N(0, (σ C_g / a_g)²) per coordinate of
    group g, with a_head² + a_lora² = 1. Rescaling group g by a_g / C_g (a fixed linear map,
    post-processing) turns it into Σ_i v_i + N(0, σ² I) with ‖v_i‖² = Σ_g a_g² ‖ĝ_i^g‖² / C_g²
    ≤ 1: the sampled Gaussian mechanism of sensitivity 1 and noise multiplier σ, which the
    accountant composes exactly as it does flat clipping.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 expected_batch_size: int, head_params: set[int], head_max_grad_norm: float,
                 lora_max_grad_norm: float, lora_noise_share: float,
                 loss_reduction: str = "mean") -> None:
        # max_grad_norm = 1: the sensitivity of the rescaled mechanism (unused by the
        # overridden clipping and noise below, kept for Opacus' bookkeeping).
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=1.0,
                         expected_batch_size=expected_batch_size,
                         loss_reduction=loss_reduction)
        in_head = [id(p) in head_params for p in self.params]
        if all(in_head) or not any(in_head):
            raise ValueError("grouped clipping needs trainable head and non-head parameters")
        self._in_head = in_head
        self._clip = {True: float(head_max_grad_norm), False: float(lora_max_grad_norm)}
        self._share = {True: 1.0 - float(lora_noise_share), False: float(lora_noise_share)}

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples  # per param: (B, *shape)
        n = len(samples[0])
        factor: dict[bool, torch.Tensor] = {}
        for head in (True, False):
            if n == 0:  # empty Poisson draw
                factor[head] = torch.zeros((0,), device=samples[0].device)
                continue
            norms = torch.stack([g.reshape(n, -1).norm(2, dim=-1)
                                 for g, h in zip(samples, self._in_head, strict=True)
                                 if h == head], dim=1).norm(2, dim=1)  # (B,)
            factor[head] = (self._clip[head] / (norms + 1e-6)).clamp(max=1.0)
        for p, head in zip(self.params, self._in_head, strict=True):
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor[head].to(grad_sample.device, p.dtype),
                                grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        for p, head in zip(self.params, self._in_head, strict=True):
            _check_processed_flag(p.summed_grad)
            std = self.noise_multiplier * self._clip[head] / np.sqrt(self._share[head])
            noise = _generate_noise(std=std, reference=p.summed_grad, generator=self.generator,
                                    secure_mode=self.secure_mode)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def choose_clipping(model: nn.Module, *, physical_batch_size: int, mode: Clipping,
                    grouped: bool = False) -> str:
    """The per-sample clipping mode for this model: ``mode`` unless it is ``"auto"``.

    auto: per-sample gradients while one physical batch of them fits in
    :data:`GHOST_ABOVE_BYTES` (always the case for LoRA adapters), else "ghost" (large trainable
    parts, e.g. a vocabulary-sized head, where per-sample gradients would not fit). Per-sample
    gradients come from "linear-hooks" (:mod:`fedllm.grad_sample`) when every trainable
    parameter is an ``nn.Linear``'s (LoRA + head), else from Opacus' "hooks".
    ``grouped`` (:class:`GroupedDPOptimizer`) needs the per-sample gradients themselves: auto
    never gives "ghost" then, and "ghost" is refused.
    """
    if grouped and mode == "ghost":
        raise ValueError("grouped clipping (lora_max_grad_norm) needs per-sample gradients "
                         "(clipping = 'auto', 'linear-hooks' or 'hooks'), not ghost clipping")
    if mode != "auto":
        return mode
    per_sample = sum(p.numel() * p.element_size() for p in _trainable(model))
    if not grouped and per_sample * physical_batch_size > GHOST_ABOVE_BYTES:
        return "ghost"
    return "linear-hooks" if grad_sample.supports(model) else "hooks"


def choose_precision(mode: Precision, *, device: torch.device, clipping: str | None) -> str:
    """The forward pass's precision: ``mode`` unless it is ``"auto"``; ``clipping`` is the
    resolved per-sample mode (:func:`choose_clipping`), None without DP.

    "bf16" runs the forward pass under ``torch.autocast`` in bfloat16 (no loss scaling needed,
    unlike fp16); parameters, optimizer state and the per-example losses stay fp32. Under DP it
    needs "linear-hooks": :class:`fedllm.grad_sample.LinearGradSampler` computes every
    per-example gradient in the parameter's dtype (fp32) from the bf16 activations, so the norms
    that clipping bounds, and with them the sensitivity the accountant assumes, are exact.
    Opacus' hooks and ghost clipping would compute them from bf16 tensors (a clip factor from a
    norm rounded to 8 bits can let an example's contribution exceed C), so bf16 is refused
    there. auto: bf16 on a CUDA device that supports it, where that condition holds; fp32
    otherwise (on CPU bf16 is opt-in: README "Performance" measures it).
    """
    if mode == "auto":
        return ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported()
                and clipping in (None, "linear-hooks") else "fp32")
    if mode == "bf16" and clipping not in (None, "linear-hooks"):
        raise ValueError(f"precision 'bf16' under DP needs clipping 'linear-hooks' (per-example "
                         f"gradients and their clip norms in fp32); clipping {clipping!r} would "
                         "clip norms computed in bf16")
    return mode


def _autocast(precision: str, device: torch.device) -> torch.autocast:
    """The forward pass's autocast context (a no-op at fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def make_optimizer(kind: Optimizer, model: nn.Module, *, learning_rate: float,
                   head_learning_rate: float | None = None, weight_decay: float,
                   momentum: float) -> torch.optim.Optimizer:
    """The local optimizer, fresh every round (nodes are sampled; no state crosses rounds).

    AdamW (default) normalises each coordinate, which the classification head needs: its
    useful gradient lies along directions of small feature variance. Its first steps from a
    fresh state are sign-like, though (every coordinate moves by about ``learning_rate``), so
    FedAvg of few local AdamW steps is closer to a vote of the nodes than to an average of
    their gradients. SGD averages exactly; under DP it needs a far larger step for the head than
    for LoRA (``head_learning_rate``). Under strong noise AdamW's rate is also the size of the
    random walk it takes on noise-dominated coordinates: on the 3-node Dirichlet(0.5) SST-2
    split at ε = 1 (bench/utility.py, README "Performance"), LoRA at 1e-2 scrambled the frozen
    features it scales (0.57 dev accuracy, below a frozen LoRA's 0.72); at 1e-3 with the head
    at 0.03 and a logical batch of a third of the node it reached 0.775 (seed 0; with the
    nodes' label skews of seeds 1 and 2 an uncentred head collapses towards one class, which
    centring its input fixes: fedllm.model.set_feature_center, README "Performance").

    ``head_learning_rate`` (None: ``learning_rate``) is the classification head's own rate.
    """
    head = [p for n, p in model.named_parameters() if p.requires_grad and _is_head(n)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not _is_head(n)]
    groups = [{"params": rest, "lr": learning_rate}] if rest else []
    if head:
        groups.append({"params": head, "lr": (learning_rate if head_learning_rate is None
                                                 else head_learning_rate)})
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum,
                               weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)


def _is_head(name: str) -> bool:
    return f".{HEAD_MODULE}." in f".{name}"


def _frozen_at_rate_zero(model: nn.Module, *, learning_rate: float,
                         head_learning_rate: float | None) -> list[nn.Parameter]:
    """Freeze (``requires_grad = False``) the trainable parameters whose rate is 0 for this
    round: LoRA at ``learning_rate == 0``, the head at ``head_learning_rate == 0``. Returns them
    for :func:`_unfreeze`.

    Why not just a zero step: under DP a frozen part's per-example gradient would still count in
    the clip norm (flat clipping: the head's signal scaled down by LoRA's far larger gradient)
    and be noised for nothing; frozen, it has no per-sample gradient at all. With LoRA frozen
    the head alone is trained, a DP linear probe of the frozen encoder, and the backward pass
    stops at the head (no backward through the encoder: 1.8x the samples/s of DP-LoRA on
    CPU, bench/throughput.py).
    """
    if learning_rate < 0 or (head_learning_rate is not None and head_learning_rate < 0):
        raise ValueError("learning rates must be non-negative")
    head_rate = learning_rate if head_learning_rate is None else head_learning_rate
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = [p for n, p in trainable
              if (head_rate if _is_head(n) else learning_rate) == 0]
    if len(frozen) == len(trainable):
        raise ValueError("nothing to train: every trainable part has learning rate 0 "
                         f"(learning_rate={learning_rate}, "
                         f"head_learning_rate={head_learning_rate})")
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _unfreeze(params: list[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)


def train_local(
    loaded: LoadedModel,
    dataset: TokenizedDataset,
    *,
    epochs: int,
    batch_size: int,
    physical_batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    dp: DPParams | None,
    seed: int,
    clipping: Clipping = "auto",
    optimizer: Optimizer = "adamw",
    momentum: float = 0.0,
    head_learning_rate: float | None = None,
    local_steps: int | None = None,
    precision: Precision = "fp32",
    schedule: LRSchedule | None = None,
    logit_offset: np.ndarray | None = None,
) -> TrainResult:
    """Train the adapter of ``loaded.model`` in place on ``dataset``.

    ``dp=None`` trains without differential privacy (callers must have an explicit opt-out).
    ``clipping`` picks how examples are clipped ("linear-hooks": per-sample gradients of the
    ``nn.Linear`` layers, :mod:`fedllm.grad_sample`; "hooks": Opacus' per-sample gradients;
    "ghost": Opacus ghost clipping, per-sample norms without materialising them; "auto": see
    :func:`choose_clipping`). It changes speed and memory, never the maths: all clip each
    example's gradient to ``max_grad_norm`` before noise.

    A rate of 0 (``learning_rate`` for LoRA, ``head_learning_rate`` for the head) freezes that
    part for the round: no gradient, no per-sample gradient, no share of the clip norm
    (:func:`_frozen_at_rate_zero`). ``learning_rate=0`` trains the head alone.

    ``local_steps``: stop after that many optimizer steps (logical batches; under DP each one
    a Poisson draw at q = batch_size / N, empty draws included) instead of ``epochs`` epochs.

    ``precision``: the forward pass's precision ("bf16": autocast; see
    :func:`choose_precision`, which also resolves "auto").

    ``schedule``: the rate's decay over the run, of which this call covers one stretch
    (:class:`LRSchedule`; None: constant).

    ``logit_offset``: (C,) added to the logits in the training loss (:func:`logit_adjustment`).
    Under DP it must not depend on the node's data except through a DP release (the node's
    class-statistics release gives noisy counts): DP-SGD's guarantee assumes a loss fixed
    before the data is sampled.
    """
    if local_steps is not None and local_steps <= 0:
        raise ValueError("local_steps must be positive")
    model = loaded.model
    device = loaded.device
    n = len(dataset)
    torch.manual_seed(seed)
    collate = Collator(pad_token_id=int(loaded.tokenizer.pad_token_id))
    loaded.enforce_frozen()  # (lora.freeze_a: PEFT may have made A trainable again)
    frozen = _frozen_at_rate_zero(model, learning_rate=learning_rate,
                                  head_learning_rate=head_learning_rate)
    try:
        if dp is not None and dp.lora_max_grad_norm is not None and frozen:
            raise ValueError("grouped clipping (lora_max_grad_norm) clips the head and LoRA "
                             "separately; with one of them frozen (learning rate 0) use flat "
                             "clipping")
        # Trap: HF models load in eval mode; dropout etc. must be in training mode.
        model.train()
        opt = make_optimizer(optimizer, model, learning_rate=learning_rate,
                             head_learning_rate=head_learning_rate, weight_decay=weight_decay,
                             momentum=momentum)
        mode = None if dp is None else choose_clipping(
            model, physical_batch_size=physical_batch_size, mode=clipping,
            grouped=dp.lora_max_grad_norm is not None)
        resolved = choose_precision(precision, device=device, clipping=mode)
        offset = None if logit_offset is None else torch.as_tensor(
            np.asarray(logit_offset, dtype=np.float32), device=device)
        if offset is not None:
            base = loaded.model.get_base_model()
            if not isinstance(base, SequenceClassifier):
                raise ValueError("logit adjustment applies to seq-cls models only")
            if offset.shape != (base.head.out_features,):
                raise ValueError(f"logit_offset of shape {tuple(offset.shape)} does not fit "
                                 f"the model's {base.head.out_features} classes")
        t0 = time.perf_counter()
        if dp is None:
            result = _train_no_dp(
                model, dataset, collate, opt, device=device, task=loaded.task, epochs=epochs,
                batch_size=batch_size, physical_batch_size=physical_batch_size, seed=seed,
                local_steps=local_steps, precision=resolved, schedule=schedule,
                logit_offset=offset,
            )
        else:
            assert mode is not None
            result = _train_dp(
                model, dataset, collate, opt, device=device, task=loaded.task, epochs=epochs,
                batch_size=batch_size, physical_batch_size=physical_batch_size, dp=dp,
                seed=seed, local_steps=local_steps, grad_sample_mode=mode, precision=resolved,
                schedule=schedule, logit_offset=offset,
            )
    finally:
        _unfreeze(frozen)
    model.eval()
    result.seconds = time.perf_counter() - t0
    result.num_examples = n
    return result


def dp_for_run(config: RunConfig, *, noise_multiplier: float) -> DPParams:
    """A run's ``[privacy]`` clipping settings with the node's calibrated σ: the one place that
    maps them, for the nodes and the canary audit."""
    p = config.privacy
    return DPParams(noise_multiplier=noise_multiplier, max_grad_norm=p.max_grad_norm,
                    accountant=p.accountant,
                    lora_max_grad_norm=p.lora_max_grad_norm if config.grouped_clipping else None,
                    lora_noise_share=p.lora_noise_share)


def train_for_run(loaded: LoadedModel, dataset: TokenizedDataset, train: TrainConfig, *,
                  dp: DPParams | None, seed: int, round: int, rounds: int,
                  logit_offset: np.ndarray | None = None) -> TrainResult:
    """:func:`train_local` with a run's ``[train]`` settings for round ``round`` (1-based) of
    ``rounds``: the one place that maps them, for the nodes and the canary audit.
    ``logit_offset``: the node's :func:`logit_adjustment` when ``train.logit_adjustment`` is
    on (the caller knows where its label prior may come from)."""
    return train_local(
        loaded, dataset, epochs=train.local_epochs, batch_size=train.batch_for(len(dataset)),
        physical_batch_size=train.physical_batch_size, learning_rate=train.learning_rate,
        weight_decay=train.weight_decay, dp=dp, seed=seed, clipping=train.clipping,
        optimizer=train.optimizer, momentum=train.momentum,
        head_learning_rate=train.head_learning_rate, local_steps=train.local_steps,
        precision=train.precision,
        schedule=LRSchedule.for_round(train.lr_schedule, round=round, rounds=rounds,
                                      min_fraction=train.lr_min_fraction),
        logit_offset=logit_offset,
    )


def _logical_batches(epoch: Callable[[], Iterator[Any]], *, epochs: int,
                     steps: int | None) -> Iterator[Any]:
    """The round's logical batches: ``epochs`` passes of ``epoch()``, or, with ``steps``,
    exactly that many batches from as many passes as it takes (the last one cut short)."""
    if steps is None:
        for _ in range(epochs):
            yield from epoch()
        return
    taken = 0
    while taken < steps:
        for batch in epoch():
            yield batch
            taken += 1
            if taken == steps:
                return


def _private_linear_hooks(engine: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                          loader: DataLoader, *, dp: DPParams
                          ) -> tuple[nn.Module, DPOptimizer, Any, Callable[[], None]]:
    """What ``engine.make_private(grad_sample_mode="hooks", poisson_sampling=True)`` returns,
    with the per-sample gradients from :class:`fedllm.grad_sample.LinearGradSampler` instead of
    Opacus' ``GradSampleModule``: the same module validation, Poisson loader (the loader's own
    generator), ``DPOptimizer`` (mean reduction over the expected batch) and accountant hook.
    The model itself is returned, not a wrapper."""
    from opacus.data_loader import DPDataLoader

    engine.validate(module=model, optimizer=optimizer, data_loader=loader)
    dp_loader = DPDataLoader.from_data_loader(loader)
    sample_rate = 1.0 / len(loader)
    dp_opt = DPOptimizer(optimizer, noise_multiplier=dp.noise_multiplier,
                         max_grad_norm=dp.max_grad_norm,
                         expected_batch_size=int(len(loader.dataset) * sample_rate),  # type: ignore[arg-type]
                         loss_reduction="mean")
    dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    # Last, so nothing can fail with the hooks attached. The training loop backpropagates the
    # chunk's summed loss in this mode.
    sampler = grad_sample.LinearGradSampler(model, loss_reduction="sum")
    return model, dp_opt, dp_loader, sampler.close


def _train_dp(
    model: nn.Module,
    dataset: TokenizedDataset,
    collate: Collator,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    task: str,
    epochs: int,
    batch_size: int,
    physical_batch_size: int,
    dp: DPParams,
    seed: int,
    grad_sample_mode: str,
    local_steps: int | None = None,
    precision: str = "fp32",
    schedule: LRSchedule | None = None,
    logit_offset: torch.Tensor | None = None,
) -> TrainResult:
    from opacus import PrivacyEngine
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    generator = torch.Generator().manual_seed(seed)
    # batch_size here is the *expected* logical batch: Opacus turns this loader into Poisson
    # sampling with q = 1 / len(loader) = batch_size / N (rounded to whole batches).
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, generator=generator)
    # A fresh engine per round; the node's ledger (privacy.py) composes rounds from the
    # recorded history, so nothing is lost by not keeping this accountant.
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off (documented in the module docstring).
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant=dp.accountant)
        if grad_sample_mode == "linear-hooks":
            dp_model, dp_opt, dp_loader, close = _private_linear_hooks(
                engine, model, optimizer, loader, dp=dp)
        else:
            private = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=grad_sample_mode,
            )
            # Ghost mode also returns a wrapped criterion; fedllm computes its own per-example
            # losses (example_losses) and wraps them directly, so that criterion is not used.
            dp_model, dp_opt, dp_loader = private[0], private[1], private[-1]
            close = dp_model._close
    ghost, linear_hooks = grad_sample_mode == "ghost", grad_sample_mode == "linear-hooks"
    sample_rate = 1.0 / len(loader)
    if dp.lora_max_grad_norm is not None:
        # The same wrapped model, loader and accountant; only the clipping and noise differ.
        try:
            dp_opt = GroupedDPOptimizer(
                optimizer, noise_multiplier=dp.noise_multiplier,
                expected_batch_size=dp_opt.expected_batch_size,
                head_params={id(p) for n, p in model.named_parameters()
                             if p.requires_grad and _is_head(n)},
                head_max_grad_norm=dp.max_grad_norm, lora_max_grad_norm=dp.lora_max_grad_norm,
                lora_noise_share=dp.lora_noise_share)
        except BaseException:
            close()  # no hooks left on the model
            raise
        dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    lengths = dataset.lengths()
    loss_sum, loss_batches, samples, tokens = 0.0, 0, 0, 0
    try:
        with warnings.catch_warnings():
            # torch notes that Opacus' full backward hooks fire on modules whose inputs need no
            # grad (the frozen base); that is expected with LoRA.
            warnings.filterwarnings("ignore", message="Full backward hook")
            # One Poisson-sampled logical batch (list of example indices) per DP step.
            # len(loader) = 1 / q Poisson draws per epoch.
            planned = local_steps if local_steps is not None else epochs * len(loader)
            for logical in _scheduled(
                    _logical_batches(lambda: iter(dp_loader.batch_sampler), epochs=epochs,
                                     steps=local_steps),
                    optimizer, schedule=schedule, steps=planned):
                if len(logical) == 0:
                    # Empty draw (probability (1-q)^N): nothing to clip or release. Count the
                    # step anyway so the ledger can only over-, never under-state epsilon.
                    engine.accountant.step(noise_multiplier=dp.noise_multiplier,
                                           sample_rate=sample_rate)
                    continue
                # Physical chunks of similar length => little padding. The same protocol as
                # Opacus' BatchMemoryManager: clip+accumulate per chunk, noise+step once.
                chunks = split_logical(logical, lengths, device=device,
                                       physical_batch_size=physical_batch_size)
                for j, chunk in enumerate(chunks):
                    dp_opt.signal_skip_step(do_skip=j < len(chunks) - 1)
                    batch = _to(collate([dataset[int(i)] for i in chunk]), device)
                    # Mean over the chunk; Opacus rescales per-example grads so the noisy sum is
                    # divided by the *expected* logical batch size, as DP-SGD prescribes.
                    with _autocast(precision, device):
                        losses = example_losses(dp_model, batch, task,
                                                logit_offset=logit_offset).float()  # (B,)
                    if ghost:
                        # Two backward passes: per-example norms, then the clipped sum.
                        DPTensorFastGradientClipping(dp_model, dp_opt, losses,
                                                     "mean").backward()
                    elif linear_hooks:
                        # The sum: its per-example pieces are the examples' own gradients
                        # (the sampler's loss_reduction="sum"; no 1/n to undo per layer).
                        losses.sum().backward()
                    else:
                        losses.mean().backward()
                    dp_opt.step()
                    dp_opt.zero_grad(set_to_none=True)
                    loss_sum += float(losses.detach().mean())
                    loss_batches += 1
                    samples += len(chunk)
                    tokens += int(lengths[chunk].sum())
        history = [(float(s), float(q), int(k)) for s, q, k in engine.accountant.history]
    finally:
        # Remove the hooks and per-sample grad buffers so the same model object is reused
        # next round without growing memory (no model rebuild per round).
        close()
        optimizer.zero_grad(set_to_none=True)
    steps = sum(k for _, _, k in history)
    return TrainResult(
        num_examples=len(dataset),
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=dp.noise_multiplier,
        mean_loss=loss_sum / max(loss_batches, 1),
        seconds=0.0,
        history=history,
        samples=samples,
        tokens=tokens,
        clipping=grad_sample_mode,
        precision=precision,
    )


def _train_no_dp(
    model: nn.Module,
    dataset: TokenizedDataset,
    collate: Collator,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    task: str,
    epochs: int,
    batch_size: int,
    physical_batch_size: int,
    seed: int,
    local_steps: int | None = None,
    precision: str = "fp32",
    schedule: LRSchedule | None = None,
    logit_offset: torch.Tensor | None = None,
) -> TrainResult:
    generator = torch.Generator().manual_seed(seed)
    n = len(dataset)
    steps, loss_sum, loss_batches, tokens, samples = 0, 0.0, 0, 0, 0

    def epoch() -> Iterator[np.ndarray]:  # one shuffled pass in logical batches
        perm = torch.randperm(n, generator=generator).numpy()
        return (perm[start : start + batch_size] for start in range(0, n, batch_size))

    lengths = dataset.lengths()
    planned = local_steps if local_steps is not None else epochs * math.ceil(n / batch_size)
    for logical in _scheduled(_logical_batches(epoch, epochs=epochs, steps=local_steps),
                              optimizer, schedule=schedule, steps=planned):
        samples += len(logical)
        optimizer.zero_grad(set_to_none=True)
        for chunk in split_logical(logical, lengths, device=device,
                                   physical_batch_size=physical_batch_size):
            batch = _to(collate([dataset[int(i)] for i in chunk]), device)
            # Weight each chunk by its share so the step uses the logical-batch mean.
            with _autocast(precision, device):
                loss = example_losses(model, batch, task,
                                      logit_offset=logit_offset).float().mean()
            (loss * (len(chunk) / len(logical))).backward()
            loss_sum += float(loss.detach())
            loss_batches += 1
            tokens += int(lengths[chunk].sum())
        optimizer.step()
        steps += 1
    return TrainResult(
        num_examples=n,
        steps=steps,
        sample_rate=min(1.0, batch_size / n),
        noise_multiplier=None,
        mean_loss=loss_sum / max(loss_batches, 1),
        seconds=0.0,
        samples=samples,
        tokens=tokens,
        precision=precision,
    )
