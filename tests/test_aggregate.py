import numpy as np
import pytest

from fedllm.aggregate import (
    HEAD_PREFIX,
    MIN_CENTER_SNR,
    MIN_COUNT_SNR,
    ServerOptState,
    UpdateRejected,
    class_stats_can_help,
    class_stats_noise_norm,
    class_stats_weights,
    ema_update,
    estimate_class_stats,
    fedavg,
    server_step,
    validate_update,
)

REF = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


def test_fedavg_weighted_by_examples():
    u1 = {"a": np.ones((2, 3), np.float32), "b": np.full(4, 2, np.float32)}
    u2 = {"a": np.full((2, 3), 4, np.float32), "b": np.zeros(4, np.float32)}
    out = fedavg([(u1, 100), (u2, 300)])
    np.testing.assert_allclose(out["a"], 3.25)
    np.testing.assert_allclose(out["b"], 0.5)
    assert out["a"].dtype == np.float32


def test_validate_accepts_good_update_and_returns_norm():
    u = {"a": np.full((2, 3), 1, np.float32), "b": np.zeros(4, np.float32)}
    assert validate_update(u, REF) == pytest.approx(np.sqrt(6))


@pytest.mark.parametrize("update, needle", [
    ({"a": np.zeros((2, 3), np.float32)}, "missing ['b']"),
    ({**REF, "c": np.zeros(1, np.float32)}, "unexpected ['c']"),
    ({"a": np.zeros((3, 2), np.float32), "b": REF["b"]}, "a: shape (3, 2)"),
    ({"a": np.full((2, 3), np.nan, np.float32), "b": REF["b"]}, "a: contains NaN"),
    ({"a": np.zeros((2, 3), np.int32), "b": REF["b"]}, "dtype int32"),
])
def test_validate_rejects_bad_updates(update, needle):
    with pytest.raises(UpdateRejected) as e:
        validate_update(update, REF)
    assert needle in str(e.value)


def test_norm_bound():
    u = {"a": np.full((2, 3), 10, np.float32), "b": REF["b"]}
    with pytest.raises(UpdateRejected, match="exceeds the bound"):
        validate_update(u, REF, max_norm=1.0)


def test_central_dp_average_matches_the_formula():
    """DP-FedAvg: reference + Σ(x_i − ref)/(q·N) + N(0, (σC/(q·N))²) per coordinate."""
    from fedllm.aggregate import central_dp_average, clip_update

    rng = np.random.default_rng(0)
    ref = {"w": np.zeros((200, 500), dtype=np.float32)}
    big = {"w": np.full((200, 500), 0.01, dtype=np.float32)}  # norm 3.16 > clip 0.5
    clipped, norm = clip_update(big, ref, clip_norm=0.5)
    assert norm == pytest.approx(np.sqrt(200 * 500) * 0.01, rel=1e-5)
    assert np.linalg.norm(clipped["w"]) == pytest.approx(0.5, rel=1e-5)  # scaled down
    small = {"w": np.full((200, 500), 1e-4, dtype=np.float32)}
    assert np.allclose(clip_update(small, ref, clip_norm=0.5)[0]["w"], small["w"])  # untouched
    sigma, clip, expected = 1.3, 0.5, 2.5  # q·N = 2.5
    out = central_dp_average([clipped, clipped], ref, expected_nodes=expected,
                             noise_std=sigma * clip / expected, rng=rng)["w"]
    signal = 2 * clipped["w"] / expected
    noise = out - signal
    assert abs(float(noise.mean())) < 3 * sigma * clip / expected / np.sqrt(noise.size)
    assert float(noise.std()) == pytest.approx(sigma * clip / expected, rel=0.01)
    noiseless = central_dp_average([clipped], ref, expected_nodes=expected, noise_std=0.0,
                                   rng=rng)["w"]
    np.testing.assert_allclose(noiseless, clipped["w"] / expected, rtol=1e-6)


def _class_data(rng: np.random.Generator, n: int, share1: float, h: int = 384):
    """Unit vectors in two classes around a common mean (norm ~0.4, as MiniLM's on SST-2)."""
    common = np.zeros(h)
    common[0] = 0.4
    sep = np.zeros(h)
    sep[1] = 0.1
    y = (rng.random(n) < share1).astype(np.int64)
    x = common + np.where(y[:, None] == 1, sep, -sep) + rng.normal(0, 0.9 / np.sqrt(h), (n, h))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


A, B = np.sqrt(0.9), np.sqrt(0.1)  # the release's weights of sums and counts, a² + b² = 1


