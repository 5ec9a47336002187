"""Runs: every run in the store, filterable; selecting one carries it to the other pages."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard.common import (
    StoreUnavailable,
    first_run_message,
    fmt,
    live,
    load_runs,
    select_run,
    selected_run_id,
)
from dashboard.data import final_metric, runs_frame

TABLE_KEY = "runs_table"
RERUN_KEY = "runs_table_changed"


def _filter(df: pd.DataFrame) -> pd.DataFrame:
    c1, c2, c3 = st.columns([2, 2, 1])
    text = c1.text_input("Filter by name or run ID", placeholder="e.g. tiny or 20250101")
    states = sorted(df["State"].unique())
    chosen = c2.multiselect("State", options=states, default=states)
    dp = c3.selectbox("DP", options=["all", "on", "OFF"])
    keep = df["State"].isin(chosen)
    if text:
        needle = text.lower()
        keep &= (df["Name"].str.lower().str.contains(needle, regex=False)
                 | df["Run ID"].str.lower().str.contains(needle, regex=False))
    if dp != "all":
        keep &= df["DP"] == dp
    return df[keep].reset_index(drop=True)


def _on_select(ids: list[str]) -> None:
    rows = st.session_state[TABLE_KEY].selection.rows
    if rows:
        select_run(ids[rows[0]])
        st.session_state[RERUN_KEY] = True  # a live fragment rerun must refresh the sidebar too


def _summary(run: dict[str, Any]) -> None:
    st.subheader(f"Selected: {run['name']}")
    st.caption(f"Run `{run['run_id']}` · model {run['model_path']} · mode {run['mode']} · "
               f"task {run['task']}")
    key, value = final_metric(run)
    c = st.columns(5)
    c[0].metric("State", run["state"])
    c[1].metric("Rounds done", f"{fmt(run.get('last_round'))} / {run['num_rounds']}")
    c[2].metric(f"Final {key or 'metric'}", fmt(value))
    c[3].metric("Max ε (any node)", fmt(run.get("max_epsilon"), 3))
    c[4].metric("DP", "on" if run["dp_enabled"] else "OFF")
    links = st.columns(4)
    for col, (page, label) in zip(links, [("views/utility.py", "Utility curves"),
                                          ("views/privacy.py", "Privacy budget"),
                                          ("views/bias.py", "Bias"),
                                          ("views/audit.py", "Audit trail")], strict=True):
        col.page_link(page, label=label, icon=":material/arrow_forward:")


def render() -> None:
    if st.session_state.pop(RERUN_KEY, False):
        st.rerun()
    try:
        runs = load_runs()
    except StoreUnavailable as e:
        first_run_message(str(e))
        return
    if not runs:
        first_run_message()
        return
    current = selected_run_id(runs)
    df = _filter(runs_frame(runs))
    if df.empty:
        st.warning("No run matches the filter.")
        return
    ids = list(df["Run ID"])
    default_rows = [ids.index(current)] if current in ids else []
    st.dataframe(
        df, hide_index=True, key=TABLE_KEY, on_select=lambda: _on_select(ids),
        selection_mode="single-row", selection_default={"selection": {"rows": default_rows}},
        column_config={
            "Rounds done": st.column_config.NumberColumn(help="last recorded round (0 = initial "
                                                         "evaluation)"),
            "Final accuracy": st.column_config.NumberColumn(format="%.4f"),
            "Final perplexity": st.column_config.NumberColumn(format="%.3f"),
            "Max ε": st.column_config.NumberColumn(format="%.3f"),
        },
    )
    st.caption(f"{len(df)} of {len(runs)} runs · select a row to inspect it on the other pages. "
               "Same data: `fedllm status <run> --json`.")
    selected = next((r for r in runs if r["run_id"] == current), None)
    if selected is not None:
        _summary(selected)


def main() -> None:
    st.title("Runs")
    try:
        running = any(r["state"] == "running" for r in load_runs())
    except StoreUnavailable:
        running = False
    live("running" if running else "finished", render)


main()
