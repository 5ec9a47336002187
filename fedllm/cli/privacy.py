"""Privacy and audit commands: `privacy` (the ledger), `audit show|verify`, `audit-dp`
(canary audit) and `node reset-ledger` (an operator's explicit, recorded reset)."""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedllm.cli.common import USER_ERRORS, HomeOpt, JsonOpt, app, audit_app, err, fmt, node_app
from fedllm.cli.common import console as make_console
from fedllm.store import CENTRAL_LEDGER_ID, Store, StoreError, default_db_path

RunArg = Annotated[str, typer.Argument(help="run id, or 'latest'")]


def _open(home: Path | None) -> Store:
    try:
        return Store(default_db_path(home), read_only=True)
    except StoreError as e:
        raise err(str(e)) from None


def ledger_report(store: Store, run_id: str, *, verify: bool) -> dict[str, Any]:
    """The run's ledgers as the nodes reported them (and the central one), optionally with
    every ε recomputed by fedllm's accountant and by dp-accounting from the stored history."""
    from fedllm.privacy import compute_epsilon, independent_epsilon

    run = store.get_run(run_id)
    limits: dict[str, float | None] = {}
    for r in run["rounds"]:
        for n in r["nodes"]:
            if n.get("epsilon_limit") is not None:
                limits[n["node_id"]] = n["epsilon_limit"]
    nodes: dict[str, dict[str, Any]] = {}
    for e in store.ledger(run["run_id"]):
        node = nodes.setdefault(e["node_id"], {
            "kind": "node-level (central DP)" if e["kind"] == "node" else "example-level",
            "epsilon_limit": limits.get(e["node_id"]), "entries": []})
        entry = {"run_id": e["entry_run_id"], "round": e["entry_round"],
                 "noise_multiplier": e["noise_multiplier"], "sample_rate": e["sample_rate"],
                 "steps": e["steps"], "epsilon": e["epsilon"], "delta": e["delta"],
                 "accountant": e["accountant"]}
        if verify:
            hist = [(x["noise_multiplier"], x["sample_rate"], x["steps"])
                    for x in node["entries"]] + [(e["noise_multiplier"], e["sample_rate"],
                                                  e["steps"])]
            entry["epsilon_recomputed"] = compute_epsilon(hist, delta=e["delta"],
                                                          accountant=e["accountant"])
            entry["epsilon_dp_accounting"] = independent_epsilon(
                hist, delta=e["delta"], accountant=e["accountant"])
        node["entries"].append(entry)
    for node in nodes.values():
        node["epsilon"] = node["entries"][-1]["epsilon"] if node["entries"] else 0.0
    return {"run_id": run["run_id"], "dp_enabled": run["dp_enabled"],
            "target_epsilon": run["target_epsilon"], "delta": run["delta"],
            "accountant": run["accountant"], "nodes": nodes}


