import math

import numpy as np
import pytest

from fedllm.data import encode_labels, read_table, tokenize
from fedllm.model import load_model
from fedllm.privacy import compute_epsilon
from fedllm.train import DPParams, train_local
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def setup():
    lm = load_model(None, task="seq-cls", label_names=("0", "1"), seed=0)
    t = read_table(DEMO / "sst2_train_sample.tsv", text_column="sentence", label_column="label",
                   max_examples=120)
    ds = tokenize(lm.tokenizer, t.texts, encode_labels(t, ("0", "1"), "label"), max_length=64)
    return lm, ds


def test_dp_round_takes_planned_steps_and_cleans_up(setup):
    lm, ds = setup
    before = lm.adapter_state()
    r = train_local(lm, ds, epochs=2, batch_size=40, physical_batch_size=16, learning_rate=1e-2,
                    dp=DPParams(noise_multiplier=1.0, max_grad_norm=1.0), seed=1)
    steps_per_epoch = math.ceil(120 / 40)
    assert r.steps == 2 * steps_per_epoch
    assert r.sample_rate == pytest.approx(1 / steps_per_epoch)
    assert r.history == [(1.0, pytest.approx(1 / 3), 6)]
    assert compute_epsilon(r.history, delta=1e-5, accountant="prv") > 0
    after = lm.adapter_state()
    assert any(not np.allclose(before[k], after[k]) for k in before)
    # Opacus hooks and per-sample buffers are gone: the model object is reusable next round
    assert not any(hasattr(p, "grad_sample") for p in lm.model.parameters())
    assert not lm.model.training
    lm.load_adapter_state(before)


def test_noise_is_applied(setup):
    """Two runs with different seeds: with tiny noise their updates point the same way (the
    gradient signal dominates); with huge noise they are nearly uncorrelated."""
    lm, ds = setup
    before = lm.adapter_state()

    def update(sigma, seed):
        lm.load_adapter_state(before)
        train_local(lm, ds, epochs=1, batch_size=40, physical_batch_size=40,
                    learning_rate=1e-3, dp=DPParams(sigma, 1.0), seed=seed)
        after = lm.adapter_state()
        lm.load_adapter_state(before)
        # The head: LoRA A has zero gradient while B is still zero, and Adam turns pure noise
        # there into ±lr steps whatever σ is; the head always gets a real gradient.
        return np.concatenate([(after[k] - before[k]).ravel() for k in before if "head" in k])

    def corr(a, b):
        return float(np.corrcoef(a, b)[0, 1])

    assert corr(update(1e-3, 1), update(1e-3, 2)) > 0.5
    assert abs(corr(update(100.0, 1), update(100.0, 2))) < 0.2


def test_no_dp_training_learns(setup):
    lm, ds = setup
    before = lm.adapter_state()
    r1 = train_local(lm, ds, epochs=1, batch_size=20, physical_batch_size=20, learning_rate=1e-2,
                     dp=None, seed=0)
    r2 = train_local(lm, ds, epochs=3, batch_size=20, physical_batch_size=20, learning_rate=1e-2,
                     dp=None, seed=0)
    assert r1.noise_multiplier is None and r1.steps == 6
    assert r2.mean_loss < r1.mean_loss
    lm.load_adapter_state(before)


def test_causal_lm_dp_step(tiny_causal_lm):
    lm = load_model(str(tiny_causal_lm), task="causal-lm", seed=0)
    t = read_table(DEMO / "sst2_train_sample.tsv", text_column="sentence", label_column=None,
                   max_examples=40)
    ds = tokenize(lm.tokenizer, t.texts, None, max_length=32)
    r = train_local(lm, ds, epochs=1, batch_size=10, physical_batch_size=5, learning_rate=1e-2,
                    dp=DPParams(1.0, 1.0), seed=0)
    assert r.steps == 4 and np.isfinite(r.mean_loss)
