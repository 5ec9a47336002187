"""A node's side of a round: load its data, check its budget, train privately, reply.

Flower-free: ``client/app.py`` turns Flower messages into :class:`TrainRequest` and calls
:meth:`NodeRuntime.train`. The runtime caches the loaded base model and the tokenised data so a
node process does not reload them every round; privacy state is *not* cached in memory, it is
read from and written to the node's ledger file every round.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedllm.aggregate import clip_update, released_counts
from fedllm.config import NodeConfig, RedactionConfig, RunConfig
from fedllm.data import (
    DataError,
    TextTable,
    TokenizedDataset,
    cap_per_user,
    check_trainable_size,
    encode_labels,
    fingerprint,
    partition_indices,
    read_table,
    subset,
    tokenize,
)
from fedllm.model import LoadedModel, load_run_model
from fedllm.privacy import NodeLedger, PrivacyError, ledger_path, plan_dp_sgd
from fedllm.protocol import (
    PHASE_CENTER,
    PHASE_COUNT,
    PHASE_TRAIN,
    STATS_KEY,
    STATUS_OK,
    STATUS_REFUSED,
    TrainReply,
    TrainRequest,
    pack_state,
    unpack_state,
)
from fedllm.sealed import SealedDir, SealedError
from fedllm.store import fedllm_home
from fedllm.train import (
    DPParams,
    dp_for_run,
    logit_adjustment,
    private_class_stats,
    train_for_run,
)

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
    # Node-side data protection (issue 9): user id column, per-user cap (0 = none), redaction
    # (None = off). Applied after the ledger's fingerprint is taken from the raw data, so
    # changing them never gives the same data a fresh ledger.
    user_column: str | None = None
    max_examples_per_user: int = 0
    redaction: RedactionConfig | None = None
    # Held-out split the node evaluates the received global adapter on (only counts leave):
    # a separate file, else a deterministic fraction of the data taken out of training.
    eval_fraction: float = 0.0
    eval_path: str | None = None
    group_column: str | None = None  # optional sensitive attribute (bias metrics)


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
    # The operator key sealing the state (made by `fedllm node init`). None (simulation) = a
    # key auto-created at <state_dir>/node.key on first use.
    key_file: Path | None = None


def simulated_node_data(config: RunConfig, partition_id: int) -> NodeDataSpec:
    """The data of virtual node ``partition_id`` in a simulation of ``config``."""
    d = config.data
    label_col = d.label_column if config.model.task == "seq-cls" else None
    paths = d.resolved_train_paths()
    extra: dict[str, object] = dict(
        user_column=d.user_column, max_examples_per_user=d.max_examples_per_user,
        redaction=config.redaction if config.redaction.enabled else None,
        eval_fraction=d.node_eval_fraction, group_column=d.group_column)
    if config.partition.scheme == "files":
        return NodeDataSpec(paths[partition_id], d.text_column, label_col, d.max_examples,
                            **extra)  # type: ignore[arg-type]
    return NodeDataSpec(
        paths[0], d.text_column, label_col, d.max_examples,
        partition=(config.partition.scheme, config.partition.alpha, config.seed, partition_id,
                   config.federation.num_nodes),
        **extra,  # type: ignore[arg-type]
    )


def simulated_state_dir(home: Path, run_id: str, partition_id: int) -> Path:
    """Where virtual node ``partition_id`` of a simulated run keeps its ledger, secret and
    releases (one layout for the Flower simulation and the in-process federation)."""
    return home / "runs" / run_id / "nodes" / f"node-{partition_id}"


def deployed_node(config: NodeConfig, home: str | Path | None = None, *,
                  base_dir: Path | None = None, task: str = "seq-cls"
                  ) -> tuple[NodeIdentity, NodeDataSpec]:
    """A deployed node's identity (state dir, key file, operator limits) and data, from its
    node.toml; relative paths are taken relative to ``base_dir`` (the file's folder)."""
    n, d = config.node, config.data

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() or base_dir is None else base_dir / q

    state_dir = resolve(n.state_dir) if n.state_dir else fedllm_home(home) / "nodes" / n.name
    key_file = resolve(n.key_file) if n.key_file else state_dir / "node.key"
    identity = NodeIdentity(n.name, state_dir, epsilon_limit=config.privacy.max_epsilon,
                            max_delta=config.privacy.delta,
                            allow_no_dp=config.privacy.allow_no_dp, key_file=key_file)
    label_column = d.label_column if task == "seq-cls" else None
    spec = NodeDataSpec(str(resolve(d.path)), d.text_column, label_column, d.max_examples,
                        user_column=d.user_column,
                        max_examples_per_user=config.contribution.max_examples_per_user,
                        redaction=config.redaction if config.redaction.enabled else None)
    return identity, spec


def open_node_state(identity: NodeIdentity) -> SealedDir:
    """The node's sealed state folder (see fedllm/sealed.py). Raises SealedError."""
    if identity.key_file is None:
        return SealedDir.open_or_create(identity.state_dir, identity.state_dir / "node.key")
    from fedllm.sealed import load_key

    return SealedDir(identity.state_dir, load_key(identity.key_file))



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
                       user_column=spec.user_column, group_column=spec.group_column)
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
        n = len(table)
        if spec.max_examples_per_user and table.user_ids is not None:
            # How many rows the cap keeps does not depend on the node's secret.
            per_user = np.unique(np.asarray(table.user_ids), return_counts=True)[1]
            n = int(np.minimum(per_user, spec.max_examples_per_user).sum())
        check_trainable_size(n, config.train.batch_for(n), where=f"node-{pid} ({spec.path})")
        sizes.append(n)
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
    fingerprint: str  # of the raw data (before capping and redaction): the ledger's key
    # Node-side protection applied (issue 9): what goes into the reply, never any value.
    user_cap: int | None = None  # examples per user bound; None = unbounded/unknown
    num_users: int | None = None
    redactions: dict[str, int] | None = None
    eval_dataset: TokenizedDataset | None = None
    eval_groups: list[str] | None = None
    eval_note: str = ""  # why there is no held-out evaluation / no group counts


