"""`fedllm run`: a federated DP-LoRA run in Flower's simulation engine, with live progress."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedllm.cli.common import USER_ERRORS, HomeOpt, JsonOpt, app, err, fmt
from fedllm.cli.common import console as make_console
from fedllm.config import ConfigError, RunConfig, load_config, parse_set_options
from fedllm.coordinator import RoundReport, RunFailed, RunSummary
from fedllm.store import Store, default_db_path, fedllm_home, new_run_id


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
    print_stored_summary(console, store.get_run(summary.run_id), summary.db_path)


def print_stored_summary(console: Console, run: dict[str, Any], db_path: str | Path) -> None:
    """The end-of-run summary, from the run's record in the store (simulation or deployment)."""
    dp = bool(run["dp_enabled"])
    final = run["rounds"][-1]["metrics"] if run["rounds"] else {}
    latest: dict[str, dict[str, Any]] = {}
    for r in run["rounds"]:
        for n in r["nodes"]:
            latest[n["node_id"]] = n
    console.print()
    console.rule(f"[bold]run {run['run_id']} finished")
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
    console.print(f"adapter:   {run.get('adapter_path')}")
    console.print(f"run store: {db_path}")
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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Models are local directories only: never reach for a hub (inherited by node processes).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    console = make_console(stderr=as_json)
    if not cfg.privacy.enabled:
        console.print("[bold red]WARNING: differential privacy is OFF (--no-dp). Node updates "
                      "carry no formal privacy guarantee.[/]")
    home_dir = fedllm_home(home)
    run_id = new_run_id()
    console.print(f"fedllm run [bold]{run_id}[/]: {cfg.federation.num_nodes} nodes, "
                  f"{cfg.federation.rounds} rounds, task {cfg.model.task}, "
                  + (f"DP target ε={cfg.privacy.target_epsilon:g} δ={cfg.privacy.delta:g} "
                     f"({cfg.privacy.accountant})" if cfg.privacy.enabled else "DP OFF")
                  + (f", SecAgg+ (clip ±{cfg.secagg.clip:g}, {cfg.secagg.bits} bits)"
                     if cfg.secagg.enabled else ""))
    if federation is not None or superlink is not None:
        from fedllm.cli.deploy import submit_and_wait

        # The nodes' data is theirs: only the coordinator's side is known here.
        submit_and_wait(cfg, run_id, federation=federation or "fedllm", superlink=superlink,
                        root_certificates=root_certificates, insecure=insecure,
                        home=home_dir, console=console, as_json=as_json, timeout=timeout)
        return
    from fedllm.coordinator import resolve_label_names
    from fedllm.node import check_simulation_data

    try:  # fail fast, before any process starts or anything is written to the store
        sizes = check_simulation_data(cfg, resolve_label_names(cfg))
    except USER_ERRORS as e:
        raise err(str(e)) from None
    console.print("examples per node: " + ", ".join(map(str, sizes)))
    from server.simulation import simulate

    observer = ConsoleObserver(console, cfg)
    try:
        summary = simulate(cfg, home=home_dir, run_id=run_id, observer=observer,
                           verbose=verbose)
    except USER_ERRORS as e:
        observer.close()
        raise err(f"{e}\n(run {run_id} recorded as failed in {default_db_path(home_dir)})"
                   ) from None
    except RunFailed as e:
        observer.close()
        raise err(f"run {run_id} failed: {e}", code=1) from None
    except KeyboardInterrupt:
        observer.close()
        raise err(f"run {run_id} interrupted; rounds completed so far are kept", 130) from None
    observer.close()
    with Store(default_db_path(home_dir), read_only=True) as store:
        if as_json:
            print(json.dumps(store.get_run(run_id), indent=2, default=str))
        else:
            _print_summary(console, summary, store, cfg.privacy.enabled)
