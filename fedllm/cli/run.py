"""`fedllm run`: a federated DP-LoRA run in Flower's simulation engine, with live progress."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedllm.cli.common import USER_ERRORS, HomeOpt, JsonOpt, app, err, fmt
from fedllm.cli.common import console as make_console
from fedllm.config import ConfigError, RunConfig, load_config, parse_set_options
from fedllm.store import Store, StoreError, default_db_path, fedllm_home, new_run_id

if TYPE_CHECKING:  # the coordinator pulls in torch and Flower: only `fedllm run` needs them
    from fedllm.coordinator import RoundReport, RunSummary


class ConsoleObserver:
    """Progress bar per round and one table row per finished round."""

    def __init__(self, console: Console, config: RunConfig) -> None:
        self.console = console
        self.rounds = config.federation.rounds
        self.task = config.model.task
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("nodes"), TimeElapsedColumn(),
                                 console=console, transient=True)
        self._task_id: Any = None
        self.progress.start()
        cols = "accuracy  f1_macro" if self.task == "seq-cls" else "perplexity"
        console.print(f"[bold]round  nodes   loss    {cols}  max ε[/]")

    def round_started(self, rnd: int, num_nodes: int) -> None:
        self._task_id = self.progress.add_task(f"round {rnd}/{self.rounds}", total=num_nodes)

    def node_replied(self, rnd: int) -> None:
        if self._task_id is not None:
            self.progress.advance(self._task_id)

    def round_finished(self, report: RoundReport) -> None:
        if self._task_id is not None:
            self.progress.remove_task(self._task_id)
            self._task_id = None
        m = report.metrics
        eps = [n["epsilon"] for n in report.nodes if n.get("epsilon") is not None]
        nodes = f"{report.num_aggregated}/{len(report.nodes)}" if report.round else "-"
        if self.task == "seq-cls":
            body = f"{fmt(m.get('accuracy')):>8}  {fmt(m.get('f1_macro')):>8}"
        else:
            body = f"{fmt(m.get('perplexity'), 2):>10}"
        self.console.print(f"{report.round:>5}  {nodes:>5}  {fmt(m.get('loss')):>7}  {body}"
                           f"  {fmt(max(eps), 3) if eps else '-':>6}")

    def close(self) -> None:
        self.progress.stop()


def _print_summary(console: Console, summary: RunSummary, store: Store, dp: bool) -> None:
    entries = store.audit_entries(summary.run_id)
    print_stored_summary(console, store.get_run(summary.run_id), summary.db_path,
                         stopped_early=summary.stopped_early,
                         audit_head=(len(entries), entries[-1].hash) if entries else None)


def print_stored_summary(console: Console, run: dict[str, Any], db_path: str | Path, *,
                         stopped_early: str | None = None,
                         audit_head: tuple[int, str] | None = None) -> None:
    """The end-of-run summary, from the run's record in the store (simulation or deployment)."""
    dp = bool(run["dp_enabled"])
    done = [r for r in run["rounds"] if r["metrics"]]
    final = done[-1]["metrics"] if done else {}
    latest: dict[str, dict[str, Any]] = {}
    for r in run["rounds"]:
        for n in r["nodes"]:
            latest[n["node_id"]] = n
    console.print()
    console.rule(f"[bold]run {run['run_id']} finished")
    if stopped_early:
        console.print(f"[bold yellow]stopped early:[/] {stopped_early}")
    console.print("final metrics: " + ", ".join(f"{k}={fmt(v)}" for k, v in sorted(final.items())))
    t = Table(title="privacy spent per node" if dp else "nodes (DP OFF)")
    for col in ("node", "examples", "ε (cumulative)", "δ", "noise σ", "last status"):
        t.add_column(col)
    for node, n in sorted(latest.items()):
        t.add_row(node, fmt(n.get("num_examples")), fmt(n.get("epsilon"), 3),
                  fmt(n.get("delta"), 7) if n.get("delta") else "-",
                  fmt(n.get("noise_multiplier"), 3), n.get("status", "-"))
    console.print(t)
    if not dp:
        console.print("[bold red]WARNING: differential privacy was OFF for this run.[/]")
    if run.get("mode") == "deployment":
        console.print("transport: " + ("TLS" if run.get("secure_transport") else
                                       "[bold red]INSECURE (no TLS)[/]"))
    adapter_bytes, model_bytes = run.get("adapter_bytes") or 0, run.get("model_bytes") or 0
    ratio = adapter_bytes / model_bytes if model_bytes else 0
    console.print(f"update size: {adapter_bytes:,} bytes per node per round "
                  f"({ratio:.2%} of the full model's {model_bytes:,} bytes)")
    fc = run.get("feature_center")
    if fc:
        console.print(
            f"feature centre: used ({fc['nodes']} node(s), {fc['examples']:,} examples, norm "
            f"{fc['norm']:.3f}, expected noise norm {fc['expected_noise_norm']:.3f}); head "
            + ("started from the class means" if fc.get("head_init") else
               f"[yellow]started random[/] ({fc.get('head_reason')})")
            if fc.get("used") else f"feature centre: [yellow]skipped[/] ({fc.get('reason')})"
            + ("; not released, no node spent ε on it" if fc.get("released") is False else ""))
    console.print(f"adapter:   {run.get('adapter_path')}")
    console.print(f"run store: {db_path}")
    if audit_head:
        console.print(f"audit log: {audit_head[0]} entries, head {audit_head[1][:16]}… "
                      f"(fedllm audit verify {run['run_id']})")
    console.print(f"privacy:   fedllm privacy {run['run_id']}")
    console.print(f"details:   fedllm status {run['run_id']}")
    console.print("dashboard: fedllm dashboard   (then open http://localhost:8501)")


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run config")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="override any config field, e.g. -s train.learning_rate=0.01")] = None,
    rounds: Annotated[int | None, typer.Option(help="federated rounds")] = None,
    nodes: Annotated[int | None, typer.Option(help="number of (virtual) nodes")] = None,
    nodes_per_round: Annotated[int | None, typer.Option(help="nodes sampled per round")] = None,
    epsilon: Annotated[float | None, typer.Option(help="target ε for the whole run")] = None,
    delta: Annotated[float | None, typer.Option(help="δ of the (ε, δ) guarantee")] = None,
    no_dp: Annotated[bool, typer.Option(
        "--no-dp", help="train WITHOUT differential privacy (explicit opt-out, logged)")] = False,
    model_path: Annotated[str | None, typer.Option(help="local Hugging Face model dir")] = None,
    task: Annotated[str | None, typer.Option(help="seq-cls or causal-lm")] = None,
    train_data: Annotated[list[str] | None, typer.Option(
        help="training file (repeat once per node with --set partition.scheme=files)")] = None,
    eval_data: Annotated[str | None, typer.Option(help="held-out file for evaluation")] = None,
    text_column: Annotated[str | None, typer.Option(help="text column of training data")] = None,
    label_column: Annotated[str | None, typer.Option(help="label column")] = None,
    eval_text_column: Annotated[str | None, typer.Option(help="text column of eval data")] = None,
    max_examples: Annotated[int | None, typer.Option(help="read at most N training rows")] = None,
    seed: Annotated[int | None, typer.Option(help="run seed (public)")] = None,
    secagg: Annotated[bool | None, typer.Option(
        "--secagg/--no-secagg", help="secure aggregation (SecAgg+): the coordinator sees "
        "masked updates only (secagg.enabled); default: on with --federation, off in "
        "simulation")] = None,
    home: HomeOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Flower/Ray logs")] = False,
    as_json: JsonOpt = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="print the privacy plan (per-node σ, steps, projected ε per round) "
        "and exit without training")] = False,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="continue RUN_ID after its last completed round (its stored config)",
        metavar="RUN_ID")] = None,
    run_id_opt: Annotated[str | None, typer.Option(
        "--run-id", help="id for the new run (default: time-based); must be unused")] = None,
    # Deployment: submit to a running coordinator instead of simulating (fedllm/cli/deploy.py).
    federation: Annotated[str | None, typer.Option(
        "--federation", help="submit to this SuperLink connection (Flower's config; "
        "--superlink creates it) instead of simulating")] = None,
    superlink: Annotated[str | None, typer.Option(
        "--superlink", help="with --federation: coordinator's Control API HOST:PORT")] = None,
    root_certificates: Annotated[Path | None, typer.Option(
        "--root-certificates", help="with --federation: the federation's ca.crt")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="with --federation: no TLS to the coordinator (explicit, warned)")
    ] = False,
    timeout: Annotated[float, typer.Option(
        help="with --federation: seconds to wait for the run")] = 24 * 3600.0,
) -> None:
    """Federate DP-LoRA fine-tuning across simulated nodes and record it in the run store."""
    if resume:
        _resume(resume, home=home, verbose=verbose, as_json=as_json)
        return
    overrides: dict[str, Any] = {}
    try:
        overrides.update(parse_set_options(set_ or []))
        shortcuts = {
            "federation.rounds": rounds, "federation.num_nodes": nodes,
            "federation.nodes_per_round": nodes_per_round, "privacy.target_epsilon": epsilon,
            "privacy.delta": delta, "model.path": model_path, "model.task": task,
            "data.train_paths": train_data or None, "data.eval_path": eval_data,
            "data.text_column": text_column, "data.label_column": label_column,
            "data.eval_text_column": eval_text_column, "data.max_examples": max_examples,
            "seed": seed,
        }
        overrides.update({k: v for k, v in shortcuts.items() if v is not None})
        if no_dp:
            overrides.update({"privacy.enabled": False, "privacy.allow_no_dp": True})
        deployed = federation is not None or superlink is not None
        if secagg is not None:
            overrides["secagg.enabled"] = secagg
        elif deployed and "secagg.enabled" not in overrides:
            overrides["secagg.enabled"] = True  # deployments: secure aggregation by default
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise err(str(e)) from None
    _setup_logging(verbose)
    console = make_console(stderr=as_json)
    if not cfg.privacy.enabled:
        console.print("[bold red]WARNING: differential privacy is OFF (--no-dp). Node updates "
                      "carry no formal privacy guarantee.[/]")
    home_dir = fedllm_home(home)
    run_id = run_id_opt or new_run_id()
    if run_id_opt is not None:
        _check_new_run_id(run_id_opt, home_dir)
    console.print(f"fedllm run [bold]{run_id}[/]: {cfg.federation.num_nodes} nodes, "
                  f"{cfg.federation.rounds} rounds, task {cfg.model.task}, "
                  + (f"DP target ε={cfg.privacy.target_epsilon:g} δ={cfg.privacy.delta:g} "
                     f"({cfg.privacy.accountant})" if cfg.privacy.enabled else "DP OFF")
                  + (f", SecAgg+ (clip ±{cfg.secagg.clip:g}, {cfg.secagg.bits} bits)"
                     if cfg.secagg.enabled else ""))
    from fedllm.privacy import check_center_budget

    if federation is not None or superlink is not None:
        from fedllm.cli.deploy import submit_and_wait

        try:
            check_center_budget(cfg)
        except USER_ERRORS as e:
            raise err(str(e)) from None

        # The nodes' data is theirs: only the coordinator's side is known here.
        submit_and_wait(cfg, run_id, federation=federation or "fedllm", superlink=superlink,
                        root_certificates=root_certificates, insecure=insecure,
                        home=home_dir, console=console, as_json=as_json, timeout=timeout)
        return
    from fedllm.coordinator import resolve_label_names
    from fedllm.node import check_simulation_data

    try:  # fail fast, before any process starts or anything is written to the store
        check_center_budget(cfg)
        labels = resolve_label_names(cfg)
        sizes = check_simulation_data(cfg, labels)
    except USER_ERRORS as e:
        raise err(str(e)) from None
    console.print("examples per node: " + ", ".join(map(str, sizes)))
    if dry_run:
        print_plan(console, cfg, sizes, as_json=as_json, classes=len(labels))
        return
    _simulate_and_report(cfg, console, home_dir, run_id, resume=False, verbose=verbose,
                         as_json=as_json)


