"""The coordinator's round loop, Flower-free.

Each round: sample nodes, send them the global adapter and the run plan, collect replies,
validate updates, FedAvg the good ones, evaluate on the held-out set, record everything in the
run store. ``server/app.py`` supplies a :class:`Transport` backed by Flower's Grid.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedllm.aggregate import (
    MIN_CENTER_SNR,
    ServerOptState,
    UpdateRejected,
    central_dp_average,
    class_stats_can_help,
    class_stats_noise_norm,
    ema_update,
    estimate_class_stats,
    fedavg,
    reject_outliers,
    server_step,
    validate_update,
)
from fedllm.audit import canonical_json, sha256_hex
from fedllm.config import RunConfig
from fedllm.data import (
    TextTable,
    TokenizedDataset,
    encode_labels,
    infer_label_names,
    read_table,
    tokenize,
)
from fedllm.model import (
    LoadedModel,
    feature_dim,
    is_lora_a,
    load_run_model,
    save_adapter,
    with_head,
)
from fedllm.privacy import (
    CentralPlan,
    PrivacyError,
    check_center_budget,
    compute_epsilon,
    plan_central_dp,
)
from fedllm.protocol import (
    PHASE_CENTER,
    PHASE_COUNT,
    STATS_KEY,
    STATUS_REFUSED,
    TrainReply,
    TrainRequest,
    pack_state,
    state_bytes,
    state_digest,
    unpack_state,
)
from fedllm.run_eval import RunEvaluator
from fedllm.secagg import SecureRoundResult
from fedllm.store import CENTRAL_LEDGER_ID, Store

log = logging.getLogger(__name__)

# Checkpoint names of the server optimizer's state (fedllm.aggregate.ServerOptState), beside the
# adapter's tensors (PEFT names, which never start with it).
SERVER_STATE_PREFIX = "server_optimizer/"


def pack_checkpoint(state: dict[str, np.ndarray], server: ServerOptState) -> bytes:
    """A round's checkpoint: the global adapter and, once it has stepped or averaged, the
    server optimizer's state."""
    extra = ({SERVER_STATE_PREFIX + k: a for k, a in server.to_arrays().items()}
             if server.step or server.ema else {})
    return pack_state(state | extra)


def unpack_checkpoint(blob: bytes) -> tuple[dict[str, np.ndarray], ServerOptState]:
    arrays = unpack_state(blob)
    server = {k[len(SERVER_STATE_PREFIX):]: a for k, a in arrays.items()
              if k.startswith(SERVER_STATE_PREFIX)}
    state = {k: a for k, a in arrays.items() if not k.startswith(SERVER_STATE_PREFIX)}
    return state, (ServerOptState.from_arrays(server) if server else ServerOptState())


class RunFailed(RuntimeError):
    """The run cannot continue; the message is recorded as the run's error."""


class RunInterrupted(Exception):
    """The operator stopped the run (Ctrl-C / SIGTERM); completed rounds are kept and the run
    can be resumed. An Exception, not a BaseException, so it crosses Flower's ServerApp thread."""


class Transport(Protocol):
    def node_ids(self, *, min_nodes: int, timeout: float) -> list[int]:
        """Connected node ids, waiting up to ``timeout`` s for at least ``min_nodes``."""
        ...

    def train(self, requests: dict[int, TrainRequest], *, timeout: float,
              on_reply: Callable[[int], None]) -> dict[int, TrainReply | str]:
        """Send each request, return each node's reply or a failure reason (str)."""
        ...

    def train_secure(self, requests: dict[int, TrainRequest], *, timeout: float,
                     on_reply: Callable[[int], None]) -> SecureRoundResult:
        """Like :meth:`train`, through SecAgg+: per-node metadata and the unmasked weighted
        mean of the updates only (fedllm/secagg.py)."""
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
    stopped_early: str | None = None  # why the run ended before its last round (budget)


def run_dir(home: Path, run_id: str) -> Path:
    return home / "runs" / run_id


@contextmanager
def run_lock(home: Path, run_id: str) -> Iterator[None]:
    """Exclusive lock on a run for as long as a coordinator drives it. The OS releases it when
    the process dies (even by SIGKILL), so a crashed run can be resumed, a live one cannot."""
    path = run_dir(home, run_id) / "coordinator.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFailed(f"run {run_id} is being driven by another coordinator process "
                            f"(lock {path})") from None
        yield
    finally:
        os.close(fd)


class _BudgetStop(Exception):
    """Too few nodes can still afford a round: end the run early (not a failure)."""


