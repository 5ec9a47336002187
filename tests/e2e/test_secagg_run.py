"""End to end: SecAgg+ rounds on the real MiniLM in Flower's simulation engine.

One in-process run (3 nodes, 2 rounds) with a Flower client mod that (test only) records each
node's clear update from the node's own state and the masked vector it uploads, and kills one
node per round: node-2 after uploading in round 1, node-1 after sharing keys (before
uploading) in round 2. Checks: both rounds complete, what the coordinator receives is masked,
and the final adapter equals g0 + FedAvg(round 1) + FedAvg(round 2 survivors) computed in
clear, within quantisation error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedllm.config import load_config
from fedllm.coordinator import resolve_label_names
from fedllm.model import load_model, load_trained
from fedllm.secagg import NodeSession, flatten, unpack
from fedllm.store import Store, default_db_path
from tests.conftest import run_cli

OVERRIDES = {
    "federation.num_nodes": 3, "federation.rounds": 2, "privacy.target_epsilon": 8.0,
    "data.max_examples": 360, "train.batch_size": 40, "train.physical_batch_size": 20,
    "data.node_eval_fraction": 0.0,  # every row trains: the pinned weights stay exact
    "train.learning_rate": 0.01, "data.max_eval_examples": 200, "name": "tiny-secagg",
    "secagg.enabled": True,
}
KILL = {("train.secagg_unmask", 1, 2), ("train.secagg_mask", 2, 1)}  # (stage, round, pid)


def make_spy(out: Path):
    def spy(msg, context, call_next):
        from client.secagg import STATE_KEY

        pid = int(context.node_config["partition-id"])
        mtype = msg.metadata.message_type

        def session() -> NodeSession:
            rec = context.state.config_records[STATE_KEY]
            return NodeSession.from_state({k: bytes(v) for k, v in rec.items()})

        if mtype in ("train.secagg_mask", "train.secagg_unmask") \
                and (mtype, session().rid.round, pid) in KILL:
            raise RuntimeError(f"test: node-{pid} killed at {mtype}")
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if mtype == "train.secagg_advertise":
            s = session()
            np.save(out / f"clear-r{s.rid.round}-p{pid}.npy", s.update)
            (out / f"weight-r{s.rid.round}-p{pid}").write_text(str(s.weight))
        elif mtype == "train.secagg_mask":
            data = reply.content.array_records["masked"]["y"].numpy().tobytes()
            (out / f"masked-r{session().rid.round}-p{pid}.bin").write_bytes(data)
        return reply

    return spy


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    from server.simulation import simulate

    home = tmp_path_factory.mktemp("home")
    spy_dir = tmp_path_factory.mktemp("spy")
    cfg = load_config(None, OVERRIDES)
    summary = simulate(cfg, home=home, run_id="secagg-e2e", client_mods=[make_spy(spy_dir)])
    with Store(default_db_path(home), read_only=True) as store:
        run = store.get_run("secagg-e2e")
    return cfg, summary, run, spy_dir


def _round(spy: Path, rnd: int, pids: list[int]):
    ups = {p: np.load(spy / f"clear-r{rnd}-p{p}.npy") for p in pids}
    ws = {p: int((spy / f"weight-r{rnd}-p{p}").read_text()) for p in pids}
    return ups, ws


def test_rounds_complete_despite_a_node_killed_each_round(secagg_run):
    _, summary, run, _ = secagg_run
    assert summary.state == "finished" and run["secure_aggregation"] is True
    r1, r2 = run["rounds"][1], run["rounds"][2]
    assert r1["num_nodes"] == 3  # node-2 uploaded before it died: still in the sum
    assert r2["num_nodes"] == 2
    status = {n["node_id"]: n["status"] for n in r2["nodes"]}
    assert status == {"node-0": "ok", "node-1": "dropped", "node-2": "ok"}
    infos = [e["message"] for e in run["events"] if e["level"] == "info"]
    assert any("round 2: securely aggregated 2 node(s), total weight 240, 0 coordinate(s) "
               "clipped, dropped: node-1" in m for m in infos), infos
    reason = next(n["reason"] for n in r2["nodes"] if n["node_id"] == "node-1")
    assert "secagg_mask" in reason and "killed" in reason and len(reason) < 400


def test_final_adapter_equals_clear_fedavg_within_quantisation_error(secagg_run):
    cfg, summary, _, spy = secagg_run
    labels = resolve_label_names(cfg)
    m = cfg.model
    g0 = load_model(m.path, task=m.task, label_names=labels, pooling=m.pooling,
                    lora_r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                    target_modules=cfg.lora.target_modules, device="cpu",
                    seed=cfg.seed).adapter_state()
    names = sorted(g0)
    expected = flatten(g0, names).astype(np.float64)
    for rnd, pids in ((1, [0, 1, 2]), (2, [0, 2])):
        ups, ws = _round(spy, rnd, pids)
        assert max(np.abs(u).max() for u in ups.values()) < cfg.secagg.clip  # nothing clipped
        expected += sum(ws[p] * ups[p].astype(np.float64) for p in pids) / sum(ws.values())
    final = flatten(load_trained(summary.adapter_path).adapter_state(), names)
    step = 2 * cfg.secagg.clip / (2 ** cfg.secagg.bits - 1)
    err = np.abs(final - expected).max()
    # Two rounds of rounding (step / 2 each) plus float32 storage of the adapter.
    assert err <= step + 1e-6 * (1 + np.abs(expected).max()), err
    moved = np.abs(final - flatten(g0, names)).max()
    assert moved > 100 * step  # the rounds really changed the adapter


def test_what_the_coordinator_receives_is_masked(secagg_run):
    _, _, _, spy = secagg_run
    for rnd, pids in ((1, [0, 1, 2]), (2, [0, 2])):
        ups, _ = _round(spy, rnd, pids)
        for p in pids:
            data = (spy / f"masked-r{rnd}-p{p}.bin").read_bytes()
            n = ups[p].size + 2
            y = unpack(data, 8 * len(data) // n, n)[:-2].astype(np.float64)
            r = np.corrcoef(y, ups[p].astype(np.float64))[0, 1]
            assert abs(r) < 0.03, (rnd, p, r)


def test_cli_flag_turns_it_on_and_needs_three_nodes(tmp_path):
    bad = run_cli(["run", "--secagg", "--nodes", "2"], tmp_path)
    assert bad.returncode == 2 and "secagg.enabled needs at least 3 nodes" in bad.stderr
    assert not (tmp_path / "fedllm.db").exists() or json.loads(
        run_cli(["runs", "--json"], tmp_path).stdout or "[]") == []
