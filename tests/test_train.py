import math
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from fedllm.data import encode_labels, read_table, tokenize
from fedllm.model import load_model
from fedllm.privacy import compute_epsilon
from fedllm.train import (
    DPParams,
    LRSchedule,
    _scheduled,
    logit_adjustment,
    private_class_stats,
    train_local,
)
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def setup():
    lm = load_model(None, task="seq-cls", label_names=("0", "1"), seed=0)
    t = read_table(DEMO / "sst2_train_sample.tsv", text_column="sentence", label_column="label",
                   max_examples=120)
    ds = tokenize(lm.tokenizer, t.texts, encode_labels(t, ("0", "1"), "label"), max_length=64)
    return lm, ds


@contextmanager
def _dropout_off(*models):
    """Every dropout of the models' modules at p = 0 (a deterministic forward, so two methods
    or two models see the same gradients), restored afterwards."""
    drop = [(m, m.p) for lm in models for m in lm.model.modules() if isinstance(m, nn.Dropout)]
    for m, _ in drop:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in drop:
            m.p = p


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


def _clipped_sum(lm, ds, mode: str, max_grad_norm: float, *,
                 lora_max_grad_norm: float | None = None) -> dict[str, np.ndarray]:
    """Σ_i clip(g_i) over all examples via the private loop with σ = 0 and SGD(lr=1): with q = 1
    every example is drawn, and the step moves the adapter by -Σ clip(g_i) / N."""
    import torch

    from fedllm.data import Collator
    from fedllm.train import _train_dp

    state = lm.adapter_state()
    trainable = {n: p for n, p in lm.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().numpy().copy() for n, p in trainable.items()}
    lm.model.train()
    _train_dp(lm.model, ds, Collator(int(lm.tokenizer.pad_token_id)),
              torch.optim.SGD(list(trainable.values()), lr=1.0), device=lm.device,
              task=lm.task, epochs=1, batch_size=len(ds), physical_batch_size=3,
              dp=DPParams(0.0, max_grad_norm, lora_max_grad_norm=lora_max_grad_norm), seed=0,
              grad_sample_mode=mode)
    lm.model.eval()
    after = {n: p.detach().numpy().copy() for n, p in trainable.items()}
    lm.load_adapter_state(state)
    return {k: (before[k] - after[k]) * len(ds) for k in before}


def _manual_clipped_sum(lm, ds, max_grad_norm: float, *,
                        lora_max_grad_norm: float | None = None) -> dict[str, np.ndarray]:
    """The definition, one example at a time, no Opacus: Σ_i g_i · min(1, C / ‖g_i‖); with
    ``lora_max_grad_norm`` the head's part clipped to C and the rest to C_l separately."""
    import torch

    from fedllm.data import Collator
    from fedllm.train import example_losses

    collate = Collator(int(lm.tokenizer.pad_token_id))
    names = {id(p): n for n, p in lm.model.named_parameters() if p.requires_grad}
    total: dict[str, torch.Tensor] = {}
    lm.model.train()
    for i in range(len(ds)):
        lm.model.zero_grad(set_to_none=True)
        example_losses(lm.model, collate([ds[i]]), lm.task).sum().backward()
        grads = {names[id(p)]: p.grad.detach().clone()
                 for p in lm.model.parameters() if p.requires_grad}
        groups = ({n: "all" for n in grads} if lora_max_grad_norm is None
                  else {n: "head" if "head" in n else "lora" for n in grads})
        bound = {"all": max_grad_norm, "head": max_grad_norm, "lora": lora_max_grad_norm}
        scale = {}
        for grp in set(groups.values()):
            norm = torch.sqrt(sum((g.double() ** 2).sum() for n, g in grads.items()
                                  if groups[n] == grp))
            scale[grp] = min(1.0, bound[grp] / (float(norm) + 1e-6))
        for n, g in grads.items():
            total[n] = total.get(n, 0) + g * scale[groups[n]]
    lm.model.zero_grad(set_to_none=True)
    lm.model.eval()
    return {n: g.numpy() for n, g in total.items()}


# Mean-norm pooling (unit-length sentence vectors, as all-MiniLM-L6-v2 was trained); with
# unnormalised mean pooling this was 0.69445.
PINNED_HEAD_L1 = 0.50541


