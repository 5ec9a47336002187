"""fedllm command line: thin — parse, call the library, print.

One module per group of commands; each registers on the shared typer ``app`` when imported.
"""

from __future__ import annotations

import sys

from rich.console import Console

from fedllm.cli import report, run, runs  # noqa: F401  (registers commands)
from fedllm.cli.common import USER_ERRORS, app


def main() -> None:
    try:
        app()
    except USER_ERRORS as e:  # pragma: no cover - commands convert these already
        Console(stderr=True).print(f"[bold red]error:[/] {e}")
        sys.exit(2)


__all__ = ["app", "main"]
