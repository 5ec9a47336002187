"""Group metrics from aggregated per-group counts == fairlearn on the pooled predictions."""

import numpy as np
import pytest
from fairlearn.metrics import (
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
)

from fedllm.config import BiasConfig
from fedllm.evaluate import confusion_matrix
from fedllm.fairness import group_metrics, node_metrics, sort_flagged_first

# Pooled predictions of a fixed example (binary, positive label "1"), two groups.
Y = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0, 1])
P = np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0])
G = np.array(["a"] * 8 + ["b"] * 8)
CFG = BiasConfig(min_group_size=1)


def counts_of(y, p, g, nodes=2):
    """Per-group confusion matrices summed over ``nodes`` disjoint shards (what the
    coordinator gets from the nodes)."""
    total = {}
    for shard in np.array_split(np.arange(len(y)), nodes):
        for grp in sorted(set(g[shard])):
            m = confusion_matrix(y[shard][g[shard] == grp], p[shard][g[shard] == grp], 2)
            total[grp] = total.get(grp, np.zeros((2, 2), np.int64)) + m
    return total


def by_metric(rows):
    return {(r.metric, r.group): r for r in rows}


def test_group_metrics_equal_fairlearn_on_pooled_predictions():
    rows = by_metric(group_metrics(counts_of(Y, P, G, nodes=3), source="federated",
                                   label_names=("0", "1"), config=CFG))
    dpd = demographic_parity_difference(Y, P, sensitive_features=G)
    assert rows[("demographic_parity_difference", None)].value == pytest.approx(dpd)
    assert rows[("demographic_parity_ratio", None)].value == pytest.approx(
        demographic_parity_ratio(Y, P, sensitive_features=G))
    assert rows[("equalized_odds_difference", None)].value == pytest.approx(
        equalized_odds_difference(Y, P, sensitive_features=G))
    # pinned by hand: group a selects 4/8, TPR 3/4, FPR 1/4, accuracy 6/8;
    # group b selects 2/8, TPR 1/4, FPR 1/4, accuracy 4/8
    assert rows[("group_selection_rate", "a")].value == pytest.approx(4 / 8)
    assert rows[("group_selection_rate", "b")].value == pytest.approx(2 / 8)
    assert rows[("group_tpr", "a")].value == pytest.approx(3 / 4)
    assert rows[("group_tpr", "b")].value == pytest.approx(1 / 4)
    assert rows[("group_fpr", "b")].value == pytest.approx(1 / 4)
    assert dpd == pytest.approx(2 / 8)
    assert rows[("equalized_odds_difference", None)].value == pytest.approx(0.5)
    assert rows[("accuracy_gap", None)].value == pytest.approx(6 / 8 - 4 / 8)
    # thresholds: DPD 0.25 > 0.1, EOD 0.5 > 0.1, accuracy gap 0.25 > 0.1 flagged;
    # ratio (2/8)/(4/8) = 0.5 < 0.8 flagged
    assert rows[("demographic_parity_difference", None)].flagged
    assert rows[("demographic_parity_ratio", None)].value == pytest.approx(0.5)
    assert rows[("demographic_parity_ratio", None)].flagged
    assert rows[("accuracy_gap", None)].note.startswith("worst group 'b'")


def test_balanced_groups_are_not_flagged():
    g = np.array(["a", "b"] * 8)
    y = np.repeat([0, 1], 8)
    rows = by_metric(group_metrics(counts_of(y, y, g), source="federated",
                                   label_names=("0", "1"), config=CFG))
    assert rows[("demographic_parity_difference", None)].value == pytest.approx(0.0)
    assert not any(r.flagged for r in rows.values())


def test_no_group_column_is_unavailable_with_the_reason():
    rows = group_metrics(None, source="federated", label_names=("0", "1"), config=CFG,
                         unavailable="data.group_column is not set")
    assert {r.metric for r in rows} >= {"demographic_parity_difference", "accuracy_gap"}
    assert all(r.value is None and not r.flagged and "group_column" in r.note for r in rows)


def test_group_with_zero_examples_is_left_out_not_zero():
    counts = counts_of(Y, P, G)
    counts["c"] = np.zeros((2, 2), np.int64)  # e.g. a group every sampled node lacks
    rows = group_metrics(counts, source="federated", label_names=("0", "1"), config=CFG)
    r = by_metric(rows)
    assert r[("group_accuracy", "c")].value is None
    assert "no examples" in r[("group_accuracy", "c")].note
    assert "'c' has no examples" in r[("demographic_parity_difference", None)].note
    # the gaps are those of groups a and b only
    assert r[("demographic_parity_difference", None)].value == pytest.approx(2 / 8)


def test_group_without_positives_makes_equalized_odds_unavailable():
    counts = counts_of(Y, P, G)
    counts["c"] = np.array([[5, 1], [0, 0]])  # no positive examples: TPR undefined
    r = by_metric(group_metrics(counts, source="federated", label_names=("0", "1"),
                                config=CFG))
    assert r[("group_tpr", "c")].value is None
    eod = r[("equalized_odds_difference", None)]
    assert eod.value is None and "'c'" in eod.note and not eod.flagged


def test_small_groups_and_single_group():
    r = by_metric(group_metrics(counts_of(Y, P, G), source="f", label_names=("0", "1"),
                                config=BiasConfig(min_group_size=9)))
    assert r[("accuracy_gap", None)].value is None
    assert "needs at least 2 groups with >= 9" in r[("accuracy_gap", None)].note


def test_missing_group_column_on_some_nodes_is_noted():
    rows = group_metrics(counts_of(Y, P, G), source="federated", label_names=("0", "1"),
                         config=CFG, note="no group counts from node-2 (no group column)")
    assert "node-2" in by_metric(rows)[("demographic_parity_difference", None)].note


def test_unknown_positive_label_is_a_clear_error():
    with pytest.raises(ValueError, match="positive_label 'yes'"):
        group_metrics(counts_of(Y, P, G), source="f", label_names=("0", "1"),
                      config=BiasConfig(positive_label="yes"))


def test_node_spread_and_flag_ordering():
    rows = node_metrics({"node-0": (0.9, 50), "node-1": (0.6, 50), "node-2": (0.8, 5)},
                        config=BiasConfig(min_group_size=10))
    r = by_metric(rows)
    assert r[("node_accuracy_gap", None)].value == pytest.approx(0.3)  # node-2 too small
    assert r[("node_accuracy_gap", None)].flagged
    assert r[("worst_node_accuracy", "node-1")].value == pytest.approx(0.6)
    assert r[("node_accuracy_std", None)].value == pytest.approx(0.15)
    ordered = sort_flagged_first([x.to_dict() for x in rows])
    assert ordered[0]["metric"] == "node_accuracy_gap"
