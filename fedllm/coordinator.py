"""The coordinator's round loop, Flower-free.

Each round: sample nodes, send them the global adapter and the run plan, collect replies,
validate updates, FedAvg the good ones, evaluate on the held-out set, record everything in the
run store. ``server/app.py`` supplies a :class:`Transport` backed by Flower's Grid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedllm.aggregate import UpdateRejected, fedavg, validate_update
from fedllm.config import RunConfig
from fedllm.data import (
    TextTable,
    TokenizedDataset,
    encode_labels,
    infer_label_names,
    read_table,
    tokenize,
)
from fedllm.model import LoadedModel, load_model, resolve_device, save_adapter
from fedllm.protocol import TrainReply, TrainRequest, state_bytes
from fedllm.run_eval import RunEvaluator
from fedllm.store import Store

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run cannot continue; the message is recorded as the run's error."""


class Transport(Protocol):
    def node_ids(self, *, min_nodes: int, timeout: float) -> list[int]:
        """Connected node ids, waiting up to ``timeout`` s for at least ``min_nodes``."""
        ...

    def train(self, requests: dict[int, TrainRequest], *, timeout: float,
              on_reply: Callable[[int], None]) -> dict[int, TrainReply | str]:
        """Send each request, return each node's reply or a failure reason (str)."""
        ...

    # Optional: ``evaluate(requests, *, timeout) -> dict[int, TrainReply | str]`` sends
    # evaluate-only requests (the final model); a transport without it skips that step.


class RunObserver(Protocol):
    def round_started(self, rnd: int, num_nodes: int) -> None: ...
    def node_replied(self, rnd: int) -> None: ...
    def round_finished(self, report: RoundReport) -> None: ...


@dataclass
class RoundReport:
    round: int
    metrics: dict[str, float | None]
    nodes: list[dict[str, Any]] = field(default_factory=list)
    num_aggregated: int = 0
    seconds: float = 0.0


@dataclass
class RunSummary:
    run_id: str
    state: str
    rounds: list[RoundReport]
    adapter_path: str | None
    db_path: str
    model_bytes: int
    adapter_bytes: int
    error: str | None = None


def run_dir(home: Path, run_id: str) -> Path:
    return home / "runs" / run_id


def eval_table(config: RunConfig) -> TextTable:
    """The coordinator's held-out file (labels read for seq-cls only)."""
    d = config.data
    return read_table(
        d.resolved_eval_path(), text_column=d.eval_text_column or d.text_column,
        label_column=(d.eval_label_column or d.label_column)
        if config.model.task == "seq-cls" else None,
        max_examples=d.max_eval_examples, group_column=d.group_column)


def eval_dataset(config: RunConfig, loaded: LoadedModel, label_names: tuple[str, ...]
                 ) -> TokenizedDataset:
    d = config.data
    table = eval_table(config)
    labels = (encode_labels(table, label_names, d.eval_label_column or d.label_column)
              if config.model.task == "seq-cls" else None)
    return tokenize(loaded.tokenizer, table.texts, labels, max_length=config.model.max_length)


def resolve_label_names(config: RunConfig) -> tuple[str, ...]:
    """Labels as configured, else the sorted distinct labels of the coordinator's eval file."""
    if config.model.task != "seq-cls":
        return ()
    if config.data.labels:
        return tuple(config.data.labels)
    return infer_label_names(eval_table(config))


