"""fedllm command line: thin — parse, call the library, print.

One module per group of commands; each registers on the shared typer ``app`` when imported.
"""

from __future__ import annotations

import sys

from rich.console import Console

# Registers commands, in this order (deploy: certs, coordinator, node start/register).
from fedllm.cli import run, runs  # noqa: F401  # isort: skip
from fedllm.cli import deploy, node_data, privacy, report  # noqa: F401  # isort: skip
from fedllm.cli.common import USER_ERRORS, app


def main() -> None:
    try:
        app()
    except USER_ERRORS as e:  # pragma: no cover - commands convert these already
        Console(stderr=True).print(f"[bold red]error:[/] {e}")
        sys.exit(2)


__all__ = ["app", "main"]
