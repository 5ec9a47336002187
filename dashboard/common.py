"""Streamlit helpers shared by the dashboard pages: store access, run selection, live refresh,
access control, banners and chart styling. The store is opened read-only, per render."""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from fedllm.store import Store, StoreError, default_db_path

PASSWORD_ENV = "FEDLLM_DASHBOARD_PASSWORD_SHA256"
RUN_KEY = "fedllm_run_id"          # canonical selected run, shared by every page
PICKER_KEY = "fedllm_run_picker"   # the sidebar selectbox
AUTH_KEY = "fedllm_authenticated"
REFRESH_SECONDS = 3.0              # live refresh period of a running run
FIRST_RUN = ("No runs yet — run `fedllm run` to start a federated fine-tuning run "
             "(for example `fedllm run --nodes 3 --rounds 2`), then reload this page.")


class StoreUnavailable(Exception):
    """The run store is missing or unreadable; the message says why, for display."""


def db_path() -> Path:
    """``$FEDLLM_HOME/fedllm.db`` (``~/.fedllm/fedllm.db`` by default); launch sets the env var."""
    return default_db_path()


def _read(fn: Callable[[Store], Any]) -> Any:
    path = db_path()
    if not path.exists():
        raise StoreUnavailable(f"no run store at `{path}`")
    try:
        with Store(path, read_only=True) as store:
            return fn(store)
    except (StoreError, sqlite3.Error) as e:
        raise StoreUnavailable(f"cannot read the run store `{path}`: {e}") from e


def load_runs() -> list[dict[str, Any]]:
    """``Store.list_runs()`` (newest first)."""
    return list(_read(lambda s: s.list_runs()))


def load_run(run_id: str) -> dict[str, Any]:
    """``Store.get_run(run_id)``: the same document as ``fedllm status <run> --json``."""
    return dict(_read(lambda s: s.get_run(run_id)))


def load_audit(run_id: str) -> tuple[list[Any], Any]:
    """The run's audit entries and their chain check (``fedllm audit show|verify``)."""
    from fedllm.audit import verify_chain

    entries = list(_read(lambda s: s.audit_entries(run_id)))
    return entries, verify_chain(entries)


def load_ledger(run_id: str) -> list[dict[str, Any]]:
    """Every stored ledger entry (``fedllm privacy <run> --json``)."""
    return list(_read(lambda s: s.ledger(run_id)))


def load_bias(run_id: str) -> list[dict[str, Any]]:
    """``Store.get_bias(run_id)``: bias metric rows (group, node spread, probe) with flags."""
    return list(_read(lambda s: s.get_bias(run_id)))


def check_password() -> bool:
    """Optional access control. Off unless ``FEDLLM_DASHBOARD_PASSWORD_SHA256`` is set; then the
    SHA-256 hex digest of the entered password must match it (constant-time compare)."""
    expected = os.environ.get(PASSWORD_ENV, "").strip().lower()
    if not expected or st.session_state.get(AUTH_KEY):
        return True
    st.title("fedllm dashboard")
    with st.form("login"):
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        digest = hashlib.sha256(password.encode("utf-8")).hexdigest()
        if hmac.compare_digest(digest, expected):
            st.session_state[AUTH_KEY] = True
            st.rerun()
        st.error("Wrong password.")
    return False


def first_run_message(reason: str | None = None) -> None:
    st.info(FIRST_RUN)
    if reason:
        st.caption(reason)


def _run_label(run: dict[str, Any]) -> str:
    return f"{run['run_id']} · {run['name']} · {run['state']}"


def _set_selected(run_id: str) -> None:
    st.session_state[RUN_KEY] = run_id
    st.query_params["run"] = run_id


def select_run(run_id: str) -> None:
    """Select a run from a widget callback (keeps the sidebar picker in step)."""
    _set_selected(run_id)
    st.session_state[PICKER_KEY] = run_id


def _on_pick() -> None:
    _set_selected(st.session_state[PICKER_KEY])