class Coordinator:
    def __init__(self, config: RunConfig, store: Store, *, run_id: str, home: Path,
                 mode: str = "simulation", secure_transport: bool = False,
                 secure_aggregation: bool = False,
                 observer: RunObserver | None = None) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.home = home
        self.mode = mode
        self.secure_transport = secure_transport  # TLS on every link
        self.secure_aggregation = secure_aggregation  # coordinator sees masked updates only
        self.observer = observer

    def run(self, transport: Transport) -> RunSummary:
        cfg = self.config
        p = cfg.privacy
        self.store.create_run(
            self.run_id, name=cfg.name, mode=self.mode, task=cfg.model.task,
            model_path=cfg.model.path or "default:all-MiniLM-L6-v2",
            num_rounds=cfg.federation.rounds, num_nodes=cfg.federation.num_nodes,
            dp_enabled=p.enabled, target_epsilon=p.target_epsilon if p.enabled else None,
            delta=p.delta if p.enabled else None, accountant=p.accountant if p.enabled else None,
            secure_transport=self.secure_transport,
            secure_aggregation=self.secure_aggregation, config=cfg.to_dict(),
        )
        if not p.enabled:
            self._warn("DIFFERENTIAL PRIVACY IS OFF for this run (explicit --no-dp): node "
                       "updates carry no formal privacy guarantee")
        if not self.secure_aggregation:
            self._warn("updates are not securely aggregated in this run: the coordinator sees "
                       "each node's (DP-noised) update")
        if self.mode != "simulation" and not self.secure_transport:
            self._warn("INSECURE TRANSPORT: this deployment runs without TLS (--insecure); "
                       "updates and credentials travel in clear")
        reports: list[RoundReport] = []
        adapter_path: str | None = None
        model_bytes = adapter_bytes = 0
        try:
            label_names = resolve_label_names(cfg)
            loaded = load_model(
                cfg.model.path, task=cfg.model.task, label_names=label_names,
                pooling=cfg.model.pooling, lora_r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules,
                device=resolve_device(cfg.train.device), seed=cfg.seed,
            )
            eval_ds = eval_dataset(cfg, loaded, label_names)
            self.evaluator = self._make_evaluator(label_names, eval_ds)
            global_state = loaded.adapter_state()
            model_bytes, adapter_bytes = loaded.full_model_bytes, state_bytes(global_state)
            self.store.update_run(self.run_id, model_bytes=model_bytes,
                                  adapter_bytes=adapter_bytes, label_names=label_names)
            t0 = time.time()
            report = RoundReport(0, self.evaluator.global_model(0, loaded),
                                 seconds=time.time() - t0)
            self.store.record_round(self.run_id, 0, started_at=t0, num_nodes=0,
                                    metrics=report.metrics, nodes=[])
            reports.append(report)
            if self.observer:
                self.observer.round_finished(report)
            out_dir = run_dir(self.home, self.run_id) / "adapter"
            rng = np.random.default_rng(cfg.seed)
            for rnd in range(1, cfg.federation.rounds + 1):
                global_state, report = self._round(rnd, transport, loaded, eval_ds,
                                                   global_state, label_names, rng)
                reports.append(report)
                adapter_path = str(save_adapter(loaded, out_dir))
                self.store.update_run(self.run_id, adapter_path=adapter_path)
                if self.observer:
                    self.observer.round_finished(report)
            self._final_node_evaluation(transport, global_state, label_names)
        except KeyboardInterrupt:
            self.store.finish_run(self.run_id, "interrupted", "interrupted by the user")
            raise
        except Exception as e:  # recorded, then re-raised for the caller to report
            msg = f"{type(e).__name__}: {e}" if not isinstance(e, RunFailed) else str(e)
            self.store.finish_run(self.run_id, "failed", msg)
            self.store.add_event(self.run_id, "error", msg)
            raise
        self.store.finish_run(self.run_id, "finished")
        return RunSummary(self.run_id, "finished", reports, adapter_path, str(self.store.path),
                          model_bytes, adapter_bytes)

    def _warn(self, message: str) -> None:
        log.warning(message)
        self.store.add_event(self.run_id, "warning", message)

    def _round(self, rnd: int, transport: Transport, loaded: LoadedModel, eval_ds: TokenizedDataset,
               global_state: dict[str, np.ndarray], label_names: tuple[str, ...],
               rng: np.random.Generator) -> tuple[dict[str, np.ndarray], RoundReport]:
        cfg = self.config
        fed = cfg.federation
        t0 = time.time()
        available = sorted(transport.node_ids(min_nodes=fed.sampled_per_round,
                                              timeout=min(fed.round_timeout, 300.0)))
        if len(available) < fed.sampled_per_round:
            raise RunFailed(f"round {rnd}: only {len(available)} node(s) connected, "
                            f"{fed.sampled_per_round} needed")
        # Sample positions, not ids: Flower node ids are uint64 and numpy would round them.
        picks = rng.choice(len(available), fed.sampled_per_round, replace=False)
        chosen = sorted(available[int(i)] for i in picks)
        if self.observer:
            self.observer.round_started(rnd, len(chosen))
        request = TrainRequest(self.run_id, rnd, cfg, label_names, global_state)
        replies = transport.train(
            {nid: request for nid in chosen}, timeout=fed.round_timeout,
            on_reply=lambda _nid: self.observer.node_replied(rnd) if self.observer else None,
        )
        # Nodes evaluated the global model they received (round rnd - 1) before training.
        self.evaluator.node_replies(rnd - 1, [r for r in replies.values()
                                              if not isinstance(r, str)])
        rows: list[dict[str, Any]] = []
        accepted: list[tuple[dict[str, np.ndarray], float]] = []
        for nid in chosen:
            reply = replies.get(nid, "no reply before the round timeout")
            if isinstance(reply, str):
                rows.append({"node_id": f"flower-{nid}", "status": "failed", "reason": reply})
                log.warning("round %d: node %s failed: %s", rnd, nid, reply)
                continue
            row = reply.record_fields()
            if reply.ok:
                try:
                    validate_update(reply.arrays, global_state)
                    accepted.append((reply.arrays, float(reply.metrics["num_examples"])))
                except UpdateRejected as e:
                    row.update(status="rejected", reason=str(e))
                    log.warning("round %d: update of %s rejected: %s", rnd, reply.node, e)
            rows.append(row)
        if not accepted:
            # Record who did what before failing: nothing already learnt is lost.
            self.store.record_round(self.run_id, rnd, started_at=t0, num_nodes=0,
                                    metrics={}, nodes=rows)
            reasons = "; ".join(f"{r['node_id']}: {r['status']} ({r.get('reason')})"
                                for r in rows)
            raise RunFailed(f"round {rnd}: no usable update from any node — {reasons}")
        new_state = fedavg(accepted)
        loaded.load_adapter_state(new_state)
        metrics = self.evaluator.global_model(rnd, loaded)
        self.store.record_round(self.run_id, rnd, started_at=t0, num_nodes=len(accepted),
                                metrics=metrics, nodes=rows)
        return new_state, RoundReport(rnd, metrics, rows, len(accepted), time.time() - t0)

    # -- evaluation & bias (issue 4): see fedllm/run_eval.py ----------------------------------

    def _make_evaluator(self, label_names: tuple[str, ...], eval_ds: TokenizedDataset
                        ) -> RunEvaluator:
        cfg = self.config
        groups = eval_table(cfg).groups if cfg.data.group_column else None
        if cfg.data.node_eval_fraction > 0 and self.mode == "simulation":
            self._info("nodes evaluate the global model on a held-out "
                       f"{cfg.data.node_eval_fraction:.0%} of their data and send aggregate "
                       "counts (confusion matrices, loss sums, per-group counts): these "
                       "aggregates are not covered by the DP guarantee of the training data")
        return RunEvaluator(cfg, self.store, self.run_id, label_names=label_names,
                            eval_dataset=eval_ds, eval_groups=groups,
                            eval_source=cfg.data.resolved_eval_path())

    def _info(self, message: str) -> None:
        log.info(message)
        self.store.add_event(self.run_id, "info", message)

    def _final_node_evaluation(self, transport: Transport, global_state: dict[str, np.ndarray],
                               label_names: tuple[str, ...]) -> None:
        """Nodes evaluate the *final* global model too (an evaluate-only message), then flags
        of the final model become warning events."""
        cfg = self.config
        last = cfg.federation.rounds
        evaluate = getattr(transport, "evaluate", None)
        if evaluate is not None:
            ids = transport.node_ids(min_nodes=0, timeout=0.0)
            request = TrainRequest(self.run_id, last, cfg, label_names, global_state)
            replies = evaluate({nid: request for nid in ids},
                               timeout=min(cfg.federation.round_timeout, 600.0))
            failed = {nid: r for nid, r in replies.items() if isinstance(r, str)}
            for nid, why in failed.items():
                log.warning("final evaluation: node %s failed: %s", nid, why)
            self.evaluator.node_replies(last, [r for r in replies.values()
                                               if not isinstance(r, str)])
        else:
            self._info("this transport cannot send evaluate-only messages: the final model "
                       "is evaluated coordinator-side only")
        n = self.evaluator.flag_events(last)
        if n:
            log.warning("%d bias metric(s) flagged for the final model: fedllm report %s",
                        n, self.run_id)
