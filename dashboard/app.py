"""fedllm dashboard entry point (``streamlit run dashboard/app.py``; ``fedllm dashboard``).

Reads the run store in ``$FEDLLM_HOME`` read-only. The dashboard reads, never computes:
everything it shows comes from the run store and is also reachable from the CLI.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import streamlit as st

from dashboard.common import StoreUnavailable, check_password, load_runs, sidebar_run_picker

VIEWS = Path(__file__).resolve().parent / "views"
PAGES = [
    ("runs.py", "Runs", ":material/table_rows:", "runs"),
    ("utility.py", "Utility", ":material/show_chart:", "utility"),
    ("privacy.py", "Privacy budget", ":material/shield_lock:", "privacy"),
    ("bias.py", "Bias", ":material/balance:", "bias"),
    ("audit.py", "Audit", ":material/fact_check:", "audit"),
]


def main() -> None:
    st.set_page_config(page_title="fedllm dashboard", page_icon=":material/hub:", layout="wide")
    if not check_password():
        return
    pages = [st.Page(VIEWS / file, title=title, icon=icon, url_path=url, default=(i == 0))
             for i, (file, title, icon, url) in enumerate(PAGES)]
    nav = st.navigation(pages)
    st.sidebar.markdown("**fedllm** · federated DP-LoRA")
    # A missing store is explained on each page by the first-run message.
    with contextlib.suppress(StoreUnavailable):
        sidebar_run_picker(load_runs())
    nav.run()


main()
