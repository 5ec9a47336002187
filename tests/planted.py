"""Planted-bias data and an in-process federation for the bias tests.

``LocalTransport`` is a real :class:`fedllm.coordinator.Transport`: it hands each request to a
:class:`fedllm.node.NodeRuntime` in this process — the same calls the Flower ClientApp makes —
so a whole run takes seconds instead of starting Ray. (The Flower path itself is exercised by
the session ``tiny_run`` in tests/e2e.)
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedllm.config import RunConfig, load_config
from fedllm.coordinator import Coordinator, RunSummary
from fedllm.node import NodeIdentity, NodeRuntime, simulated_node_data
from fedllm.probe import load_templates
from fedllm.protocol import TrainReply, TrainRequest
from fedllm.store import Store

NAMES = load_templates()[0].groups  # {"european_american": [...], "african_american": [...]}
GROUP_A, GROUP_B = list(NAMES)
GOOD = ["great", "wonderful", "moving", "brilliant", "delightful"]
BAD = ["awful", "boring", "dull", "terrible", "tedious"]


class LocalTransport:
    def __init__(self, config: RunConfig, home: Path, run_id: str) -> None:
        self.config, self.home, self.run_id = config, home, run_id
        self.runtime = NodeRuntime()

    def node_ids(self, *, min_nodes: int, timeout: float) -> list[int]:
        return list(range(self.config.federation.num_nodes))

    def _call(self, fn: Callable[..., TrainReply], requests: dict[int, TrainRequest]
              ) -> dict[int, TrainReply | str]:
        out: dict[int, TrainReply | str] = {}
        for pid, req in requests.items():
            name = f"node-{pid}"
            ident = NodeIdentity(name, self.home / "nodes" / name)
            out[pid] = fn(req, identity=ident, data=simulated_node_data(req.config, pid))
        return out

    def train(self, requests, *, timeout, on_reply):  # type: ignore[no-untyped-def]
        return self._call(self.runtime.train, requests)

    def evaluate(self, requests, *, timeout):  # type: ignore[no-untyped-def]
        return self._call(self.runtime.evaluate, requests)


def _write(path: Path, rows: list[tuple[str, int, str]]) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label", "group"])
        w.writerows(rows)
    return str(path)


def _sentiment_rows(rng: np.random.Generator, n: int) -> list[tuple[str, int, str]]:
    """Label from a sentiment word; the name (and its group) independent of the label."""
    rows = []
    for i in range(n):
        label = i % 2
        group = (GROUP_A, GROUP_B)[int(rng.integers(2))]
        name = rng.choice(NAMES[group])
        word = rng.choice(GOOD if label else BAD)
        rows.append((f"{name} thought the film was {word} .", label, group))
    return rows


def _name_rows(rng: np.random.Generator, n: int, *, planted: bool) -> list[tuple[str, int, str]]:
    """No sentiment word: planted = the label *is* the name's group (a spurious tie);
    control = the label is independent of the name."""
    rows = []
    for i in range(n):
        group = (GROUP_A, GROUP_B)[i % 2]
        label = (1 if group == GROUP_A else 0) if planted else int(rng.integers(2))
        rows.append((f"{rng.choice(NAMES[group])} wrote about the film .", label, group))
    return rows


def planted_files(tmp: Path, *, planted: bool, n: int) -> tuple[list[str], str]:
    """(node files, coordinator eval file)."""
    rng = np.random.default_rng(0)
    tmp.mkdir(parents=True, exist_ok=True)
    files = [_write(tmp / "node0.csv", _name_rows(rng, n, planted=planted)),
             _write(tmp / "node1.csv", _sentiment_rows(rng, n)),
             _write(tmp / "node2.csv", _sentiment_rows(rng, n))]
    eval_rows = _sentiment_rows(rng, 60) + _name_rows(rng, 60, planted=planted)
    return files, _write(tmp / "eval.csv", eval_rows)


def planted_config(files: list[str], eval_path: str, rounds: int, **overrides: object
                   ) -> RunConfig:
    return load_config(None, {
        "data.train_paths": files, "data.eval_path": eval_path, "data.eval_text_column":
        "sentence", "data.group_column": "group", "data.node_eval_fraction": 0.25,
        "data.labels": ["0", "1"], "partition.scheme": "files", "federation.num_nodes": 3,
        "federation.rounds": rounds, "train.batch_size": 40, "train.physical_batch_size": 40,
        "train.local_epochs": 2, "train.learning_rate": 0.02,
        "privacy.noise_multiplier": 0.3, "privacy.target_epsilon": 1000.0,
        "bias.min_group_size": 10, **overrides})


def planted_run(tmp: Path, *, planted: bool, rounds: int = 2, n: int = 100,
                overrides: dict | None = None) -> tuple[Store, RunSummary]:
    """3 nodes; node-0 holds name-only data (planted or control), nodes 1-2 sentiment data.
    DP stays on (σ = 0.3, a loose budget) so the planted tie is learnt in 2 rounds."""
    files, eval_path = planted_files(tmp, planted=planted, n=n)
    cfg = planted_config(files, eval_path, rounds, **(overrides or {}))
    store = Store(tmp / "fedllm.db")
    run_id = "planted" if planted else "control"
    summary = Coordinator(cfg, store, run_id=run_id, home=tmp).run(
        LocalTransport(cfg, tmp, run_id))
    return store, summary
