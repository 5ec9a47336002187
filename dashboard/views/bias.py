"""Bias: per-group metrics once the store records them; meanwhile the per-node spread of the
local train loss that it does record."""

from __future__ import annotations

from typing import Any

import altair as alt
import streamlit as st

from dashboard.common import line_chart, live_page, show_chart
from dashboard.data import bias_metric_keys, metrics_long, node_rounds_frame, train_loss_frame
from dashboard.data import train_loss_spread as spread_frame

NO_BIAS = ("Bias metrics appear here once recorded. This run store holds no per-group "
           "(fairness) metrics for this run yet — only the standard utility metrics — so none "
           "are shown. Below: the per-node spread that is recorded.")


def _recorded_bias_metrics(run: dict[str, Any]) -> None:
    keys = bias_metric_keys(run)
    if not keys:
        st.info(NO_BIAS, icon=":material/info:")
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


def render(run: dict[str, Any]) -> None:
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
