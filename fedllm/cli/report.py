"""`fedllm report / export / predict / generate`: a run's evaluation, its exported adapter with
model card, and inference with the trained adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedllm.cli.common import USER_ERRORS, HomeOpt, JsonOpt, app, err, fmt
from fedllm.cli.common import console as make_console
from fedllm.errors import ModelError
from fedllm.report import UTILITY_COLUMNS, build_report, export_adapter
from fedllm.store import Store, default_db_path


def _report(run_id: str, home: Path | None) -> dict[str, Any]:
    try:
        with Store(default_db_path(home), read_only=True) as store:
            return build_report(store, run_id)
    except USER_ERRORS as e:
        raise err(str(e)) from None


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="run id, or 'latest'")] = "latest",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Utility, per-node and bias tables of a run (flagged bias metrics first)."""
    r = _report(run_id, home)
    if as_json:
        out = {k: v for k, v in r.items() if k != "bias_history"}
        print(json.dumps(out, indent=2, default=str))
        return
    c = make_console()
    c.print(f"[bold]report of run {r['run_id']}[/] ({r['name']}): {r['state']}, task {r['task']}"
            + ("" if r["dp_enabled"] else "  [bold red]DP OFF[/]"))
    if r["flagged"]:
        c.print(f"[bold red]{len(r['flagged'])} bias metric(s) flagged[/]")
        for b in r["flagged"]:
            c.print(f"  [red]FLAG[/] {b['source']}: {b['metric']}"
                    + (f"[{b['group']}]" if b["group"] else "")
                    + f" = {fmt(b['value'])} (threshold {fmt(b['threshold'], 3)}) {b['note']}")
    else:
        c.print("no bias metric flagged")
    cols = [k for k in UTILITY_COLUMNS if any(k in u for u in r["utility"])]
    t = Table(title="utility per round (coordinator held-out; federated = summed node counts)")
    for col in ("round", "source", "examples", *cols):
        t.add_column(col)
    for u in r["utility"]:
        t.add_row(str(u["round"]), u["source"], fmt(u["num_examples"]),
                  *(fmt(u.get(k)) for k in cols))
    c.print(t)
    nt = Table(title="per node (held-out split of the latest evaluated model; privacy spent)")
    for col in ("node", "round", "examples", "accuracy", "f1_macro", "loss", "ε", "δ",
                "accountant"):
        nt.add_column(col)
    for n in r["nodes"]:
        nt.add_row(n["node_id"], fmt(n["eval_round"]), fmt(n["eval_examples"]),
                   fmt(n.get("accuracy")), fmt(n.get("f1_macro")), fmt(n.get("loss")),
                   fmt(n["epsilon"], 3), fmt(n["delta"], 7) if n["delta"] else "-",
                   n["accountant"] or "-")
    c.print(nt)
    bt = Table(title="bias (latest round per source; flagged first)")
    for col in ("flag", "round", "source", "metric", "group", "value", "threshold", "note"):
        bt.add_column(col)
    for b in r["bias"]:
        bt.add_row("[red]FLAG[/]" if b["flagged"] else "", str(b["round"]), b["source"],
                   b["metric"], b["group"] or "",
                   fmt(b["value"]) if b["value"] is not None else "[yellow]unavailable[/]",
                   fmt(b["threshold"], 3), b["note"])
    c.print(bt)
    for s in r["samples"]:
        c.print(f"sample (round {s['round']}): [italic]{s['prompt']}[/] → {s['text']}")


@app.command()
def export(
    run_id: Annotated[str, typer.Argument(help="run id, or 'latest'")],
    out: Annotated[Path, typer.Option("--out", "-o", help="new (or empty) output directory")],
    home: HomeOpt = None,
) -> None:
    """Write the run's adapter (loadable with PeftModel.from_pretrained) and a model card."""
    try:
        with Store(default_db_path(home), read_only=True) as store:
            dst = export_adapter(store, run_id, out)
    except USER_ERRORS as e:
        raise err(str(e)) from None
    make_console().print(f"exported adapter and model card to {dst} (README.md)")


def _load(run_id: str, home: Path | None, task: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from fedllm.model import load_trained

    hf_logging.disable_progress_bar()
    r = _report(run_id, home)
    if r["task"] != task:
        other = "generate" if r["task"] == "causal-lm" else "predict"
        raise err(f"run {r['run_id']} is a {r['task']} run: use `fedllm {other}`")
    if not r["adapter_path"]:
        raise err(f"run {r['run_id']} has no saved adapter (it trained no round)")
    try:
        return load_trained(r["adapter_path"])
    except (ModelError, OSError) as e:
        raise err(str(e)) from None


def _texts(texts: list[str] | None, file: Path | None, text_column: str) -> list[str]:
    from fedllm.data import DataError, read_table

    out = list(texts or [])
    if file is not None:
        try:
            if file.suffix.lower() in (".csv", ".tsv", ".jsonl"):
                out += read_table(file, text_column=text_column, label_column=None).texts
            else:
                out += [ln.strip() for ln in file.read_text(encoding="utf-8").splitlines()
                        if ln.strip()]
        except (DataError, OSError, UnicodeDecodeError) as e:
            raise err(f"{file}: {e}") from None
    if not out:
        raise err("no input: give texts as arguments or --file")
    return out


@app.command()
def predict(
    run_id: Annotated[str, typer.Argument(help="run id, or 'latest'")],
    texts: Annotated[list[str] | None, typer.Argument(help="texts to classify")] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", help="one text per line, or a csv/tsv/jsonl file (--text-column)")] = None,
    text_column: Annotated[str, typer.Option(help="text column of --file")] = "sentence",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Classify texts with a seq-cls run's adapter: label and class probabilities."""
    inputs = _texts(texts, file, text_column)
    loaded = _load(run_id, home, "seq-cls")
    from fedllm.evaluate import predict_proba

    proba = predict_proba(loaded, inputs)
    names = list(loaded.label_names)
    rows = [{"text": t, "label": names[int(p.argmax())],
             "probabilities": {n: float(v) for n, v in zip(names, p, strict=True)}}
            for t, p in zip(inputs, proba, strict=True)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table()
    for col in ("label", *(f"p({n})" for n in names), "text"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["label"], *(f"{r['probabilities'][n]:.4f}" for n in names), r["text"])
    make_console().print(t)


@app.command()
def generate(
    run_id: Annotated[str, typer.Argument(help="run id, or 'latest'")],
    prompts: Annotated[list[str], typer.Argument(help="prompt(s) to continue")],
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 40,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continue prompts with a causal-lm run's adapter (greedy decoding)."""
    loaded = _load(run_id, home, "causal-lm")
    from fedllm.evaluate import generate as gen

    texts = gen(loaded, prompts, max_new_tokens=max_new_tokens)
    if as_json:
        print(json.dumps([{"prompt": p, "text": t} for p, t in zip(prompts, texts, strict=True)],
                         indent=2))
        return
    c = make_console()
    for p, t in zip(prompts, texts, strict=True):
        c.print(f"[bold]{p}[/]{t}")