@dataclass
class _Attempt:
    rows: list[dict[str, Any]]
    new_state: dict[str, np.ndarray] | None  # None: the attempt produced no aggregate
    num_aggregated: int
    audit: list[tuple[str, str, dict[str, Any]]]
    ledgers: list[tuple[str, TrainReply]]


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
                 secure_aggregation: bool = False, resume: bool = False,
                 observer: RunObserver | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.home = home
        self.mode = mode
        self.secure_transport = secure_transport  # TLS on every link
        self.secure_aggregation = secure_aggregation  # coordinator sees masked updates only
        self.resume = resume
        self.observer = observer
        self.should_stop = should_stop or (lambda: False)
        # Nodes (transport ids) that refused for lack of budget: never asked again this run.
        self._exhausted: dict[int, str] = {}
        self._last_limit: dict[str, float] = {}
        self._central: CentralPlan | None = None
        # The run's feature centre (train.center_features), sent with every train request;
        # None = the head trains uncentred.
        self._center: np.ndarray | None = None
        # The server optimizer's state (server_optimizer), carried across rounds and resumes.
        self._server = ServerOptState()

    # -- the run -----------------------------------------------------------------------------

    def run(self, transport: Transport) -> RunSummary:
        with run_lock(self.home, self.run_id):
            return self._run(transport)

    def _run(self, transport: Transport) -> RunSummary:
        cfg = self.config
        start_round, global_state = (self._reopen() if self.resume else (0, None))
        if not self.resume:
            self._create()
        reports: list[RoundReport] = []
        adapter_path: str | None = None
        model_bytes = adapter_bytes = 0
        stopped: str | None = None
        try:
            try:
                check_center_budget(cfg)
            except PrivacyError as e:
                raise RunFailed(str(e)) from None
            label_names = resolve_label_names(cfg)
            loaded = load_run_model(cfg, label_names)
            eval_ds = eval_dataset(cfg, loaded, label_names)
            self.evaluator = self._make_evaluator(label_names, eval_ds)
            if global_state is None:
                global_state = loaded.adapter_state()
            else:
                loaded.load_adapter_state(global_state)
            model_bytes, adapter_bytes = loaded.full_model_bytes, state_bytes(global_state)
            self.store.update_run(self.run_id, model_bytes=model_bytes,
                                  adapter_bytes=adapter_bytes, label_names=label_names)
            if cfg.central_dp.enabled:
                c = cfg.central_dp
                self._central = plan_central_dp(
                    num_nodes=cfg.federation.num_nodes,
                    nodes_per_round=cfg.federation.sampled_per_round,
                    rounds=cfg.federation.rounds, clip_norm=c.clip_norm,
                    target_epsilon=c.target_epsilon, delta=c.delta, accountant=c.accountant,
                    noise_multiplier=c.noise_multiplier)
            if start_round == 0:
                t0 = time.time()
                center_rows: list[dict[str, Any]] = []
                audit: list[tuple[str, str, dict[str, Any]]] = []
                if cfg.centers_features:
                    center_rows, audit, head = self._center_phase(transport, loaded,
                                                                  label_names)
                    if head is not None and self._center is not None:
                        # The wire form is uncentred: b - W c (fedllm.model.adapter_state).
                        w, b = head
                        global_state = with_head(global_state, weight=w,
                                                 bias=b - w @ self._center)
                        loaded.load_adapter_state(global_state)
                report = RoundReport(0, self.evaluator.global_model(0, loaded), center_rows,
                                     seconds=time.time() - t0)
                audit.append(("coordinator", "round_completed",
                              {"round": 0, "metrics": report.metrics,
                               "participants": [{k: r.get(k) for k in ("node_id", "status",
                                                                       "reason", "epsilon")}
                                                for r in center_rows],
                               "adapter_sha256": state_digest(global_state)}))
                # Round 0 = before training: the initial model's evaluation and, if the run
                # centres features, the nodes' feature-mean releases (their ε shows here).
                self.store.record_round(
                    self.run_id, 0, started_at=t0, num_nodes=0, metrics=report.metrics,
                    nodes=center_rows, checkpoint=pack_checkpoint(global_state, self._server),
                    audit=audit)
                reports.append(report)
                if self.observer:
                    self.observer.round_finished(report)
                start_round = 1
            out_dir = run_dir(self.home, self.run_id) / "adapter"
            last_round = start_round - 1
            for rnd in range(start_round, cfg.federation.rounds + 1):
                if self.should_stop():
                    raise RunInterrupted(f"interrupted by the user before round {rnd}")
                try:
                    global_state, report = self._round(rnd, transport, loaded, eval_ds,
                                                       global_state, label_names)
                except _BudgetStop as e:
                    stopped = str(e)
                    self._warn(stopped)
                    break
                reports.append(report)
                adapter_path = str(save_adapter(loaded, out_dir))
                self.store.update_run(self.run_id, adapter_path=adapter_path)
                if self.observer:
                    self.observer.round_finished(report)
                last_round = rnd
            # The run's output: the moving average of the global adapter if one is kept.
            output = self._server.output(global_state)
            self._final_node_evaluation(transport, output, label_names, last_round)
        except (KeyboardInterrupt, RunInterrupted) as e:
            self._end("interrupted", str(e) or "interrupted by the user")
            raise
        except Exception as e:  # recorded, then re-raised for the caller to report
            msg = f"{type(e).__name__}: {e}" if not isinstance(e, RunFailed) else str(e)
            self.store.add_event(self.run_id, "error", msg)
            self._end("failed", msg)
            raise
        self._end("finished", None, stopped_early=stopped, adapter_sha256=state_digest(output))
        return RunSummary(self.run_id, "finished", reports, adapter_path, str(self.store.path),
                          model_bytes, adapter_bytes, stopped_early=stopped)

    def _create(self) -> None:
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
        self.store.append_audit(self.run_id, actor="coordinator", event="run_started", payload={
            "config_sha256": sha256_hex(canonical_json(cfg.to_dict())), "config": cfg.to_dict(),
            "mode": self.mode, "tls": self.secure_transport,
            "secure_aggregation": self.secure_aggregation})
        if not p.enabled:
            self._warn("DIFFERENTIAL PRIVACY IS OFF for this run (explicit --no-dp): node "
                       "updates carry no formal privacy guarantee")
        if not cfg.server_optimizer.plain_fedavg:
            self._info(cfg.server_optimizer.describe())
        if not self.secure_aggregation:
            self._warn("updates are not securely aggregated in this run: the coordinator sees "
                       "each node's (DP-noised) update")
        if self.mode != "simulation" and not self.secure_transport:
            self._warn("INSECURE TRANSPORT: this deployment runs without TLS (--insecure); "
                       "updates and credentials travel in clear")

    def _reopen(self) -> tuple[int, dict[str, np.ndarray]]:
        """Resume: continue after the last completed round from its stored checkpoint."""
        run = self.store.get_run(self.run_id)
        if run["state"] == "finished":
            raise RunFailed(f"run {self.run_id} already finished; nothing to resume")
        ck = self.store.checkpoint(self.run_id)
        if ck is None:
            raise RunFailed(f"run {self.run_id} has no completed round to resume from; "
                            "start a new run")
        rnd, blob, sha = ck
        if hashlib.sha256(blob).hexdigest() != sha:
            raise RunFailed(f"checkpoint of run {self.run_id} (round {rnd}) is corrupted")
        state, self._server = unpack_checkpoint(blob)
        center = self.store.feature_center_vector(self.run_id)
        self._center = None if center is None else np.asarray(center, np.float32)
        self.store.update_run(self.run_id, state="running", error=None, finished_at=None)
        self.store.append_audit(self.run_id, actor="coordinator", event="run_resumed", payload={
            "previous_state": run["state"], "from_round": rnd + 1,
            "adapter_sha256": state_digest(state)})
        self.store.add_event(self.run_id, "info",
                             f"resumed after round {rnd} (was {run['state']})")
        return rnd + 1, state

    def _end(self, state: str, error: str | None, **payload: Any) -> None:
        self.store.finish_run(self.run_id, state, error)
        self.store.append_audit(self.run_id, actor="coordinator", event=f"run_{state}",
                                payload={"error": error, **payload})

    def _warn(self, message: str) -> None:
        log.warning(message)
        self.store.add_event(self.run_id, "warning", message)
        self.store.append_audit(self.run_id, actor="coordinator", event="warning",
                                payload={"message": message})

    # -- one round (retried with a fresh sample when too few usable updates came back) ---------

    def _round(self, rnd: int, transport: Transport, loaded: LoadedModel,
               eval_ds: TokenizedDataset, global_state: dict[str, np.ndarray],
               label_names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], RoundReport]:
        fed = self.config.federation
        t0 = time.time()
        reasons: list[str] = []
        for attempt in range(fed.max_round_retries + 1):
            att = self._attempt(rnd, attempt, transport, global_state, label_names)
            self._record_ledgers(att.ledgers)
            if att.new_state is not None:
                opt = self.config.server_optimizer
                att.new_state, server = server_step(global_state, att.new_state, self._server,
                                                    **opt.step_arguments())
                if self.config.lora.freeze_a:
                    # Nobody trains A (FFA-LoRA): it stays the run's shared initialisation.
                    # Under central DP this also drops the noise the release added to it
                    # (post-processing), so A does not drift by noise round after round.
                    att.new_state.update({k: v for k, v in global_state.items() if is_lora_a(k)})
                if opt.ema_decay:
                    # The output model is the moving average; the nodes train on from the
                    # round's global adapter (att.new_state).
                    server = replace(server, ema=ema_update(server.ema or None, att.new_state,
                                                            decay=opt.ema_decay))
                output = server.output(att.new_state)
                loaded.load_adapter_state(output)  # evaluated now, saved by _run
                metrics = self.evaluator.global_model(rnd, loaded)
                digest = state_digest(att.new_state)
                att.audit.append(("coordinator", "round_completed", {
                    "round": rnd, "attempt": attempt, "metrics": metrics,
                    "aggregated": att.num_aggregated, "adapter_sha256": digest,
                    **({"output_sha256": state_digest(output)} if opt.ema_decay else {}),
                    "participants": [{k: r.get(k) for k in ("node_id", "status", "reason",
                                                            "epsilon")} for r in att.rows]}))
                self.store.record_round(self.run_id, rnd, started_at=t0,
                                        num_nodes=att.num_aggregated, metrics=metrics,
                                        nodes=att.rows, audit=att.audit,
                                        checkpoint=pack_checkpoint(att.new_state, server))
                self._server = server
                self._record_central(rnd)
                return att.new_state, RoundReport(rnd, metrics, att.rows, att.num_aggregated,
                                                  time.time() - t0)
            # Nothing aggregated: keep who did what (nothing already learnt is lost), retry.
            why = "; ".join(f"{r['node_id']}: {r['status']} ({r.get('reason')})"
                            for r in att.rows) or "no node sampled"
            reasons.append(f"attempt {attempt + 1}: {why}")
            att.audit.append(("coordinator", "round_attempt_failed",
                              {"round": rnd, "attempt": attempt, "reason": why}))
            self.store.record_round(self.run_id, rnd, started_at=t0, num_nodes=0, metrics={},
                                    nodes=att.rows, audit=att.audit)
            log.warning("round %d attempt %d: too few usable updates: %s", rnd, attempt + 1, why)
        raise RunFailed(f"round {rnd}: fewer than federation.min_nodes={fed.min_nodes} usable "
                        f"updates after {fed.max_round_retries + 1} attempt(s) — "
                        + " | ".join(reasons))

    # -- feature centring (train.center_features): one DP release per node before round 1 ---

    def _center_phase(self, transport: Transport, loaded: LoadedModel,
                      label_names: tuple[str, ...]
                      ) -> tuple[list[dict[str, Any]], list[tuple[str, str, dict[str, Any]]],
                                 tuple[np.ndarray, np.ndarray] | None]:
        """Ask every connected node for DP per-class feature statistics, combine them
        (example-weighted, through SecAgg when the run uses it) into the run's feature centre,
        kept if its signal clears its noise, and (train.head_init = "class-means") the class
        means' head (fedllm.aggregate.estimate_class_stats). Returns the nodes' rows, audit
        entries for round 0 and the initial head (W, b) in centred form, or None. A failed or
        too noisy release is a warning, not a failure: the head then trains uncentred or from
        its random start, as without the release (utility, not privacy).

        First the nodes' example counts (PHASE_COUNT, no ε): a release the counts show cannot
        give a usable centre (fedllm.aggregate.class_stats_can_help) is not asked for, so no
        node spends ε on it, and the nodes' training σ then uses their whole budget."""
        cfg = self.config
        fed = cfg.federation
        sigma = cfg.privacy.center_noise_multiplier
        template = {STATS_KEY: np.zeros((len(label_names), feature_dim(loaded) + 1), np.float32)}
        nodes = sorted(transport.node_ids(min_nodes=fed.sampled_per_round,
                                          timeout=min(fed.round_timeout, 300.0)))
        if self.observer:
            self.observer.round_started(0, len(nodes))
        skipped = self._class_stats_hopeless(transport, nodes, label_names, template)
        if skipped is not None:
            self.store.update_run(self.run_id, feature_center=skipped)
            self._warn(f"class-statistics release not asked for ({skipped['reason']}): the "
                       "head trains uncentred from its random initialisation; no node spent ε "
                       "on it" + ("; train.logit_adjustment, whose DP label priors come from "
                                  "it, is off for this run's nodes"
                                  if cfg.train.logit_adjustment > 0 else ""))
            return [], [("coordinator", "feature_center", {**skipped, "center_sha256": None})], \
                None
        request = TrainRequest(self.run_id, 0, cfg, label_names, template, phase=PHASE_CENTER)

        def on_reply(_nid: int) -> None:
            if self.observer:
                self.observer.node_replied(0)

        rows: list[dict[str, Any]] = []
        audit: list[tuple[str, str, dict[str, Any]]] = []
        ledgers: list[tuple[str, TrainReply]] = []
        mean: dict[str, np.ndarray] | None = None
        count = examples = 0
        if self.secure_aggregation:
            result = transport.train_secure({nid: request for nid in nodes},
                                            timeout=fed.round_timeout, on_reply=on_reply)
            for nid in nodes:
                reply = result.replies.get(nid, "no reply before the round timeout")
                rows.append(self._reply_row(0, nid, reply, audit, ledgers))
                if isinstance(reply, TrainReply) and reply.ok and nid not in result.aggregated:
                    rows[-1].update(status="dropped", reason=result.reasons.get(nid)
                                    or result.error or "dropped out of the secure aggregation")
            if result.mean is not None and result.aggregated:
                mean, count = result.mean, len(result.aggregated)
                examples = int(result.total_weight)
            if result.clipped:
                self._warn(f"round 0: {result.clipped} class-statistics coordinate(s) were "
                           f"clipped to ±{cfg.secagg.clip:g} before secure aggregation")
        else:
            replies = transport.train({nid: request for nid in nodes},
                                      timeout=fed.round_timeout, on_reply=on_reply)
            good: list[tuple[dict[str, np.ndarray], float]] = []
            for nid in nodes:
                reply = replies.get(nid, "no reply before the round timeout")
                row = self._reply_row(0, nid, reply, audit, ledgers)
                if isinstance(reply, TrainReply) and reply.ok:
                    try:
                        n = float(reply.metrics["num_examples"])
                        # The clean statistic is a mean of vectors of norm ≤ 1; the noise's
                        # norm concentrates at σ sqrt(C (H+1)) / n (relative spread ~3 %):
                        # twice that is never honest.
                        bound = 1.0 + 2.0 * sigma * np.sqrt(template[STATS_KEY].size) / n
                        validate_update(reply.arrays, template, max_norm=bound)
                        good.append((reply.arrays, n))
                    except (UpdateRejected, KeyError, ZeroDivisionError) as e:
                        self._reject(row, 0, f"class statistics rejected: {e}", audit)
                rows.append(row)
            if good:
                mean, count = fedavg(good), len(good)
                examples = int(sum(w for _, w in good))
        self._record_ledgers(ledgers)
        info: dict[str, Any] = {"noise_multiplier": sigma, "requested": len(nodes),
                                "released": True}
        head: tuple[np.ndarray, np.ndarray] | None = None
        if mean is None or count < fed.min_nodes or not np.isfinite(mean[STATS_KEY]).all():
            info.update(used=False, head_init=False, nodes=count,
                        reason=f"{count} usable class statistics, federation.min_nodes="
                               f"{fed.min_nodes}")
        else:
            est = estimate_class_stats(mean[STATS_KEY], nodes=count, examples=examples,
                                       noise_multiplier=sigma)
            info.update(est.summary())
            if est.usable:
                self._center = est.center
                info["vector"] = [float(x) for x in est.center]
                if est.head_usable and cfg.train.head_init == "class-means":
                    head = est.head()
                else:
                    info["head_init"] = False
                    info["head_reason"] = (
                        "train.head_init='random'" if cfg.train.head_init == "random" else
                        f"class means too noisy: spread {est.spread_signal:.3f} against noise "
                        f"{est.spread_noise:.3f}, smallest class count SNR {est.count_snr:.1f}")
            else:
                info["head_init"] = False
                info["reason"] = (f"too noisy: estimated signal {est.signal_norm:.3f} < "
                                  f"{MIN_CENTER_SNR:g} × expected noise norm "
                                  f"{est.expected_noise_norm:.3f} ({examples} examples over "
                                  f"{count} node(s) at σ={sigma:g})")
        self.store.update_run(self.run_id, feature_center=info)
        public = {k: v for k, v in info.items() if k != "vector"}
        audit.append(("coordinator", "feature_center", {
            **public, "center_sha256": None if self._center is None
            else sha256_hex(self._center.astype("<f4").tobytes())}))
        if self._center is not None:
            self._info(f"feature centre from {count} node(s), {examples} examples: norm "
                       f"{info['norm']:.3f}, expected noise norm "
                       f"{info['expected_noise_norm']:.3f}; the head trains on centred features"
                       + ("; it starts from the class means" if head is not None else ""))
            if head is None and cfg.train.head_init == "class-means":
                self._warn(f"head not initialised from the class means ({info['head_reason']})"
                           ": it starts from its random initialisation")
        else:
            self._warn(f"feature centring skipped ({info['reason']}): the head trains on "
                       "uncentred features from its random initialisation; ε the nodes spent "
                       "on the release stays in their ledgers (round 0)")
        return rows, audit, head

    def _class_stats_hopeless(self, transport: Transport, nodes: list[int],
                              label_names: tuple[str, ...], template: dict[str, np.ndarray]
                              ) -> dict[str, Any] | None:
        """Ask ``nodes`` for their example counts; the feature-centre info to store when the
        release cannot help, else None. Too few counts (e.g. nodes that predate PHASE_COUNT)
        predict nothing: the release then goes ahead as before."""
        cfg = self.config
        sigma = cfg.privacy.center_noise_multiplier
        request = TrainRequest(self.run_id, 0, cfg, label_names, {}, phase=PHASE_COUNT)
        replies = transport.train({nid: request for nid in nodes},
                                  timeout=cfg.federation.round_timeout, on_reply=lambda _: None)
        counts = []
        for reply in replies.values():
            if isinstance(reply, TrainReply) and reply.ok:
                n = reply.metrics.get("num_examples")
                if n is not None and np.isfinite(n) and n >= 1:
                    counts.append(int(n))
        if len(counts) < max(cfg.federation.min_nodes, 1):
            return None
        classes, width = template[STATS_KEY].shape
        shape = {"nodes": len(counts), "examples": sum(counts), "classes": classes,
                 "hidden": width - 1, "noise_multiplier": sigma}
        if class_stats_can_help(**shape):
            return None
        noise = class_stats_noise_norm(**shape)
        return {"noise_multiplier": sigma, "requested": len(nodes), "released": False,
                "used": False, "head_init": False, "nodes": len(counts),
                "examples": sum(counts), "expected_noise_norm": round(noise, 6),
                "reason": f"the nodes' public counts show it could never be used: at "
                          f"σ={sigma:g} over {sum(counts)} examples on {len(counts)} node(s) "
                          f"the centre's expected noise norm {noise:.3f} is above "
                          f"1/{MIN_CENTER_SNR:g} of the largest centre norm possible (1)"}

    def _sample(self, rnd: int, attempt: int, transport: Transport) -> list[int]:
        cfg = self.config
        fed = cfg.federation
        available = sorted(transport.node_ids(min_nodes=fed.sampled_per_round,
                                              timeout=min(fed.round_timeout, 300.0)))
        eligible = [n for n in available if n not in self._exhausted]
        if len(eligible) < fed.min_nodes:
            if self._exhausted and len(available) >= fed.min_nodes:
                names = ", ".join(sorted(set(self._exhausted.values())))
                raise _BudgetStop(
                    f"run stopped before round {rnd}: privacy budget exhausted at {names}; "
                    f"{len(eligible)} node(s) can still train, federation.min_nodes="
                    f"{fed.min_nodes}")
            raise RunFailed(f"round {rnd}: only {len(available)} node(s) connected, "
                            f"{fed.min_nodes} needed")
        if self._central is not None:
            # Node-level DP: independent (Poisson) sampling with *secret* randomness — the
            # privacy amplification assumes nobody outside can tell who was sampled.
            q = self._central.sample_rate
            srng = np.random.default_rng(secrets.randbits(128))
            return [n for n in eligible if srng.random() < q]
        # Public, reproducible sampling (a resumed run samples what the original would have).
        # Sample positions, not ids: Flower node ids are uint64 and numpy would round them.
        rng = np.random.default_rng([cfg.seed, rnd, attempt])
        k = min(fed.sampled_per_round, len(eligible))
        return sorted(eligible[int(i)] for i in rng.choice(len(eligible), k, replace=False))

    def _attempt(self, rnd: int, attempt: int, transport: Transport,
                 global_state: dict[str, np.ndarray],
                 label_names: tuple[str, ...]) -> _Attempt:
        cfg = self.config
        fed = cfg.federation
        chosen = self._sample(rnd, attempt, transport)
        if self.observer:
            self.observer.round_started(rnd, len(chosen))
        request = TrainRequest(self.run_id, rnd, cfg, label_names, global_state,
                               feature_center=self._center)
        if self.secure_aggregation:
            return self._secure_attempt(rnd, transport, global_state, request, chosen)
        replies = transport.train(
            {nid: request for nid in chosen}, timeout=fed.round_timeout,
            on_reply=lambda _nid: self.observer.node_replied(rnd) if self.observer else None,
        ) if chosen else {}
        # Nodes evaluated the global model they received (round rnd - 1) before training.
        self.evaluator.node_replies(rnd - 1, [r for r in replies.values()
                                              if not isinstance(r, str)])
        rows: list[dict[str, Any]] = []
        audit: list[tuple[str, str, dict[str, Any]]] = []
        ledgers: list[tuple[str, TrainReply]] = []
        good: dict[str, tuple[dict[str, np.ndarray], float, float]] = {}  # name: (x, w, norm)
        for nid in chosen:
            reply = replies.get(nid, "no reply before the round timeout")
            row = self._reply_row(rnd, nid, reply, audit, ledgers)
            if isinstance(reply, TrainReply) and reply.ok:
                try:
                    bound = fed.max_update_norm
                    if self._central is not None:  # nodes must have clipped (tiny fp slack)
                        bound = self._central.clip_norm * (1 + 1e-4) + 1e-6
                    norm = validate_update(reply.arrays, global_state, max_norm=bound)
                    good[reply.node] = (reply.arrays,
                                        float(reply.metrics.get("num_examples", 1.0)), norm)
                except UpdateRejected as e:
                    self._reject(row, rnd, str(e), audit)
            rows.append(row)
        if fed.outlier_factor is not None:
            outliers = reject_outliers({n: v[2] for n, v in good.items()},
                                       factor=fed.outlier_factor)
            for row in rows:
                if row["node_id"] in outliers:
                    self._reject(row, rnd, outliers[row["node_id"]], audit)
                    good.pop(row["node_id"])
        if self._central is not None:
            # Central DP releases every round, whoever replied (a failed node adds 0).
            noise_rng = np.random.default_rng(secrets.randbits(128))
            new_state: dict[str, np.ndarray] | None = central_dp_average(
                [x for x, _, _ in good.values()], global_state,
                expected_nodes=self._central.expected_nodes,
                noise_std=self._central.noise_std, rng=noise_rng)
        elif len(good) >= fed.min_nodes:
            new_state = fedavg([(x, w) for x, w, _ in good.values()])
        else:
            new_state = None
        if new_state is not None and not all(np.isfinite(a).all() for a in new_state.values()):
            raise RunFailed(f"round {rnd}: the aggregate is not finite")
        return _Attempt(rows, new_state, len(good), audit, ledgers)

    def _reply_row(self, rnd: int, nid: int, reply: TrainReply | str,
                   audit: list[tuple[str, str, dict[str, Any]]],
                   ledgers: list[tuple[str, TrainReply]]) -> dict[str, Any]:
        """A node's row for the store; records its failure or refusal (a node out of budget is
        never asked again this run), its ledger copy and any change of its ε limit."""
        if isinstance(reply, str):
            audit.append(("coordinator", "node_failed",
                          {"round": rnd, "node": f"flower-{nid}", "reason": reply}))
            log.warning("round %d: node %s failed: %s", rnd, nid, reply)
            return {"node_id": f"flower-{nid}", "status": "failed", "reason": reply}
        row = reply.record_fields()
        if reply.ledger:
            ledgers.append((reply.node, reply))
        self._note_limit(reply, rnd, audit)
        if reply.status == STATUS_REFUSED:
            audit.append((reply.node, "node_refused", {"round": rnd, "reason": reply.reason,
                                                       "epsilon": row.get("epsilon")}))
            if "budget exhausted" in reply.reason:
                self._exhausted[nid] = reply.node
        return row

    def _record_ledgers(self, ledgers: list[tuple[str, TrainReply]]) -> None:
        """The store's copy of each replying node's ledger (the node's file is the authority)."""
        p = self.config.privacy
        for name, reply in ledgers:
            self.store.record_ledger(self.run_id, name, kind="example", delta=p.delta,
                                     accountant=reply.accountant or p.accountant,
                                     entries=reply.ledger)

    def _reject(self, row: dict[str, Any], rnd: int, reason: str,
                audit: list[tuple[str, str, dict[str, Any]]]) -> None:
        row.update(status="rejected", reason=reason)
        audit.append(("coordinator", "update_rejected",
                      {"round": rnd, "node": row["node_id"], "reason": reason}))
        log.warning("round %d: update of %s rejected: %s", rnd, row["node_id"], reason)

    def _note_limit(self, reply: TrainReply, rnd: int,
                    audit: list[tuple[str, str, dict[str, Any]]]) -> None:
        limit = reply.metrics.get("epsilon_limit")
        if limit is None:
            return
        before = self._last_limit.get(reply.node)
        if before != limit:
            audit.append((reply.node, "budget_limit", {"round": rnd, "epsilon_limit": limit,
                                                       "previous": before}))
            self._last_limit[reply.node] = limit

    def _record_central(self, rnd: int) -> None:
        """The coordinator's node-level ledger: one Gaussian release per completed round."""
        plan = self._central
        if plan is None:
            return
        c = self.config.central_dp
        entries = [{"run_id": self.run_id, "round": r, "noise_multiplier": plan.noise_multiplier,
                    "sample_rate": plan.sample_rate, "steps": 1,
                    "epsilon_after": compute_epsilon(
                        [(plan.noise_multiplier, plan.sample_rate, r)], delta=c.delta,
                        accountant=c.accountant)}
                   for r in range(1, rnd + 1)]
        self.store.record_ledger(self.run_id, CENTRAL_LEDGER_ID, kind="node", delta=c.delta,
                                 accountant=c.accountant, entries=entries)

    # -- secure aggregation (SecAgg+): the coordinator only ever sees masked updates ---------

    def _secure_attempt(self, rnd: int, transport: Transport, global_state: dict[str, np.ndarray],
                        request: TrainRequest, chosen: list[int]) -> _Attempt:
        """Per-update validation is impossible on masked data: nodes clip into the
        quantisation range before masking, and the unmasked aggregate is validated here."""
        fed = self.config.federation
        result = transport.train_secure(
            {nid: request for nid in chosen}, timeout=fed.round_timeout,
            on_reply=lambda _nid: self.observer.node_replied(rnd) if self.observer else None,
        ) if chosen else SecureRoundResult(replies={})
        self.evaluator.node_replies(rnd - 1, [r for r in result.replies.values()
                                              if not isinstance(r, str)])
        rows: list[dict[str, Any]] = []
        audit: list[tuple[str, str, dict[str, Any]]] = []
        ledgers: list[tuple[str, TrainReply]] = []
        aggregated = set(result.aggregated)
        for nid in chosen:
            reply = result.replies.get(nid, "no reply before the round timeout")
            row = self._reply_row(rnd, nid, reply, audit, ledgers)
            if isinstance(reply, TrainReply):
                row["update_bytes"] = result.bytes_sent.get(nid)  # masked vector, keys, shares
                if reply.ok and nid not in aggregated:
                    row.update(status="dropped", reason=result.reasons.get(nid) or result.error
                               or "dropped out of the secure aggregation round")
                    audit.append(("coordinator", "node_dropped",
                                  {"round": rnd, "node": reply.node, "reason": row["reason"]}))
            rows.append(row)
        new_state: dict[str, np.ndarray] | None = None
        enough = len(aggregated) >= fed.min_nodes or self._central is not None
        if result.mean is not None and enough:
            try:
                validate_update(result.mean, global_state)  # names, shapes, finite
            except UpdateRejected as e:
                result.error = f"unmasked aggregate rejected: {e}"
            else:
                if self._central is not None:
                    # Nodes masked weight 1 each under central DP: mean · W is the plain sum
                    # of their clipped deltas; add it to the reference as a single "update".
                    total = {k: global_state[k].astype(np.float64)
                             + result.mean[k].astype(np.float64) * result.total_weight
                             for k in global_state}
                    new_state = central_dp_average(
                        [total], global_state, expected_nodes=self._central.expected_nodes,
                        noise_std=self._central.noise_std,
                        rng=np.random.default_rng(secrets.randbits(128)))
                else:
                    # The aggregate is the weighted mean *delta*; FedAvg of the nodes'
                    # adapters is the global adapter plus it.
                    new_state = {k: (global_state[k].astype(np.float64)
                                     + result.mean[k]).astype(np.float32) for k in global_state}
        elif self._central is not None and not chosen:
            new_state = central_dp_average([], global_state,
                                           expected_nodes=self._central.expected_nodes,
                                           noise_std=self._central.noise_std,
                                           rng=np.random.default_rng(secrets.randbits(128)))
        if new_state is None and result.error:
            rows.append({"node_id": "*secagg*", "status": "failed", "reason": result.error})
        dropped = sorted(r["node_id"] for r in rows if r.get("status") == "dropped")
        if chosen:
            self.store.add_event(self.run_id, "info", (
                f"round {rnd}: securely aggregated {len(aggregated)} node(s), total weight "
                f"{result.total_weight}, {result.clipped} coordinate(s) clipped"
                + (f", dropped: {', '.join(dropped)}" if dropped else "")))
        if result.clipped:
            self._warn(f"round {rnd}: {result.clipped} update coordinate(s) were clipped to "
                       f"±{self.config.secagg.clip:g} before secure aggregation "
                       "(raise secagg.clip)")
        if new_state is not None and not all(np.isfinite(a).all() for a in new_state.values()):
            raise RunFailed(f"round {rnd}: the aggregate is not finite")
        return _Attempt(rows, new_state, len(aggregated), audit, ledgers)

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
                               label_names: tuple[str, ...], last: int) -> None:
        """Nodes evaluate the *final* global model too (an evaluate-only message), then flags
        of the final model become warning events."""
        cfg = self.config
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