def test_ghost_hooks_and_linear_hooks_clip_the_same(setup):
    """Opacus' two modes and fedllm's linear-hooks give Σ_i clip(g_i), equal to the
    one-example-at-a-time definition, on 8 examples in physical chunks of 3 (accumulation across
    chunks included)."""
    lm, ds_all = setup
    ds = type(ds_all)(ds_all.input_ids[:8], ds_all.labels[:8])
    with _dropout_off(lm):  # so the four methods see the same gradients
        # A small bound so clipping is active for every example (the norms are ~0.1 to 1).
        hooks = _clipped_sum(lm, ds, "hooks", 0.01)
        ghost = _clipped_sum(lm, ds, "ghost", 0.01)
        linear = _clipped_sum(lm, ds, "linear-hooks", 0.01)
        manual = _manual_clipped_sum(lm, ds, 0.01)
    assert set(hooks) == set(ghost)
    head = [k for k in hooks if "head" in k and k.endswith("weight")][0]
    # Each clipped gradient has norm ≤ C, so the sum over 8 examples has norm ≤ 8 C.
    total_norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in hooks.values()))
    assert 0.0 < total_norm <= 8 * 0.01 + 1e-6
    for k in hooks:
        np.testing.assert_allclose(ghost[k], hooks[k], atol=1e-6, rtol=1e-3)
        np.testing.assert_allclose(linear[k], hooks[k], atol=1e-7, rtol=1e-4)
    assert set(manual) == set(hooks)
    for k in hooks:
        np.testing.assert_allclose(hooks[k], manual[k], atol=1e-6, rtol=1e-3)
    # Pinned: the head's clipped-gradient sum (model seed 0, first 8 demo examples, C = 0.01).
    assert float(np.abs(hooks[head]).sum()) == pytest.approx(PINNED_HEAD_L1, rel=1e-3)


def test_grouped_clipping_clips_head_and_lora_separately(setup):
    """Grouped clipping's σ = 0 sum equals the definition: the head's part of each example's
    gradient clipped to C, LoRA's to C_l, independently (8 examples, chunks of 3)."""
    lm, ds_all = setup
    ds = type(ds_all)(ds_all.input_ids[:8], ds_all.labels[:8])
    state = lm.adapter_state()
    # A non-zero LoRA B, so LoRA A has a gradient too (B = 0 at init).
    lm.load_adapter_state({k: (v + 0.05 if "lora_B" in k else v) for k, v in state.items()})
    try:
        grouped = _clipped_sum(lm, ds, "hooks", 0.01, lora_max_grad_norm=0.002)
        linear = _clipped_sum(lm, ds, "linear-hooks", 0.01, lora_max_grad_norm=0.002)
        manual = _manual_clipped_sum(lm, ds, 0.01, lora_max_grad_norm=0.002)
        flat = _manual_clipped_sum(lm, ds, 0.01)
    finally:
        lm.load_adapter_state(state)
    assert set(grouped) == set(manual)
    for k in grouped:
        np.testing.assert_allclose(grouped[k], manual[k], atol=1e-7, rtol=1e-3)
        np.testing.assert_allclose(linear[k], manual[k], atol=1e-7, rtol=1e-3)
    # Each group's sum is bounded by its own clip norm times the 8 examples.
    head = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum())
                         for k, v in grouped.items() if "head" in k))
    lora = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum())
                         for k, v in grouped.items() if "head" not in k))
    assert 0 < head <= 8 * 0.01 + 1e-6 and 0 < lora <= 8 * 0.002 + 1e-6
    # ... and it is not flat clipping: LoRA's tighter bound leaves the head more of its part.
    assert any(not np.allclose(grouped[k], flat[k], rtol=1e-2) for k in grouped if "head" in k)


def test_grouped_noise_is_per_group_and_accounted_as_flat():
    """Noise std σ C_g / a_g per group (a_head² = 1 − share, a_lora² = share); the accountant
    records the same (σ, q, steps) as flat clipping at σ."""
    from opacus import GradSampleModule

    from fedllm.train import GroupedDPOptimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("body", torch.nn.Linear(200, 200, bias=False))
    net.add_module("head", torch.nn.Linear(200, 200, bias=False))
    gsm = GradSampleModule(net)
    head_ids = {id(net.head.weight)}
    sigma, c_head, c_lora, share = 2.0, 0.5, 0.1, 0.2
    opt = GroupedDPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=sigma,
                             expected_batch_size=1, head_params=head_ids,
                             head_max_grad_norm=c_head, lora_max_grad_norm=c_lora,
                             lora_noise_share=share, loss_reduction="sum")
    with warnings.catch_warnings():  # torch: the full backward hook fires on a frozen input
        warnings.simplefilter("ignore", UserWarning)
        gsm(torch.zeros(3, 200)).sum().backward()  # zero inputs: zero per-sample gradients
    assert opt.pre_step()
    std_head = float(net.head.weight.grad.std())
    std_body = float(net.body.weight.grad.std())
    assert std_head == pytest.approx(sigma * c_head / math.sqrt(1 - share), rel=0.02)
    assert std_body == pytest.approx(sigma * c_lora / math.sqrt(share), rel=0.02)
    with pytest.raises(ValueError, match="head and non-head"):
        GroupedDPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=1.0,
                           expected_batch_size=1, head_params=set(), head_max_grad_norm=1.0,
                           lora_max_grad_norm=1.0, lora_noise_share=0.5)
    with pytest.raises(ValueError, match="lora_noise_share"):
        DPParams(1.0, 1.0, lora_max_grad_norm=0.1, lora_noise_share=1.0)


