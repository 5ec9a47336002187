import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from fedllm.evaluate import classification_metrics, confusion_matrix


def test_metrics_from_counts_equal_sklearn_on_pooled_predictions():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    y_pred = np.array([0, 1, 0, 1, 1, 2, 0, 2, 1, 1])
    # counts summed over two "nodes" equal counts of the pooled predictions
    cm = confusion_matrix(y_true[:4], y_pred[:4], 3) + confusion_matrix(y_true[4:], y_pred[4:], 3)
    m = classification_metrics(cm)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert m["accuracy"] == pytest.approx(0.7)  # pinned


def test_never_predicted_class_gives_zero_f1():
    cm = confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 0]), 2)
    m = classification_metrics(cm)
    assert m["f1_macro"] == pytest.approx(f1_score([0, 1, 1], [0, 0, 0], average="macro",
                                                   zero_division=0))


# --- counts from several nodes == metrics of the pooled predictions (issue 4) ---------------

from sklearn.metrics import precision_recall_fscore_support, roc_auc_score  # noqa: E402

from fedllm.evaluate import (  # noqa: E402
    EvalCounts,
    calibration_bins,
    metrics_from_counts,
    score_bins,
    score_histogram,
)

# A fixed binary example: 12 pooled predictions, split 5 / 7 across two "nodes".
Y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0])
P1 = np.array([0.10, 0.35, 0.62, 0.05, 0.48, 0.91, 0.77, 0.40, 0.66, 0.99, 0.52, 0.81])
PROBA = np.stack([1 - P1, P1], axis=1)


def node_counts(idx: slice, bins: int = 10) -> EvalCounts:
    y, p = Y[idx], PROBA[idx]
    return EvalCounts(len(y), 0.0, confusion_matrix(y, p.argmax(1), 2),
                      score_hist=score_histogram(y, p, bins),
                      calibration=calibration_bins(y, p, bins))


def test_summed_node_counts_equal_sklearn_on_pooled_predictions():
    total = node_counts(slice(0, 5)) + node_counts(slice(5, None))
    m = metrics_from_counts(total, "seq-cls", ("neg", "pos"))
    pred = PROBA.argmax(1)
    prec, rec, f1, _ = precision_recall_fscore_support(Y, pred, zero_division=0)
    for i, name in enumerate(("neg", "pos")):
        assert m[f"precision/{name}"] == pytest.approx(prec[i])
        assert m[f"recall/{name}"] == pytest.approx(rec[i])
        assert m[f"f1/{name}"] == pytest.approx(f1[i])
    # ROC-AUC from the summed histograms == sklearn's on the binned scores
    assert m["roc_auc"] == pytest.approx(roc_auc_score(Y, score_bins(P1, 10)))
    # ECE from binned counts == the per-example definition with the same bins
    conf, correct = PROBA.max(1), (pred == Y)
    b = score_bins(conf, 10)
    ece = sum(abs(correct[b == k].sum() - conf[b == k].sum()) for k in range(10)) / len(Y)
    assert m["ece"] == pytest.approx(ece)
    # pinned on this example, by hand: 29 of 36 (pos, neg) bin pairs ordered (ties 1/2);
    # ECE bins 5..9: |2-1.04| + |2-2.53| + |1-0.77| + |0-0.81| + |4-3.75| = 2.78 over 12
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["roc_auc"] == pytest.approx(29 / 36)
    assert m["ece"] == pytest.approx(2.78 / 12)


def test_auc_binned_finely_equals_unbinned_auc():
    total = node_counts(slice(0, 5), 1000) + node_counts(slice(5, None), 1000)
    assert metrics_from_counts(total, "seq-cls")["roc_auc"] == pytest.approx(
        roc_auc_score(Y, P1))


def test_auc_is_unavailable_not_zero_when_a_class_is_absent():
    c = node_counts(slice(0, 5))  # only class 0 present
    m = metrics_from_counts(c, "seq-cls")
    assert m["roc_auc"] is None and m["recall/1"] == 0.0


def test_counts_round_trip_and_malformed_counts_are_rejected():
    c = node_counts(slice(0, 7))
    c.group_confusion = {"a": confusion_matrix(Y[:3], PROBA[:3].argmax(1), 2)}
    back = EvalCounts.from_dict(c.to_dict())
    assert np.array_equal(back.confusion, c.confusion)
    assert np.array_equal(back.group_confusion["a"], c.group_confusion["a"])
    bad = c.to_dict()
    bad["confusion"] = [[-1, 0], [0, 1]]
    with pytest.raises(ValueError, match="confusion"):
        EvalCounts.from_dict(bad)
    with pytest.raises(ValueError, match="shapes"):
        _ = c + EvalCounts(1, 0.0, np.zeros((3, 3), dtype=np.int64))
