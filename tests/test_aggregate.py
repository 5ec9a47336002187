import numpy as np
import pytest

from fedllm.aggregate import UpdateRejected, fedavg, validate_update

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