def test_grouped_round_history_and_ghost_refusal(setup):
    lm, ds = setup
    before = lm.adapter_state()
    kw = dict(epochs=1, batch_size=40, physical_batch_size=40, learning_rate=1e-3, seed=4)
    flat = train_local(lm, ds, dp=DPParams(1.3, 1.0), **kw)
    lm.load_adapter_state(before)
    grouped = train_local(lm, ds, dp=DPParams(1.3, 1.0, lora_max_grad_norm=0.1), **kw)
    assert grouped.history == flat.history == [(1.3, pytest.approx(1 / 3), 3)]
    assert grouped.clipping == "linear-hooks"
    assert any(not np.allclose(before[k], v) for k, v in lm.adapter_state().items())
    lm.load_adapter_state(before)
    with pytest.raises(ValueError, match="ghost"):
        train_local(lm, ds, dp=DPParams(1.3, 1.0, lora_max_grad_norm=0.1), clipping="ghost",
                    **kw)
    lm.load_adapter_state(before)
    assert not any(hasattr(p, "grad_sample") for p in lm.model.parameters())


def test_auto_clipping_picks_linear_hooks_for_lora_and_ghost_for_huge_trainables(setup):
    from fedllm.train import GHOST_ABOVE_BYTES, choose_clipping

    lm, _ = setup
    auto = choose_clipping(lm.model, physical_batch_size=64, mode="auto")
    assert auto == "linear-hooks"  # LoRA A, B and the head are all nn.Linear
    assert choose_clipping(lm.model, physical_batch_size=64, mode="ghost") == "ghost"
    assert choose_clipping(lm.model, physical_batch_size=64, mode="hooks") == "hooks"
    assert choose_clipping(lm.model, physical_batch_size=64, mode="auto",
                           grouped=True) == "linear-hooks"
    with pytest.raises(ValueError, match="not ghost"):
        choose_clipping(lm.model, physical_batch_size=64, mode="ghost", grouped=True)
    big = nn.Linear(1024, GHOST_ABOVE_BYTES // (4 * 1024 * 8) + 1)  # > budget at batch 8
    assert choose_clipping(big, physical_batch_size=8, mode="auto") == "ghost"
    assert choose_clipping(big, physical_batch_size=8, mode="auto", grouped=True) == "linear-hooks"
    assert choose_clipping(big, physical_batch_size=1, mode="auto") == "linear-hooks"
    # A trainable layer that is not nn.Linear: Opacus' hooks, which cover any layer type.
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert choose_clipping(net, physical_batch_size=8, mode="auto") == "hooks"


def test_linear_hooks_and_opacus_hooks_train_the_same_round(setup):
    """Same seed, same Poisson draws, same noise: a whole DP round (σ 1, AdamW, chunks of 16)
    moves the adapter identically whichever computes the per-sample gradients."""
    lm, ds = setup
    before = lm.adapter_state()
    kw = dict(epochs=1, batch_size=40, physical_batch_size=16, learning_rate=1e-2,
              dp=DPParams(1.0, 1.0), seed=7)
    a = train_local(lm, ds, clipping="hooks", **kw)
    after_hooks = lm.adapter_state()
    lm.load_adapter_state(before)
    b = train_local(lm, ds, clipping="linear-hooks", **kw)
    after_linear = lm.adapter_state()
    lm.load_adapter_state(before)
    assert (a.clipping, b.clipping) == ("hooks", "linear-hooks")
    assert a.history == b.history and a.samples == b.samples
    assert any(not np.allclose(before[k], after_hooks[k]) for k in before)
    for k in before:
        np.testing.assert_allclose(after_linear[k], after_hooks[k], rtol=1e-4, atol=1e-6)
    assert not any(hasattr(p, "grad_sample") for p in lm.model.parameters())
    assert not any(m._forward_hooks for m in lm.model.modules())


def _clipped_grads(lm, ds, mode: str, max_grad_norm: float, precision: str) -> np.ndarray:
    """The gradient DP-SGD steps on with σ = 0 and q = 1 (all of ``ds`` drawn, physical chunks
    of 3), Σ_i clip(g_i) / N, flattened: read off the inner optimizer just before it steps."""
    from fedllm.data import Collator
    from fedllm.train import _train_dp

    state = lm.adapter_state()
    params = [p for p in lm.model.parameters() if p.requires_grad]
    inner = torch.optim.SGD(params, lr=0.0)
    seen: list[np.ndarray] = []
    inner.register_step_pre_hook(lambda *_: seen.append(
        torch.cat([p.grad.detach().double().ravel() for p in params]).numpy()))
    lm.model.train()
    try:
        r = _train_dp(lm.model, ds, Collator(int(lm.tokenizer.pad_token_id)), inner,
                      device=lm.device, task=lm.task, epochs=1, batch_size=len(ds),
                      physical_batch_size=3, dp=DPParams(0.0, max_grad_norm), seed=0,
                      grad_sample_mode=mode, precision=precision)
    finally:
        lm.model.eval()
        lm.load_adapter_state(state)
    assert r.precision == precision and len(seen) == 1
    return seen[0]


def test_bf16_forward_keeps_clip_norms_exact_and_is_refused_with_opacus_modes(setup):
    """Under bf16 autocast fedllm's per-example gradients are fp32 from bf16 activations: one
    clipped example has norm C to fp32 precision (the sensitivity the accountant assumes), and
    points where the fp32 gradient does. Opacus' modes would clip bf16 norms: refused."""
    from fedllm.train import choose_precision

    lm, ds_all = setup
    with _dropout_off(lm):
        one = type(ds_all)(ds_all.input_ids[:1], ds_all.labels[:1])
        c = 1e-3  # far below the example's gradient norm: it is clipped to exactly C
        g16 = _clipped_grads(lm, one, "linear-hooks", c, "bf16")
        g32 = _clipped_grads(lm, one, "linear-hooks", c, "fp32")
        assert np.linalg.norm(g16) == pytest.approx(c, rel=1e-5)
        assert np.linalg.norm(g32) == pytest.approx(c, rel=1e-5)
        cos = float(g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)))
        assert 0.99 < cos < 1 - 1e-9  # the same gradient, computed from bf16 activations
        eight = type(ds_all)(ds_all.input_ids[:8], ds_all.labels[:8])
        s16 = _clipped_grads(lm, eight, "linear-hooks", c, "bf16")
        assert np.linalg.norm(s16) <= c + 1e-9  # the mean of 8 clipped gradients
    cpu = torch.device("cpu")
    assert choose_precision("auto", device=cpu, clipping="linear-hooks") == "fp32"
    assert choose_precision("bf16", device=cpu, clipping="linear-hooks") == "bf16"
    assert choose_precision("bf16", device=cpu, clipping=None) == "bf16"  # no DP
    for mode in ("hooks", "ghost"):
        with pytest.raises(ValueError, match="bf16.*linear-hooks"):
            choose_precision("bf16", device=cpu, clipping=mode)
    before = lm.adapter_state()
    with pytest.raises(ValueError, match="bf16"):
        train_local(lm, ds_all, epochs=1, batch_size=40, physical_batch_size=16,
                    learning_rate=1e-2, dp=DPParams(1.0, 1.0), seed=0, clipping="hooks",
                    precision="bf16")
    assert all(np.array_equal(before[k], v) for k, v in lm.adapter_state().items())
    r = train_local(lm, ds_all, epochs=1, batch_size=40, physical_batch_size=16,
                    learning_rate=1e-2, dp=None, seed=0, precision="bf16")
    lm.load_adapter_state(before)
    assert r.precision == "bf16" and np.isfinite(r.mean_loss)


