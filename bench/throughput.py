"""Local training throughput of DP-LoRA on the bundled MiniLM with SST-2 text lengths.

Variants, measured in one process on the same examples (so machine load cancels out of the
ratios): fedllm without DP; fedllm with DP, its per-sample gradients from fedllm's own tensor
hooks on the linear layers (fedllm.grad_sample, "linear-hooks", the default for LoRA), from
Opacus' module hooks ("hooks"), or Opacus ghost clipping; the head alone with and without DP
(LoRA at learning rate 0: a DP linear probe of the frozen encoder, reported apart since it
trains less); FFA-LoRA with and without DP (lora.freeze_a: A fixed, B and the head trained;
reported apart); no DP with the checkpoint's sdpa attention on every batch (before session 29
fedllm's kernel; now short CPU batches run eager, model.attention_by_length; reported apart);
no DP and DP linear-hooks with the forward pass in bf16 (train.precision,
reported apart against their fp32 twins and a bf16 matmul ceiling); the same two with the
frozen base stored in bf16 (model.base_dtype, a second model; adapter fp32), these four only
where the hardware multiplies bf16 (:func:`native_bf16`); and the common example
setup as reference (every batch padded to max_len 64, batch 32, a fresh model and
PrivacyEngine per round). Plus this machine's fp32 matmul ceiling, read next to each repeat's
no-DP run, and the model's training FLOPs per token, giving the fraction of the ceiling reached
without DP (per repeat against its own reading; the median is ``ceiling_fraction``).

    python -m bench.throughput [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Any

import numpy as np
import torch

from bench._common import finish, set_threads, sst2_paths
from fedllm.config import TrainConfig
from fedllm.data import Collator, TokenizedDataset, encode_labels, read_table, tokenize
from fedllm.model import is_base_parameter, load_model
from fedllm.train import DPParams, example_losses, train_local

LABELS = ("0", "1")


def matmul_ceiling_gflops(size: int = 2048, seconds: float = 2.0,
                          dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of a large square matmul in ``dtype`` on this machine (torch's current
    threads)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def train_flops_per_token(lm: Any, ds: TokenizedDataset, samples: int = 64) -> float:
    """Useful FLOPs of one no-DP forward + backward per token: counted by torch's
    FlopCounterMode on single examples (no padding at all) spread over the length
    distribution. Padding the trainer computes is therefore waste, not credited work."""
    from torch.utils.flop_counter import FlopCounterMode

    collate = Collator(int(lm.tokenizer.pad_token_id))
    order = np.argsort(ds.lengths(), kind="stable")
    pick = order[np.linspace(0, len(order) - 1, num=min(samples, len(order))).astype(int)]
    lm.model.train()
    counter = FlopCounterMode(display=False)
    tokens = 0
    with counter:
        for i in pick:
            batch = collate([ds[int(i)]])
            example_losses(lm.model, batch, lm.task).sum().backward()
            tokens += int(batch["attention_mask"].sum())
    lm.model.zero_grad(set_to_none=True)
    lm.model.eval()
    return counter.get_total_flops() / tokens


def native_bf16() -> bool:
    """Whether this CPU (where the benchmark trains) multiplies bf16 matrices in hardware
    (AVX-512 BF16 or AMX, as oneDNN reports). Without it, bf16 matmuls are emulated at a
    fraction of fp32's speed, and the bf16 variants would only measure the emulation, for the
    better part of an hour: they are then skipped and the JSON says why."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def base_param_bytes(lm: Any) -> int:
    """Bytes of the frozen base's parameters (what model.base_dtype changes)."""
    return sum(p.numel() * p.element_size() for n, p in lm.model.named_parameters()
               if is_base_parameter(n))


