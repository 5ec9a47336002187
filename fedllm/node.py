"""A node's side of a round: load its data, check its budget, train privately, reply.

Flower-free: ``client/app.py`` turns Flower messages into :class:`TrainRequest` and calls
:meth:`NodeRuntime.train`. The runtime caches the loaded base model and the tokenised data so a
node process does not reload them every round; privacy state is *not* cached in memory, it is
read from and written to the node's ledger file every round.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.aggregate import clip_update
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
from fedllm.privacy import NodeLedger, PrivacyError, ledger_path, plan_dp_sgd
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


@dataclass(frozen=True)
class NodeIdentity:
    """Who the node is and the operator's own limits; the coordinator cannot change these."""

    name: str
    state_dir: Path  # the node's own persistent state: privacy ledger, secret, releases
    # The operator's ε limit. It wins over the coordinator's plan; None = use the plan's.
    epsilon_limit: float | None = None
    # The largest δ the operator accepts; a run planned with a larger δ is refused.
    max_delta: float | None = None
    # Whether the operator lets this node train runs with DP off.
    allow_no_dp: bool = False


def simulated_node_data(config: RunConfig, partition_id: int) -> NodeDataSpec:
    """The data of virtual node ``partition_id`` in a simulation of ``config``."""
    d = config.data
    label_col = d.label_column if config.model.task == "seq-cls" else None
    paths = d.resolved_train_paths()
    if config.partition.scheme == "files":
        return NodeDataSpec(paths[partition_id], d.text_column, label_col, d.max_examples)
    return NodeDataSpec(
        paths[0], d.text_column, label_col, d.max_examples,
        partition=(config.partition.scheme, config.partition.alpha, config.seed, partition_id,
                   config.federation.num_nodes),
    )


def simulated_state_dir(home: Path, run_id: str, partition_id: int) -> Path:
    """Where virtual node ``partition_id`` of a simulated run keeps its ledger, secret and
    releases (one layout for the Flower simulation and the in-process federation)."""
    return home / "runs" / run_id / "nodes" / f"node-{partition_id}"


