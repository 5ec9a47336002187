"""Reshape run-store dicts into tables for display. No Streamlit here, and no metric computation:
every number returned is a value the store holds (``Store.list_runs`` / ``Store.get_run``),
only moved into rows and columns. The one arithmetic step, remaining ε budget, is labelled as
``limit - spent`` where it is shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

import pandas as pd

# Global metric keys the coordinator records, with a display name and axis title (with units).
UTILITY_METRICS: dict[str, tuple[str, str]] = {
    "loss": ("Loss", "Held-out loss (cross-entropy, nats)"),
    "accuracy": ("Accuracy", "Score (fraction, 0–1)"),
    "f1_macro": ("F1 (macro)", "Score (fraction, 0–1)"),
    "f1_weighted": ("F1 (weighted)", "Score (fraction, 0–1)"),
    "perplexity": ("Perplexity", "Perplexity (exp of loss per token)"),
    "roc_auc": ("ROC-AUC", "Score (fraction, 0–1)"),
    "ece": ("ECE", "Expected calibration error (fraction, 0–1)"),
}
SCORE_METRICS = ("accuracy", "f1_macro", "f1_weighted")
NODE_STATUSES = ("ok", "refused", "failed", "rejected")


def fmt_time(ts: float | None) -> str:
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SS UTC`` ('' when absent)."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def model_name(model_path: str) -> str:
    """Short model name: ``default:all-MiniLM-L6-v2`` -> ``all-MiniLM-L6-v2``, a dir -> its name."""
    if model_path.startswith("default:"):
        return model_path.split(":", 1)[1]
    return PurePath(model_path).name or model_path


def final_metric(run: Mapping[str, Any]) -> tuple[str, float | None]:
    """The headline metric of a run from ``list_runs``: accuracy, else perplexity, else loss."""
    metrics = run.get("final_metrics") or {}
    for key in ("accuracy", "perplexity", "loss"):
        if metrics.get(key) is not None:
            return key, float(metrics[key])
    return "", None


RUN_COLUMNS = ["Run ID", "Name", "State", "Final accuracy", "Final perplexity", "Max ε", "DP",
               "Secure transport", "Nodes", "Rounds done", "Rounds planned", "Model", "Started",
               "Finished", "Mode", "Task"]


def transport_label(mode: Any, secure_transport: Any) -> str:
    """How updates travelled: in-process in a simulation; TLS or not in a deployment."""
    if mode == "simulation":
        return "simulation, in-process"
    return "TLS" if secure_transport else "NO TLS (--insecure)"


def runs_frame(runs: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run (``Store.list_runs`` order: newest first)."""
    rows = []
    for r in runs:
        fm = r.get("final_metrics") or {}
        rows.append({
            "Run ID": r["run_id"],
            "Name": r["name"],
            "State": r["state"],
            "Started": fmt_time(r.get("created_at")),
            "Finished": fmt_time(r.get("finished_at")),
            "Mode": r.get("mode"),
            "Task": r.get("task"),
            "Model": model_name(str(r.get("model_path") or "")),
            "Nodes": r.get("num_nodes"),
            "Rounds done": r.get("last_round"),
            "Rounds planned": r.get("num_rounds"),
            "Final accuracy": fm.get("accuracy"),
            "Final perplexity": fm.get("perplexity"),
            "Max ε": r.get("max_epsilon"),
            "DP": "on" if r.get("dp_enabled") else "OFF",
            "Secure transport": transport_label(r.get("mode"), r.get("secure_transport")),
        })
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    # A store with only classification (or only causal-lm) runs needs no empty metric column.
    return df.drop(columns=[c for c in ("Final accuracy", "Final perplexity")
                            if len(df) and df[c].isna().all()])


def global_metrics_frame(run: Mapping[str, Any]) -> pd.DataFrame:
    """Wide table: one row per round (round 0 = initial model), one column per metric key."""
    rows = [{"round": rd["round"], **rd.get("metrics", {})} for rd in run.get("rounds", [])]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["round"])
    return df.sort_values("round").reset_index(drop=True)


def metrics_long(run: Mapping[str, Any], keys: Iterable[str]) -> pd.DataFrame:
    """Long table ``round, metric, value`` for the metric keys present in the store."""
    wanted = list(keys)
    rows = []
    for rd in run.get("rounds", []):
        for key in wanted:
            value = rd.get("metrics", {}).get(key)
            if value is not None:
                name = UTILITY_METRICS.get(key, (key, ""))[0]
                rows.append({"round": rd["round"], "metric": name, "value": float(value)})
    return pd.DataFrame(rows, columns=["round", "metric", "value"])


def metric_keys(run: Mapping[str, Any]) -> list[str]:
    """Every global metric key recorded in any round, in first-seen order."""
    keys: dict[str, None] = {}
    for rd in run.get("rounds", []):
        for k in rd.get("metrics", {}):
            keys.setdefault(k, None)
    return list(keys)