def protect_table(table: TextTable, labels: np.ndarray | None, spec: NodeDataSpec, *,
                  secret: bytes) -> tuple[TextTable, np.ndarray | None, _NodeData]:
    """Per-user cap, then PII redaction, of a node's raw table (before tokenisation).
    Returns the table to train on, its labels and what the reply may say about it."""
    info = _NodeData(TokenizedDataset([], None), fingerprint(table, labels))
    if table.user_ids is not None:
        info.num_users = len(set(table.user_ids))
        if spec.max_examples_per_user:
            keep = cap_per_user(table.user_ids, table.texts,
                                max_per_user=spec.max_examples_per_user, secret=secret)
            table = subset(table, keep)
            labels = None if labels is None else labels[keep]
            info.user_cap = spec.max_examples_per_user
    if spec.redaction is not None:
        from fedllm.pii import build_redactor, redact_texts

        redactor = build_redactor(spec.redaction)
        for note in redactor.notes:
            log.warning("redaction at this node: %s", note)
        res = redact_texts(redactor, table.texts)
        table = TextTable(table.path, res.texts, table.raw_labels, table.lines, table.user_ids,
                          table.groups)
        info.redactions = res.counts
    return table, labels, info


def release_free_memory() -> None:
    """Give memory freed by a finished request back to the operating system.

    A round allocates and frees hundreds of MB (activations, per-sample gradients, Opacus'
    buffers, the PRV accountant's grids); glibc keeps freed blocks in its arenas, so without a
    trim a long-lived node process's RSS creeps up round after round although nothing is
    kept (bench/scale.py). Python's cycles are collected first so their blocks are free too.
    A no-op where the C library has no malloc_trim (not glibc).
    """
    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class NodeRuntime:
    """Per-process cache of what is expensive to rebuild (base model, tokenised data)."""

    def __init__(self) -> None:
        self._model_key: tuple[object, ...] | None = None
        self._model: LoadedModel | None = None
        self._data: dict[tuple[object, ...], _NodeData] = {}

    def model(self, config: RunConfig, label_names: tuple[str, ...]) -> LoadedModel:
        # Every model and LoRA setting (frozen, hashable configs) plus the device.
        key = (config.model, config.lora, label_names, config.train.device)
        if self._model is None or self._model_key != key:
            self._model = None  # drop the old one first: one base model per process
            self._model = load_run_model(config, label_names)
            self._model_key = key
        return self._model

    def data(self, spec: NodeDataSpec, loaded: LoadedModel, label_names: tuple[str, ...],
             max_length: int, *, secret: bytes = b"") -> _NodeData:
        key = (spec, loaded.base_path, label_names, max_length,
               hashlib.sha256(secret).hexdigest())
        if key not in self._data:
            t = load_node_tables(spec, label_names)
            # Per-user cap and redaction apply to what is trained on; the fingerprint (the
            # ledger's key) is taken from the raw training rows before them.
            table, labels, nd = protect_table(t.train, t.train_labels, spec, secret=secret)
            nd.dataset = tokenize(loaded.tokenizer, table.texts, labels, max_length=max_length)
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
        node_data = self.data(data, loaded, request.label_names, cfg.model.max_length,
                              secret=node_secret(identity.state_dir))
        reply = TrainReply(node=identity.name, status=STATUS_OK)
        self._evaluate_received(loaded, node_data, reply, cfg.evaluation.bins)
        return reply

    def train(self, request: TrainRequest, *, identity: NodeIdentity,
              data: NodeDataSpec) -> TrainReply:
        """One request of the run: train a round (PHASE_TRAIN) or, before round 1, release
        the DP class statistics that centre and initialise the head (PHASE_CENTER). Both are
        releases of the node's data: budget-checked, recorded in its ledger and stored for
        replay first. PHASE_COUNT, before that release, answers with the number of training
        examples only (public metadata: no data, no ε, no ledger entry)."""
        cfg = request.config
        p = cfg.privacy
        center_phase = request.phase in (PHASE_CENTER, PHASE_COUNT)
        reply = TrainReply(node=identity.name, status=STATUS_OK)
        # The operator's limits come first: no data is read for a run the node will not join.
        if not p.enabled and not identity.allow_no_dp:
            return self._refuse(reply, {}, None, "the run has differential privacy OFF and this "
                                "node's operator does not allow training without DP")
        if p.enabled and identity.max_delta is not None and p.delta > identity.max_delta:
            return self._refuse(reply, {}, None, f"the run asks for δ={p.delta:g}, above this "
                                f"node's limit δ ≤ {identity.max_delta:g}")
        if request.phase not in (PHASE_TRAIN, PHASE_CENTER, PHASE_COUNT):
            return self._refuse(reply, {}, None, f"unknown request phase {request.phase!r}")
        if center_phase and not cfg.centers_features:
            return self._refuse(reply, {}, None, "a class-statistics release was requested, but "
                                "the run's plan does not centre features with DP "
                                "(train.center_features)")
        loaded = self.model(cfg, request.label_names)
        if cfg.model.task == "seq-cls":
            # Keeps the model's function (the head's bias absorbs W c); the wire state stays
            # uncentred, so the order with load_adapter_state does not matter.
            loaded.set_feature_center(request.feature_center)
        if not center_phase:
            loaded.load_adapter_state(request.arrays)
        secret = node_secret(identity.state_dir)
        node_data = self.data(data, loaded, request.label_names, cfg.model.max_length,
                              secret=secret)
        ds = node_data.dataset
        check_trainable_size(len(ds), cfg.train.batch_for(len(ds)),
                             where=f"node {identity.name} ({data.path})")
        if request.phase == PHASE_COUNT:
            reply.metrics = {"num_examples": len(ds), "steps": 0}
            return reply
        seed = _round_seed(secret, request.run_id, request.round)
        metrics: dict[str, float] = {}
        _protection_metrics(metrics, node_data)
        if not center_phase:
            # Node-side evaluation of the received global model rides on the train reply (one
            # message per round); it spends no training ε: the held-out rows are never trained
            # on.
            self._evaluate_received(loaded, node_data, reply, cfg.evaluation.bins)

        dp: DPParams | None = None
        ledger: NodeLedger | None = None
        box: SealedDir | None = None
        lpath = ledger_path(identity.state_dir, node_data.fingerprint)
        what = "releasing the class statistics" if center_phase else "training this round"
        if p.enabled:
            try:  # sealed node state: a deleted or tampered ledger -> refuse, never reset
                box = open_node_state(identity)
                ledger = NodeLedger.load_or_create(lpath, node=identity.name,
                                                   dataset=node_data.fingerprint,
                                                   accountant=p.accountant, delta=p.delta,
                                                   box=box)
            except (PrivacyError, SealedError) as e:
                return self._refuse(reply, metrics, None, str(e))
            if center_phase:
                planned = list(cfg.center_prior())
                sigma, q = p.center_noise_multiplier, 1.0
            else:
                # σ is calibrated around this run's class-statistics release when this node's
                # ledger has it (round 0), so the target ε holds with it. Without one (the
                # coordinator skipped it as useless, or this node missed it) the rounds get the
                # whole budget: the plan is the node's own, from its own ledger.
                prior = cfg.center_prior() if ledger.has_round(request.run_id, 0) else ()
                plan = plan_dp_sgd(num_examples=len(ds), batch_size=cfg.train.batch_for(len(ds)),
                                   local_epochs=cfg.train.local_epochs,
                                   rounds=cfg.federation.rounds, target_epsilon=p.target_epsilon,
                                   delta=p.delta, accountant=p.accountant,
                                   noise_multiplier=p.noise_multiplier, project=False,
                                   prior=prior, local_steps=cfg.train.local_steps)
                planned = plan.round_history()
                sigma, q = plan.noise_multiplier, plan.sample_rate
            limit = identity.epsilon_limit if identity.epsilon_limit is not None \
                else p.epsilon_limit
            reply.accountant = p.accountant
            metrics.update(delta=p.delta, epsilon_limit=limit, noise_multiplier=sigma,
                           sample_rate=q, num_examples=len(ds))
            spent = ledger.epsilon()
            if ledger.has_round(request.run_id, request.round):
                # A retried or resumed round: re-send exactly what was released (no new ε);
                # never train it again.
                try:
                    replay = load_release(box, request.run_id, request.round)
                except SealedError as e:
                    return self._refuse(reply, metrics, ledger, str(e))
                if replay is None:
                    return self._refuse(reply, metrics, ledger,
                                        f"round {request.round} of run {request.run_id} was "
                                        "already released by this node and the release is not "
                                        "stored (nothing is released twice)")
                reply.arrays, reply.metrics = replay
                reply.metrics["replayed"] = 1
                reply.ledger = [asdict(e) for e in ledger.entries]
                return reply
            if request.phase == PHASE_CENTER and any(
                    e.run_id == request.run_id and e.round > 0 for e in ledger.entries):
                # This node planned its rounds' σ without the release (its ledger had none):
                # releasing it now would take the run past its target ε.
                return self._refuse(reply, metrics, ledger,
                                    f"a class-statistics release for run {request.run_id} "
                                    "after this node trained rounds of it: round 0 comes "
                                    "before training")
            projected = ledger.epsilon(extra=planned)
            if projected > limit:
                return self._refuse(reply, metrics, ledger,
                                    f"privacy budget exhausted: {what} would take ε from "
                                    f"{spent:.3f} to {projected:.3f} > limit {limit:g} "
                                    f"(δ={p.delta:g})")
            dp = dp_for_run(cfg, noise_multiplier=sigma)

        if center_phase:
            t0 = time.perf_counter()
            cs = private_class_stats(loaded, ds, noise_multiplier=p.center_noise_multiplier,
                                     seed=seed, physical_batch_size=cfg.train.physical_batch_size)
            arrays = {STATS_KEY: cs.stats}
            history = cs.history()
            metrics.update(num_examples=cs.num_examples, steps=1, sample_rate=1.0,
                           seconds=time.perf_counter() - t0)
        else:
            offset = None
            if cfg.train.logit_adjustment > 0:
                counts = self._label_prior(cfg, ds, request.run_id, box=box, ledger=ledger,
                                           classes=len(request.label_names))
                metrics["logit_adjusted"] = float(counts is not None)
                if counts is not None:
                    offset = logit_adjustment(counts, tau=cfg.train.logit_adjustment)
            result = train_for_run(loaded, ds, cfg.train, dp=dp, seed=seed,
                                   round=request.round, rounds=cfg.federation.rounds,
                                   logit_offset=offset)
            arrays = loaded.adapter_state()
            if cfg.central_dp.enabled:
                # Node-level DP: bound this node's influence before anything leaves it.
                arrays, _ = clip_update(arrays, request.arrays,
                                        clip_norm=cfg.central_dp.clip_norm)
            history = result.history
            metrics.update(num_examples=result.num_examples, steps=result.steps,
                           sample_rate=result.sample_rate, train_loss=result.mean_loss,
                           seconds=result.seconds)
        if ledger is not None:
            assert box is not None
            # Persist the spend and the release *before* anything leaves the node.
            metrics["epsilon"] = ledger.record(request.run_id, request.round, history,
                                               user_cap=node_data.user_cap)
            user = ledger.user_level()
            if user.epsilon is not None and user.delta is not None:
                metrics.update(user_epsilon=user.epsilon, user_delta=user.delta)
            save_release(box, request.run_id, request.round, arrays, metrics)
            ledger.save_sealed(box)
            reply.ledger = [asdict(e) for e in ledger.entries]
        reply.arrays = arrays
        reply.metrics = metrics
        return reply

    @staticmethod
    def _label_prior(cfg: RunConfig, ds: TokenizedDataset, run_id: str, *,
                     box: SealedDir | None, ledger: NodeLedger | None,
                     classes: int) -> np.ndarray | None:
        """The class counts behind this node's logit adjustment (train.logit_adjustment):
        without DP its own labels'; under DP the noisy counts of its class-statistics release
        for this run (round 0, stored sealed), so the loss depends on the data only through a
        release already in its ε. None (and a warning) when there is no such release."""
        if not cfg.privacy.enabled:
            assert ds.labels is not None
            return np.bincount(np.asarray(ds.labels, np.int64), minlength=classes)
        assert box is not None and ledger is not None
        stored = load_release(box, run_id, 0) if ledger.has_round(run_id, 0) else None
        if stored is None or STATS_KEY not in stored[0]:
            log.warning("train.logit_adjustment: no class-statistics release of run %s on this "
                        "node (the coordinator skipped it), so this round trains on plain "
                        "cross-entropy", run_id)
            return None
        arrays, released = stored
        return released_counts(arrays[STATS_KEY], num_examples=int(released["num_examples"]))

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