def run_reference(texts: list[str], labels: np.ndarray, *, rounds: int, seed: int) -> dict:
    """The common Flower + Opacus example: each round builds a fresh HF
    AutoModelForSequenceClassification + LoRA and a fresh PrivacyEngine, pads every batch to
    max_length 64, logical = physical batch 32, DP via hooks. Time includes the rebuilds."""
    from opacus import PrivacyEngine
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedllm.model import default_model_path

    path = default_model_path()
    samples, tokens = 0, 0
    t0 = time.perf_counter()
    for r in range(rounds):
        torch.manual_seed(seed + r)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS"))
        enc = tok(texts, truncation=True, max_length=64, padding="max_length",
                  return_tensors="pt")
        data = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels))
        loader = DataLoader(data, batch_size=32, shuffle=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine()
            model, opt, loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0)
            for ids, mask, y in loader:
                if len(y) == 0:
                    continue
                opt.zero_grad()
                out = model(input_ids=ids, attention_mask=mask)
                torch.nn.functional.cross_entropy(out.logits, y).backward()
                opt.step()
                samples += len(y)
                tokens += int(mask.sum())
        model._close()
    seconds = time.perf_counter() - t0
    return {"samples": samples, "tokens": tokens, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="≈ 1 minute on 2 CPU cores")
    size.add_argument("--smoke", action="store_true", help="seconds; checks that it runs")
    ap.add_argument("--examples", type=int, help="SST-2 training examples per variant")
    defaults = TrainConfig()  # fedllm's own training defaults
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size,
                    help="fedllm logical batch (default: fedllm's)")
    ap.add_argument("--physical-batch-size", type=int,
                    default=defaults.physical_batch_size, help="(default: fedllm's)")
    ap.add_argument("--repeats", type=int, help="measure each variant this many times, keep best")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = 1 on an oversubscribed machine, else torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", help="where to append the JSON line (default bench/results)")
    args = ap.parse_args(argv)
    n = args.examples or (96 if args.smoke else 192 if args.quick else 2048)
    repeats = args.repeats or (1 if args.smoke or args.quick else 4)
    batch = min(args.batch_size, n)
    physical = min(args.physical_batch_size, batch)
    set_threads(args.threads)

    train_path, _ = sst2_paths()
    table = read_table(train_path, text_column="sentence", label_column="label")
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(table), size=min(n, len(table)), replace=False)
    texts = [table.texts[i] for i in pick]
    labels = encode_labels(table, LABELS, "label")[pick]

    t_load = time.perf_counter()
    lm = load_model(None, task="seq-cls", label_names=LABELS, seed=args.seed)
    load_seconds = time.perf_counter() - t_load
    bf16 = native_bf16()
    # The attention kernel fedllm no longer uses on CPU for short batches (the checkpoint's
    # sdpa everywhere, as before session 29), to measure what the per-length choice buys.
    models = {"fp32": lm, "sdpa": load_model(None, task="seq-cls", label_names=LABELS,
                                             seed=args.seed, cpu_eager_attention_max_tokens=0)}
    if bf16:
        # model.base_dtype = "bf16": the frozen base's weights in bf16, the same seeded adapter.
        models["bf16"] = load_model(None, task="seq-cls", label_names=LABELS, seed=args.seed,
                                    base_dtype="bf16")
    ds = tokenize(lm.tokenizer, texts, labels, max_length=128)
    lengths = ds.lengths()
    initial = lm.adapter_state()

    # LoRA + head (the targets' workload), then the head alone (LoRA at rate 0: a DP linear
    # probe of the frozen encoder, no backward through it), reported apart: it trains less.
    all_variants: dict[str, dict[str, Any]] = {
        "no_dp": {"dp": None, "clipping": "auto", "lr": 1e-3},
        # no DP with the loaded attention kernel (sdpa) on every batch; reported apart.
        "no_dp_sdpa": {"dp": None, "clipping": "auto", "lr": 1e-3, "base": "sdpa"},
        "dp_linear_hooks": {"dp": DPParams(1.0, 1.0), "clipping": "linear-hooks", "lr": 1e-3},
        "dp_hooks": {"dp": DPParams(1.0, 1.0), "clipping": "hooks", "lr": 1e-3},
        "dp_ghost": {"dp": DPParams(1.0, 1.0), "clipping": "ghost", "lr": 1e-3},
        "head_only_no_dp": {"dp": None, "clipping": "auto", "lr": 0.0},
        "head_only_dp": {"dp": DPParams(1.0, 1.0), "clipping": "auto", "lr": 0.0},
        # lora.freeze_a (FFA-LoRA): B and the head train, A is fixed; reported apart too.
        "ffa_no_dp": {"dp": None, "clipping": "auto", "lr": 1e-3, "freeze_a": True},
        "ffa_dp": {"dp": DPParams(1.0, 1.0), "clipping": "auto", "lr": 1e-3,
                   "freeze_a": True},
        # train.precision = "bf16" (autocast forward; per-example gradients and clip norms in
        # fp32): the auto default on CUDA, opt-in on CPU; reported apart.
        "no_dp_bf16": {"dp": None, "clipping": "auto", "lr": 1e-3, "precision": "bf16"},
        "dp_linear_hooks_bf16": {"dp": DPParams(1.0, 1.0), "clipping": "linear-hooks",
                                 "lr": 1e-3, "precision": "bf16"},
        # model.base_dtype = "bf16" (the frozen base stored in bf16, no autocast); apart too.
        "no_dp_bf16_base": {"dp": None, "clipping": "auto", "lr": 1e-3, "base": "bf16"},
        "dp_linear_hooks_bf16_base": {"dp": DPParams(1.0, 1.0), "clipping": "linear-hooks",
                                      "lr": 1e-3, "base": "bf16"},
    }
    variants = {k: v for k, v in all_variants.items()
                if bf16 or "bf16" not in (v.get("precision"), v.get("base"))}

    # Warm-up (lazy inits, allocator) on a few examples, not timed: Opacus' hooks, then each
    # (stored base, forward precision) pair the variants use (bf16: oneDNN builds its kernels
    # on first use).
    warm = TokenizedDataset(ds.input_ids[:physical], labels[:physical])
    train_local(lm, warm, epochs=1, batch_size=physical, physical_batch_size=physical,
                learning_rate=1e-3, dp=DPParams(1.0, 1.0), seed=0, clipping="hooks")
    for base, precision in sorted({(v.get("base", "fp32"), v.get("precision", "fp32"))
                                   for v in variants.values()}):
        train_local(models[base], warm, epochs=1, batch_size=physical,
                    physical_batch_size=physical, learning_rate=1e-3, dp=DPParams(1.0, 1.0),
                    seed=0, clipping="linear-hooks", precision=precision)
    lm.load_adapter_state(initial)
    best: dict[str, dict[str, float]] = {}
    runs: dict[str, list[float]] = {name: [] for name in variants}  # samples/s per repeat
    no_dp_tps: list[float] = []  # no DP's tokens/s per repeat
    # The fp32 matmul ceiling, read right before each repeat's no-DP run: on a shared VM it
    # moves (125-180 GFLOP/s within one session here), so the fraction is taken per repeat
    # against the reading next to it, as the DP / no-DP ratio is.
    ceilings: list[float] = []
    ceiling_s = 0.5 if args.smoke else 1.0 if args.quick else 2.0
    for rep in range(repeats):
        # Forward, then backward order (ABBA): a machine that speeds up or slows down during
        # the run favours no variant on average over the repeats.
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            if name == "no_dp":
                ceilings.append(matmul_ceiling_gflops(seconds=ceiling_s))
            v = variants[name]
            m = models[v.get("base", "fp32")]
            m.load_adapter_state(initial)
            m.lora_a_frozen = bool(v.get("freeze_a"))  # train_local applies it
            r = train_local(m, ds, epochs=1, batch_size=batch, physical_batch_size=physical,
                            learning_rate=v["lr"], head_learning_rate=1e-3, dp=v["dp"],
                            seed=args.seed + rep, clipping=v["clipping"],
                            precision=v.get("precision", "fp32"))
            sps, tps = r.samples / r.seconds, r.tokens / r.seconds
            runs[name].append(sps)
            if name == "no_dp":
                no_dp_tps.append(tps)
            # Best of the repeats, samples/s and tokens/s each on its own.
            top_tps = max(tps, best[name]["tokens_per_s"]) if name in best else tps
            if name not in best or sps > best[name]["samples_per_s"]:
                best[name] = {"samples_per_s": sps, "seconds": r.seconds,
                              "samples": r.samples}
            best[name]["tokens_per_s"] = top_tps
    ref_rounds = 1
    ref = run_reference(texts, labels, rounds=ref_rounds, seed=args.seed)
    best["reference"] = {"samples_per_s": ref["samples"] / ref["seconds"],
                         "tokens_per_s": ref["tokens"] / ref["seconds"],
                         "seconds": ref["seconds"], "samples": ref["samples"]}

    flops_tok = train_flops_per_token(lm, ds)
    no_dp_gflops = best["no_dp"]["tokens_per_s"] * flops_tok / 1e9
    # Per repeat: no DP's GFLOP/s against the ceiling read next to it; the median is the
    # headline. Also the strictest pairing: best no DP against the highest reading.
    fractions = [t * flops_tok / 1e9 / c for t, c in zip(no_dp_tps, ceilings, strict=True)]
    best_dp = max(("dp_linear_hooks", "dp_hooks", "dp_ghost"),
                  key=lambda k: best[k]["samples_per_s"])
    def per_repeat(a: str, b: str) -> list[float]:  # a / b, each repeat's runs side by side
        return [x / y for x, y in zip(runs[a], runs[b], strict=True)]

    def median(xs: list[float]) -> float:
        return round(float(np.median(xs)), 3)

    # Per repeat, the best DP variant against no DP measured next to it (adjacent in the ABBA
    # order); the median is robust to one repeat hit by machine noise.
    paired = per_repeat(best_dp, "no_dp")

    def ratio(a: str, b: str, digits: int = 3) -> float:
        return round(best[a]["samples_per_s"] / best[b]["samples_per_s"], digits)
    result = {
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "config": {"examples": len(ds), "batch_size": batch, "physical_batch_size": physical,
                   "max_length": 128, "repeats": repeats, "noise_multiplier": 1.0,
                   "max_grad_norm": 1.0, "lora_r": 8, "data": str(train_path),
                   "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max()),
                   "reference": {"max_length": 64, "batch_size": 32, "rounds": ref_rounds,
                                 "fresh_model_per_round": True, "grad_sample_mode": "hooks"}},
        "samples_per_s": {k: round(v["samples_per_s"], 2) for k, v in best.items()},
        "tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in best.items()},
        "seconds": {k: round(v["seconds"], 2) for k, v in best.items()},
        "best_dp_variant": best_dp,
        "dp_vs_nodp_ratio": ratio(best_dp, "no_dp"),
        "dp_vs_nodp_paired": [round(x, 3) for x in paired],
        "dp_vs_nodp_paired_median": median(paired),
        # The same on non-padding tokens/s: Poisson sampling draws a different number and mix
        # of examples each run (a round's DP tokens per example vary by a few %), which the
        # samples/s ratio counts as speed.
        "dp_vs_nodp_token_ratio": round(best[best_dp]["tokens_per_s"]
                                        / best["no_dp"]["tokens_per_s"], 3),
        "vs_reference": ratio("no_dp", "reference", 2),
        "dp_vs_reference": ratio(best_dp, "reference", 2),
        "ghost_vs_hooks": ratio("dp_ghost", "dp_hooks"),
        # fedllm's attention kernel by batch length (eager on short CPU batches) against sdpa
        # on every batch; per repeat, next to each other, and best / best.
        "attention": {"no_dp_vs_sdpa": ratio("no_dp", "no_dp_sdpa"),
                      "no_dp_vs_sdpa_paired_median": median(per_repeat("no_dp", "no_dp_sdpa"))},
        "linear_hooks_vs_hooks": ratio("dp_linear_hooks", "dp_hooks"),
        "head_only": {"dp_vs_nodp_ratio": ratio("head_only_dp", "head_only_no_dp"),
                      "dp_vs_lora_dp": ratio("head_only_dp", best_dp, 2)},
        "ffa": {"dp_vs_nodp_ratio": ratio("ffa_dp", "ffa_no_dp"),
                "dp_vs_lora_dp": ratio("ffa_dp", best_dp),
                "no_dp_vs_lora_no_dp": ratio("ffa_no_dp", "no_dp")},
        "matmul_ceiling_gflops": round(max(ceilings), 1),
        "matmul_ceiling_gflops_per_repeat": [round(c, 1) for c in ceilings],
        "train_flops_per_token": round(flops_tok),
        "no_dp_gflops": round(no_dp_gflops, 2),
        "ceiling_fraction": median(fractions),
        "ceiling_fraction_per_repeat": [round(f, 3) for f in fractions],
        "ceiling_fraction_best_vs_max": round(no_dp_gflops / max(ceilings), 3),
        "model_load_seconds": round(load_seconds, 2),
    }
    if bf16:
        ceiling_bf16 = matmul_ceiling_gflops(seconds=ceiling_s, dtype=torch.bfloat16)
        result["bf16"] = {
            "no_dp_vs_fp32": ratio("no_dp_bf16", "no_dp"),
            "dp_vs_fp32": ratio("dp_linear_hooks_bf16", "dp_linear_hooks"),
            "dp_vs_nodp_ratio": ratio("dp_linear_hooks_bf16", "no_dp_bf16"),
            "dp_vs_nodp_paired_median": median(per_repeat("dp_linear_hooks_bf16",
                                                           "no_dp_bf16")),
            "matmul_ceiling_gflops": round(ceiling_bf16, 1),
            "ceiling_fraction": round(best["no_dp_bf16"]["tokens_per_s"] * flops_tok
                                      / 1e9 / ceiling_bf16, 3)}
        result["bf16_base"] = {
            "no_dp_vs_fp32": ratio("no_dp_bf16_base", "no_dp"),
            "dp_vs_fp32": ratio("dp_linear_hooks_bf16_base", "dp_linear_hooks"),
            "dp_vs_nodp_ratio": ratio("dp_linear_hooks_bf16_base", "no_dp_bf16_base"),
            "base_param_bytes_vs_fp32": round(
                base_param_bytes(models["bf16"]) / base_param_bytes(lm), 3)}
    else:
        result["bf16"] = result["bf16_base"] = {
            "skipped": "no native bf16 matmul here (CPU capability "
                       f"{torch.backends.cpu.get_cpu_capability()})"}
    if not all(math.isfinite(v) for v in result["samples_per_s"].values()):
        raise SystemExit("non-finite throughput")
    from pathlib import Path

    return finish("throughput", result,
                  out_dir=Path(args.results_dir) if args.results_dir else None)


if __name__ == "__main__":
    main()
