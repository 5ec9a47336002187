"""Planted bias: a group term spuriously tied to the label at one node is flagged by the group
metrics and the counterfactual probe; a balanced control is not."""

from __future__ import annotations

import csv

import pytest

from fedllm.node import NodeIdentity, NodeRuntime, simulated_node_data
from fedllm.protocol import TrainRequest
from fedllm.run_eval import RunEvaluator
from fedllm.store import Store
from tests.planted import planted_config, planted_files, planted_run


def _final(store: Store, run_id: str, rounds: int) -> dict:
    return {(b["source"], b["metric"], b["group"]): b for b in store.get_bias(run_id)
            if b["round"] == rounds}


@pytest.mark.slow  # two 2-round runs: ~1 min on a free 2-core machine, far more when shared
@pytest.mark.timeout(3600)
def test_planted_bias_is_flagged_and_balanced_control_is_not(tmp_path):
    store, s = planted_run(tmp_path / "planted", planted=True)
    b = _final(store, s.run_id, 2)
    assert b[("probe", "probe_score_gap", "names")]["flagged"]
    assert b[("probe", "probe_score_gap", "names")]["note"].startswith(
        "highest 'european_american'")  # the direction that was planted
    assert b[("federated", "equalized_odds_difference", None)]["flagged"]
    assert b[("federated", "accuracy_gap", None)]["flagged"]
    assert "worst group 'african_american'" in b[("federated", "accuracy_gap", None)]["note"]
    assert any("bias flag" in e["message"] for e in store.get_run(s.run_id)["events"])

    store, s = planted_run(tmp_path / "control", planted=False)
    c = _final(store, s.run_id, 2)
    assert not c[("probe", "probe_score_gap", "names")]["flagged"]
    for m in ("demographic_parity_difference", "equalized_odds_difference"):
        assert not c[("federated", m, None)]["flagged"], c[("federated", m, None)]
    assert c[("probe", "probe_score_gap", "names")]["value"] < \
        b[("probe", "probe_score_gap", "names")]["value"]


def test_group_column_missing_on_one_node_is_reported_not_fatal(tmp_path):
    """Fast variant (no training): real node evaluations of the planted files, one node's
    file stripped of the group column; the federated group metrics use the nodes that have it
    and name the one that does not."""
    files, eval_path = planted_files(tmp_path, planted=True, n=80)
    with open(files[2], encoding="utf-8") as f:
        rows = list(csv.reader(f))
    with open(files[2], "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([r[:2] for r in rows])  # node-2: no group column
    cfg = planted_config(files, eval_path, 1)
    from fedllm.model import load_model

    init = load_model(None, task="seq-cls", label_names=("0", "1"), seed=cfg.seed)
    rt = NodeRuntime()
    req = TrainRequest("r", 1, cfg, ("0", "1"), init.adapter_state())
    replies = [rt.evaluate(req, identity=NodeIdentity(f"node-{i}", tmp_path / f"n{i}"),
                           data=simulated_node_data(cfg, i)) for i in range(3)]
    assert replies[2].eval_counts["group_confusion"] is None
    assert "no group column 'group'" in replies[2].eval_note
    with Store(tmp_path / "s.db") as store:
        store.create_run("r", name="n", mode="simulation", task="seq-cls", model_path="m",
                         num_rounds=1, num_nodes=3, dp_enabled=True, target_epsilon=1.0,
                         delta=1e-5, accountant="prv", secure_transport=False, config={})
        ev = RunEvaluator(cfg, store, "r", label_names=("0", "1"), eval_dataset=None,
                          eval_groups=None)
        ev.node_replies(1, replies)
        b = {(x["source"], x["metric"], x["group"]): x for x in store.get_bias("r")}
        fed = {e["source"]: e for e in store.get_evaluations("r") if e["source"] != "node"}
    dpd = b[("federated", "demographic_parity_difference", None)]
    assert dpd["value"] is not None and "node-2" in dpd["note"]
    # utility covers all three nodes (20 held out each), group sizes only nodes 0 and 1
    assert fed["federated"]["num_examples"] == 60
    sizes = sum(x["value"] for k, x in b.items() if k[1] == "group_size")
    assert sizes == 40
