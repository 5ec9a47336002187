"""The coordinator's handling of node evaluation counts (no model needed)."""

import numpy as np

from fedllm.config import load_config
from fedllm.evaluate import EvalCounts
from fedllm.protocol import TrainReply
from fedllm.run_eval import RunEvaluator
from fedllm.store import Store


def _counts(cm, groups=None):
    cm = np.asarray(cm)
    return EvalCounts(int(cm.sum()), 0.5 * cm.sum(), cm, group_confusion=groups).to_dict()


def test_bad_counts_from_one_node_are_ignored_with_a_warning(tmp_path):
    cfg = load_config(None, {"data.group_column": "g", "bias.min_group_size": 1})
    with Store(tmp_path / "s.db") as store:
        store.create_run("r", name="n", mode="simulation", task="seq-cls", model_path="m",
                         num_rounds=1, num_nodes=3, dp_enabled=True, target_epsilon=1.0,
                         delta=1e-5, accountant="prv", secure_transport=False, config={})
        ev = RunEvaluator(cfg, store, "r", label_names=("0", "1"), eval_dataset=None,
                          eval_groups=None)
        good = {"a": np.array([[3, 1], [0, 4]]), "b": np.array([[2, 2], [2, 2]])}
        ev.node_replies(1, [
            TrainReply("node-0", "ok", eval_counts=_counts([[5, 1], [2, 8]], good)),
            # an unknown third label: a 3x3 matrix in a 2-label run
            TrainReply("node-1", "ok", eval_counts=_counts(np.eye(3, dtype=int))),
            TrainReply("node-2", "ok", eval_counts={"num_examples": -1, "loss_sum": 0}),
        ])
        events = [e["message"] for e in store.get_run("r")["events"]]
        evals = store.get_evaluations("r")
        bias = {(b["metric"], b["group"]): b for b in store.get_bias("r")}
    assert any("node-1" in m and "not 2x2" in m for m in events)
    assert any("node-2" in m and "negative" in m for m in events)
    assert {e["node_id"] for e in evals if e["source"] == "node"} == {"node-0"}
    fed = next(e for e in evals if e["source"] == "federated")
    assert fed["num_examples"] == 16 and fed["metrics"]["accuracy"] == 13 / 16
    # groups a / b: selection rates 5/8 and 4/8
    assert bias[("demographic_parity_difference", None)]["value"] == 1 / 8
