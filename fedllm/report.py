"""A run's evaluation report (utility, per node, bias) and its export with a model card.

Reads the run store only (nothing is recomputed): what `fedllm report` prints, what the model
card in an exported adapter directory states.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fedllm.errors import ModelError
from fedllm.fairness import sort_flagged_first
from fedllm.store import Store

# Utility columns of the report, in order (present ones only).
UTILITY_COLUMNS = ("loss", "accuracy", "f1_macro", "f1_weighted", "roc_auc", "ece", "perplexity")


def _latest_per_source(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the latest round each source has (federated rows of the final model arrive
    after the coordinator's)."""
    last: dict[str, int] = {}
    for r in rows:
        last[r["source"]] = max(last.get(r["source"], -1), r["round"])
    return [r for r in rows if r["round"] == last[r["source"]]]


def build_report(store: Store, run_id: str) -> dict[str, Any]:
    run = store.get_run(run_id)
    evaluations = store.get_evaluations(run["run_id"])
    bias = store.get_bias(run["run_id"])
    utility = [{"round": e["round"], "source": e["source"], "num_examples": e["num_examples"],
                **{k: e["metrics"].get(k) for k in UTILITY_COLUMNS if k in e["metrics"]}}
               for e in evaluations if e["source"] != "node"]
    latest_nodes = _latest_per_source([e for e in evaluations if e["source"] == "node"])
    privacy: dict[str, dict[str, Any]] = {}
    for r in run["rounds"]:
        for n in r["nodes"]:
            if n.get("epsilon") is not None or n["node_id"] not in privacy:
                privacy[n["node_id"]] = n
    nodes = []
    for node_id in sorted(set(privacy) | {e["node_id"] for e in latest_nodes}):
        ev = next((e for e in latest_nodes if e["node_id"] == node_id), None)
        p = privacy.get(node_id, {})
        nodes.append({
            "node_id": node_id, "eval_round": ev["round"] if ev else None,
            "eval_examples": ev["num_examples"] if ev else None,
            **({k: ev["metrics"].get(k) for k in UTILITY_COLUMNS if k in ev["metrics"]}
               if ev else {}),
            "epsilon": p.get("epsilon"), "delta": p.get("delta"),
            "accountant": p.get("accountant"), "last_status": p.get("status"),
        })
    final_bias = sort_flagged_first(_latest_per_source(bias))
    samples = [{"round": e["round"], **s} for e in evaluations for s in e["samples"]]
    return {
        "run_id": run["run_id"], "name": run["name"], "state": run["state"],
        "task": run["task"], "model_path": run["model_path"], "num_rounds": run["num_rounds"],
        "num_nodes": run["num_nodes"], "dp_enabled": run["dp_enabled"],
        "target_epsilon": run["target_epsilon"], "delta": run["delta"],
        "accountant": run["accountant"], "label_names": run["label_names"],
        "adapter_path": run["adapter_path"],
        "data_description": run["config"].get("data", {}).get("description", ""),
        "group_column": run["config"].get("data", {}).get("group_column"),
        "utility": utility, "nodes": nodes, "bias": final_bias,
        "bias_history": bias,
        "flagged": [b for b in final_bias if b["flagged"]],
        "samples": samples[-10:],
    }


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def model_card(report: dict[str, Any]) -> str:
    """The exported adapter's README.md: what it is, how it was trained, how good and how
    biased it measured, and what that does not say."""
    r = report
    task = r["task"]
    util_rows = _latest_per_source(r["utility"])  # the final model, per source
    util_cols = [c for c in UTILITY_COLUMNS if any(c in u for u in util_rows)]
    dp = (f"DP-SGD (example-level), target ε = {r['target_epsilon']:g}, δ = {r['delta']:g}, "
          f"accountant `{r['accountant']}`" if r["dp_enabled"]
          else "**Differential privacy was OFF for this run** (explicit `--no-dp`)")
    lines = [
        f"# fedllm adapter: {r['name']} (run `{r['run_id']}`)", "",
        "A LoRA adapter (PEFT) fine-tuned by federated learning with fedllm: each organisation "
        "trained on its own private data; only (differentially private) adapter updates were "
        "shared and averaged.", "",
        "## Model", "",
        f"- Base model: `{r['model_path']}`",
        f"- Task: `{task}`" + (f", labels {r['label_names']}" if r["label_names"] else ""),
        f"- Federated rounds: {r['num_rounds']}, nodes: {r['num_nodes']}, final state: "
        f"{r['state']}",
        f"- Privacy: {dp}",
        "", "Load it:", "", "```python",
        "import json; from peft import PeftModel; from fedllm.model import build_base",
        "meta = json.load(open('DIR/fedllm_model.json'))",
        "base, tokenizer = build_base(meta)  # the frozen base (+ pooling/head for seq-cls)",
        "model = PeftModel.from_pretrained(base, 'DIR')",
        "```", "", "or `fedllm.model.load_trained('DIR')`.", "",
        "## Data", "",
        r["data_description"] or "_No data description was supplied by the coordinator "
        "(`data.description`)._", "",
        f"Sensitive-attribute column: `{r['group_column']}`" if r["group_column"]
        else "No sensitive-attribute (group) column was configured: group fairness metrics "
             "are unavailable; only the cross-node spread and the counterfactual probe apply.",
        "", "## Privacy spent per node", "",
        _table(["node", "ε (cumulative)", "δ", "accountant", "last status"],
               [[n["node_id"], n["epsilon"], f"{n['delta']:g}" if n["delta"] else None,
                 n["accountant"], n["last_status"]] for n in r["nodes"]]),
        "", "## Utility", "",
        _table(["round", "source", "examples", *util_cols],
               [[u["round"], u["source"], u["num_examples"], *(u.get(c) for c in util_cols)]
                for u in util_rows]),
        "", "`coordinator`: the coordinator's held-out file; `federated`: counts summed over the "
        "nodes' held-out splits (each node sends aggregate counts only).", "",
        "### Per node (held-out split of each node)", "",
        _table(["node", "round", "examples", "accuracy", "f1_macro", "loss", "perplexity"],
               [[n["node_id"], n["eval_round"], n["eval_examples"], n.get("accuracy"),
                 n.get("f1_macro"), n.get("loss"), n.get("perplexity")] for n in r["nodes"]]),
        "", "## Bias (flagged first)", "",
        _table(["flag", "source", "metric", "group", "value", "threshold", "note"],
               [["FLAG" if b["flagged"] else "", b["source"], b["metric"], b["group"] or "",
                 b["value"] if b["value"] is not None else "unavailable", b["threshold"],
                 b["note"]] for b in r["bias"]
                if b["metric"] not in ("group_size",)]),
        "",
    ]
    if r["samples"]:
        lines += ["## Generated samples (coordinator prompts, greedy)", ""]
        lines += [f"- round {s['round']}: *{s['prompt']}* → {s['text']}" for s in r["samples"]]
        lines.append("")
    lines += [
        "## Known limitations", "",
        "- The DP guarantee covers each node's *training* examples. The aggregate evaluation "
        "counts nodes send (confusion matrices, loss sums, per-group counts, score histograms) "
        "are computed on a held-out split and are not differentially private.",
        "- ROC-AUC and ECE come from binned score histograms (equal-width bins): exact for the "
        "binned scores, an approximation of the unbinned ones.",
        "- Federated metrics of a round cover only the nodes sampled that round; groups or "
        "nodes below `bias.min_group_size` examples are left out of the gaps.",
        "- The counterfactual probe uses a small shipped template set (names, nationalities, "
        "religions; English); passing it is not evidence of absence of bias.",
        "- Bias thresholds are configurable conventions, not legal or ethical standards.",
        "",
    ]
    return "\n".join(lines)


def export_adapter(store: Store, run_id: str, out: str | Path) -> Path:
    """Copy the run's final adapter directory to ``out`` and write the model card."""
    from fedllm.model import FEDLLM_MODEL_FILE  # here: reports never need torch, exports rarely

    report = build_report(store, run_id)
    src = Path(report["adapter_path"]) if report["adapter_path"] else None
    if src is None or not (src / FEDLLM_MODEL_FILE).is_file():
        raise ModelError(f"run {report['run_id']} has no saved adapter"
                         + (f" (missing {src})" if src else " (it trained no round)"))
    dst = Path(out)
    if dst.exists() and any(dst.iterdir()):
        raise ModelError(f"export directory {dst} exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    (dst / "README.md").write_text(model_card(report), encoding="utf-8")
    return dst
