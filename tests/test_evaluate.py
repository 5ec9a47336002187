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
