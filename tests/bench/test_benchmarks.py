"""Each benchmark runs at its smallest size, prints JSON and appends a row with the required keys.

Results go to a temporary folder (``--results-dir``), not to bench/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def run_bench(name: str, args: list[str], tmp_path: Path, timeout: float = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *args,
                           "--results-dir", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = (tmp_path / f"{name}.jsonl").read_text().splitlines()
    assert len(rows) == 1
    row = json.loads(rows[0])
    assert f'"benchmark": "{name}"' in proc.stdout  # the same JSON is printed
    for key in ("cpu_count", "torch", "torch_threads", "git_commit"):
        assert key in row["machine"]
    assert row["config"]
    return row


def test_communication_quick(tmp_path):
    row = run_bench("communication", ["--quick"], tmp_path)
    # r = 8 LoRA on query/value of 6 layers (6 * 2 * 8 * (384 + 384)) + head (384 * 2 + 2)
    assert row["per_rank"][0]["adapter_params"] == 6 * 2 * 8 * (384 + 384) + 384 * 2 + 2
    assert row["adapter_bytes"] == 4 * row["per_rank"][0]["adapter_params"]
    assert row["adapter_fraction"] < 0.01 and row["meets_target"]
    # the wire carries the tensors plus names and the plan: a little more than the raw bytes
    r = row["per_rank"][0]
    assert r["adapter_bytes"] < r["reply_wire_bytes"] < 1.1 * r["adapter_bytes"]


@pytest.mark.slow
def test_throughput_smoke(tmp_path):
    row = run_bench("throughput", ["--smoke"], tmp_path)
    from bench.throughput import native_bf16

    bf16 = {"no_dp_bf16", "dp_linear_hooks_bf16", "no_dp_bf16_base", "dp_linear_hooks_bf16_base"}
    assert set(row["samples_per_s"]) == {"no_dp", "no_dp_sdpa", "dp_linear_hooks", "dp_hooks",
                                         "dp_ghost",
                                         "head_only_no_dp", "head_only_dp", "ffa_no_dp",
                                         "ffa_dp", "reference"} | (bf16 if native_bf16() else set())
    # the head alone trains less
    assert row["best_dp_variant"] in ("dp_linear_hooks", "dp_hooks", "dp_ghost")
    assert set(row["head_only"]) == {"dp_vs_nodp_ratio", "dp_vs_lora_dp"}
    assert set(row["ffa"]) == {"dp_vs_nodp_ratio", "dp_vs_lora_dp", "no_dp_vs_lora_no_dp"}
    if native_bf16():
        assert row["bf16"]["matmul_ceiling_gflops"] > 0 and row["bf16"]["dp_vs_fp32"] > 0
        assert row["bf16_base"]["base_param_bytes_vs_fp32"] == pytest.approx(0.5, abs=0.05)
    else:  # emulated bf16 would take most of an hour to measure nothing useful
        assert "no native bf16" in row["bf16"]["skipped"]
    assert all(v > 0 for v in row["samples_per_s"].values())
    assert set(row["attention"]) == {"no_dp_vs_sdpa", "no_dp_vs_sdpa_paired_median"}
    # the ceiling is read once per repeat, next to no DP's run
    repeats = row["config"]["repeats"]
    assert len(row["matmul_ceiling_gflops_per_repeat"]) == repeats
    assert len(row["ceiling_fraction_per_repeat"]) == repeats
    assert row["matmul_ceiling_gflops"] == max(row["matmul_ceiling_gflops_per_repeat"])
    assert row["ceiling_fraction_best_vs_max"] > 0
    for key in ("dp_vs_nodp_ratio", "dp_vs_nodp_token_ratio", "linear_hooks_vs_hooks",
                "ceiling_fraction", "vs_reference"):
        assert row[key] > 0
    # fedllm counts only real tokens: ~13 per SST-2 phrase, far below the reference's 64
    assert row["tokens_per_s"]["no_dp"] / row["samples_per_s"]["no_dp"] < 30


@pytest.mark.slow
def test_scale_smoke(tmp_path):
    row = run_bench("scale", ["--smoke"], tmp_path)
    assert row["state"] == "finished" and row["failures"] == 0
    assert len(row["rss_mb_per_round"]) == len(row["round_seconds"]) == 4
    assert all(v > 0 for v in row["rss_mb_per_round"])
    # 20 nodes x 20 examples at σ_c = 4: the counts show the release could not help, so no
    # node spends ε on round 0
    r0 = row["round0"]
    assert r0["released"] is False and r0["ledger_entries_round0"] == r0["released_by"] == 0
    assert 0 < row["max_node_epsilon"] <= 8.0


@pytest.mark.slow
def test_utility_smoke(tmp_path):
    row = run_bench("utility", ["--smoke"], tmp_path)
    assert set(row["accuracy"]) == {"initial", "centralised", "federated",
                                    "federated_dp_eps8", "federated_dp_eps3",
                                    "federated_dp_eps1"}
    for eps in (8, 3, 1):
        setting = row["settings"][f"federated_dp_eps{eps}"]
        # whole-run calibration, the class-statistics release included: each node ends at
        # (just under) its target
        assert all(0.9 * eps <= e <= eps * 1.01 for e in setting["epsilon_spent"]), setting
        assert setting["class_stats"]["examples"] == 192


@pytest.mark.slow
def test_utility_server_adam_and_distributed_noise_what_if(tmp_path):
    """DP-FedSGD (one local SGD step a round) with the coordinator's Adam, and the
    distributed-noise what-if: ε is still each node's at the calibrated σ."""
    small = ["--nodes", "3", "--examples-per-node", "64", "--eval-examples", "64",
             "--dp-batch-size", "32", "--physical-batch-size", "32", "--epsilons", "8",
             "--settings", "federated_dp_eps8", "--dp-rounds", "2", "--dp-local-steps", "1",
             "--dp-optimizer", "sgd", "--dp-lr", "1", "--dp-head-lr", "1"]
    row = run_bench("utility", [*small, "--server-opt", "fedadam", "--server-lr", "0.01",
                                "--dp-distributed", "3"], tmp_path)
    assert row["config"]["server_opt"] == "fedadam" and row["config"]["dp_distributed"] == 3
    setting = row["settings"]["federated_dp_eps8"]
    assert all(7.2 <= e <= 8.08 for e in setting["epsilon_spent"]), setting
    # The what-if is refused where the released sum would not be linear in the noise.
    proc = subprocess.run([sys.executable, "-m", "bench.utility", *small[:-6],
                           "--dp-distributed", "3", "--results-dir", str(tmp_path / "x")],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--dp-local-steps 1 --dp-optimizer sgd" in proc.stderr


@pytest.mark.slow
def test_utility_noise_scale_diagnostic_and_ema(tmp_path):
    """--dp-noise-scale runs the DP recipe with scaled noise: ε is that of the noise added
    (half the calibrated σ spends more than the target), and none at all is no ε (null).
    --ema evaluates moving averages of the global adapter too."""
    small = ["--nodes", "3", "--examples-per-node", "64", "--eval-examples", "64",
             "--dp-batch-size", "32", "--physical-batch-size", "32", "--epsilons", "8",
             "--settings", "federated_dp_eps8", "--dp-rounds", "2", "--dp-local-steps", "1"]
    half = run_bench("utility", [*small, "--dp-noise-scale", "0.5", "--ema", "0.5"],
                     tmp_path / "half")
    assert half["config"]["dp_noise_scale"] == 0.5 and half["config"]["ema"] == [0.5]
    setting = half["settings"]["federated_dp_eps8"]
    assert all(e > 8.5 for e in setting["epsilon_spent"])
    # The moving average of the 2 rounds' adapters is evaluated beside the last one.
    assert 0 <= setting["ema"]["0.5"]["accuracy"] <= 1
    none = run_bench("utility", [*small, "--dp-noise-scale", "0"], tmp_path / "none")
    assert none["settings"]["federated_dp_eps8"]["epsilon_spent"] is None


@pytest.mark.slow
def test_utility_cosine_rate_and_one_sampling_rate(tmp_path):
    """Non-private federated with --sample-rate (each node's batch q × its examples) and the
    cosine rate: both recorded, and the batches follow q."""
    row = run_bench("utility", ["--nodes", "3", "--examples-per-node", "64", "--eval-examples",
                                "64", "--physical-batch-size", "32", "--settings", "federated",
                                "--sample-rate", "0.25", "--lr-schedule", "cosine",
                                "--lr-min-fraction", "0.1"], tmp_path)
    assert row["config"]["lr_schedule"] == "cosine" and row["config"]["sample_rate"] == 0.25
    assert row["settings"]["federated"]["batch_sizes"] == [16, 16, 16]


@pytest.mark.slow
def test_utility_logit_adjustment_priors(tmp_path):
    """--logit-adjust: non-private nodes use their own label counts (an exact smoothed prior:
    the two offsets' exponentials sum to 1), DP nodes the noisy counts of their release."""
    import math

    row = run_bench("utility", ["--smoke", "--settings", "federated,federated_dp_eps8",
                                "--epsilons", "8", "--logit-adjust", "1"], tmp_path)
    assert row["config"]["logit_adjust"] == 1.0
    for name in ("federated", "federated_dp_eps8"):
        offsets = row["settings"][name]["logit_offsets"]
        assert len(offsets) == 3 and all(len(o) == 2 for o in offsets)
        assert all(math.isclose(sum(math.exp(v) for v in o), 1.0, abs_tol=5e-3)
                   for o in offsets)
    assert row["settings"]["federated"]["logit_offsets"] != \
        row["settings"]["federated_dp_eps8"]["logit_offsets"]


def test_utility_split_keeps_skew_and_pooled_label_mix():
    """--quick's nodes: exactly per_node examples each, disjoint, strongly skewed, and together
    in the label proportions of the whole split (seed 0 of independent draws gave 22 %
    positives against 56 %)."""
    import numpy as np

    from bench.utility import equal_size_dirichlet

    labels = np.array([1] * 5580 + [0] * 4420)  # SST-2's 55.8 % positives
    for seed in range(5):
        parts = equal_size_dirichlet(labels, 3, 3000, alpha=0.5, seed=seed)
        assert [len(p) for p in parts] == [3000, 3000, 3000]
        pooled = np.concatenate(parts)
        assert len(np.unique(pooled)) == 9000  # disjoint
        assert abs(labels[pooled].mean() - 0.558) < 1e-3
        shares = [labels[p].mean() for p in parts]
        assert max(shares) - min(shares) > 0.2  # Dirichlet(0.5) skew is kept


def test_utility_dp_settings_per_epsilon():
    from bench.utility import per_epsilon

    assert per_epsilon("1024", 8.0) == 1024.0
    assert per_epsilon("8:256,3:512,1:1024", 3.0) == 512.0
    assert per_epsilon("8:0.1,1:0.03", 1.0) == 0.03
    assert per_epsilon("8:256,1:1024", 4.0) == 256.0  # nearest on a log scale (3 -> 1024)
    assert per_epsilon("8:256,1:1024", 2.0) == 1024.0
    with pytest.raises(SystemExit, match="bad per-ε"):
        per_epsilon("8:256,1", 3.0)


@pytest.mark.slow
def test_gradsignal_smoke(tmp_path):
    row = run_bench("gradsignal", ["--smoke", "--threads", "1"], tmp_path)
    assert row["config"]["examples_sampled"] == 24
    groups = row["groups"]
    # B = 0 at LoRA's init, so A's gradient is exactly zero: all noise, no signal
    assert groups["kind:lora_A"]["ratio"] == 0.0
    assert groups["kind:lora_A"]["dim"] == groups["kind:lora_B"]["dim"] == 6 * 2 * 8 * 384
    assert groups["head"]["dim"] == 384 * 2 + 2
    assert row["total"]["noise_energy_per_step"] > 0


def test_gradsignal_estimator_and_groups():
    import torch

    from bench.gradsignal import _groups, signal_energy

    v = torch.tensor([3.0, 4.0], dtype=torch.float64)
    same = torch.stack([v] * 10)
    assert signal_energy(same.sum(0), (same ** 2).sum(0), 10) == pytest.approx(25.0)
    # zero-mean draws: the naive ‖mean‖² is ~d / k, the unbiased estimate ~0
    x = torch.randn(4000, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    naive = float((x.mean(0) ** 2).sum())
    est = signal_energy(x.sum(0), (x ** 2).sum(0), 4000)
    assert naive == pytest.approx(50 / 4000, rel=0.3)
    assert abs(est) < 0.3 * naive
    name = "base_model.model.encoder.encoder.layer.4.attention.self.value.lora_B.default.weight"
    assert _groups(name) == ["kind:lora_B", "module:attention.self.value", "layer:4"]
    assert _groups("base_model.model.head.modules_to_save.default.weight") == ["head"]


@pytest.mark.slow
def test_accounting_quick(tmp_path):
    row = run_bench("accounting", ["--quick"], tmp_path)
    demo = row["scenarios"]["demo_node"]
    assert demo["same_plan_with_and_without_memo"] and demo["opacus_prv_epsilon_equal"]
    assert 7.9 < demo["projected_epsilon"][-1] <= 8.0
    assert len(demo["seconds"]["memo"]) == len(demo["seconds"]["no_memo"]) == 1
