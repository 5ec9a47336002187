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