def test_dp_round_counts_samples_and_tokens(setup):
    lm, ds = setup
    before = lm.adapter_state()
    r = train_local(lm, ds, epochs=1, batch_size=40, physical_batch_size=16, learning_rate=1e-2,
                    dp=DPParams(noise_multiplier=1.0, max_grad_norm=1.0), seed=3,
                    clipping="ghost")
    lm.load_adapter_state(before)
    assert r.clipping == "ghost"
    # Poisson sampling: about N examples in expectation; each has ≥ 3 tokens ([CLS] w [SEP])
    assert 60 < r.samples < 180 and r.tokens >= 3 * r.samples
    assert not any(hasattr(p, "grad_sample") for p in lm.model.parameters())


def _padded(lengths: np.ndarray, chunks: list[np.ndarray]) -> int:
    return sum(len(c) * int(lengths[c].max()) for c in chunks)


def _brute_force_best(lengths: list[int], cap: int, cost: float) -> float:
    """Cheapest cut of a sorted list into contiguous chunks of <= cap, by enumeration."""
    n = len(lengths)
    best = math.inf
    for mask in range(2 ** (n - 1)):  # bit i set: a cut after position i
        bounds = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        if max(sizes) > cap:
            continue
        best = min(best, sum(cost + (b - a) * lengths[b - 1]
                             for a, b in zip(bounds, bounds[1:], strict=False)))
    return best


def test_physical_chunks_are_an_optimal_cover():
    from fedllm.train import physical_chunks

    rng = np.random.default_rng(0)
    for _ in range(40):
        n, cap = int(rng.integers(1, 10)), int(rng.integers(1, 5))
        cost = float(rng.choice([0.0, 3.0, 32.0]))
        lengths = np.sort(rng.integers(1, 40, size=n))
        chunks = physical_chunks(lengths, max_examples=cap, chunk_cost_tokens=cost)
        assert np.array_equal(np.concatenate(chunks), np.arange(n))  # each index once, in order
        assert max(len(c) for c in chunks) <= cap
        got = sum(cost + len(c) * int(lengths[c].max()) for c in chunks)
        assert got == pytest.approx(_brute_force_best(lengths.tolist(), cap, cost))


