"""The CLI's own start-up: read-only commands must not pay for torch, transformers or Flower."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "peft", "opacus", "flwr", "fairlearn", "sklearn")


def test_cli_import_leaves_the_ml_stack_unloaded():
    # `fedllm status` / `privacy` / `audit` / `report` only read the store: importing the CLI
    # (which registers every command) must not import the training stack. If it does, each of
    # those commands takes seconds instead of a fraction of one.
    code = ("import json, sys, fedllm.cli, fedllm.report, fedllm.privacy; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=True)
    assert json.loads(proc.stdout) == []
