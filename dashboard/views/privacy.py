"""Privacy budget: per-node cumulative ε against its limit, accountant inputs, refusals, and
loud banners when DP was off or transport was not secured."""

from __future__ import annotations

from typing import Any

import altair as alt
import streamlit as st

from dashboard.common import fmt, live_page, load_ledger, show_chart
from dashboard.data import epsilon_frame, privacy_frame, status_rows


def banners(run: dict[str, Any]) -> None:
    if not run["dp_enabled"]:
        st.error("**Differential privacy was OFF for this run.** Node updates were trained "
                 "without DP-SGD: there is no (ε, δ) guarantee for any node's data.",
                 icon=":material/gpp_bad:")
    if not run.get("secure_aggregation"):
        st.warning("**No secure aggregation.** The coordinator saw each node's (DP-noised) "
                   "update in the clear; protection rests on differential privacy alone.",
                   icon=":material/warning:")
    if run["mode"] == "simulation":
        st.info("Simulation: every node ran in-process on this machine (no network, no TLS).",
                icon=":material/info:")
    elif not run["secure_transport"]:
        st.error("**INSECURE TRANSPORT: this deployment ran without TLS (--insecure).** "
                 "Updates, run configs and node credentials travelled in clear text and the "
                 "coordinator was not authenticated to the nodes.", icon=":material/gpp_bad:")
    if run["dp_enabled"] and run["secure_transport"] and run["mode"] != "simulation":
        st.success("DP-SGD on, TLS on" + (", secure aggregation on."
                                          if run.get("secure_aggregation") else "."),
                   icon=":material/verified_user:")


def _epsilon_chart(run: dict[str, Any]) -> None:
    df = epsilon_frame(run)
    if df.empty:
        st.info("No ε recorded yet: it appears after the first training round.")
        return
    x = alt.X("round:Q", title="Round", axis=alt.Axis(tickMinStep=1, format="d"))
    y = alt.Y("value:Q", title="Cumulative privacy loss ε")
    color = alt.Color("node_id:N", title="Node")
    dash = alt.StrokeDash("series:N", title="Series",
                          scale=alt.Scale(domain=["ε spent (cumulative)", "ε limit"],
                                          range=[[1, 0], [6, 4]]))
    tooltip = [alt.Tooltip("round:Q", title="Round"), alt.Tooltip("node_id:N", title="Node"),
               alt.Tooltip("series:N", title="Series"),
               alt.Tooltip("value:Q", title="ε", format=".4f")]
    chart = (alt.Chart(df, title="Cumulative ε per node vs its limit")
             .mark_line(point=True)
             .encode(x=x, y=y, color=color, strokeDash=dash, detail="series:N", tooltip=tooltip)
             .properties(height=360))
    show_chart(chart)


def render(run: dict[str, Any]) -> None:
    banners(run)
    c = st.columns(4)
    c[0].metric("Target ε (run)", fmt(run.get("target_epsilon"), 3))
    c[1].metric("δ", "—" if run.get("delta") is None else f"{run['delta']:.2e}")
    c[2].metric("Accountant", fmt(run.get("accountant")))
    c[3].metric("Max ε spent (any node)",
                fmt(max((n["epsilon"] for rd in run["rounds"] for n in rd["nodes"]
                         if n.get("epsilon") is not None), default=None), 3))
    _epsilon_chart(run)
    st.subheader("Budget per node")
    table = privacy_frame(run)
    if table.empty:
        st.info("No node has reported yet.")
    else:
        st.dataframe(table, hide_index=True, column_config={
            "ε spent (last recorded)": st.column_config.NumberColumn(format="%.4f"),
            "ε limit": st.column_config.NumberColumn(format="%.4f"),
            "ε remaining (limit − spent)": st.column_config.NumberColumn(format="%.4f"),
            "δ": st.column_config.NumberColumn(format="%.2e"),
            "Noise multiplier σ": st.column_config.NumberColumn(format="%.4f"),
            "Sample rate q": st.column_config.NumberColumn(format="%.4f"),
        })
    st.subheader("Refused rounds")
    refused = status_rows(run, ["refused"])
    if refused.empty:
        st.caption("No node refused a round (no budget exhaustion recorded).")
    else:
        st.dataframe(refused, hide_index=True)
    _feature_center(run)
    _ledger(run)
    st.caption("ε is cumulative per node as reported by its accountant and stored per round; "
               "same data: `fedllm status <run> --json` and `fedllm privacy <run> --json`.")


def _feature_center(run: dict[str, Any]) -> None:
    """Round 0's release, if the run centred the head's features (train.center_features)."""
    fc = run.get("feature_center")
    if not fc:
        return
    sigma = fc.get("noise_multiplier")
    if fc.get("used"):
        head = ("the head started from the class means" if fc.get("head_init") else
                f"the head started random ({fc.get('head_reason')})")
        st.caption(f"Round 0: each node released DP class statistics of its features (σ = "
                   f"{fmt(sigma)}, in its ε above) to centre and start the classification head;"
                   f" centre from {fc['nodes']} node(s), {fc['examples']:,} examples, norm "
                   f"{fmt(fc['norm'])}, expected noise norm {fmt(fc['expected_noise_norm'])}; "
                   f"{head}.")
    elif fc.get("released") is False:
        st.warning(f"Round 0: the nodes' DP class statistics (σ = {fmt(sigma)}) were not asked "
                   f"for: {fc.get('reason')}. No node spent ε on them; the head trained on "
                   "uncentred features from a random start.", icon=":material/warning:")
    else:
        st.warning(f"Round 0: the nodes' DP class statistics (σ = {fmt(sigma)}, in their ε) "
                   f"were not used: {fc.get('reason')}. The head trained on uncentred features"
                   " from a random start.", icon=":material/warning:")


def _ledger(run: dict[str, Any]) -> None:
    st.subheader("Ledgers as the nodes reported them")
    entries = load_ledger(run["run_id"])
    if not entries:
        st.caption("No ledger entries stored for this run.")
        return
    central = [e for e in entries if e["kind"] == "node"]
    example = [e for e in entries if e["kind"] != "node"]
    cols = ["node_id", "entry_run_id", "entry_round", "noise_multiplier", "sample_rate",
            "steps", "epsilon", "delta", "accountant"]
    if example:
        st.caption("Example-level DP-SGD per node, including spend by earlier runs on the same "
                   "data (run column). Verify every ε: `fedllm privacy <run> --verify`.")
        st.dataframe([{k: e[k] for k in cols} for e in example], hide_index=True)
    if central:
        st.markdown("**Node-level DP at aggregation (central DP)**")
        st.dataframe([{k: e[k] for k in cols[1:]} for e in central], hide_index=True)


live_page("Privacy budget", render)
