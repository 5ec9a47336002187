"""Utility: global held-out metrics per round and per-node train loss curves."""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard.common import fmt, line_chart, live_page, show_chart
from dashboard.data import (
    SCORE_METRICS,
    UTILITY_METRICS,
    global_metrics_frame,
    metric_keys,
    metrics_long,
    train_loss_frame,
)

ROUND_AXIS = "Round (0 = initial model)"


def _final_metrics(run: dict[str, Any]) -> None:
    rounds = run.get("rounds", [])
    if not rounds:
        st.info("No round recorded yet: the first evaluation appears here when round 0 ends.")
        return
    last = rounds[-1]
    keys = [k for k in UTILITY_METRICS if k in last["metrics"]]
    cols = st.columns(max(len(keys), 1) + 1)
    cols[0].metric("Rounds recorded", f"{last['round']} / {run['num_rounds']}")
    for col, key in zip(cols[1:], keys, strict=False):
        first = rounds[0]["metrics"].get(key)
        value = last["metrics"][key]
        delta = None if first is None or len(rounds) < 2 else f"{value - first:+.4f} vs round 0"
        col.metric(f"Final {UTILITY_METRICS[key][0].lower()}", fmt(value), delta=delta,
                   delta_color="inverse" if key in ("loss", "perplexity") else "normal")


def render(run: dict[str, Any]) -> None:
    _final_metrics(run)
    keys = metric_keys(run)
    st.subheader("Global model on the held-out set")
    charts = [(["loss"], "Held-out loss per round", UTILITY_METRICS["loss"][1]),
              ([k for k in SCORE_METRICS], "Accuracy and F1 per round",
               UTILITY_METRICS["accuracy"][1]),
              (["perplexity"], "Perplexity per round", UTILITY_METRICS["perplexity"][1])]
    shown = False
    for wanted, title, y_title in charts:
        df = metrics_long(run, [k for k in wanted if k in keys])
        if df.empty:
            continue
        shown = True
        show_chart(line_chart(df, x="round", y="value", color="metric", x_title=ROUND_AXIS,
                              y_title=y_title, color_title="Metric", title=title))
    if not shown:
        st.info("No global metric recorded yet.")
    table = global_metrics_frame(run)
    if len(table.columns) > 1:
        with st.expander("Per-round values (as stored)", expanded=False):
            st.dataframe(table, hide_index=True)

    st.subheader("Per-node local training loss")
    losses = train_loss_frame(run)
    if losses.empty:
        st.info("No node has reported a train loss yet.")
    else:
        show_chart(line_chart(losses, x="round", y="train_loss", color="node_id",
                              x_title="Round", y_title="Mean local train loss (nats)",
                              color_title="Node", title="Train loss reported by each node"))
    st.caption("Values as recorded in the run store; also in `fedllm status <run> --json`.")


live_page("Utility", render)