def load_node_table(spec: NodeDataSpec, label_names: tuple[str, ...]
                    ) -> tuple[TextTable, np.ndarray | None]:
    """Read, validate and (in simulation) partition a node's data: (texts, label ids)."""
    table = read_table(spec.path, text_column=spec.text_column,
                       label_column=spec.label_column, max_examples=spec.max_examples)
    labels = encode_labels(table, label_names, spec.label_column) if spec.label_column else None
    if spec.partition is not None:
        scheme, alpha, seed, index, count = spec.partition
        part = partition_indices(len(table), count, scheme=scheme,  # type: ignore[arg-type]
                                 seed=seed, labels=labels, alpha=alpha)[index]
        table = subset(table, part)
        labels = None if labels is None else labels[part]
    return table, labels


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
            table, labels = load_node_table(spec, label_names)
            ds = tokenize(loaded.tokenizer, table.texts, labels, max_length=max_length)
            if len(self._data) >= 4:
                self._data.pop(next(iter(self._data)))
            self._data[key] = _NodeData(ds, fingerprint(table, labels))
        return self._data[key]

    def train(self, request: TrainRequest, *, identity: NodeIdentity,
              data: NodeDataSpec) -> TrainReply:
        cfg = request.config
        p = cfg.privacy
        reply = TrainReply(node=identity.name, status=STATUS_OK)
        # The operator's limits come first: no data is read for a run the node will not join.
        if not p.enabled and not identity.allow_no_dp:
            return self._refuse(reply, {}, None, "the run has differential privacy OFF and this "
                                "node's operator does not allow training without DP")
        if p.enabled and identity.max_delta is not None and p.delta > identity.max_delta:
            return self._refuse(reply, {}, None, f"the run asks for δ={p.delta:g}, above this "
                                f"node's limit δ ≤ {identity.max_delta:g}")
        loaded = self.model(cfg, request.label_names)
        loaded.load_adapter_state(request.arrays)
        node_data = self.data(data, loaded, request.label_names, cfg.model.max_length)
        ds = node_data.dataset
        check_trainable_size(len(ds), cfg.train.batch_size,
                             where=f"node {identity.name} ({data.path})")
        secret = node_secret(identity.state_dir)
        seed = _round_seed(secret, request.run_id, request.round)
        metrics: dict[str, float] = {}

        dp: DPParams | None = None
        ledger: NodeLedger | None = None
        lpath = ledger_path(identity.state_dir, node_data.fingerprint)
        if p.enabled:
            plan = plan_dp_sgd(num_examples=len(ds), batch_size=cfg.train.batch_size,
                               local_epochs=cfg.train.local_epochs,
                               rounds=cfg.federation.rounds, target_epsilon=p.target_epsilon,
                               delta=p.delta, accountant=p.accountant,
                               noise_multiplier=p.noise_multiplier, project=False)
            ledger = NodeLedger.load_or_create(lpath, node=identity.name,
                                               dataset=node_data.fingerprint,
                                               accountant=p.accountant, delta=p.delta)
            limit = identity.epsilon_limit if identity.epsilon_limit is not None \
                else p.epsilon_limit
            reply.accountant = p.accountant
            metrics.update(delta=p.delta, epsilon_limit=limit,
                           noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                           num_examples=len(ds))
            spent = ledger.epsilon()
            if ledger.has_round(request.run_id, request.round):
                # A retried or resumed round: re-send exactly what was released (no new ε);
                # never train it again.
                replay = load_release(identity.state_dir, request.run_id, request.round)
                if replay is None:
                    return self._refuse(reply, metrics, ledger,
                                        f"round {request.round} of run {request.run_id} was "
                                        "already trained by this node and its release is not "
                                        "stored (no update is trained twice)")
                reply.arrays, reply.metrics = replay
                reply.metrics["replayed"] = 1
                reply.ledger = [asdict(e) for e in ledger.entries]
                return reply
            projected = ledger.epsilon(extra=plan.round_history())
            if projected > limit:
                return self._refuse(reply, metrics, ledger,
                                    f"privacy budget exhausted: training this round would take "
                                    f"ε from {spent:.3f} to {projected:.3f} > limit {limit:g} "
                                    f"(δ={p.delta:g})")
            dp = DPParams(noise_multiplier=plan.noise_multiplier, max_grad_norm=p.max_grad_norm,
                          accountant=p.accountant)

        result = train_local(
            loaded, ds, epochs=cfg.train.local_epochs, batch_size=cfg.train.batch_size,
            physical_batch_size=cfg.train.physical_batch_size,
            learning_rate=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
            dp=dp, seed=seed,
        )
        arrays = loaded.adapter_state()
        if cfg.central_dp.enabled:
            # Node-level DP: bound this node's influence before anything leaves it.
            arrays, _ = clip_update(arrays, request.arrays, clip_norm=cfg.central_dp.clip_norm)
        metrics.update(num_examples=result.num_examples, steps=result.steps,
                       sample_rate=result.sample_rate, train_loss=result.mean_loss,
                       seconds=result.seconds)
        if ledger is not None:
            # Persist the spend and the release *before* the update leaves the node.
            metrics["epsilon"] = ledger.record(request.run_id, request.round, result.history)
            save_release(identity.state_dir, request.run_id, request.round, arrays, metrics)
            ledger.save(lpath)
            reply.ledger = [asdict(e) for e in ledger.entries]
        reply.arrays = arrays
        reply.metrics = metrics
        return reply

    @staticmethod
    def _refuse(reply: TrainReply, metrics: dict[str, float], ledger: NodeLedger | None,
                reason: str) -> TrainReply:
        log.warning("%s refuses to train: %s", reply.node, reason)
        reply.status = STATUS_REFUSED
        reply.reason = reason
        if ledger is not None:
            metrics["epsilon"] = ledger.epsilon()
            reply.ledger = [asdict(e) for e in ledger.entries]
        metrics["steps"] = 0
        reply.metrics = metrics
        return reply


def _release_path(state_dir: Path, run_id: str, rnd: int) -> Path:
    return state_dir / "releases" / run_id / f"round-{rnd}.npz"


def save_release(state_dir: Path, run_id: str, rnd: int, arrays: dict[str, np.ndarray],
                 metrics: dict[str, float]) -> None:
    """Keep what this node released for (run, round), so a retried or resumed round re-sends
    the same update instead of training (and spending ε) again. Atomic write."""
    path = _release_path(state_dir, run_id, rnd)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    meta = np.frombuffer(json.dumps(metrics).encode(), dtype=np.uint8)
    payload: dict[str, Any] = {"__metrics__": meta, **arrays}
    np.savez(tmp, **payload)
    os.replace(tmp, path)


def load_release(state_dir: Path, run_id: str, rnd: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
    path = _release_path(state_dir, run_id, rnd)
    if not path.exists():
        return None
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "__metrics__"}
        metrics = json.loads(z["__metrics__"].tobytes().decode())
    return arrays, metrics


__all__ = ["DataError", "NodeDataSpec", "NodeIdentity", "NodeRuntime", "PrivacyError",
           "simulated_node_data"]