def test_split_logical_pads_less_than_equal_count_chunks():
    from fedllm.train import split_logical

    lengths = np.random.default_rng(1).lognormal(2.4, 0.6, size=2000).astype(int) + 2
    logical = np.random.default_rng(2).choice(2000, size=256, replace=False)
    cpu = split_logical(logical, lengths, physical_batch_size=64, device=torch.device("cpu"))
    assert sorted(np.concatenate(cpu).tolist()) == sorted(logical.tolist())
    ordered = np.asarray(sorted(logical, key=lengths.__getitem__))
    equal = np.array_split(ordered, 4)
    assert _padded(lengths, cpu) < 0.85 * _padded(lengths, equal)
    # Accelerators: as few chunks as the cap allows (4), boundaries chosen to cut padding.
    gpu = split_logical(logical, lengths, physical_batch_size=64, device=torch.device("meta"))
    assert len(gpu) == 4 and _padded(lengths, gpu) <= _padded(lengths, equal)


def test_make_optimizer_gives_the_head_its_own_rate_or_the_shared_one():
    from fedllm.train import make_optimizer

    model = nn.Module()
    model.body = nn.Linear(2, 2)
    model.head = nn.Linear(2, 2)
    for head_lr, expected in ((None, 1e-3), (0.03, 0.03), (0.0, 0.0)):
        opt = make_optimizer("adamw", model, learning_rate=1e-3, head_learning_rate=head_lr,
                             weight_decay=0.0, momentum=0.0)
        assert [g["lr"] for g in opt.param_groups] == [1e-3, expected]