def test_the_release_gives_the_counts_a_tenth_of_its_sensitivity():
    assert class_stats_weights() == pytest.approx((A, B))


def _release(x: np.ndarray, y: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """fedllm.train.private_class_stats on given features (clip 1: unit rows)."""
    t = np.stack([np.append(A * x[y == c].sum(0), B * (y == c).sum()) for c in (0, 1)])
    return ((t + rng.normal(0, sigma, t.shape)) / len(y)).astype(np.float32)


def test_public_counts_predict_the_noise_and_which_releases_cannot_help():
    """Before any release the coordinator knows σ, C, H, the nodes and their examples: that
    predicts the centre's noise exactly as the estimator reports it afterwards, and a release
    whose noise even a centre of the largest possible norm (1) could not clear is not asked."""
    rng = np.random.default_rng(1)
    shape = {"classes": 2, "hidden": 384, "noise_multiplier": 4.0}
    m = fedavg([({"s": _release(*_class_data(rng, 3000, 0.5), 4.0, rng)}, 3000.0)
                for _ in range(3)])["s"]
    est = estimate_class_stats(m, nodes=3, examples=9000, noise_multiplier=4.0)
    assert class_stats_noise_norm(nodes=3, examples=9000, **shape) == pytest.approx(
        est.expected_noise_norm) == pytest.approx(0.0225, abs=1e-4)
    assert class_stats_can_help(nodes=3, examples=9000, **shape) and est.usable
    # bench/scale's federation: 100 nodes × 18 examples, noise norm 0.65 > 1 / MIN_CENTER_SNR
    assert class_stats_noise_norm(nodes=100, examples=1800, **shape) == pytest.approx(
        0.6495, abs=1e-3)
    assert not class_stats_can_help(nodes=100, examples=1800, **shape)
    # ... and such a release is indeed never used, even when every feature is the same unit
    # vector (the largest centre norm there is)
    same = np.zeros((18, 384))
    same[:, 0] = 1.0
    for _ in range(20):
        rel = [({"s": _release(same, rng.integers(0, 2, 18), 4.0, rng)}, 18.0)
               for _ in range(100)]
        assert not estimate_class_stats(fedavg(rel)["s"], nodes=100, examples=1800,
                                        noise_multiplier=4.0).usable
    # the boundary: noise norm exactly 1 / MIN_CENTER_SNR still may help
    n_edge = np.sqrt(2 * 384 * 10) * 4.0 * MIN_CENTER_SNR / A
    assert class_stats_can_help(nodes=10, examples=int(np.ceil(n_edge)), **shape)
    assert not class_stats_can_help(nodes=10, examples=int(np.floor(n_edge)), **shape)
    with pytest.raises(ValueError, match="at least one node"):
        class_stats_noise_norm(nodes=0, examples=10, **shape)


def test_estimate_class_stats_knows_its_noise_and_recovers_centre_shares_and_class_means():
    """Nodes release per-class ([a S_c, b n_c] + N(0, σ²)) / n_i; the combined estimate's noise is
    predicted from (σ, C, H, nodes, examples) alone, the centre and class shares come back, and
    its head is the nearest-class-mean (isotropic LDA) rule."""
    rng = np.random.default_rng(0)
    h, sizes, sigma = 384, [1000, 1500, 2500], 4.0
    data = [_class_data(rng, n, s1) for n, s1 in zip(sizes, (0.2, 0.5, 0.8), strict=True)]
    xs, ys = np.concatenate([d[0] for d in data]), np.concatenate([d[1] for d in data])
    n_all = len(ys)
    true_center = xs.mean(0)
    true_means = np.stack([xs[ys == c].mean(0) for c in (0, 1)])
    trials = []
    for _ in range(100):
        rel = [(_release(x, y, sigma, rng), float(len(y))) for x, y in data]
        m = fedavg([({"s": r}, n) for r, n in rel])["s"]
        trials.append(estimate_class_stats(m, nodes=3, examples=n_all, noise_multiplier=sigma))
    est = trials[0]
    expected = np.sqrt(2 * h * 3) * sigma / (A * n_all)  # σ sqrt(C H nodes) / (a N)
    assert est.expected_noise_norm == pytest.approx(expected)
    noise = np.array([np.linalg.norm(t.center - true_center) for t in trials])
    assert np.sqrt(np.mean(noise ** 2)) == pytest.approx(expected, rel=0.05)
    assert np.mean([t.signal_norm for t in trials]) == pytest.approx(
        np.linalg.norm(true_center), abs=0.01)
    shares = np.mean([t.shares for t in trials], axis=0)
    np.testing.assert_allclose(shares, [np.mean(ys == 0), np.mean(ys == 1)], atol=1e-3)
    mean_err = np.mean([np.linalg.norm(t.class_means - true_means, axis=1) ** 2 for t in trials],
                       axis=0)
    predicted = h * 3 * sigma ** 2 / (A * n_all) ** 2 / shares ** 2  # E‖noise in μ_c‖²
    np.testing.assert_allclose(mean_err, predicted, rtol=0.1)
    # The spread (between-class signal) is recovered, debiased of the class means' noise.
    true_spread = np.sqrt(sum(np.mean(ys == c) * np.sum((true_means[c] - true_center) ** 2)
                              for c in (0, 1)))
    assert np.mean([t.spread_signal for t in trials]) == pytest.approx(true_spread, rel=0.1)
    within = np.mean(np.sum((xs - true_means[ys]) ** 2, axis=1)) / h
    assert np.mean([t.within_var for t in trials]) == pytest.approx(within, rel=0.02)
    assert est.usable and est.head_usable and est.summary()["head_init"] is True
    # The head is the nearest-class-mean rule with the log prior: argmax_c W_c (x - μ) + b_c
    # = argmin_c ‖x - μ_c‖² / (2 s²) - log p_c.
    w, b = est.head()
    test, _ = _class_data(rng, 500, 0.5)
    logits = (test - est.center) @ w.T + b
    rule = (np.sum((test[:, None, :] - est.class_means[None]) ** 2, axis=2)
            / (2 * est.within_var) - np.log(est.shares))
    np.testing.assert_array_equal(logits.argmax(1), rule.argmin(1))
    # 3 nodes × 64 examples at σ = 20: centre noise ~7 drowns the 0.4 signal, nothing is used.
    tiny = [_class_data(rng, 64, 0.5) for _ in range(3)]
    m = fedavg([({"s": _release(x, y, 20.0, rng)}, 64.0) for x, y in tiny])["s"]
    small = estimate_class_stats(m, nodes=3, examples=192, noise_multiplier=20.0)
    assert not small.usable and not small.head_usable
    assert MIN_CENTER_SNR * small.expected_noise_norm > small.signal_norm
    with pytest.raises(ValueError, match="too noisy"):
        small.head()
    # A class nobody has: its noisy count is no count, the head is not initialised.
    x0, _ = _class_data(rng, 3000, 0.5)
    absent = _release(x0, np.zeros(3000, np.int64), 4.0, rng)
    one = estimate_class_stats(absent, nodes=1, examples=3000, noise_multiplier=4.0)
    assert one.usable and one.count_snr < MIN_COUNT_SNR and not one.head_usable
    with pytest.raises(ValueError, match="at least one node"):
        estimate_class_stats(absent, nodes=0, examples=0, noise_multiplier=sigma)
    with pytest.raises(ValueError, match="classes"):
        estimate_class_stats(absent[0], nodes=1, examples=3000, noise_multiplier=sigma)


def test_exact_class_stats_sigma_zero():
    """σ = 0 (non-private benchmarks): the estimate is the exact centre and class means."""
    rng = np.random.default_rng(1)
    x, y = _class_data(rng, 400, 0.3)
    exact = _release(x, y, 0.0, rng)
    est = estimate_class_stats(exact, nodes=1, examples=400, noise_multiplier=0.0)
    assert est.expected_noise_norm == 0 and est.count_snr == float("inf")
    assert est.usable and est.head_usable
    np.testing.assert_allclose(est.center, x.mean(0), atol=1e-5)
    np.testing.assert_allclose(est.class_means[1], x[y == 1].mean(0), atol=1e-5)
    absent = _release(x, np.zeros(400, np.int64), 0.0, rng)
    assert estimate_class_stats(absent, nodes=1, examples=400,
                                noise_multiplier=0.0).count_snr == 0.0


# -- the coordinator's server optimizer ------------------------------------------------------

def _rounds(kind, n=6, **kw):
    """n rounds of server_step from a fixed start against seeded random aggregates."""
    rng = np.random.default_rng(3)
    cur = {"l.lora_B.weight": rng.normal(size=(4, 3)).astype(np.float32),
           "m.head.bias": rng.normal(size=2).astype(np.float32)}
    state, trail = ServerOptState(), []
    for _ in range(n):
        agg = {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in cur.items()}
        trail.append((cur, agg))
        cur, state = server_step(cur, agg, state, kind=kind, **kw)
    return cur, state, trail


def test_fedavg_server_step_is_the_average_itself():
    cur, state, trail = _rounds("fedavg", n=1)
    for k in cur:
        np.testing.assert_array_equal(cur[k], trail[-1][1][k])
    assert state == ServerOptState()  # stateless


def test_fedadam_equals_torch_adam_on_the_negative_pseudo_gradient():
    torch = pytest.importorskip("torch")
    cur, state, trail = _rounds("fedadam", learning_rate=0.05, beta1=0.8, beta2=0.95,
                                eps=1e-6)
    # Independent reference: torch.optim.Adam fed gradient = global - aggregate each round.
    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64))
              for k, v in trail[0][0].items()}
    opt = torch.optim.Adam(params.values(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for glob, agg in trail:
        for k, p in params.items():
            p.data = torch.tensor(glob[k], dtype=torch.float64)
            p.grad = p.data - torch.tensor(agg[k], dtype=torch.float64)
        opt.step()
    for k, p in params.items():
        np.testing.assert_allclose(cur[k], p.detach().numpy(), rtol=0, atol=1e-6)
    assert state.step == len(trail)
    # The state survives a checkpoint round trip exactly.
    back = ServerOptState.from_arrays(state.to_arrays())
    assert back.step == state.step
    for k in state.m:
        np.testing.assert_array_equal(back.m[k], state.m[k])
        np.testing.assert_array_equal(back.v[k], state.v[k])


def test_fedavgm_accumulates_momentum_and_the_head_takes_its_own_rate():
    cur, state, trail = _rounds("fedavgm", n=2, learning_rate=0.5, beta1=0.9,
                                head_learning_rate=2.0)
    (g0, a0), (g1, a1) = trail
    for k in cur:
        lr = 2.0 if f".{HEAD_PREFIX}." in f".{k}" else 0.5
        m1 = a0[k].astype(np.float64) - g0[k]
        m2 = 0.9 * m1 + (a1[k].astype(np.float64) - g1[k])
        np.testing.assert_allclose(cur[k], g1[k] + lr * m2, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(state.m[k], m2, rtol=1e-6)


def test_head_prefix_is_the_models_head_module():
    model = pytest.importorskip("fedllm.model")
    assert model.HEAD_MODULE == HEAD_PREFIX


@pytest.mark.parametrize("kw", [{"learning_rate": 0.0}, {"beta1": 1.0}, {"eps": 0.0},
                                {"head_learning_rate": -1.0}])
def test_server_step_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        server_step(REF, REF, ServerOptState(), kind="fedadam", **kw)


def test_ema_update_averages_rounds_and_starts_from_the_first():
    first = {"a": np.array([1.0, 2.0], np.float32)}
    second = {"a": np.array([3.0, 6.0], np.float32)}
    avg = ema_update(None, first, decay=0.9)
    np.testing.assert_array_equal(avg["a"], first["a"])
    avg = ema_update(avg, second, decay=0.9)
    np.testing.assert_allclose(avg["a"], [1.2, 2.4], rtol=1e-6)  # 0.9·first + 0.1·second
    assert avg["a"].dtype == np.float32
    assert ema_update(avg, second, decay=0.0)["a"].tolist() == [3.0, 6.0]
    with pytest.raises(ValueError, match="decay"):
        ema_update(avg, second, decay=1.0)
    with pytest.raises(ValueError, match="different tensors"):
        ema_update(avg, {"b": second["a"]}, decay=0.5)


def test_server_state_carries_the_moving_average_and_it_is_the_output():
    state = ServerOptState(step=2, ema={"a": np.array([1.5, 2.5], np.float32)})
    back = ServerOptState.from_arrays(state.to_arrays())
    assert back.step == 2 and not back.m and not back.v
    np.testing.assert_array_equal(back.ema["a"], state.ema["a"])
    assert back.ema["a"].dtype == np.float32
    latest = {"a": np.zeros(2, np.float32)}
    np.testing.assert_array_equal(back.output(latest)["a"], state.ema["a"])
    np.testing.assert_array_equal(ServerOptState().output(latest)["a"], latest["a"])
    # A server step keeps the average (the coordinator updates it after the step).
    _, stepped = server_step({"a": latest["a"]}, {"a": latest["a"] + 1}, state, kind="fedavgm")
    np.testing.assert_array_equal(stepped.ema["a"], state.ema["a"])
