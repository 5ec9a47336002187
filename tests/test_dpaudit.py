"""Canary audit: the ε lower bound's statistics (fast) and a real DP-vs-control audit (slow)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedllm.dpaudit import epsilon_lower_bound, make_canaries


def test_perfect_separation_gives_the_clopper_pearson_limited_bound():
    inside, outside = np.ones(32), np.zeros(32)
    ub = 1 - 0.05 ** (1 / 32)  # one-sided 95 % Clopper-Pearson upper bound of 0/32
    got = epsilon_lower_bound(inside, outside, delta=1e-5, threshold=0.5)
    assert got == pytest.approx(math.log((1 - 1e-5 - ub) / ub), rel=1e-6)
    assert 2.0 < got < 2.5  # 32 + 32 canaries cannot certify more than this


def test_no_separation_gives_no_bound():
    rng = np.random.default_rng(0)
    s = rng.normal(size=64)
    assert epsilon_lower_bound(s[:32], s[32:], delta=1e-5, threshold=0.0) == 0.0


def test_canaries_are_random_words_with_random_labels():
    rng = np.random.default_rng(1)
    texts, labels = make_canaries(50, words=["alpha", "bravo", "charlie", "delta"],
                                  num_labels=2, length=6, rng=rng)
    assert len(set(texts)) == 50 and all(len(t.split()) == 6 for t in texts)
    assert set(labels.tolist()) == {0, 1}


@pytest.mark.slow
def test_control_without_dp_leaks_more_than_dp(tmp_path):
    """The issue's check: a no-DP run shows a clearly higher bound than the DP run.

    10 local epochs: with unit-length pooled features (mean-norm) the no-DP control memorises
    the canaries more slowly; after 6 epochs its bound was 0.24 (AUC already well above DP's)."""
    import json

    from tests.conftest import run_cli

    proc = run_cli(["audit-dp", "--canaries", "64", "--json", "-s", "data.max_examples=300",
                    "-s", "train.batch_size=64", "-s", "train.physical_batch_size=64",
                    "-s", "train.learning_rate=0.01", "-s", "train.local_epochs=10",
                    "-s", "model.max_length=32"], tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    dp, control = json.loads(proc.stdout)
    assert dp["dp_enabled"] and not control["dp_enabled"]
    assert dp["empirical_epsilon_lower_bound"] <= dp["accountant_epsilon"]
    assert control["auc"] > dp["auc"] + 0.1
    assert control["empirical_epsilon_lower_bound"] > dp["empirical_epsilon_lower_bound"] + 0.3
