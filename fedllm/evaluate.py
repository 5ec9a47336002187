"""Evaluation: run a model over a dataset into *counts*, and turn counts into metrics.

Metrics are computed from aggregate statistics (confusion matrix, loss sums, token counts) so
the same code serves the coordinator's held-out set and, later, counts summed across nodes
without any node revealing predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.data import Collator, TokenizedDataset
from fedllm.model import LoadedModel
from fedllm.train import example_losses


@dataclass
class EvalCounts:
    """Sufficient statistics of one evaluation pass."""

    num_examples: int
    loss_sum: float  # seq-cls: sum of per-example CE; causal-lm: sum of per-token CE
    confusion: np.ndarray | None  # (C, C): rows = true label, cols = predicted (seq-cls)
    num_tokens: int = 0  # causal-lm: predicted tokens


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and weighted F1 from a confusion matrix (sklearn's definitions,
    with F1 = 0 for a class that is never predicted nor present)."""
    cm = confusion.astype(np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "f1_macro": float(f1.mean()),
        "f1_weighted": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
    }


def metrics_from_counts(counts: EvalCounts, task: str) -> dict[str, float]:
    if task == "seq-cls":
        assert counts.confusion is not None
        out = {"loss": counts.loss_sum / max(counts.num_examples, 1)}
        out.update(classification_metrics(counts.confusion))
        return out
    loss = counts.loss_sum / max(counts.num_tokens, 1)
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 700.0)))}


@torch.no_grad()
def evaluate_counts(loaded: LoadedModel, dataset: TokenizedDataset, *,
                    batch_size: int = 64) -> EvalCounts:
    """Forward pass over ``dataset`` (length-sorted batches, dynamic padding)."""
    model = loaded.model
    model.eval()
    collate = Collator(pad_token_id=int(loaded.tokenizer.pad_token_id))
    order = np.argsort(dataset.lengths(), kind="stable")
    loss_sum, tokens = 0.0, 0
    preds = np.empty(len(dataset), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(loaded.device) for k, v in collate([dataset[int(i)] for i in idx]).items()}
        if loaded.task == "seq-cls":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits.float(), batch["labels"], reduction="sum"))
            preds[idx] = logits.argmax(dim=-1).cpu().numpy()
        else:
            per_example = example_losses(model, batch, loaded.task)  # mean over own tokens
            n_tok = batch["attention_mask"][:, 1:].sum(dim=1)  # (B,)
            loss_sum += float((per_example * n_tok).sum())
            tokens += int(n_tok.sum())
    confusion = None
    if loaded.task == "seq-cls":
        assert dataset.labels is not None
        confusion = confusion_matrix(dataset.labels, preds, len(loaded.label_names))
    return EvalCounts(len(dataset), loss_sum, confusion, tokens)


def evaluate(loaded: LoadedModel, dataset: TokenizedDataset, *, batch_size: int = 64
             ) -> dict[str, float]:
    return metrics_from_counts(evaluate_counts(loaded, dataset, batch_size=batch_size),
                               loaded.task)


@torch.no_grad()
def predict_proba(loaded: LoadedModel, texts: list[str], *, max_length: int = 128
                  ) -> np.ndarray:
    """Class probabilities (N, C) for raw texts (seq-cls)."""
    enc = loaded.tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")
    logits = loaded.model(input_ids=enc["input_ids"].to(loaded.device),
                          attention_mask=enc["attention_mask"].to(loaded.device))
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()