@app.command()
def privacy(run_id: RunArg = "latest", home: HomeOpt = None, as_json: JsonOpt = False,
            verify: Annotated[bool, typer.Option(
                "--verify", help="recompute every ε from the recorded history with fedllm's "
                "accountant and with Google's dp-accounting")] = False) -> None:
    """Print the privacy ledger: per node, per round σ, q, steps, cumulative ε, δ, accountant."""
    with _open(home) as store:
        try:
            rep = ledger_report(store, run_id, verify=verify)
        except StoreError as e:
            raise err(str(e)) from None
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    c = make_console()
    if not rep["dp_enabled"]:
        c.print("[bold red]DIFFERENTIAL PRIVACY WAS OFF for this run: no example-level "
                "guarantee[/]")
    else:
        c.print(f"run {rep['run_id']}: target ε={fmt(rep['target_epsilon'], 3)}, "
                f"δ={rep['delta']:g}, accountant {rep['accountant']}")
    worst = 0.0
    for node_id, node in sorted(rep["nodes"].items()):
        title = ("coordinator: node-level DP at aggregation" if node_id == CENTRAL_LEDGER_ID
                 else f"{node_id}: example-level DP-SGD, limit ε ≤ "
                      f"{fmt(node['epsilon_limit'], 3)}")
        t = Table(title=title)
        cols = ["run", "round", "σ", "q", "steps", "ε (cumulative)", "δ", "accountant"]
        if verify:
            cols += ["ε fedllm", "ε dp-accounting", "agree"]
        for col in cols:
            t.add_column(col)
        for e in node["entries"]:
            row = [e["run_id"], str(e["round"]), fmt(e["noise_multiplier"], 4),
                   fmt(e["sample_rate"], 4), str(e["steps"]), fmt(e["epsilon"], 4),
                   f"{e['delta']:g}", e["accountant"]]
            if verify:
                ref = e["epsilon_dp_accounting"]
                rel = abs(e["epsilon"] - ref) / max(ref, 1e-12)
                worst = max(worst, rel)
                row += [fmt(e["epsilon_recomputed"], 4), fmt(ref, 4),
                        "[green]yes[/]" if rel <= 0.02 else f"[red]{rel:.1%} off[/]"]
            t.add_row(*row)
        c.print(t)
    if not rep["nodes"]:
        c.print("no ledger entries recorded for this run")
    if verify and rep["nodes"]:
        c.print(f"largest relative difference to dp-accounting: {worst:.2%}")


@audit_app.command("show")
def audit_show(run_id: RunArg = "latest", home: HomeOpt = None,
               as_json: JsonOpt = False) -> None:
    """Print a run's audit log (hash-chained: time, actor, event, payload, hashes)."""
    with _open(home) as store:
        try:
            entries = store.audit_entries(run_id)
        except StoreError as e:
            raise err(str(e)) from None
    if as_json:
        print(json.dumps([{"seq": e.seq, "time": e.time, "actor": e.actor, "event": e.event,
                           "payload": e.payload, "payload_hash": e.payload_hash,
                           "prev_hash": e.prev_hash, "hash": e.hash} for e in entries],
                         indent=2))
        return
    t = Table(title=f"audit log of run {run_id}")
    for col in ("seq", "time", "actor", "event", "summary", "hash"):
        t.add_column(col)
    for e in entries:
        p = e.payload
        summary = ", ".join(f"{k}={v}" for k, v in p.items()
                            if k not in ("config", "participants", "metrics"))[:90]
        t.add_row(str(e.seq), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time)),
                  e.actor, e.event, summary, e.hash[:12])
    make_console().print(t)


@audit_app.command("verify")
def audit_verify(run_id: RunArg = "latest", home: HomeOpt = None) -> None:
    """Recompute the hash chain; exit 1 naming the first altered entry."""
    from fedllm.audit import verify_chain

    with _open(home) as store:
        try:
            entries = store.audit_entries(run_id)
            run_id = store.resolve_run_id(run_id)
        except StoreError as e:
            raise err(str(e)) from None
    check = verify_chain(entries)
    c = make_console()
    if check.ok:
        c.print(f"[green]audit log of run {run_id} verifies[/]: {check.entries} entries, "
                f"head {check.head}")
        return
    c.print(f"[bold red]audit log of run {run_id} FAILS at entry {check.first_bad_seq}[/]: "
            f"{check.reason} ({check.entries} entries before it verify)")
    raise typer.Exit(1)


