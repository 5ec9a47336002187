"""Read-only commands over the run store: `runs`, `status`, `dashboard`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedllm.cli.common import HomeOpt, JsonOpt, app, err, fmt
from fedllm.cli.common import console as make_console
from fedllm.store import Store, StoreError, default_db_path, fedllm_home


@app.command()
def runs(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List recorded runs, newest first."""
    db = default_db_path(home)
    if not db.exists():
        if as_json:
            print("[]")
            return
        make_console().print(f"no runs yet (store {db} does not exist): try `fedllm run`")
        return
    with Store(db, read_only=True) as store:
        rows = store.list_runs()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    t = Table(title=f"runs in {db}")
    for col in ("run id", "state", "task", "nodes", "rounds", "accuracy / ppl", "max ε", "DP"):
        t.add_column(col)
    for r in rows:
        m = r["final_metrics"]
        util = m.get("accuracy", m.get("perplexity"))
        t.add_row(r["run_id"], r["state"], r["task"], str(r["num_nodes"]),
                  f"{r['last_round'] or 0}/{r['num_rounds']}", fmt(util),
                  fmt(r["max_epsilon"], 3), "on" if r["dp_enabled"] else "[red]OFF[/]")
    make_console().print(t)


@app.command()
def status(
    run_id: Annotated[str, typer.Argument(help="run id, or 'latest'")] = "latest",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one run: state, per-round metrics and per-node privacy spend."""
    db = default_db_path(home)
    try:
        with Store(db, read_only=True) as store:
            run_info = store.get_run(run_id)
    except StoreError as e:
        raise err(str(e)) from None
    if as_json:
        print(json.dumps(run_info, indent=2, default=str))
        return
    c = make_console()
    c.print(f"[bold]run {run_info['run_id']}[/] ({run_info['name']}): {run_info['state']}, "
            f"task {run_info['task']}, mode {run_info['mode']}")
    if run_info.get("error"):
        c.print(f"[red]error:[/] {run_info['error']}")
    if not run_info["dp_enabled"]:
        c.print("[bold red]DIFFERENTIAL PRIVACY OFF for this run[/]")
    else:
        c.print(f"DP: target ε={run_info['target_epsilon']:g}, δ={run_info['delta']:g}, "
                f"accountant {run_info['accountant']}")
    if run_info["mode"] == "simulation":
        c.print("transport: simulation, in-process [yellow](no secure aggregation / TLS)[/]")
    elif run_info["secure_transport"]:
        c.print("transport: TLS (deployment)")
    else:
        c.print("[bold red]transport: INSECURE, no TLS (deployment started with --insecure)[/]")
    c.print(f"model bytes {run_info['model_bytes']}, adapter bytes {run_info['adapter_bytes']},"
            f" adapter: {run_info['adapter_path']}")
    t = Table(title="rounds")
    metric_names = sorted({k for r in run_info["rounds"] for k in r["metrics"]})
    for col in ["round", "nodes", *metric_names, "max ε"]:
        t.add_column(col)
    for r in run_info["rounds"]:
        eps = [n["epsilon"] for n in r["nodes"] if n.get("epsilon") is not None]
        t.add_row(str(r["round"]), str(r["num_nodes"]),
                  *(fmt(r["metrics"].get(k)) for k in metric_names),
                  fmt(max(eps), 3) if eps else "-")
    c.print(t)
    nt = Table(title="nodes per round")
    for col in ("round", "node", "status", "examples", "steps", "σ", "q", "ε", "bytes",
                "reason"):
        nt.add_column(col)
    for r in run_info["rounds"]:
        for n in r["nodes"]:
            nt.add_row(str(r["round"]), n["node_id"], n["status"], fmt(n["num_examples"]),
                       fmt(n["steps"]), fmt(n["noise_multiplier"], 3),
                       fmt(n["sample_rate"], 4), fmt(n["epsilon"], 3),
                       fmt(n["update_bytes"]), n["reason"] or "")
    c.print(nt)
    _print_data_protection(c, run_info)
    for e in run_info["events"]:
        c.print(f"[{'red' if e['level'] != 'info' else 'dim'}]{e['level']}: {e['message']}[/]")


@app.command()
def dashboard(
    home: HomeOpt = None,
    port: Annotated[int, typer.Option(help="HTTP port")] = 8501,
    address: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
) -> None:
    """Open the Streamlit dashboard over the run store (read-only)."""
    from dashboard.launch import launch

    raise typer.Exit(launch(home=fedllm_home(home), port=port, address=address))


def _print_data_protection(c: Console, run_info: dict[str, Any]) -> None:
    """Node-side data protection (issue 9): user-level ε and PII redaction counts per node
    (the latest round each node reported them)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in run_info["rounds"]:
        for n in r["nodes"]:
            if n.get("redactions") or n.get("num_users") is not None \
                    or n.get("user_epsilon") is not None:
                latest[n["node_id"]] = n
    if not latest:
        return
    entities = sorted({e for n in latest.values() for e in (n.get("redactions") or {})})
    t = Table(title="node data protection (user-level ε: group-privacy bound of the cap)")
    for col in ("node", "users", "cap/user", "user ε", "user δ", *entities):
        t.add_column(col)
    for node, n in sorted(latest.items()):
        red = n.get("redactions") or {}
        t.add_row(node, fmt(n.get("num_users")), fmt(n.get("max_examples_per_user")),
                  fmt(n.get("user_epsilon"), 3) if n.get("user_epsilon") is not None
                  else "unknown",
                  _user_delta(n.get("user_delta")),
                  *(fmt(red.get(e)) for e in entities))
    c.print(t)


def _user_delta(d: float | None) -> str:
    if d is None:
        return "-"
    # The group-privacy δ grows like e^{(k-1)ε}: say plainly when it bounds nothing.
    return "1 (vacuous)" if d >= 1 else f"{d:.2g}"
