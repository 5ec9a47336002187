"""A node's side of a round: load its data, check its budget, train privately, reply.

Flower-free: ``client/app.py`` turns Flower messages into :class:`TrainRequest` and calls
:meth:`NodeRuntime.train`. The runtime caches the loaded base model and the tokenised data so a
node process does not reload them every round; privacy state is *not* cached in memory, it is
read from and written to the node's ledger file every round.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedllm.config import RunConfig
from fedllm.data import (
    DataError,
    TextTable,
    TokenizedDataset,
    check_trainable_size,
    encode_labels,
    fingerprint,
    partition_indices,
    read_table,
    subset,
    tokenize,
)
from fedllm.model import LoadedModel, load_model, resolve_device
from fedllm.privacy import NodeLedger, PrivacyError, calibrate_noise, ledger_path
from fedllm.protocol import STATUS_OK, STATUS_REFUSED, TrainReply, TrainRequest
from fedllm.train import DPParams, train_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeDataSpec:
    """Where a node's private training data comes from."""

    path: str
    text_column: str
    label_column: str | None  # None for causal-lm
    max_examples: int = 0
    # Simulation only: this node's share of a shared file: (scheme, alpha, seed, index, count).
    partition: tuple[str, float, int, int, int] | None = None
    # Held-out split the node evaluates the received global adapter on (only counts leave):
    # a separate file, else a deterministic fraction of the data taken out of training.
    eval_fraction: float = 0.0
    eval_path: str | None = None
    group_column: str | None = None  # optional sensitive attribute (bias metrics)


@dataclass(frozen=True)
class NodeIdentity:
    name: str
    state_dir: Path  # the node's own persistent state: privacy ledger, secret
    # The operator's ε limit. It wins over the coordinator's plan; None = use the plan's.
    epsilon_limit: float | None = None


def simulated_node_data(config: RunConfig, partition_id: int) -> NodeDataSpec:
    """The data of virtual node ``partition_id`` in a simulation of ``config``."""
    d = config.data
    label_col = d.label_column if config.model.task == "seq-cls" else None
    paths = d.resolved_train_paths()
    held_out = {"eval_fraction": d.node_eval_fraction, "group_column": d.group_column}
    if config.partition.scheme == "files":
        return NodeDataSpec(paths[partition_id], d.text_column, label_col, d.max_examples,
                            **held_out)  # type: ignore[arg-type]
    return NodeDataSpec(
        paths[0], d.text_column, label_col, d.max_examples,
        partition=(config.partition.scheme, config.partition.alpha, config.seed, partition_id,
                   config.federation.num_nodes),
        **held_out,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class NodeTables:
    """A node's training part and its held-out part (None when it has none)."""

    train: TextTable
    train_labels: np.ndarray | None
    eval: TextTable | None
    eval_labels: np.ndarray | None


def eval_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, held-out) index split; the held-out part gets round(f·n) rows
    (at least 1 when f > 0 and n > 1)."""
    k = min(max(int(round(fraction * n)), 1 if fraction > 0 and n > 1 else 0), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def load_node_tables(spec: NodeDataSpec, label_names: tuple[str, ...]) -> NodeTables:
    """Read, validate and (in simulation) partition a node's data, then hold out its eval
    split. The split is seeded by the data's own fingerprint: the same data always splits the
    same way, so the training set (and the ledger that follows it) is stable across runs."""
    table = read_table(spec.path, text_column=spec.text_column,
                       label_column=spec.label_column, max_examples=spec.max_examples,
                       group_column=spec.group_column)
    labels = encode_labels(table, label_names, spec.label_column) if spec.label_column else None
    if spec.partition is not None:
        scheme, alpha, seed, index, count = spec.partition
        part = partition_indices(len(table), count, scheme=scheme,  # type: ignore[arg-type]
                                 seed=seed, labels=labels, alpha=alpha)[index]
        table = subset(table, part)
        labels = None if labels is None else labels[part]
    if spec.eval_path:
        ev = read_table(spec.eval_path, text_column=spec.text_column,
                        label_column=spec.label_column, max_examples=spec.max_examples,
                        group_column=spec.group_column)
        ev_labels = (encode_labels(ev, label_names, spec.label_column)
                     if spec.label_column else None)
        return NodeTables(table, labels, ev, ev_labels)
    if spec.eval_fraction <= 0:
        return NodeTables(table, labels, None, None)
    train_idx, eval_idx = eval_split(len(table), spec.eval_fraction,
                                     int(fingerprint(table, labels)[:8], 16))
    return NodeTables(subset(table, train_idx), None if labels is None else labels[train_idx],
                      subset(table, eval_idx), None if labels is None else labels[eval_idx])


def load_node_table(spec: NodeDataSpec, label_names: tuple[str, ...]
                    ) -> tuple[TextTable, np.ndarray | None]:
    """A node's *training* data: (texts, label ids), its held-out split removed."""
    t = load_node_tables(spec, label_names)
    return t.train, t.train_labels