@node_app.command("reset-ledger")
def reset_ledger(
    state_dir: Annotated[Path, typer.Option(help="the node's state directory")],
    reason: Annotated[str, typer.Option(help="why (kept in the ledger forever)")],
    key_file: Annotated[Path | None, typer.Option(
        help="the node's key (default: <state-dir>/node.key)")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="dataset fingerprint of the ledger to reset (default: the only one)")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="confirm")] = False,
) -> None:
    """Operator only: restart a dataset's spent ε from zero, recording the old entries, who,
    when and why in the (sealed) ledger. Only sensible when the data itself was replaced."""
    from fedllm.privacy import NodeLedger, PrivacyError, sealed_ledger_name
    from fedllm.sealed import SealedDir, SealedError, load_key

    try:
        box = SealedDir(state_dir, load_key(key_file or state_dir / "node.key"))
        names = [n for n in box.names() if n.startswith("ledger-")]
    except (SealedError, OSError) as e:
        raise err(f"cannot open the node state in {state_dir}: {e}") from None
    if dataset:
        names = [n for n in names if n == sealed_ledger_name(dataset)]
    if not names:
        raise err(f"no ledger {'for ' + dataset + ' ' if dataset else ''}in {state_dir}")
    if len(names) > 1:
        raise err("several ledgers in " + str(state_dir) + ": pass --dataset, one of "
                  + ", ".join(n.removeprefix("ledger-").removesuffix(".sealed") for n in names))
    try:
        raw = box.read(names[0])
        assert raw is not None
        ledger = NodeLedger.from_json(raw.decode())
    except (SealedError, ValueError, KeyError, TypeError) as e:
        raise err(f"ledger {state_dir / names[0]} is unreadable: {e}") from None
    if not yes:
        raise err(f"this resets {ledger.node}'s spent ε={ledger.epsilon():.3f} on dataset "
                  f"{ledger.dataset} to 0; add --yes to confirm")
    try:
        rec = ledger.reset(operator=getpass.getuser(), reason=reason, now=time.time())
    except PrivacyError as e:
        raise err(str(e)) from None
    ledger.save_sealed(box)
    make_console().print(f"ledger {state_dir / names[0]} reset by {rec['operator']}: ε "
                         f"{rec['epsilon_before']:.3f} → 0 ({len(rec['entries'])} entries kept "
                         "under 'resets')")


@app.command("audit-dp")
def audit_dp(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run config")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="override a config field, e.g. -s train.local_epochs=5")] = None,
    canaries: Annotated[int, typer.Option(help="canaries inserted (as many held out)")] = 64,
    control: Annotated[bool, typer.Option(
        help="also train a non-private control on the same data")] = True,
    seed: Annotated[int, typer.Option(help="seed of the canaries and their split")] = 0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Canary audit: insert random canaries with secret labels at node 0, train as the run
    config plans, attack, and report an empirical ε lower bound next to the accountant's ε."""
    from fedllm.config import ConfigError, load_config, parse_set_options
    from fedllm.dpaudit import result_dict, run_canary_audit
    from fedllm.store import fedllm_home

    try:
        cfg = load_config(config, parse_set_options(set_ or []))
    except ConfigError as e:
        raise err(str(e)) from None
    if canaries < 4:
        raise err("--canaries must be at least 4")
    c = make_console(stderr=as_json)
    variants = [cfg]
    if control and cfg.privacy.enabled:
        variants.append(cfg.model_copy(update={"privacy": cfg.privacy.model_copy(
            update={"enabled": False, "allow_no_dp": True})}))
    results = []
    for v in variants:
        c.print(f"training with {'DP' if v.privacy.enabled else 'NO DP (control)'} and "
                f"{canaries} inserted canaries …")
        try:
            results.append(result_dict(run_canary_audit(v, canaries=canaries, seed=seed)))
        except (ValueError, *USER_ERRORS) as e:
            raise err(str(e)) from None
    with Store(default_db_path(fedllm_home(home))) as store:
        store.record_dp_audit(config=cfg.to_dict(), results=results)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    t = Table(title="canary audit (membership inference on secret labels)")
    for col in ("training", "accountant ε", "empirical ε ≥ (95 %)", "attack advantage",
                "attack AUC", "examples"):
        t.add_column(col)
    for r in results:
        t.add_row("DP-SGD σ=" + fmt(r["noise_multiplier"], 3) if r["dp_enabled"]
                  else "[red]no DP (control)[/]", fmt(r["accountant_epsilon"], 3),
                  fmt(r["empirical_epsilon_lower_bound"], 3), fmt(r["attack_advantage"], 3),
                  fmt(r["auc"], 3), str(r["num_examples"]))
    c.print(t)
    c.print("the empirical bound must stay below the accountant's ε; a much higher bound for "
            "the control shows the attack works and DP is what stops it")