def test_private_class_stats_are_clipped_class_sums_and_counts_plus_calibrated_noise(setup):
    """The Gaussian mechanism: (Σ_{y_i = c} [a x_i, b C] + N(0, (σC)²)) / N per row c (a² = 0.9,
    b² = 0.1: most of the sensitivity to the sums), one
    q = 1 step in the accountant; the model's mode is left as it was."""
    lm, ds = setup
    clf = lm.model.get_base_model()
    with torch.no_grad():
        lm.model.eval()
        x = torch.cat([clf.pooled(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
                       for ids in ds.input_ids]).numpy()  # (N, H), unit rows (mean-norm)
    y = np.asarray(ds.labels)
    n, h = x.shape
    exact = np.stack([np.append(x[y == c].sum(0), (y == c).sum()) for c in (0, 1)])
    exact = exact * np.append(np.full(h, np.sqrt(0.9)), np.sqrt(0.1)) / n  # (C, H + 1)
    assert 0 < (y == 1).sum() < n  # both classes present
    lm.model.train()
    quiet = private_class_stats(lm, ds, noise_multiplier=1e-6, seed=0)
    assert lm.model.training
    assert quiet.stats.shape == (2, h + 1)
    assert np.allclose(quiet.stats, exact, atol=1e-6)
    assert quiet.history() == [(1e-6, 1.0, 1)] and quiet.num_examples == n
    # Clipping bounds each example's share: at C = 0.5 every row [x, C] is halved.
    half = private_class_stats(lm, ds, noise_multiplier=1e-6, clip_norm=0.5, seed=0)
    assert np.allclose(half.stats, exact / 2, atol=1e-6)
    noisy = private_class_stats(lm, ds, noise_multiplier=20.0, seed=3)
    z = (noisy.stats - exact) * n / 20.0  # should be N(0, 1) per coordinate (2 × 385)
    assert abs(float(z.mean())) < 0.1 and 0.9 < float(z.std()) < 1.1
    again = private_class_stats(lm, ds, noise_multiplier=20.0, seed=3)
    assert np.array_equal(again.stats, noisy.stats)  # the seed fixes the noise
    # The frozen base's features whatever the adapter holds (a cached node model carries the
    # last round's LoRA): a trained LoRA changes the pooled features, not this statistic.
    saved = lm.adapter_state()
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        lm.model.eval()
        moved = clf.pooled(torch.tensor([ds.input_ids[0]]),
                           torch.ones(1, len(ds.input_ids[0]), dtype=torch.long))[0].numpy()
    assert not np.allclose(moved, x[0], atol=1e-3)
    assert np.allclose(private_class_stats(lm, ds, noise_multiplier=1e-6, seed=0).stats,
                       exact, atol=1e-6)
    lm.load_adapter_state(saved)
    # σ = 0 (non-private benchmarks only; a run's σ is validated > 0): the exact statistic.
    assert np.allclose(private_class_stats(lm, ds, noise_multiplier=0.0, seed=0).stats,
                       exact, atol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        private_class_stats(lm, ds, noise_multiplier=-1.0, seed=0)
    with pytest.raises(ValueError, match="labelled"):
        private_class_stats(lm, type(ds)(ds.input_ids, None), noise_multiplier=1.0, seed=0)
    lm.model.eval()


def test_rate_zero_freezes_lora_and_dp_trains_the_head_alone(setup):
    """learning_rate = 0: LoRA is frozen for the round (no per-sample gradient, no share of the
    clip norm), the head alone is trained, and LoRA is trainable again afterwards. Without
    noise and with a clip norm no example reaches, a full-batch (q = 1) DP step of the head
    equals the non-private step: the per-sample path computes the head's gradient and nothing
    of LoRA's enters it."""
    lm, ds = setup
    before = lm.adapter_state()
    lora = [p for n, p in lm.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora
    kw = dict(epochs=1, batch_size=len(ds), physical_batch_size=48, learning_rate=0.0,
              head_learning_rate=0.05, seed=5)
    r = train_local(lm, ds, dp=DPParams(noise_multiplier=0.0, max_grad_norm=1e6), **kw)
    dp_after = lm.adapter_state()
    assert r.steps == 1 and r.history == [(0.0, 1.0, 1)] and r.samples == len(ds)
    assert all(p.requires_grad for p in lora)
    assert not any(hasattr(p, "grad_sample") for p in lm.model.parameters())
    head = [k for k in before if "head" in k]
    assert head and all(not np.allclose(before[k], dp_after[k]) for k in head)
    assert all(np.array_equal(before[k], dp_after[k]) for k in before if k not in head)
    lm.load_adapter_state(before)
    train_local(lm, ds, dp=None, **kw)
    plain_after = lm.adapter_state()
    lm.load_adapter_state(before)
    for k in before:
        np.testing.assert_allclose(dp_after[k], plain_after[k], rtol=1e-4, atol=1e-6)
    # Both parts at rate 0: nothing to train, and nothing left frozen by the refusal.
    with pytest.raises(ValueError, match="nothing to train"):
        train_local(lm, ds, dp=DPParams(1.0, 1.0), **(kw | {"head_learning_rate": 0.0}))
    with pytest.raises(ValueError, match="flat clipping"):
        train_local(lm, ds, dp=DPParams(1.0, 1.0, lora_max_grad_norm=0.1), **kw)
    assert all(p.requires_grad for p in lora)
    assert lm.adapter_state().keys() == before.keys()


def test_local_steps_replace_epochs_at_the_same_rate(setup):
    """local_steps = 5 with 3 steps per epoch: exactly 5 DP steps (Poisson draws at q = 1/3,
    the second pass cut short), and the plan calibrates for rounds x 5 steps at that q."""
    from fedllm.privacy import plan_dp_sgd

    lm, ds = setup
    before = lm.adapter_state()
    kw = dict(epochs=1, batch_size=40, physical_batch_size=40, learning_rate=1e-3, seed=6,
              local_steps=5)
    r = train_local(lm, ds, dp=DPParams(1.1, 1.0), **kw)
    assert r.steps == 5 and r.history == [(1.1, pytest.approx(1 / 3), 5)]
    lm.load_adapter_state(before)
    plain = train_local(lm, ds, dp=None, **kw)
    lm.load_adapter_state(before)
    assert plain.steps == 5 and plain.samples == 40 * 3 + 40 * 2
    plan = plan_dp_sgd(num_examples=120, batch_size=40, local_epochs=1, rounds=4,
                       target_epsilon=8.0, delta=1e-5, accountant="prv", local_steps=5)
    assert plan.steps_per_round == 5 and plan.sample_rate == pytest.approx(1 / 3)
    assert plan.projected_epsilon[-1] == pytest.approx(compute_epsilon(
        [(plan.noise_multiplier, 1 / 3, 20)], delta=1e-5, accountant="prv"))
    with pytest.raises(ValueError, match="local_steps"):
        train_local(lm, ds, dp=None, **(kw | {"local_steps": 0}))


def test_freeze_a_trains_b_only_also_after_peft_reactivates_the_adapter(setup):
    """lora.freeze_a (FFA-LoRA): A stays bit-identical through a class-statistics release and a
    DP round, B and the head train. The trap it guards: leaving PEFT's disable_adapter() (as
    the release does) makes every LoRA matrix trainable again, so training re-applies the
    freeze instead of trusting requires_grad."""
    from dataclasses import replace

    lm, ds = setup
    ffa = replace(lm, lora_a_frozen=True)
    a_params = [p for n, p in lm.model.named_parameters() if ".lora_A." in n]
    assert a_params
    try:
        ffa.enforce_frozen()
        with lm.model.disable_adapter():
            pass
        assert all(p.requires_grad for p in a_params)  # PEFT's behaviour, the trap
        before = ffa.adapter_state()
        private_class_stats(ffa, ds, noise_multiplier=1.0, seed=0)
        assert not any(p.requires_grad for p in a_params)
        with lm.model.disable_adapter():
            pass
        r = train_local(ffa, ds, epochs=1, batch_size=40, physical_batch_size=16,
                        learning_rate=1e-2, dp=DPParams(noise_multiplier=1.0,
                                                         max_grad_norm=1.0), seed=3)
        after = ffa.adapter_state()
        assert r.steps >= 1
        for k in before:
            changed = not np.array_equal(before[k], after[k])
            assert changed == (".lora_A." not in k), k  # A kept; B and the head trained
        lm.load_adapter_state(before)
    finally:
        lm.enforce_frozen()  # lm's own flag: A trainable again for the other tests
    assert all(p.requires_grad for p in a_params)


@pytest.mark.parametrize("mode", ["linear-hooks", "hooks"])
def test_bf16_base_keeps_clip_norms_exact_in_fp32(setup, mode):
    """model.base_dtype = "bf16": LoRA and the head see fp32 inputs and output gradients, so
    one clipped example has norm C to fp32 precision in fedllm's and Opacus' per-example modes,
    pointing where the fp32 model's gradient does; a DP round trains and keeps the adapter fp32."""
    lm32, ds_all = setup
    lm16 = load_model(None, task="seq-cls", label_names=("0", "1"), seed=0, base_dtype="bf16")
    with _dropout_off(lm32, lm16):
        one = type(ds_all)(ds_all.input_ids[:1], ds_all.labels[:1])
        c = 1e-3
        g16 = _clipped_grads(lm16, one, mode, c, "fp32")
        g32 = _clipped_grads(lm32, one, mode, c, "fp32")
    assert g16.shape == g32.shape
    assert np.linalg.norm(g16) == pytest.approx(c, rel=1e-5)
    cos = float(g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)))
    assert 0.99 < cos < 1 - 1e-9
    before = lm16.adapter_state()
    r = train_local(lm16, ds_all, epochs=1, batch_size=40, physical_batch_size=16,
                    learning_rate=1e-2, dp=DPParams(1.0, 1.0), seed=0, clipping=mode)
    after = lm16.adapter_state()
    assert r.clipping == mode and np.isfinite(r.mean_loss)
    assert all(v.dtype == np.float32 for v in after.values())
    assert any(not np.allclose(before[k], after[k]) for k in before)


def test_cosine_schedule_values_and_round_stretches():
    """The cosine curve over the run: full rate at the start, half way between full and the
    floor at mid-run, the floor at the end; rounds tile [0, 1] so a federated run's steps follow
    the same curve as a centralised run's over the same steps."""
    full = LRSchedule("cosine", min_fraction=0.1)
    assert full.factor(0, 10) == pytest.approx(1.0)
    assert full.factor(5, 10) == pytest.approx(0.55)
    assert full.factor(10, 10) == pytest.approx(0.1)
    assert LRSchedule("constant").factor(7, 10) == 1.0
    rounds = [LRSchedule.for_round("cosine", round=r, rounds=4, min_fraction=0.1)
              for r in range(1, 5)]
    assert [(s.start, s.end) for s in rounds] == [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1)]
    # 4 rounds x 3 steps = the centralised run's 12 steps, factor for factor
    fed = [s.factor(k, 3) for s in rounds for k in range(3)]
    np.testing.assert_allclose(fed, [full.factor(k, 12) for k in range(12)])
    assert all(np.diff(fed) < 0)  # strictly decaying
    for bad in (dict(round=0, rounds=3), dict(round=4, rounds=3)):
        with pytest.raises(ValueError, match="outside"):
            LRSchedule.for_round("cosine", **bad)
    with pytest.raises(ValueError, match="min_fraction"):
        LRSchedule("cosine", min_fraction=1.5)
    with pytest.raises(ValueError, match="stretch"):
        LRSchedule("cosine", start=0.6, end=0.5)