def check_simulation_data(config: RunConfig, label_names: tuple[str, ...]) -> list[int]:
    """Validate every virtual node's data before a simulation starts (the coordinator can read
    the files in simulation): file, columns, texts, labels, and enough examples per node for
    the batch size. Returns the number of examples of each node. Raises DataError."""
    sizes = []
    for pid in range(config.federation.num_nodes):
        spec = simulated_node_data(config, pid)
        table, _ = load_node_table(spec, label_names)
        check_trainable_size(len(table), config.train.batch_size,
                             where=f"node-{pid} ({spec.path})")
        sizes.append(len(table))
    return sizes


def node_secret(state_dir: Path) -> bytes:
    """32 random bytes kept by the node (0600). Seeds its sampling and DP noise: the
    coordinator knows the run's public seed, so that seed must never determine the noise."""
    path = state_dir / "node.secret"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def _round_seed(secret: bytes, run_id: str, rnd: int) -> int:
    digest = hmac.new(secret, f"{run_id}/{rnd}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@dataclass
class _NodeData:
    dataset: TokenizedDataset
    fingerprint: str
    eval_dataset: TokenizedDataset | None = None
    eval_groups: list[str] | None = None
    eval_note: str = ""  # why there is no held-out evaluation / no group counts


class NodeRuntime:
    """Per-process cache of what is expensive to rebuild (base model, tokenised data)."""

    def __init__(self) -> None:
        self._model_key: tuple[object, ...] | None = None
        self._model: LoadedModel | None = None
        self._data: dict[tuple[object, ...], _NodeData] = {}

    def model(self, config: RunConfig, label_names: tuple[str, ...]) -> LoadedModel:
        m, lo = config.model, config.lora
        key = (m.path, m.task, m.pooling, label_names, lo.r, lo.alpha, lo.dropout,
               lo.target_modules, config.train.device)
        if self._model is None or self._model_key != key:
            self._model = None  # drop the old one first: one base model per process
            self._model = load_model(
                m.path, task=m.task, label_names=label_names, pooling=m.pooling, lora_r=lo.r,
                lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                device=resolve_device(config.train.device), seed=config.seed,
            )
            self._model_key = key
        return self._model

    def data(self, spec: NodeDataSpec, loaded: LoadedModel, label_names: tuple[str, ...],
             max_length: int) -> _NodeData:
        key = (spec, loaded.base_path, label_names, max_length)
        if key not in self._data:
            t = load_node_tables(spec, label_names)
            ds = tokenize(loaded.tokenizer, t.train.texts, t.train_labels, max_length=max_length)
            nd = _NodeData(ds, fingerprint(t.train, t.train_labels))
            if t.eval is None:
                nd.eval_note = "no held-out split on this node"
            else:
                nd.eval_dataset = tokenize(loaded.tokenizer, t.eval.texts, t.eval_labels,
                                           max_length=max_length)
                nd.eval_groups = t.eval.groups
                if spec.group_column and t.eval.groups is None:
                    nd.eval_note = (f"{t.eval.path} has no group column "
                                    f"{spec.group_column!r}")
            if len(self._data) >= 4:
                self._data.pop(next(iter(self._data)))
            self._data[key] = nd
        return self._data[key]

    def _evaluate_received(self, loaded: LoadedModel, node_data: _NodeData, reply: TrainReply,
                           bins: int) -> None:
        """Evaluate the adapter as received (before any local training) on the held-out split
        and put only aggregate counts in the reply."""
        reply.eval_note = node_data.eval_note
        if node_data.eval_dataset is None:
            return
        from fedllm.evaluate import evaluate_counts  # evaluation stage, imported lazily

        counts = evaluate_counts(loaded, node_data.eval_dataset, groups=node_data.eval_groups,
                                 bins=bins)
        reply.eval_counts = counts.to_dict()

    def evaluate(self, request: TrainRequest, *, identity: NodeIdentity,
                 data: NodeDataSpec) -> TrainReply:
        """Evaluate-only message (the final global model): counts of the held-out split."""
        cfg = request.config
        loaded = self.model(cfg, request.label_names)
        loaded.load_adapter_state(request.arrays)
        node_data = self.data(data, loaded, request.label_names, cfg.model.max_length)
        reply = TrainReply(node=identity.name, status=STATUS_OK)
        self._evaluate_received(loaded, node_data, reply, cfg.evaluation.bins)
        return reply

    def train(self, request: TrainRequest, *, identity: NodeIdentity,
              data: NodeDataSpec) -> TrainReply:
        cfg = request.config
        loaded = self.model(cfg, request.label_names)
        loaded.load_adapter_state(request.arrays)
        node_data = self.data(data, loaded, request.label_names, cfg.model.max_length)
        ds = node_data.dataset
        check_trainable_size(len(ds), cfg.train.batch_size,
                             where=f"node {identity.name} ({data.path})")
        secret = node_secret(identity.state_dir)
        seed = _round_seed(secret, request.run_id, request.round)
        metrics: dict[str, float] = {}
        reply = TrainReply(node=identity.name, status=STATUS_OK)
        # Node-side evaluation of the received global model rides on the train reply (one
        # message per round); it spends no training ε: the held-out rows are never trained on.
        self._evaluate_received(loaded, node_data, reply, cfg.evaluation.bins)

        dp: DPParams | None = None
        ledger: NodeLedger | None = None
        lpath = ledger_path(identity.state_dir, node_data.fingerprint)
        if cfg.privacy.enabled:
            p = cfg.privacy
            steps_per_epoch = math.ceil(len(ds) / cfg.train.batch_size)
            q = 1.0 / steps_per_epoch  # Opacus' Poisson rate for this loader
            round_steps = cfg.train.local_epochs * steps_per_epoch
            sigma = p.noise_multiplier
            if sigma is None:
                # Whole-run calibration: the target ε holds after the *last* round.
                sigma = calibrate_noise(target_epsilon=p.target_epsilon, delta=p.delta,
                                        sample_rate=q,
                                        steps=cfg.federation.rounds * round_steps,
                                        accountant=p.accountant)
            ledger = NodeLedger.load_or_create(lpath, node=identity.name,
                                               dataset=node_data.fingerprint,
                                               accountant=p.accountant, delta=p.delta)
            limit = identity.epsilon_limit if identity.epsilon_limit is not None \
                else p.epsilon_limit
            reply.accountant = p.accountant
            metrics.update(delta=p.delta, epsilon_limit=limit, noise_multiplier=sigma,
                           sample_rate=q, num_examples=len(ds))
            spent = ledger.epsilon()
            if ledger.has_round(request.run_id, request.round):
                return self._refuse(reply, metrics, spent,
                                    f"round {request.round} of run {request.run_id} was already "
                                    "trained by this node (no update is released twice)")
            projected = ledger.epsilon(extra=[(sigma, q, round_steps)])
            if projected > limit:
                return self._refuse(reply, metrics, spent,
                                    f"privacy budget exhausted: training this round would take "
                                    f"ε from {spent:.3f} to {projected:.3f} > limit {limit:g} "
                                    f"(δ={p.delta:g})")
            dp = DPParams(noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                          accountant=p.accountant)

        result = train_local(
            loaded, ds, epochs=cfg.train.local_epochs, batch_size=cfg.train.batch_size,
            physical_batch_size=cfg.train.physical_batch_size,
            learning_rate=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
            dp=dp, seed=seed,
        )
        if ledger is not None:
            # Persist the spend *before* the update leaves the node.
            metrics["epsilon"] = ledger.record(request.run_id, request.round, result.history)
            ledger.save(lpath)
        metrics.update(num_examples=result.num_examples, steps=result.steps,
                       sample_rate=result.sample_rate, train_loss=result.mean_loss,
                       seconds=result.seconds)
        reply.arrays = loaded.adapter_state()
        reply.metrics = metrics
        return reply

    @staticmethod
    def _refuse(reply: TrainReply, metrics: dict[str, float], spent: float,
                reason: str) -> TrainReply:
        log.warning("%s refuses to train: %s", reply.node, reason)
        reply.status = STATUS_REFUSED
        reply.reason = reason
        metrics["epsilon"] = spent
        metrics["steps"] = 0
        reply.metrics = metrics
        return reply


__all__ = ["DataError", "NodeDataSpec", "NodeIdentity", "NodeRuntime", "PrivacyError",
           "simulated_node_data"]
