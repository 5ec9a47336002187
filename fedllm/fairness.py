"""Bias metrics from aggregated counts: per group, across organisations, and their flags.

Nodes send per-group confusion matrices, never predictions. fairlearn's metrics take
per-example arrays, so each confusion cell (group, true, predicted) with count n is expanded to
*one* row weighted by n (``sample_weight``): fairlearn then computes exactly what it would on the
pooled per-example predictions, without any example existing here.

A metric that cannot be computed (no group column, a single group, a group without positives)
is returned with ``value=None`` and a note saying why: never a silent 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedllm.config import BiasConfig

# Sources of bias metrics (the store's `bias_metrics.source`).
FEDERATED = "federated"  # group counts summed over the nodes' held-out splits
COORDINATOR = "coordinator"  # the coordinator's own held-out file
NODES = "nodes"  # fairness across organisations
PROBE = "probe"  # counterfactual template probe (fedllm.probe)


@dataclass
class BiasMetric:
    source: str
    metric: str
    value: float | None  # None = unavailable (see note)
    group: str | None = None  # per-group rows: the group (or node, or probe category)
    threshold: float | None = None
    flagged: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flag(m: BiasMetric, threshold: float, *, below: bool = False) -> BiasMetric:
    m.threshold = threshold
    if m.value is not None:
        m.flagged = m.value < threshold if below else m.value > threshold
    return m


def positive_index(label_names: tuple[str, ...], positive_label: str | None) -> int:
    if positive_label is None:
        return len(label_names) - 1
    if positive_label not in label_names:
        raise ValueError(f"bias.positive_label {positive_label!r} is not one of the labels "
                         f"{list(label_names)}")
    return label_names.index(positive_label)


def expand_cells(group_confusion: Mapping[str, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(y_true, y_pred, group, weight): one row per non-empty (group, true, pred) cell."""
    yt, yp, gs, ws = [], [], [], []
    for g, cm in sorted(group_confusion.items()):
        for t, p in zip(*np.nonzero(cm), strict=True):
            yt.append(int(t))
            yp.append(int(p))
            gs.append(g)
            ws.append(float(cm[t, p]))
    return (np.asarray(yt, dtype=np.int64), np.asarray(yp, dtype=np.int64),
            np.asarray(gs, dtype=object), np.asarray(ws, dtype=np.float64))


def _rate(num: float, den: float) -> float | None:
    return num / den if den else None