def _simulate_and_report(cfg: RunConfig, console: Console, home_dir: Path, run_id: str, *,
                         resume: bool, verbose: bool, as_json: bool) -> None:
    from fedllm.coordinator import RunFailed, RunInterrupted
    from server.simulation import simulate

    observer = ConsoleObserver(console, cfg)
    try:
        summary = simulate(cfg, home=home_dir, run_id=run_id, resume=resume, observer=observer,
                           verbose=verbose)
    except USER_ERRORS as e:
        observer.close()
        raise err(f"{e}\n(run {run_id} recorded as failed in {default_db_path(home_dir)})"
                  ) from None
    except RunFailed as e:
        observer.close()
        raise err(f"run {run_id} failed: {e}", code=1) from None
    except (KeyboardInterrupt, RunInterrupted):
        observer.close()
        raise err(f"run {run_id} interrupted; rounds completed so far are kept "
                  f"(continue with: fedllm run --resume {run_id})", 130) from None
    observer.close()
    with Store(default_db_path(home_dir), read_only=True) as store:
        if as_json:
            print(json.dumps(store.get_run(run_id), indent=2, default=str))
        else:
            _print_summary(console, summary, store, cfg.privacy.enabled)


def _check_new_run_id(run_id: str, home_dir: Path) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", run_id):
        raise err(f"invalid --run-id {run_id!r}: letters, digits, '.', '_', '-' (≤ 64)")
    db = default_db_path(home_dir)
    if db.exists():
        with Store(db, read_only=True) as store:
            try:
                store.resolve_run_id(run_id)
            except StoreError:
                return
        raise err(f"run {run_id} already exists in {db}; use --resume {run_id} to continue it")


