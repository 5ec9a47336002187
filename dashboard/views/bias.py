"""Bias: flagged metrics first, per-group rates, fairness across organisations, the
counterfactual probe (all as recorded in the store), and the per-node train-loss spread."""

from __future__ import annotations

from typing import Any

import altair as alt
import streamlit as st

from dashboard.common import StoreUnavailable, line_chart, live_page, load_bias, show_chart
from dashboard.data import (
    BIAS_SOURCES,
    bias_metric_keys,
    bias_summary_frame,
    group_rates_frame,
    latest_bias,
    metrics_long,
    node_accuracy_frame,
    node_rounds_frame,
    probe_scores_frame,
    train_loss_frame,
)
from dashboard.data import train_loss_spread as spread_frame


def _recorded_bias_metrics(run: dict[str, Any]) -> None:
    """Extra keys in the round rows (older stores put group metrics there)."""
    keys = bias_metric_keys(run)
    if not keys:
        return
    st.subheader("Recorded group / fairness metrics")
    df = metrics_long(run, keys)
    show_chart(line_chart(df, x="round", y="value", color="metric", x_title="Round",
                          y_title="Recorded value (units as stored)", color_title="Metric",
                          title="Recorded metrics beyond loss / accuracy / F1 / perplexity"))
    st.dataframe(df.pivot(index="round", columns="metric", values="value").reset_index(),
                 hide_index=True)


def _spread_chart(run: dict[str, Any]) -> None:
    losses = train_loss_frame(run)
    spread = spread_frame(run)
    band = (alt.Chart(spread).mark_rule(strokeWidth=10, opacity=0.25)
            .encode(x=alt.X("Round:Q", title="Round", axis=alt.Axis(tickMinStep=1, format="d"),
                          scale=alt.Scale(zero=False)),
                    y=alt.Y("Lowest train loss:Q", title="Local train loss (nats)",
                            scale=alt.Scale(zero=False)),
                    y2="Highest train loss:Q",
                    tooltip=["Round:Q", alt.Tooltip("Spread (highest − lowest):Q", format=".4f"),
                             "Lowest node:N", "Highest node:N"]))
    points = (line_chart(losses, x="round", y="train_loss", color="node_id", x_title="Round",
                         y_title="Local train loss (nats)", color_title="Node",
                         title="Per-node train loss and its spread (band: lowest to highest)")
              .mark_point(size=70, filled=True))
    show_chart(alt.layer(band, points).properties(height=340))


NO_BIAS_ROWS = ("This run store holds no bias metrics for this run (runs recorded before "
                "fedllm recorded fairness, or a run that has not evaluated yet).")


def _bias_metrics(run: dict[str, Any]) -> None:
    try:
        rows = load_bias(run["run_id"])
    except StoreUnavailable as e:
        st.error(str(e))
        return
    if not rows:
        st.info(NO_BIAS_ROWS, icon=":material/info:")
        return
    latest = latest_bias(rows)
    summary = bias_summary_frame(latest)
    flagged = summary[summary["Flag"] != ""]
    st.subheader("Bias metrics of the latest evaluated model")
    if flagged.empty:
        st.success("No bias metric is flagged (thresholds: `bias.*` in the run config).")
    else:
        st.error(f"{len(flagged)} bias metric(s) flagged — listed first below.")
    st.dataframe(summary, hide_index=True, column_config={
        "Value": st.column_config.NumberColumn(format="%.4f"),
        "Threshold": st.column_config.NumberColumn(format="%.3f")})
    st.caption("Unavailable = not computable from what was recorded (the note says why); it is "
               "never shown as 0. Demographic parity ratio is flagged when *below* its "
               "threshold, the others when above.")
    for source in ("federated", "coordinator"):
        rates = group_rates_frame(latest, source)
        if not rates.empty:
            st.subheader(f"Per-group rates — {BIAS_SOURCES[source].lower()}")
            st.dataframe(rates, hide_index=True, column_config={
                c: st.column_config.NumberColumn(format="%.4f")
                for c in ("Accuracy", "Selection rate", "TPR", "FPR")})
    nodes = node_accuracy_frame(rows)
    if not nodes.empty:
        st.subheader("Accuracy of each organisation's held-out split")
        show_chart(line_chart(nodes, x="Round", y="Accuracy", color="Node",
                              x_title="Round (global model evaluated)",
                              y_title="Accuracy (fraction, 0–1)", color_title="Node",
                              title="Per-node accuracy of the global model"))
    probe = probe_scores_frame(latest)
    if not probe.empty:
        st.subheader("Counterfactual probe (only the group term changes)")
        chart = (alt.Chart(probe).mark_bar()
                 .encode(x=alt.X("Mean P(positive):Q", title="Mean P(positive label)",
                                 scale=alt.Scale(domain=[0, 1])),
                         y=alt.Y("Group:N", title=None),
                         row=alt.Row("Category:N", title=None),
                         tooltip=["Category:N", "Group:N",
                                  alt.Tooltip("Mean P(positive):Q", format=".4f")])
                 .properties(height=alt.Step(16)))
        show_chart(chart)


def render(run: dict[str, Any]) -> None:
    _bias_metrics(run)
    _recorded_bias_metrics(run)
    st.subheader("Per-node spread of the local train loss")
    spread = spread_frame(run)
    if spread.empty:
        st.info("No node has reported a train loss yet.")
    else:
        _spread_chart(run)
        st.dataframe(spread, hide_index=True, column_config={
            c: st.column_config.NumberColumn(format="%.4f")
            for c in ("Lowest train loss", "Highest train loss", "Spread (highest − lowest)")})
    nodes = node_rounds_frame(run)
    if not nodes.empty:
        st.subheader("Data per node")
        share = (nodes.dropna(subset=["num_examples"])
                 .drop_duplicates("node_id", keep="last")[["node_id", "num_examples"]]
                 .rename(columns={"node_id": "Node", "num_examples": "Training examples"}))
        st.dataframe(share, hide_index=True)
    st.caption("Train loss is each node's own mean DP-SGD training loss as it reported it; a wide "
               "spread means the global adapter fits some nodes' data worse than others'.")


live_page("Bias", render)
