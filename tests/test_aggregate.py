import numpy as np
import pytest

from fedllm.aggregate import (
    MIN_CENTER_SNR,
    UpdateRejected,
    estimate_center,
    fedavg,
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


def test_estimate_center_knows_its_noise_and_recovers_the_signal_norm():
    """Nodes release (S_i + N(0, σ²)) / n_i; the weighted mean's noise norm is predicted from
    (σ, H, nodes, examples) alone, and ‖centre‖² − E‖noise‖² estimates ‖true mean‖²."""
    rng = np.random.default_rng(0)
    h, sizes, sigma = 384, [300, 500, 700], 20.0
    true = rng.normal(size=h)
    true *= 0.4 / np.linalg.norm(true)  # MiniLM's feature mean has norm ~0.4
    trials = []
    for _ in range(200):
        means = [((true * n + rng.normal(0, sigma, h)) / n).astype(np.float32) for n in sizes]
        c = fedavg([({"c": m}, n) for m, n in zip(means, sizes, strict=True)])["c"]
        trials.append(estimate_center(c, nodes=3, examples=sum(sizes), noise_multiplier=sigma))
    est = trials[0]
    expected = sigma * np.sqrt(h * 3) / 1500
    assert est.expected_noise_norm == pytest.approx(expected)
    noise = np.array([np.linalg.norm(t.center - true) for t in trials])
    assert np.sqrt(np.mean(noise ** 2)) == pytest.approx(expected, rel=0.05)
    assert np.mean([t.signal_norm for t in trials]) == pytest.approx(0.4, abs=0.02)
    # here the noise (0.45) exceeds the signal: bias-corrected, yet not worth centring on
    assert not est.usable and est.summary()["used"] is False
    # --quick size (3 nodes × 3,000 examples): noise 0.075, the centre is used
    big = estimate_center(true + rng.normal(0, 0.075 / np.sqrt(h), h), nodes=3, examples=9000,
                          noise_multiplier=sigma)
    assert big.expected_noise_norm == pytest.approx(0.0754, abs=1e-4) and big.usable
    # 3 nodes × 64 examples: noise ~3.5 drowns the 0.4 signal; the centre is not used
    small = estimate_center(true + rng.normal(0, 3.5 / np.sqrt(h), h), nodes=3, examples=192,
                            noise_multiplier=sigma)
    assert small.expected_noise_norm > 3 and not small.usable
    assert MIN_CENTER_SNR * small.expected_noise_norm > small.signal_norm
    with pytest.raises(ValueError, match="at least one node"):
        estimate_center(true, nodes=0, examples=0, noise_multiplier=sigma)
