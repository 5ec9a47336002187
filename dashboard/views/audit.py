"""Audit: the run's configuration, who took part in each round (and why not), and its events."""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard.common import live_page, load_audit
from dashboard.data import (
    events_frame,
    fmt_time,
    node_rounds_frame,
    participation_counts,
    participation_matrix,
)

RUN_FIELDS = ("run_id", "name", "state", "mode", "task", "model_path", "model_bytes",
              "adapter_bytes", "num_nodes", "num_rounds", "dp_enabled", "target_epsilon", "delta",
              "accountant", "secure_transport", "secure_aggregation", "label_names",
              "adapter_path", "error")


def _participation(run: dict[str, Any]) -> None:
    st.subheader("Participation per round")
    counts = participation_counts(run)
    if counts.empty:
        st.info("No training round recorded yet (round 0 is the initial evaluation).")
        return
    st.dataframe(counts, hide_index=True)
    st.caption("Status per node and round (ok = trained and aggregated):")
    st.dataframe(participation_matrix(run), hide_index=True)
    nodes = node_rounds_frame(run)
    problems = nodes[nodes["status"] != "ok"]
    if problems.empty:
        st.caption("Every node that was asked trained in every round: no refusal, failure "
                   "or rejection recorded.")
    else:
        st.markdown("**Refused, failed or rejected node-rounds, with reasons**")
        st.dataframe(problems[["round", "node_id", "status", "reason"]], hide_index=True)
    with st.expander("Every node-round as stored"):
        st.dataframe(nodes, hide_index=True)


def _events(run: dict[str, Any]) -> None:
    st.subheader("Events")
    events = events_frame(run)
    if events.empty:
        st.caption("No events recorded.")
        return
    levels = st.multiselect("Levels", options=["info", "warning", "error"],
                            default=["info", "warning", "error"])
    st.dataframe(events[events["Level"].isin(levels)], hide_index=True)


def _chain(run: dict[str, Any]) -> None:
    st.subheader("Hash-chained audit log")
    entries, check = load_audit(run["run_id"])
    if not entries:
        st.caption("No audit entries recorded for this run.")
        return
    if check.ok:
        st.success(f"Chain verifies: {check.entries} entries, head `{check.head}`.",
                   icon=":material/verified:")
    else:
        st.error(f"**Audit log altered at entry {check.first_bad_seq}**: {check.reason}. "
                 f"{check.entries} entries before it verify.", icon=":material/gpp_bad:")
    rows = [{"Seq": e.seq, "Time": fmt_time(e.time), "Actor": e.actor, "Event": e.event,
             "Payload": e.payload_json[:160], "Hash": e.hash[:16]} for e in entries]
    st.dataframe(rows, hide_index=True)
    st.caption("Same data: `fedllm audit show <run>`; check: `fedllm audit verify <run>`.")


def render(run: dict[str, Any]) -> None:
    _participation(run)
    _chain(run)
    _events(run)
    record = {k: run.get(k) for k in RUN_FIELDS}
    record["created_at"] = fmt_time(run.get("created_at"))
    record["finished_at"] = fmt_time(run.get("finished_at"))
    left, right = st.columns(2)
    with left:
        st.subheader("Configuration")
        st.json(run.get("config", {}), expanded=1)
    with right:
        st.subheader("Run record")
        st.json(record, expanded=1)


live_page("Audit", render)
