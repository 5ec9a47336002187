"""A node's round without Flower: budget enforcement, ledger persistence, replay refusal."""

import numpy as np
import pytest

from fedllm.config import load_config
from fedllm.model import load_model
from fedllm.node import NodeIdentity, NodeRuntime, simulated_node_data
from fedllm.privacy import NodeLedger
from fedllm.protocol import TrainRequest


@pytest.fixture(scope="module")
def runtime_and_config():
    cfg = load_config(None, {"data.max_examples": 120, "federation.num_nodes": 2,
                             "federation.rounds": 2, "train.batch_size": 30,
                             "train.physical_batch_size": 30, "privacy.target_epsilon": 4.0})
    init = load_model(None, task="seq-cls", label_names=("0", "1"), seed=cfg.seed)
    return NodeRuntime(), cfg, init.adapter_state()


def request(cfg, arrays, rnd, run_id="run-a"):
    return TrainRequest(run_id, rnd, cfg, ("0", "1"), arrays)


def test_rounds_compose_then_budget_refuses(runtime_and_config, tmp_path):
    rt, cfg, arrays = runtime_and_config
    ident = NodeIdentity("node-0", tmp_path)
    spec = simulated_node_data(cfg, 0)
    r1 = rt.train(request(cfg, arrays, 1), identity=ident, data=spec)
    r2 = rt.train(request(cfg, arrays, 2), identity=ident, data=spec)
    assert r1.ok and r2.ok
    assert 0 < r1.metrics["epsilon"] < r2.metrics["epsilon"] <= 4.0
    # 60 per node, 10 % (6) held out for evaluation (data.node_eval_fraction)
    assert r1.metrics["num_examples"] == 54 and r1.metrics["steps"] == 2
    # the received model was evaluated on the held-out split: counts only
    assert r1.eval_counts is not None and r1.eval_counts["num_examples"] == 6
    assert sum(map(sum, r1.eval_counts["confusion"])) == 6
    assert set(r1.eval_counts) == {"num_examples", "loss_sum", "num_tokens", "confusion",
                                   "group_confusion", "score_hist", "calibration"}
    # the whole planned run is spent: a third round would overrun the limit
    r3 = rt.train(request(cfg, arrays, 3), identity=ident, data=spec)
    assert r3.status == "refused" and "privacy budget exhausted" in r3.reason
    assert r3.arrays == {} and r3.metrics["epsilon"] == pytest.approx(r2.metrics["epsilon"])
    # a new run on the same data starts from what was spent: the ledger follows the data
    r4 = rt.train(request(cfg, arrays, 1, run_id="run-b"), identity=ident, data=spec)
    assert r4.status == "refused"
    (path,) = tmp_path.glob("ledger-*.json")
    ledger = NodeLedger.from_json(path.read_text())
    assert len(ledger.entries) == 2 and ledger.epsilon() == pytest.approx(r2.metrics["epsilon"])


def test_replayed_round_is_refused(runtime_and_config, tmp_path):
    rt, cfg, arrays = runtime_and_config
    ident = NodeIdentity("node-1", tmp_path)
    spec = simulated_node_data(cfg, 1)
    assert rt.train(request(cfg, arrays, 1), identity=ident, data=spec).ok
    again = rt.train(request(cfg, arrays, 1), identity=ident, data=spec)
    assert again.status == "refused" and "already trained" in again.reason


def test_operator_limit_wins_over_the_plan(runtime_and_config, tmp_path):
    rt, cfg, arrays = runtime_and_config
    ident = NodeIdentity("node-0", tmp_path, epsilon_limit=0.5)
    reply = rt.train(request(cfg, arrays, 1), identity=ident, data=simulated_node_data(cfg, 0))
    assert reply.status == "refused" and "limit 0.5" in reply.reason
    assert not list(tmp_path.glob("ledger-*.json"))  # nothing trained, nothing spent


def test_held_out_split_is_deterministic_disjoint_and_out_of_training(tmp_path):
    from fedllm.node import NodeDataSpec, eval_split, load_node_tables

    tr, ev = eval_split(50, 0.2, seed=7)
    assert len(ev) == 10 and not set(tr) & set(ev) and len(tr) + len(ev) == 50
    assert np.array_equal(ev, eval_split(50, 0.2, seed=7)[1])
    f = tmp_path / "n.csv"
    f.write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(40)))
    t = load_node_tables(NodeDataSpec(str(f), "sentence", "label", eval_fraction=0.25,
                                      group_column="group"), ("0", "1"))
    assert len(t.train) == 30 and len(t.eval) == 10
    assert not set(t.train.texts) & set(t.eval.texts)
    assert t.eval.groups is None  # this node's file has no group column: reported, not fatal
