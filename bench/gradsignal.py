"""Where DP-SGD's signal is: per-module energy of the clipped mean gradient vs the DP noise.

At the start of `bench/utility`'s DP rounds (the head from the nodes' class-statistics
release), each example's gradient over the trainable adapter is flat-clipped at C, as DP-SGD
clips it. For every parameter tensor this reports the *signal energy* ‖E[ĝ]‖² of the clipped
mean gradient (unbiased: ‖mean‖² − tr(Cov) / K over K sampled examples) against the *noise
energy* one DP step adds to that tensor's averaged gradient, d·(σC/B)², with σ calibrated as
`bench/utility` calibrates it (the whole run's steps at q = B / N, after the release). A
tensor whose ratio is far below 1 gets mostly noise on every step; one with a larger ratio
is where LoRA learns under DP. Summaries per LoRA matrix kind (A / B), adapted module
(query / value / ...), layer and the head.

    python -m bench.gradsignal --quick                           # query,value (PEFT default)
    python -m bench.gradsignal --quick --target-modules query,key,value,attention.output.dense
    python -m bench.gradsignal --smoke
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._common import finish, set_threads, sst2_paths
from bench.utility import (
    DELTA,
    LABELS,
    _center_and_init,
    equal_size_dirichlet,
    release_class_stats,
)
from fedllm.data import Collator, encode_labels, read_table, tokenize
from fedllm.model import load_model, resolve_device
from fedllm.privacy import plan_dp_sgd
from fedllm.train import example_losses


def _groups(name: str) -> list[str]:
    """The summary groups a parameter belongs to, e.g. 'kind:lora_B',
    'module:attention.self.value', 'layer:4' for
    ...layer.4.attention.self.value.lora_B.default.weight; 'head' for the head."""
    if ".head." in name or name.startswith("head."):
        return ["head"]
    out = []
    kind = re.search(r"\.(lora_[AB])\.", name)
    layer = re.search(r"\.layer\.(\d+)\.", name)
    if kind:
        out.append(f"kind:{kind.group(1)}")
        # the adapted module's path inside its layer: attention.self.value, output.dense, ...
        start = layer.end() if layer and layer.end() <= kind.start() else 0
        out.append(f"module:{name[start:kind.start()]}")
    if layer:
        out.append(f"layer:{layer.group(1)}")
    return out or ["other"]


def signal_energy(s1: torch.Tensor, s2: torch.Tensor, k: int) -> float:
    """Unbiased ‖E[x]‖² from the sums ``s1 = Σ x_i`` and ``s2 = Σ x_i²`` (per coordinate) of
    ``k`` i.i.d. vectors: E‖mean‖² = ‖μ‖² + tr(Cov) / k, so subtract the sample variance / k."""
    mean = s1 / k
    var = (s2 - k * mean * mean) / (k - 1)
    return float((mean * mean).sum() - var.sum() / k)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 nodes x 3,000 examples")
    size.add_argument("--smoke", action="store_true", help="3 nodes x 64 examples, 24 sampled")
    ap.add_argument("--examples", type=int, default=384,
                    help="examples whose per-example gradients are taken (split over nodes)")
    ap.add_argument("--target-modules", default="",
                    help="comma list (lora.target_modules); empty = PEFT's default")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--batch-size", type=int, default=256, help="DP logical batch B")
    ap.add_argument("--rounds", type=int, default=18)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="flat clip norm C")
    ap.add_argument("--center-noise", type=float, default=4.0,
                    help="σ of the class-statistics release the head starts from (0 = exact)")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir")
    a = ap.parse_args(argv)
    nodes_n, per_node = 3, 64 if a.smoke else 3000
    if a.smoke:
        a.examples = min(a.examples, 24)
    set_threads(a.threads)

    train_path, _ = sst2_paths()
    table = read_table(train_path, text_column="sentence", label_column="label")
    labels = encode_labels(table, LABELS, "label")
    parts = equal_size_dirichlet(labels, nodes_n, per_node, alpha=a.alpha, seed=a.seed)
    targets = tuple(m for m in a.target_modules.split(",") if m) or None
    lm = load_model(None, task="seq-cls", label_names=LABELS, seed=a.seed,
                    device=resolve_device(a.device), lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                    target_modules=targets, base_dropout=0.0)
    nodes = [tokenize(lm.tokenizer, [table.texts[i] for i in p], labels[p], max_length=64)
             for p in parts]
    rel = release_class_stats(lm, nodes, noise_multiplier=a.center_noise, seed=a.seed)
    start = _center_and_init(lm, rel, sigma=a.center_noise)
    batch = min(a.batch_size, per_node)
    sigma = plan_dp_sgd(num_examples=per_node, batch_size=batch, local_epochs=1,
                        rounds=a.rounds, target_epsilon=a.epsilon, delta=DELTA,
                        accountant="prv", project=False, prior=tuple(rel[0].history()),
                        local_steps=a.local_steps).noise_multiplier
    noise_var = (sigma * a.max_grad_norm / batch) ** 2  # per coordinate of the mean gradient

    model = lm.model
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Σ ĝ and Σ ĝ² per coordinate, on the model's device (no per-example copies to the host)
    s1 = {n: torch.zeros(p.numel(), dtype=torch.float64, device=p.device) for n, p in params}
    s2 = {n: torch.zeros(p.numel(), dtype=torch.float64, device=p.device) for n, p in params}
    collate = Collator(pad_token_id=int(lm.tokenizer.pad_token_id))
    rng = np.random.default_rng(a.seed)
    norms: list[float] = []
    for ds in nodes:
        for i in rng.choice(len(ds), a.examples // nodes_n, replace=False):
            b = {k: v.to(lm.device) for k, v in collate([ds[int(i)]]).items()}
            loss = example_losses(model, b, "seq-cls").sum()
            grads = torch.autograd.grad(loss, [p for _, p in params])
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
            norms.append(norm)
            scale = min(1.0, a.max_grad_norm / (norm + 1e-12))  # flat clipping, as DP-SGD
            for (n, _), g in zip(params, grads, strict=True):
                x = g.detach().double().flatten() * scale
                s1[n] += x
                s2[n] += x * x
    k = len(norms)
    rows: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, float]] = defaultdict(lambda: {"dim": 0, "signal": 0.0,
                                                              "noise": 0.0})
    for n, _ in params:
        signal = signal_energy(s1[n], s2[n], k)
        dim = s1[n].numel()
        noise = dim * noise_var
        short = n.replace("base_model.model.", "").replace(".default", "")
        rows[short] = {"dim": dim, "signal_energy": signal, "noise_energy_per_step": noise,
                       "ratio": signal / noise}
        for g in _groups(n):
            groups[g]["dim"] += dim
            groups[g]["signal"] += signal
            groups[g]["noise"] += noise
    total_signal = sum(r["signal_energy"] for r in rows.values())
    summary = {g: {"dim": int(v["dim"]), "signal_share": round(v["signal"] / total_signal, 4)
                   if total_signal > 0 else None, "ratio": v["signal"] / v["noise"]}
               for g, v in sorted(groups.items())}
    result = {
        "mode": "smoke" if a.smoke else "quick",
        "config": {k2: v for k2, v in vars(a).items() if k2 != "results_dir"}
        | {"data": str(train_path), "delta": DELTA, "noise_multiplier": round(sigma, 4),
           "examples_sampled": k, "trainable": sum(r["dim"] for r in rows.values())},
        "start": start,
        "grad_norm_percentiles": dict(zip(("p10", "p50", "p90"),
                                          (float(x) for x in np.percentile(norms,
                                                                           [10, 50, 90])),
                                          strict=True)),
        "total": {"signal_energy": total_signal,
                  "noise_energy_per_step": sum(r["noise_energy_per_step"]
                                               for r in rows.values())},
        "groups": summary,
        "tensors": rows,
    }
    return finish("gradsignal", result, out_dir=Path(a.results_dir) if a.results_dir else None)


if __name__ == "__main__":
    main()