def group_metrics(group_confusion: Mapping[str, np.ndarray] | None, *, source: str,
                  label_names: tuple[str, ...], config: BiasConfig,
                  unavailable: str = "", note: str = "") -> list[BiasMetric]:
    """Per-group accuracy, selection rate, TPR/FPR (positive label vs rest) and the gaps.

    ``group_confusion=None`` -> every metric unavailable with the reason ``unavailable``;
    ``note`` is attached to the aggregate rows (e.g. which nodes lacked the group column)."""
    # Imported here: fairlearn + sklearn take seconds to import, and the report/CLI paths that
    # import this module for sort_flagged_first never compute metrics.
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        demographic_parity_ratio,
        equalized_odds_difference,
    )
    from sklearn.metrics import accuracy_score

    summary = ("demographic_parity_difference", "demographic_parity_ratio",
               "equalized_odds_difference", "accuracy_gap")
    if group_confusion is None:
        return [BiasMetric(source, m, None, note=unavailable or "no group counts")
                for m in summary]
    pos = positive_index(label_names, config.positive_label)
    out: list[BiasMetric] = []
    eligible: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for g, cm in sorted(group_confusion.items()):
        n = int(cm.sum())
        positives = float(cm[pos].sum())
        negatives = float(n - positives)
        rows = {
            "group_size": float(n),
            "group_accuracy": _rate(float(np.trace(cm)), n),
            "group_selection_rate": _rate(float(cm[:, pos].sum()), n),
            "group_tpr": _rate(float(cm[pos, pos]), positives),
            "group_fpr": _rate(float(cm[:, pos].sum() - cm[pos, pos]), negatives),
        }
        for metric, value in rows.items():
            why = ""
            if value is None:
                why = ("group has no examples" if n == 0 else
                       "group has no positive examples" if metric == "group_tpr" else
                       "group has no negative examples")
            out.append(BiasMetric(source, metric, value, group=g, note=why))
        if n == 0:
            problems.append(f"group {g!r} has no examples (left out)")
        elif n < config.min_group_size:
            problems.append(f"group {g!r} has {n} < bias.min_group_size="
                            f"{config.min_group_size} examples (left out of the gaps)")
        else:
            eligible[g] = cm
    notes = "; ".join([x for x in (note, *problems) if x])
    if len(eligible) < 2:
        why = (f"needs at least 2 groups with >= {config.min_group_size} examples, have "
               f"{len(eligible)}" + (f" ({notes})" if notes else ""))
        return out + [BiasMetric(source, m, None, note=why) for m in summary]
    yt, yp, gs, w = expand_cells(eligible)
    bt, bp = (yt == pos).astype(int), (yp == pos).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fairlearn warns on tiny groups; we checked above
        dpd = demographic_parity_difference(bt, bp, sensitive_features=gs, sample_weight=w)
        dpr = demographic_parity_ratio(bt, bp, sensitive_features=gs, sample_weight=w)
        acc = MetricFrame(metrics=accuracy_score, y_true=yt, y_pred=yp, sensitive_features=gs,
                          sample_params={"sample_weight": w})
        gap = float(acc.difference(method="between_groups"))
    out.append(flag(BiasMetric(source, "demographic_parity_difference", float(dpd),
                                note=notes), config.demographic_parity_difference))
    out.append(flag(BiasMetric(source, "demographic_parity_ratio", float(dpr), note=notes),
                     config.demographic_parity_ratio, below=True))
    lacking = [g for g, cm in eligible.items() if cm[pos].sum() == 0 or cm[pos].sum() == cm.sum()]
    if lacking:
        out.append(BiasMetric(source, "equalized_odds_difference", None, note=(
            "TPR/FPR undefined for group(s) " + ", ".join(map(repr, lacking))
            + " (no positive or no negative examples)")))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eod = equalized_odds_difference(bt, bp, sensitive_features=gs, sample_weight=w)
        out.append(flag(BiasMetric(source, "equalized_odds_difference", float(eod),
                                    note=notes), config.equalized_odds_difference))
    worst = min(acc.by_group.items(), key=lambda kv: float(kv[1]))[0]
    out.append(flag(BiasMetric(source, "accuracy_gap", gap,
                                note=f"worst group {worst!r}" + (f"; {notes}" if notes else "")),
                     config.accuracy_gap))
    return out


def node_metrics(node_accuracy: Mapping[str, tuple[float, int]], *, config: BiasConfig
                 ) -> list[BiasMetric]:
    """Fairness across organisations: each node's accuracy on its own held-out split,
    the worst node, the spread (std) and the best − worst gap. ``{node: (accuracy, n)}``."""
    out = [BiasMetric(NODES, "node_accuracy", acc, group=node, note=f"{n} examples")
           for node, (acc, n) in sorted(node_accuracy.items())]
    eligible = {k: a for k, (a, n) in node_accuracy.items() if n >= config.min_group_size}
    if len(eligible) < 2:
        why = (f"needs at least 2 nodes with >= {config.min_group_size} evaluated examples, "
               f"have {len(eligible)}")
        return out + [BiasMetric(NODES, m, None, note=why)
                      for m in ("node_accuracy_gap", "node_accuracy_std", "worst_node_accuracy")]
    values = np.asarray(list(eligible.values()))
    worst = min(eligible, key=lambda k: eligible[k])
    out.append(flag(BiasMetric(NODES, "node_accuracy_gap", float(values.max() - values.min()),
                                note=f"worst node {worst}"), config.node_accuracy_gap))
    out.append(BiasMetric(NODES, "node_accuracy_std", float(values.std())))
    out.append(BiasMetric(NODES, "worst_node_accuracy", float(eligible[worst]), group=worst))
    return out


def sort_flagged_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flagged first, then available, then unavailable; stable otherwise."""
    return sorted(rows, key=lambda r: (not r.get("flagged"), r.get("value") is None))