def selected_run_id(runs: list[dict[str, Any]]) -> str | None:
    """The selected run: this session's choice, else ``?run=`` in the URL, else the newest."""
    ids = [r["run_id"] for r in runs]
    if not ids:
        return None
    for candidate in (st.session_state.get(RUN_KEY), st.query_params.get("run")):
        if candidate in ids:
            return str(candidate)
    return ids[0]


def sidebar_run_picker(runs: list[dict[str, Any]]) -> str | None:
    """Sidebar run selector; the choice is shared by every page (session state + ``?run=``)."""
    run_id = selected_run_id(runs)
    if run_id is None:
        return None
    _set_selected(run_id)
    labels = {r["run_id"]: _run_label(r) for r in runs}
    if st.session_state.get(PICKER_KEY) not in labels:
        st.session_state[PICKER_KEY] = run_id
    st.sidebar.selectbox("Run", options=list(labels), format_func=labels.__getitem__,
                         key=PICKER_KEY, on_change=_on_pick)
    st.sidebar.caption(f"Run store (read-only): `{db_path()}`")
    return run_id


def live(run_state: str, body: Callable[[], None]) -> None:
    """Render ``body`` as a fragment that re-reads the store every few seconds while the run is
    running (no page reload); a finished run renders once."""
    if run_state == "running":
        st.fragment(body, run_every=REFRESH_SECONDS)()
    else:
        body()


def page_run(title: str) -> dict[str, Any] | None:
    """Page title plus the selected run read from the store, or a first-run message and None."""
    st.title(title)
    try:
        runs = load_runs()
    except StoreUnavailable as e:
        first_run_message(str(e))
        return None
    if not runs:
        first_run_message()
        return None
    run_id = selected_run_id(runs)
    assert run_id is not None
    try:
        return load_run(run_id)
    except StoreUnavailable as e:
        st.error(str(e))
        return None


def run_header(run: dict[str, Any], initial_state: str) -> None:
    """One caption line naming the run; reruns the whole app when a live run changes state."""
    if run["state"] != initial_state:
        st.rerun()
    live_note = f" · live, refreshes every {REFRESH_SECONDS:g} s" if run["state"] == "running" \
        else ""
    st.caption(f"Run `{run['run_id']}` · {run['name']} · state **{run['state']}** · "
               f"mode {run['mode']} · task {run['task']}{live_note}")
    if run["state"] == "failed" and run.get("error"):
        st.error(f"Run failed: {run['error']}")


def live_page(title: str, render: Callable[[dict[str, Any]], None]) -> None:
    """Standard page: load the selected run, then render it (live while it is running)."""
    run = page_run(title)
    if run is None:
        return
    run_id, state = run["run_id"], run["state"]

    def body() -> None:
        try:
            fresh = load_run(run_id)
        except StoreUnavailable as e:
            st.error(str(e))
            return
        run_header(fresh, state)
        render(fresh)

    live(state, body)


def line_chart(df: pd.DataFrame, *, x: str, y: str, color: str, x_title: str, y_title: str,
               color_title: str, title: str, dash: str | None = None) -> alt.Chart:
    """A readable Altair line chart with points, integer round axis and tooltips."""
    enc: dict[str, Any] = {
        "x": alt.X(f"{x}:Q", title=x_title, axis=alt.Axis(tickMinStep=1, format="d"),
                   scale=alt.Scale(zero=False)),
        "y": alt.Y(f"{y}:Q", title=y_title, scale=alt.Scale(zero=False)),
        "color": alt.Color(f"{color}:N", title=color_title),
        "tooltip": [alt.Tooltip(f"{x}:Q", title=x_title), alt.Tooltip(f"{color}:N"),
                    alt.Tooltip(f"{y}:Q", title=y_title, format=".4f")],
    }
    if dash:
        enc["strokeDash"] = alt.StrokeDash(f"{dash}:N", title=dash)
        enc["tooltip"].append(alt.Tooltip(f"{dash}:N"))
    return (alt.Chart(df, title=title).mark_line(point=True)
            .encode(**enc).properties(height=320))


def show_chart(chart: alt.Chart | alt.LayerChart | alt.FacetChart) -> None:
    st.altair_chart(chart, width="stretch")


def fmt(value: Any, digits: int = 4) -> str:
    """A stored number for st.metric ('—' when the store has none)."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