def test_scheduled_sets_each_group_rate_before_each_step():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.1}], lr=1.0)
    sched = LRSchedule("cosine", min_fraction=0.0)
    seen = [[g["lr"] for g in opt.param_groups] for _ in _scheduled(iter("abcd"), opt,
                                                                       schedule=sched, steps=4)]
    for k, (a, b) in enumerate(seen):
        assert a == pytest.approx(sched.factor(k, 4)) and b == pytest.approx(0.1 * a)


@pytest.mark.parametrize("dp", [None, DPParams(noise_multiplier=0.0, max_grad_norm=1e6)])
def test_schedule_reaches_the_step_with_and_without_dp(setup, dp):
    """One full-batch SGD step at the end of a cosine run with floor m is the step at rate
    m × lr; with floor 0 nothing moves. Without DP and with DP (σ = 0, no clipping reached,
    q = 1) alike: the schedule drives the optimizer DP-SGD steps, not a copy of it."""
    lm, ds = setup
    before = lm.adapter_state()
    kw = dict(epochs=1, batch_size=len(ds), physical_batch_size=60, head_learning_rate=0.2,
              seed=3, optimizer="sgd", dp=dp)
    with _dropout_off(lm):
        train_local(lm, ds, learning_rate=1e-2, **kw,
                    schedule=LRSchedule("cosine", start=1.0, end=1.0, min_fraction=0.25))
        scheduled = lm.adapter_state()
        lm.load_adapter_state(before)
        train_local(lm, ds, learning_rate=1e-2 * 0.25, **(kw | {"head_learning_rate": 0.05}))
        scaled = lm.adapter_state()
        lm.load_adapter_state(before)
        train_local(lm, ds, learning_rate=1e-2, **kw,
                    schedule=LRSchedule("cosine", start=1.0, end=1.0, min_fraction=0.0))
        still = lm.adapter_state()
        lm.load_adapter_state(before)
    assert any(not np.allclose(before[k], scheduled[k]) for k in before)
    for k in before:
        np.testing.assert_allclose(scheduled[k], scaled[k], rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(still[k], before[k])


def test_logit_adjustment_is_tau_log_of_the_smoothed_prior():
    np.testing.assert_allclose(logit_adjustment([3, 1], tau=1.0), np.log([4 / 6, 2 / 6]),
                               rtol=1e-6)
    np.testing.assert_allclose(logit_adjustment([3, 1], tau=0.5), 0.5 * np.log([4 / 6, 2 / 6]),
                               rtol=1e-6)
    # A class the node never saw: finite (add-one smoothing); noisy negative counts count as 0.
    single = logit_adjustment([0, 12156], tau=1.0)
    assert np.all(np.isfinite(single)) and single[0] == pytest.approx(np.log(1 / 12158))
    np.testing.assert_array_equal(logit_adjustment([-4.2, 10], tau=1.0),
                                  logit_adjustment([0, 10], tau=1.0))
    assert not logit_adjustment([5, 7], tau=0.0).any()
    for bad, match in (([3], "one count per class"), ([1, np.nan], "finite")):
        with pytest.raises(ValueError, match=match):
            logit_adjustment(bad, tau=1.0)
    with pytest.raises(ValueError, match="tau"):
        logit_adjustment([1, 1], tau=-1.0)


@pytest.mark.parametrize("dp", [None, DPParams(noise_multiplier=0.0, max_grad_norm=1e6)])
def test_logit_offset_enters_the_training_loss_with_and_without_dp(setup, dp):
    """Adding o to the logits is a head whose bias is shifted by o: one full-batch SGD step
    with offset o from bias b moves every tensor exactly as the plain step from bias b + o.
    Without DP and with DP (σ = 0, no clipping reached, q = 1) alike, so the offset reaches
    the loss DP-SGD differentiates, not only the non-private one."""
    lm, ds = setup
    before = lm.adapter_state()
    bias = next(k for k in before if "head" in k and k.endswith("bias"))
    offset = np.array([0.7, -1.3], np.float32)
    kw = dict(epochs=1, batch_size=len(ds), physical_batch_size=60, learning_rate=1e-2,
              head_learning_rate=0.2, seed=3, optimizer="sgd", dp=dp)
    with _dropout_off(lm):
        train_local(lm, ds, **kw, logit_offset=offset)
        adjusted = lm.adapter_state()
        lm.load_adapter_state(before | {bias: before[bias] + offset})
        train_local(lm, ds, **kw)
        shifted = lm.adapter_state()
        lm.load_adapter_state(before)
        train_local(lm, ds, **kw)
        plain = lm.adapter_state()
        lm.load_adapter_state(before)
    shifted[bias] = shifted[bias] - offset
    assert any(not np.allclose(adjusted[k], plain[k], atol=1e-6) for k in before)
    for k in before:
        np.testing.assert_allclose(adjusted[k], shifted[k], rtol=1e-4, atol=1e-6)


def test_logit_offset_must_fit_a_classifier(setup, tiny_causal_lm):
    lm, ds = setup
    with pytest.raises(ValueError, match="2 classes"):
        train_local(lm, ds, epochs=1, batch_size=len(ds), physical_batch_size=60,
                    learning_rate=1e-3, dp=None, seed=0, logit_offset=np.zeros(3))
    causal = load_model(str(tiny_causal_lm), task="causal-lm", seed=0)
    t = read_table(DEMO / "sst2_train_sample.tsv", text_column="sentence", label_column=None,
                   max_examples=8)
    cds = tokenize(causal.tokenizer, t.texts, None, max_length=16)
    with pytest.raises(ValueError, match="seq-cls"):
        train_local(causal, cds, epochs=1, batch_size=8, physical_batch_size=8,
                    learning_rate=1e-3, dp=None, seed=0, logit_offset=np.zeros(2))


def test_class_stats_counts_are_the_released_counts(setup):
    lm, ds = setup
    y = np.asarray(ds.labels)
    exact = private_class_stats(lm, ds, noise_multiplier=1e-6, seed=0).counts()
    np.testing.assert_allclose(exact, np.bincount(y, minlength=2), atol=1e-3)
    noisy = private_class_stats(lm, ds, noise_multiplier=4.0, seed=1).counts()
    # Count noise: σ C / b per class (b² = 0.1 of the unit sensitivity), i.e. ~12.6 at σ = 4.
    assert not np.allclose(noisy, exact, atol=1e-3)
    assert np.all(np.abs(noisy - exact) < 6 * 4.0 / np.sqrt(0.1))
