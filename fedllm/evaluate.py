"""Evaluation: run a model over a dataset into *counts*, and turn counts into metrics.

Metrics are computed from aggregate statistics (confusion matrix, loss sums, token counts) so
the same code serves the coordinator's held-out set and, later, counts summed across nodes
without any node revealing predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedllm.data import Collator, TokenizedDataset
from fedllm.model import LoadedModel
from fedllm.train import example_losses


@dataclass
class EvalCounts:
    """Sufficient statistics of one evaluation pass: what a node may send (aggregates only,
    never a prediction or a text). Counts of several nodes add up to the counts of their pooled
    examples, so every metric below equals the metric of the pooled predictions."""

    num_examples: int
    loss_sum: float  # seq-cls: sum of per-example CE; causal-lm: sum of per-token CE
    confusion: np.ndarray | None  # (C, C): rows = true label, cols = predicted (seq-cls)
    num_tokens: int = 0  # causal-lm: predicted tokens
    # seq-cls, per sensitive group: (C, C) confusion. None = no group column at this source.
    group_confusion: dict[str, np.ndarray] | None = None
    # seq-cls: (C, 2, B) histogram of p(class c) over B equal-width bins, [c, 1] for examples
    # of class c and [c, 0] for the others: one-vs-rest ROC-AUC of the binned scores.
    score_hist: np.ndarray | None = None
    # seq-cls: (B, 3) per confidence bin: examples, sum of max-probability, correct ones (ECE).
    calibration: np.ndarray | None = None

    def __add__(self, other: EvalCounts) -> EvalCounts:
        def _sum(a: np.ndarray | None, b: np.ndarray | None, what: str) -> np.ndarray | None:
            if a is None or b is None:
                if a is None and b is None:
                    return None
                raise ValueError(f"cannot add eval counts: {what} present on one side only")
            if a.shape != b.shape:
                raise ValueError(f"cannot add eval counts: {what} shapes {a.shape} != {b.shape}")
            return a + b

        groups: dict[str, np.ndarray] | None = None
        if self.group_confusion is not None and other.group_confusion is not None:
            groups = {g: m.copy() for g, m in self.group_confusion.items()}
            for g, m in other.group_confusion.items():
                groups[g] = groups[g] + m if g in groups else m.copy()
        # One side without groups: group metrics are not computable from the sum (the caller
        # aggregates group counts over the sources that have them, and says which lack them).
        return EvalCounts(
            self.num_examples + other.num_examples, self.loss_sum + other.loss_sum,
            _sum(self.confusion, other.confusion, "confusion"),
            self.num_tokens + other.num_tokens, groups,
            _sum(self.score_hist, other.score_hist, "score histogram"),
            _sum(self.calibration, other.calibration, "calibration bins"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the wire and the store)."""
        def arr(a: np.ndarray | None) -> Any:
            return None if a is None else a.tolist()

        return {
            "num_examples": int(self.num_examples), "loss_sum": float(self.loss_sum),
            "num_tokens": int(self.num_tokens), "confusion": arr(self.confusion),
            "group_confusion": None if self.group_confusion is None else
            {g: m.tolist() for g, m in sorted(self.group_confusion.items())},
            "score_hist": arr(self.score_hist), "calibration": arr(self.calibration),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalCounts:
        """Parse counts received from a node; raises ValueError on anything malformed."""
        def arr(v: Any, dtype: Any, ndim: int, what: str) -> np.ndarray | None:
            if v is None:
                return None
            a = np.asarray(v, dtype=dtype)
            if a.ndim != ndim or not np.all(np.isfinite(a)) or np.any(a < 0):
                raise ValueError(f"eval counts: malformed {what}")
            return a

        n = int(d["num_examples"])
        if n < 0:
            raise ValueError("eval counts: negative num_examples")
        gc = d.get("group_confusion")
        groups = None if gc is None else {
            str(g): arr(m, np.int64, 2, f"group {g!r} confusion") for g, m in gc.items()}
        return cls(n, float(d["loss_sum"]), arr(d.get("confusion"), np.int64, 2, "confusion"),
                   int(d.get("num_tokens", 0)), groups,  # type: ignore[arg-type]
                   arr(d.get("score_hist"), np.int64, 3, "score histogram"),
                   arr(d.get("calibration"), np.float64, 2, "calibration bins"))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def score_bins(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin index of probabilities in [0, 1] (1.0 falls in the last bin)."""
    return np.minimum((np.asarray(p) * bins).astype(np.int64), bins - 1)


def score_histogram(y_true: np.ndarray, proba: np.ndarray, bins: int) -> np.ndarray:
    """(C, 2, B): per class, binned p(class) of its negatives [0] and positives [1]."""
    n, c = proba.shape
    hist = np.zeros((c, 2, bins), dtype=np.int64)
    for k in range(c):
        np.add.at(hist[k], ((y_true == k).astype(np.int64), score_bins(proba[:, k], bins)), 1)
    return hist


def calibration_bins(y_true: np.ndarray, proba: np.ndarray, bins: int) -> np.ndarray:
    """(B, 3): examples, summed confidence and correct predictions per confidence bin."""
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    b = score_bins(conf, bins)
    out = np.zeros((bins, 3), dtype=np.float64)
    np.add.at(out[:, 0], b, 1.0)
    np.add.at(out[:, 1], b, conf)
    np.add.at(out[:, 2], b, correct)
    return out


def auc_from_histogram(neg: np.ndarray, pos: np.ndarray) -> float | None:
    """ROC-AUC of binned scores (ties within a bin count 1/2): equals sklearn's
    ``roc_auc_score`` on the bin indices. None when one side is empty (undefined)."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def expected_calibration_error(calibration: np.ndarray) -> float | None:
    n = calibration[:, 0].sum()
    if n == 0:
        return None
    return float(np.abs(calibration[:, 2] - calibration[:, 1]).sum() / n)


def per_class_metrics(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, F1) per class, sklearn's definitions with zero_division=0."""
    cm = confusion.astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and weighted F1 from a confusion matrix (sklearn's definitions,
    with F1 = 0 for a class that is never predicted nor present)."""
    cm = confusion.astype(np.float64)
    total = cm.sum()
    support = cm.sum(axis=1)
    _, _, f1 = per_class_metrics(confusion)
    return {
        "accuracy": float(np.diag(cm).sum() / total) if total else float("nan"),
        "f1_macro": float(f1.mean()),
        "f1_weighted": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
    }


# Metrics a round's headline row holds (the per-class ones go to the evaluation detail).
HEADLINE_METRICS = ("loss", "accuracy", "f1_macro", "f1_weighted", "roc_auc", "ece",
                    "perplexity")


def metrics_from_counts(counts: EvalCounts, task: str,
                        label_names: tuple[str, ...] = ()) -> dict[str, float | None]:
    """Every utility metric computable from ``counts``. ``None`` = not computable from these
    counts (e.g. ROC-AUC when a class is absent), never a silent 0."""
    if task == "seq-cls":
        assert counts.confusion is not None
        out: dict[str, float | None] = {"loss": counts.loss_sum / max(counts.num_examples, 1)}
        out.update(classification_metrics(counts.confusion))
        names = label_names or tuple(str(i) for i in range(counts.confusion.shape[0]))
        prec, rec, f1 = per_class_metrics(counts.confusion)
        for i, name in enumerate(names):
            out[f"precision/{name}"] = float(prec[i])
            out[f"recall/{name}"] = float(rec[i])
            out[f"f1/{name}"] = float(f1[i])
        if counts.score_hist is not None:
            h = counts.score_hist
            aucs = [auc_from_histogram(h[k, 0], h[k, 1]) for k in range(h.shape[0])]
            if h.shape[0] == 2:  # binary: the AUC of the positive (last) class' score
                out["roc_auc"] = aucs[1]
            else:  # one-vs-rest, macro over classes (undefined if any class is absent)
                out["roc_auc"] = None if any(a is None for a in aucs) else \
                    float(np.mean([a for a in aucs if a is not None]))
        if counts.calibration is not None:
            out["ece"] = expected_calibration_error(counts.calibration)
        return out
    loss = counts.loss_sum / max(counts.num_tokens, 1)
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 700.0)))}


def headline(metrics: dict[str, float | None]) -> dict[str, float | None]:
    return {k: v for k, v in metrics.items() if k in HEADLINE_METRICS}


@torch.no_grad()
def evaluate_counts(loaded: LoadedModel, dataset: TokenizedDataset, *,
                    batch_size: int = 64, groups: Sequence[str] | None = None,
                    bins: int = 20) -> EvalCounts:
    """Forward pass over ``dataset`` (length-sorted batches, dynamic padding) into counts.

    ``groups``: the sensitive-attribute value of each example (seq-cls), or None."""
    model = loaded.model
    model.eval()
    collate = Collator(pad_token_id=int(loaded.tokenizer.pad_token_id))
    order = np.argsort(dataset.lengths(), kind="stable")
    loss_sum, tokens = 0.0, 0
    num_classes = len(loaded.label_names)
    proba = np.empty((len(dataset), max(num_classes, 1)), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(loaded.device) for k, v in collate([dataset[int(i)] for i in idx]).items()}
        if loaded.task == "seq-cls":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits.float(), batch["labels"], reduction="sum"))
            proba[idx] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
        else:
            per_example = example_losses(model, batch, loaded.task)  # mean over own tokens
            n_tok = batch["attention_mask"][:, 1:].sum(dim=1)  # (B,)
            loss_sum += float((per_example * n_tok).sum())
            tokens += int(n_tok.sum())
    if loaded.task != "seq-cls":
        return EvalCounts(len(dataset), loss_sum, None, tokens)
    assert dataset.labels is not None
    y = dataset.labels
    preds = proba.argmax(axis=1)
    group_cm = None
    if groups is not None:
        if len(groups) != len(dataset):
            raise ValueError(f"{len(groups)} group values for {len(dataset)} examples")
        g_arr = np.asarray(groups, dtype=object)
        group_cm = {str(g): confusion_matrix(y[g_arr == g], preds[g_arr == g], num_classes)
                    for g in sorted(set(groups))}
    return EvalCounts(len(dataset), loss_sum, confusion_matrix(y, preds, num_classes), tokens,
                      group_cm, score_histogram(y, proba, bins), calibration_bins(y, proba, bins))


def evaluate(loaded: LoadedModel, dataset: TokenizedDataset, *, batch_size: int = 64
             ) -> dict[str, float | None]:
    return metrics_from_counts(evaluate_counts(loaded, dataset, batch_size=batch_size),
                               loaded.task, loaded.label_names)


@torch.no_grad()
def predict_proba(loaded: LoadedModel, texts: list[str], *, max_length: int = 128
                  ) -> np.ndarray:
    """Class probabilities (N, C) for raw texts (seq-cls)."""
    enc = loaded.tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")
    logits = loaded.model(input_ids=enc["input_ids"].to(loaded.device),
                          attention_mask=enc["attention_mask"].to(loaded.device))
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()


@torch.no_grad()
def generate(loaded: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int = 20
             ) -> list[str]:
    """Greedy continuations of ``prompts`` (causal-lm): deterministic, so rounds compare."""
    model = loaded.model
    model.eval()
    tok = loaded.tokenizer
    out = []
    for prompt in prompts:  # one at a time: no left-padding subtleties across tokenizers
        enc = tok(prompt, return_tensors="pt")
        ids = model.generate(input_ids=enc["input_ids"].to(loaded.device),
                             attention_mask=enc["attention_mask"].to(loaded.device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=int(tok.pad_token_id))
        new = ids[0, enc["input_ids"].shape[1]:]
        out.append(tok.decode(new, skip_special_tokens=True))
    return out
