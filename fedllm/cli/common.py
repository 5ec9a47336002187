"""Shared pieces of the CLI: the typer app, console, error exit, formatting, options."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedllm.config import ConfigError
from fedllm.errors import DataError, ModelError
from fedllm.privacy import PrivacyError
from fedllm.store import StoreError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated DP-LoRA fine-tuning of Transformers.")

# Command groups; each is filled by its own module (see fedllm/cli/__init__.py).
coordinator_app = typer.Typer(no_args_is_help=True,
                              help="Coordinator operator: run the Flower SuperLink.")
node_app = typer.Typer(no_args_is_help=True,
                       help="Node operator: set up, inspect and start a node (SuperNode).")
certs_app = typer.Typer(no_args_is_help=True, help="TLS certificates and node keys.")
audit_app = typer.Typer(no_args_is_help=True, help="Tamper-evident audit log of a run.")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(node_app, name="node")
app.add_typer(certs_app, name="certs")
app.add_typer(audit_app, name="audit")

HomeOpt = Annotated[Path | None, typer.Option(
    "--home", help="fedllm home (run store, adapters); default $FEDLLM_HOME or ~/.fedllm")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]

USER_ERRORS = (ConfigError, DataError, ModelError, PrivacyError, StoreError)


def console(stderr: bool = False) -> Console:
    # Not a terminal (pipes, CI, tests): a wide console so ids and paths are never wrapped.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 160)


def err(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error and return the Exit to raise (``raise err(...)``)."""
    console(stderr=True).print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        return f"{v:.{digits}f}"
    return str(v)