NODE_COLUMNS = ["round", "node_id", "status", "reason", "num_examples", "steps",
                "noise_multiplier", "sample_rate", "epsilon", "delta", "accountant",
                "epsilon_limit", "update_bytes", "train_loss", "seconds"]


def node_rounds_frame(run: Mapping[str, Any]) -> pd.DataFrame:
    """Long table: one row per (round, node) as recorded."""
    rows = [{"round": rd["round"], **n}
            for rd in run.get("rounds", []) for n in rd.get("nodes", [])]
    return pd.DataFrame(rows, columns=NODE_COLUMNS)


def _last_value(df: pd.DataFrame, column: str) -> Any:
    vals = df[column].dropna()
    return vals.iloc[-1] if len(vals) else None


PRIVACY_COLUMNS = ["Node", "ε spent (last recorded)", "ε limit", "ε remaining (limit − spent)",
                   "δ", "Accountant", "Noise multiplier σ", "Sample rate q", "Rounds trained",
                   "Rounds refused", "Last status"]


def privacy_frame(run: Mapping[str, Any]) -> pd.DataFrame:
    """Per node: the latest cumulative ε stored, its limit and the accountant's inputs."""
    nodes = node_rounds_frame(run)
    rows = []
    for node_id, df in nodes.groupby("node_id", sort=True):
        df = df.sort_values("round")
        spent = _last_value(df, "epsilon")
        limit = _last_value(df, "epsilon_limit")
        remaining = (float(limit) - float(spent)) if spent is not None and limit is not None \
            else None
        rows.append({
            "Node": node_id,
            "ε spent (last recorded)": spent,
            "ε limit": limit,
            "ε remaining (limit − spent)": remaining,
            "δ": _last_value(df, "delta"),
            "Accountant": _last_value(df, "accountant"),
            "Noise multiplier σ": _last_value(df, "noise_multiplier"),
            "Sample rate q": _last_value(df, "sample_rate"),
            # Round 0 rows are the class-statistics release (ε spent, nothing trained).
            "Rounds trained": int(((df["status"] == "ok") & (df["round"] > 0)).sum()),
            "Rounds refused": int((df["status"] == "refused").sum()),
            "Last status": df["status"].iloc[-1],
        })
    return pd.DataFrame(rows, columns=PRIVACY_COLUMNS)


def epsilon_frame(run: Mapping[str, Any]) -> pd.DataFrame:
    """Long table ``round, node_id, series, value``: cumulative ε and the ε limit per node."""
    nodes = node_rounds_frame(run)
    rows = []
    for rec in nodes.to_dict("records"):
        if rec["epsilon"] is not None and not pd.isna(rec["epsilon"]):
            rows.append({"round": rec["round"], "node_id": rec["node_id"],
                         "series": "ε spent (cumulative)", "value": float(rec["epsilon"])})
        if rec["epsilon_limit"] is not None and not pd.isna(rec["epsilon_limit"]):
            rows.append({"round": rec["round"], "node_id": rec["node_id"],
                         "series": "ε limit", "value": float(rec["epsilon_limit"])})
    return pd.DataFrame(rows, columns=["round", "node_id", "series", "value"])


def status_rows(run: Mapping[str, Any], statuses: Iterable[str]) -> pd.DataFrame:
    """Node-rounds with one of ``statuses`` (e.g. refused), with their recorded reason."""
    nodes = node_rounds_frame(run)
    keep = nodes[nodes["status"].isin(list(statuses))]
    return keep[["round", "node_id", "status", "reason"]].reset_index(drop=True)


def participation_matrix(run: Mapping[str, Any]) -> pd.DataFrame:
    """Round × node grid of recorded statuses (round 0: the nodes' class-statistics release, when
    the run centres features; else no nodes)."""
    nodes = node_rounds_frame(run)
    if nodes.empty:
        return pd.DataFrame()
    grid = nodes.pivot(index="round", columns="node_id", values="status")
    grid.columns.name = None
    return grid.reset_index().rename(columns={"round": "Round"})


def participation_counts(run: Mapping[str, Any]) -> pd.DataFrame:
    """Per training round: recorded count of aggregated nodes and of each node status."""
    nodes = node_rounds_frame(run)
    rows = []
    for rd in run.get("rounds", []):
        if rd["round"] == 0:
            continue
        these = nodes[nodes["round"] == rd["round"]]
        row: dict[str, Any] = {"Round": rd["round"], "Aggregated": rd.get("num_nodes")}
        for s in NODE_STATUSES:
            row[s] = int((these["status"] == s).sum())
        rows.append(row)
    return pd.DataFrame(rows, columns=["Round", "Aggregated", *NODE_STATUSES])