def _resume(run_id: str, *, home: Path | None, verbose: bool, as_json: bool) -> None:
    from fedllm.config import config_from_dict

    home_dir = fedllm_home(home)
    db = default_db_path(home_dir)
    try:
        with Store(db, read_only=True) as store:
            run_id = store.resolve_run_id(run_id)
            info = store.get_run(run_id)
        cfg = config_from_dict(info["config"], f"stored config of run {run_id}")
    except USER_ERRORS as e:
        raise err(str(e)) from None
    if info["state"] == "finished":
        raise err(f"run {run_id} already finished; nothing to resume")
    _setup_logging(verbose)
    console = make_console(stderr=as_json)
    last = info["rounds"][-1]["round"] if info["rounds"] else None
    console.print(f"resuming run [bold]{run_id}[/] ({info['state']}) after round {last} of "
                  f"{cfg.federation.rounds}")
    _simulate_and_report(cfg, console, home_dir, run_id, resume=True, verbose=verbose,
                         as_json=as_json)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Models are local directories only: never reach for a hub (inherited by node processes).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def print_plan(console: Console, cfg: RunConfig, sizes: list[int], *, as_json: bool,
               classes: int) -> None:
    """The privacy plan of a run before anything trains: per node σ, q, steps, projected ε.
    The round-0 class-statistics release is in it when the coordinator will ask for it: not
    when these node sizes show it could never be used (the same rule, from the same counts)."""
    from fedllm.aggregate import class_stats_can_help
    from fedllm.model import hidden_size
    from fedllm.privacy import compute_epsilon, plan_central_dp, plan_dp_sgd

    p, t, fed = cfg.privacy, cfg.train, cfg.federation
    plan: dict[str, Any] = {"rounds": fed.rounds, "dp_enabled": p.enabled, "nodes": [],
                            "trains": list(t.trained_parts(cfg.model.task)),
                            "lora_a_frozen": cfg.lora.freeze_a,
                            "server_optimizer": cfg.server_optimizer.model_dump(),
                            "lr_schedule": {"kind": t.lr_schedule,
                                            "min_fraction": t.lr_min_fraction},
                            "logit_adjustment": t.logit_adjustment}
    prior = cfg.center_prior()
    if prior and sizes:
        asked = class_stats_can_help(nodes=len(sizes), examples=sum(sizes), classes=classes,
                                     hidden=hidden_size(cfg.model.path),
                                     noise_multiplier=p.center_noise_multiplier)
        if not asked:
            prior = ()
    if p.enabled:
        plan.update(target_epsilon=p.target_epsilon, delta=p.delta, accountant=p.accountant,
                    epsilon_limit=p.epsilon_limit, max_grad_norm=p.max_grad_norm,
                    clip_groups="head-lora" if cfg.grouped_clipping else "flat",
                    lora_max_grad_norm=p.lora_max_grad_norm if cfg.grouped_clipping else None,
                    lora_noise_share=p.lora_noise_share if cfg.grouped_clipping else None)
        for i, n in enumerate(sizes):
            dp = plan_dp_sgd(num_examples=n, batch_size=t.batch_for(n),
                             local_epochs=t.local_epochs, rounds=fed.rounds,
                             target_epsilon=p.target_epsilon, delta=p.delta,
                             accountant=p.accountant, noise_multiplier=p.noise_multiplier,
                             prior=prior, local_steps=t.local_steps)
            plan["nodes"].append({
                "node": f"node-{i}", "examples": n, "sample_rate": dp.sample_rate,
                "expected_batch": round(dp.sample_rate * n, 1),
                "steps_per_round": dp.steps_per_round, "noise_multiplier": dp.noise_multiplier,
                "calibrated": dp.calibrated, "projected_epsilon": list(dp.projected_epsilon)})
    if cfg.centers_features:
        # Round 0: one Gaussian release of each node's class statistics (per-class feature sums
        # and counts), in its ε (and in σ above) when it is asked for.
        plan["feature_center"] = {
            "noise_multiplier": p.center_noise_multiplier, "sample_rate": 1.0, "steps": 1,
            "epsilon": compute_epsilon(list(cfg.center_prior()), delta=p.delta,
                                       accountant=p.accountant),
            "asked": bool(prior)}
    if cfg.central_dp.enabled:
        c = cfg.central_dp
        cp = plan_central_dp(num_nodes=fed.num_nodes, nodes_per_round=fed.sampled_per_round,
                             rounds=fed.rounds, clip_norm=c.clip_norm,
                             target_epsilon=c.target_epsilon, delta=c.delta,
                             accountant=c.accountant, noise_multiplier=c.noise_multiplier)
        plan["central_dp"] = {"sample_rate": cp.sample_rate, "clip_norm": cp.clip_norm,
                              "noise_multiplier": cp.noise_multiplier, "noise_std": cp.noise_std,
                              "delta": c.delta, "accountant": c.accountant,
                              "projected_epsilon": list(cp.projected_epsilon)}
    if as_json:
        print(json.dumps(plan, indent=2))
        return
    if plan["trains"] == ["head"]:
        console.print("trains: the classification head alone (train.learning_rate = 0: LoRA "
                      "frozen, a linear probe of the frozen encoder)")
    elif plan["trains"] == ["lora"] and cfg.model.task == "seq-cls":
        console.print("trains: LoRA alone (train.head_learning_rate = 0: the head frozen)")
    if cfg.lora.freeze_a and "lora" in plan["trains"]:
        console.print("trains LoRA's B matrices only (lora.freeze_a: every A stays at the shared "
                      "seeded initialisation, FFA-LoRA)")
    if not cfg.server_optimizer.plain_fedavg:
        console.print(f"aggregation: {cfg.server_optimizer.describe()}")
    if t.lr_schedule != "constant":
        console.print(f"learning rate: {t.lr_schedule} over {fed.rounds} rounds, from "
                      f"{t.learning_rate:g} (head {t.head_rate:g}) "
                      f"to {t.lr_min_fraction:g} x that by the last step")
    if t.logit_adjustment > 0:
        prior = ("its noisy counts in the class-statistics release" if p.enabled
                 else "its own label counts")
        console.print(f"loss: logit-adjusted, each node adding {t.logit_adjustment:g} x "
                      f"log(its label prior) to its logits in training (prior from {prior})")
    if not p.enabled:
        console.print("[bold red]DP OFF: no privacy plan (nothing bounds what updates reveal)[/]")
    else:
        clip = (f"clip C={p.max_grad_norm:g}" if not cfg.grouped_clipping else
                f"grouped clip: head C={p.max_grad_norm:g}, LoRA C={p.lora_max_grad_norm:g} "
                f"(noise share {p.lora_noise_share:g})")
        console.print(f"privacy plan: target ε={p.target_epsilon:g} after round {fed.rounds}, "
                      f"δ={p.delta:g}, accountant {p.accountant}, {clip}; "
                      f"nodes refuse above ε={p.epsilon_limit:g} (or their operator's limit)")
        tab = Table(title="per-node DP-SGD plan (example-level)")
        for col in ("node", "examples", "q", "E\\[batch]", "steps/round", "σ",
                    *(f"ε r{r}" for r in range(1, fed.rounds + 1))):
            tab.add_column(col)
        for n in plan["nodes"]:
            tab.add_row(n["node"], str(n["examples"]), fmt(n["sample_rate"], 4),
                        fmt(n["expected_batch"], 1), str(n["steps_per_round"]),
                        fmt(n["noise_multiplier"], 3),
                        *(fmt(e, 3) for e in n["projected_epsilon"]))
        console.print(tab)
        if "feature_center" in plan:
            fc = plan["feature_center"]
            if fc["asked"]:
                console.print(f"before round 1 each node releases DP class statistics of its "
                              f"features to centre and start the head (σ="
                              f"{fc['noise_multiplier']:g}, alone ε={fc['epsilon']:.3f}; "
                              "composed into the ε above)")
            else:
                console.print(f"[yellow]no class-statistics release[/]: at σ="
                              f"{fc['noise_multiplier']:g} these {sum(sizes)} examples on "
                              f"{len(sizes)} node(s) could never give a usable centre, so the "
                              "coordinator will not ask for it (the ε above has none)")
    if "central_dp" in plan:
        c = plan["central_dp"]
        console.print(f"central DP (node-level): q={c['sample_rate']:.3f}, clip={c['clip_norm']:g}"
                      f", σ={c['noise_multiplier']:.3f}, δ={c['delta']:g}: projected ε per "
                      "round " + ", ".join(fmt(e, 3) for e in c["projected_epsilon"]))