def _release_name(run_id: str, rnd: int) -> str:
    return f"release-{hashlib.sha256(run_id.encode()).hexdigest()[:16]}-r{rnd}.npz"


def save_release(box: SealedDir, run_id: str, rnd: int, arrays: dict[str, np.ndarray],
                 metrics: dict[str, float]) -> None:
    """Keep what this node released for (run, round), sealed, so a retried or resumed round
    re-sends the same update instead of training (and spending ε) again."""
    meta = np.frombuffer(json.dumps(metrics).encode(), dtype=np.uint8)
    box.write(_release_name(run_id, rnd), pack_state({"__metrics__": meta, **arrays}))


def load_release(box: SealedDir, run_id: str, rnd: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
    blob = box.read(_release_name(run_id, rnd))
    if blob is None:
        return None
    state = unpack_state(blob)
    metrics = json.loads(state.pop("__metrics__").tobytes().decode())
    return state, metrics


def _protection_metrics(metrics: dict[str, float], node_data: _NodeData) -> None:
    """Counts the reply may carry about the node's data protection (never any value)."""
    if node_data.user_cap is not None:
        metrics["max_examples_per_user"] = node_data.user_cap
    if node_data.num_users is not None:
        metrics["num_users"] = node_data.num_users
    for entity, count in (node_data.redactions or {}).items():
        metrics[f"redacted_{entity}"] = count


__all__ = ["DataError", "NodeDataSpec", "NodeIdentity", "NodeRuntime", "PrivacyError",
           "simulated_node_data"]
