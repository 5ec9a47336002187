"""fedllm dashboard: a read-only Streamlit view of the run store.

The dashboard reads, never computes: everything it shows comes from the run store
(``fedllm/store.py``) and is also reachable from the CLI (``fedllm status --json``).
"""