def train_loss_frame(run: Mapping[str, Any]) -> pd.DataFrame:
    """Long table ``round, node_id, train_loss`` for node-rounds that recorded a train loss."""
    nodes = node_rounds_frame(run)
    df = nodes[["round", "node_id", "train_loss"]].dropna(subset=["train_loss"])
    return df.astype({"train_loss": float}).reset_index(drop=True)


def train_loss_spread(run: Mapping[str, Any]) -> pd.DataFrame:
    """Per round, the lowest and highest per-node train loss recorded and the node holding each."""
    df = train_loss_frame(run)
    rows = []
    for rnd, g in df.groupby("round", sort=True):
        lo = g.loc[g["train_loss"].idxmin()]
        hi = g.loc[g["train_loss"].idxmax()]
        rows.append({"Round": rnd, "Nodes reporting": len(g),
                     "Lowest train loss": lo["train_loss"], "Lowest node": lo["node_id"],
                     "Highest train loss": hi["train_loss"], "Highest node": hi["node_id"],
                     "Spread (highest − lowest)": hi["train_loss"] - lo["train_loss"]})
    return pd.DataFrame(rows, columns=["Round", "Nodes reporting", "Lowest train loss",
                                       "Lowest node", "Highest train loss", "Highest node",
                                       "Spread (highest − lowest)"])


def bias_metric_keys(run: Mapping[str, Any]) -> list[str]:
    """Recorded global metric keys that are not the standard utility metrics (e.g. per-group)."""
    return [k for k in metric_keys(run) if k not in UTILITY_METRICS]


def events_frame(run: Mapping[str, Any]) -> pd.DataFrame:
    rows = [{"Time": fmt_time(e.get("time")), "Level": e.get("level"), "Message": e.get("message")}
            for e in run.get("events", [])]
    return pd.DataFrame(rows, columns=["Time", "Level", "Message"])


# -- bias metrics (store.get_bias rows) -------------------------------------------------------

BIAS_SOURCES = {"federated": "Nodes' held-out splits (summed counts)",
                "coordinator": "Coordinator's held-out file", "nodes": "Across organisations",
                "probe": "Counterfactual probe"}
GROUP_RATES = {"group_size": "Examples", "group_accuracy": "Accuracy",
               "group_selection_rate": "Selection rate", "group_tpr": "TPR",
               "group_fpr": "FPR"}


def latest_bias(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows of the latest round each source recorded (nodes' rows of the final model arrive
    after the coordinator's)."""
    rows = list(rows)
    last: dict[str, int] = {}
    for r in rows:
        last[r["source"]] = max(last.get(r["source"], -1), r["round"])
    return [r for r in rows if r["round"] == last[r["source"]]]


def bias_summary_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Aggregate bias metrics (not per-group detail), flagged first; unavailable shown as such."""
    out = []
    for r in rows:
        if r["metric"] in GROUP_RATES or r["metric"] in ("probe_group_score", "node_accuracy"):
            continue
        out.append({"Flag": "FLAGGED" if r["flagged"] else "", "Round": r["round"],
                    "Source": BIAS_SOURCES.get(r["source"], r["source"]),
                    "Metric": r["metric"], "Group / category": r["group"] or "",
                    "Value": r["value"] if r["value"] is not None else None,
                    "Status": "available" if r["value"] is not None else "unavailable",
                    "Threshold": r["threshold"], "Note": r["note"]})
    cols = ["Flag", "Round", "Source", "Metric", "Group / category", "Value", "Status",
            "Threshold", "Note"]
    df = pd.DataFrame(out, columns=cols)
    if df.empty:
        return df
    df["_order"] = (df["Flag"] == "") * 2 + (df["Status"] == "unavailable")
    return df.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def group_rates_frame(rows: Iterable[Mapping[str, Any]], source: str) -> pd.DataFrame:
    """Per-group accuracy, selection rate, TPR, FPR of one source: one row per group."""
    by_group: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["source"] == source and r["metric"] in GROUP_RATES:
            by_group.setdefault(r["group"], {"Group": r["group"]})[GROUP_RATES[r["metric"]]] = \
                r["value"]
    return pd.DataFrame(list(by_group.values()), columns=["Group", *GROUP_RATES.values()])


def probe_scores_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean P(positive) per probe group: category, group, score."""
    out = []
    for r in rows:
        if r["metric"] == "probe_group_score" and r["group"]:
            cat, _, grp = r["group"].partition("/")
            out.append({"Category": cat, "Group": grp, "Mean P(positive)": r["value"]})
    return pd.DataFrame(out, columns=["Category", "Group", "Mean P(positive)"])


def node_accuracy_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Each node's accuracy on its own held-out split, per round of the evaluated model."""
    out = [{"Round": r["round"], "Node": r["group"], "Accuracy": r["value"],
            "Examples": r["note"]}
           for r in rows if r["source"] == "nodes" and r["metric"] == "node_accuracy"]
    return pd.DataFrame(out, columns=["Round", "Node", "Accuracy", "Examples"])
