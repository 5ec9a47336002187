"""The coordinator's evaluation of a run, round by round (Flower-free; called by coordinator.py).

Per global model version (round r):
- the coordinator evaluates it on its own held-out file (when it has one) -> utility metrics,
  group metrics from the file's group column, the counterfactual probe, causal-lm samples;
- the nodes evaluate it on their held-out splits and send aggregate counts with their next
  reply (or in the final evaluate message) -> per-node and federated (summed) metrics, group
  metrics over the summed per-group counts, and the spread across organisations.

Everything is recorded in the run store (``evaluations``, ``bias_metrics``), flags included.
"""

from __future__ import annotations

import logging
from typing import Any

from fedllm.config import RunConfig
from fedllm.data import TokenizedDataset
from fedllm.evaluate import EvalCounts, evaluate_counts, generate, headline, metrics_from_counts
from fedllm.fairness import COORDINATOR, FEDERATED, BiasMetric, group_metrics, node_metrics
from fedllm.fairness import positive_index as _positive_index
from fedllm.model import LoadedModel
from fedllm.probe import run_probe
from fedllm.protocol import TrainReply
from fedllm.store import Store

log = logging.getLogger(__name__)


class RunEvaluator:
    def __init__(self, config: RunConfig, store: Store, run_id: str, *,
                 label_names: tuple[str, ...], eval_dataset: TokenizedDataset | None,
                 eval_groups: list[str] | None, eval_source: str = "") -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.label_names = label_names
        self.eval_dataset = eval_dataset
        self.eval_groups = eval_groups
        self.eval_source = eval_source  # the coordinator's eval file, for notes
        self.task = config.model.task

    @property
    def positive(self) -> int:
        return _positive_index(self.label_names, self.config.bias.positive_label)

    # -- the coordinator's own evaluation ------------------------------------------------------

    def global_model(self, rnd: int, loaded: LoadedModel) -> dict[str, float | None]:
        """Evaluate the global model of round ``rnd`` coordinator-side, record it, and return
        the headline metrics for the round's row."""
        cfg = self.config
        evaluations: list[dict[str, Any]] = []
        bias: list[BiasMetric] = []
        metrics: dict[str, float | None] = {}
        if self.eval_dataset is not None:
            counts = evaluate_counts(loaded, self.eval_dataset, groups=self.eval_groups,
                                     bins=cfg.evaluation.bins)
            metrics = metrics_from_counts(counts, self.task, self.label_names)
            samples = []
            if self.task == "causal-lm" and cfg.evaluation.prompts:
                texts = generate(loaded, cfg.evaluation.prompts,
                                 max_new_tokens=cfg.evaluation.max_new_tokens)
                samples = [{"prompt": p, "text": t}
                           for p, t in zip(cfg.evaluation.prompts, texts, strict=True)]
            evaluations.append({"source": COORDINATOR, "num_examples": counts.num_examples,
                                "metrics": metrics, "counts": counts.to_dict(),
                                "samples": samples})
            if self.task == "seq-cls":
                bias += group_metrics(counts.group_confusion, source=COORDINATOR,
                                      label_names=self.label_names, config=cfg.bias,
                                      unavailable=self._no_groups_reason(self.eval_source))
        if cfg.bias.probe:  # causal-lm: recorded as unavailable (no label to flip)
            positive = self.positive if self.task == "seq-cls" else 0
            bias += run_probe(loaded, positive=positive, config=cfg.bias)
        self.store.record_evaluations(self.run_id, rnd, evaluations=evaluations,
                                      bias=[b.to_dict() for b in bias])
        return headline(metrics)

    def _no_groups_reason(self, where: str) -> str:
        col = self.config.data.group_column
        if not col:
            return "data.group_column is not set (no sensitive attribute configured)"
        return f"{where} has no column {col!r}"

    # -- the nodes' evaluations ----------------------------------------------------------------

    def node_replies(self, rnd: int, replies: list[TrainReply]) -> None:
        """Record the nodes' counts for the global model of round ``rnd``: per node, summed
        over nodes (federated), group metrics over the summed group counts, node spread.
        A node's malformed or mismatched counts are left out with a warning, never fatal."""
        cfg = self.config
        per_node: dict[str, EvalCounts] = {}
        notes: dict[str, str] = {}
        for reply in replies:
            if reply.eval_counts is None:
                if reply.eval_note:
                    notes[reply.node] = reply.eval_note
                continue
            try:
                counts = EvalCounts.from_dict(reply.eval_counts)
                self._check_shape(counts)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("round %d: eval counts of %s ignored: %s", rnd, reply.node, e)
                self.store.add_event(self.run_id, "warning",
                                     f"eval counts of {reply.node} for round {rnd} ignored: {e}")
                continue
            per_node[reply.node] = counts
            if reply.eval_note:
                notes[reply.node] = reply.eval_note
        if not per_node:
            return
        evaluations: list[dict[str, Any]] = []
        node_acc: dict[str, tuple[float, int]] = {}
        total: EvalCounts | None = None
        for node, c in sorted(per_node.items()):
            m = metrics_from_counts(c, self.task, self.label_names)
            evaluations.append({"source": "node", "node_id": node, "num_examples": c.num_examples,
                                "metrics": m, "counts": c.to_dict()})
            if self.task == "seq-cls" and m.get("accuracy") is not None:
                node_acc[node] = (float(m["accuracy"]), c.num_examples)  # type: ignore[arg-type]
            # Utility sums over every node; group counts only over nodes that have the column.
            total = c if total is None else total + c
        assert total is not None
        with_groups = {n: c for n, c in per_node.items() if c.group_confusion is not None}
        without = sorted(set(per_node) - set(with_groups))
        groups: dict[str, Any] | None = None
        if with_groups:
            summed = EvalCounts(0, 0.0, None, group_confusion={})
            for c in with_groups.values():
                summed = summed + EvalCounts(0, 0.0, None, group_confusion=c.group_confusion)
            groups = summed.group_confusion
            total.group_confusion = groups
        evaluations.append({"source": FEDERATED, "num_examples": total.num_examples,
                            "metrics": metrics_from_counts(total, self.task, self.label_names),
                            "counts": total.to_dict()})
        bias: list[BiasMetric] = []
        if self.task == "seq-cls":
            missing_note = ("no group counts from " + ", ".join(
                f"{n} ({notes.get(n) or 'no group column'})" for n in without)) if without else ""
            unavailable = (self._no_groups_reason("no node's held-out data")
                           if not with_groups else "")
            bias += group_metrics(groups, source=FEDERATED, label_names=self.label_names,
                                  config=cfg.bias, unavailable=unavailable, note=missing_note)
            bias += node_metrics(node_acc, config=cfg.bias)
        self.store.record_evaluations(self.run_id, rnd, evaluations=evaluations,
                                      bias=[b.to_dict() for b in bias])

    def _check_shape(self, counts: EvalCounts) -> None:
        c = len(self.label_names)
        if self.task != "seq-cls":
            return
        if counts.confusion is None or counts.confusion.shape != (c, c):
            raise ValueError(f"confusion matrix is not {c}x{c} (labels {list(self.label_names)})")
        for g, m in (counts.group_confusion or {}).items():
            if m.shape != (c, c):
                raise ValueError(f"group {g!r} confusion matrix is not {c}x{c}")

    # -- flags -----------------------------------------------------------------------------------

    def flag_events(self, rnd: int) -> int:
        """One warning event per flagged bias metric of the final model; returns the count."""
        flagged = [b for b in self.store.get_bias(self.run_id)
                   if b["round"] == rnd and b["flagged"]]
        for b in flagged:
            what = b["metric"] + (f"[{b['group']}]" if b["group"] else "")
            op = "<" if b["metric"] == "demographic_parity_ratio" else ">"
            self.store.add_event(self.run_id, "warning",
                                 f"bias flag ({b['source']}, round {rnd}): {what} = "
                                 f"{b['value']:.4f} {op} threshold {b['threshold']:g}")
        return len(flagged)
