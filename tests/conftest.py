"""Shared fixtures: paths to the reference data, and one real tiny federated run per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SST2 = REPO.parent / "shared" / "data" / "sst2"
DEMO = REPO / "fedllm" / "demo_data"

# A small but real run: the bundled MiniLM, 3 nodes x ~100 examples, 2 DP rounds.
TINY_RUN_ARGS = [
    "--nodes", "3", "--rounds", "2", "--epsilon", "8",
    "--max-examples", "360",
    "-s", "train.batch_size=40", "-s", "train.physical_batch_size=20",
    "-s", "train.learning_rate=0.01",
    "-s", "data.max_eval_examples=200",
    "-s", "name='tiny-test-run'",
]


def sst2_dir() -> Path:
    """The shared SST-2 folder when present, else the shipped sample (same format)."""
    return SHARED_SST2 if (SHARED_SST2 / "dev.tsv").exists() else DEMO


def run_cli(args: list[str], home: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDLLM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fedllm.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def run_cli_many(arg_lists: list[list[str]], home: Path, timeout: float = 600
                 ) -> list[subprocess.CompletedProcess]:
    """``run_cli`` for each argument list, two processes at a time (results in input order).
    For independent commands that are mostly CLI start-up or σ calibration: on 2 cores this
    halves their wall time; none of them may depend on another's effects."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: run_cli(args, home, timeout), arg_lists))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run `fedllm run` once (real model, real Flower simulation) and return
    {"home": Path, "run_id": str, "status": <fedllm status --json>, "stdout": str}."""
    home = tmp_path_factory.mktemp("fedllm-home")
    proc = run_cli(["run", *TINY_RUN_ARGS], home)
    assert proc.returncode == 0, f"fedllm run failed:\n{proc.stdout}\n{proc.stderr}"
    st = run_cli(["status", "latest", "--json"], home)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    return {"home": home, "run_id": status["run_id"], "status": status, "stdout": proc.stdout}


def build_tiny_causal_lm(out: Path) -> Path:
    """A tiny random Llama saved with save_pretrained, using MiniLM's tokenizer (no hub)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedllm.model import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))
