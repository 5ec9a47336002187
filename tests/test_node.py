"""A node's round without Flower: budget enforcement, ledger persistence, replay refusal."""

import numpy as np
import pytest

from fedllm.config import load_config
from fedllm.model import load_model
from fedllm.node import NodeIdentity, NodeRuntime, simulated_node_data
from fedllm.privacy import NodeLedger
from fedllm.protocol import TrainRequest
from fedllm.sealed import SealedDir, load_key


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
    # the ledger is sealed (AES-GCM) under the node's auto-created simulation key
    assert not list(tmp_path.glob("ledger-*.json"))
    (path,) = tmp_path.glob("ledger-*.sealed")
    assert b'"entries"' not in path.read_bytes()
    box = SealedDir(tmp_path, load_key(tmp_path / "node.key"))
    ledger = NodeLedger.from_json(box.read(path.name).decode())
    assert len(ledger.entries) == 2 and ledger.epsilon() == pytest.approx(r2.metrics["epsilon"])
    assert ledger.user_level().method.startswith("unknown")  # no user column


def test_a_retried_round_resends_the_same_release_without_spending_again(
        runtime_and_config, tmp_path):
    rt, cfg, arrays = runtime_and_config
    ident = NodeIdentity("node-1", tmp_path)
    spec = simulated_node_data(cfg, 1)
    first = rt.train(request(cfg, arrays, 1), identity=ident, data=spec)
    again = rt.train(request(cfg, arrays, 1), identity=ident, data=spec)
    assert first.ok and again.ok and again.metrics["replayed"] == 1
    assert again.metrics["epsilon"] == first.metrics["epsilon"]
    assert all((again.arrays[k] == first.arrays[k]).all() for k in first.arrays)
    (path,) = tmp_path.glob("ledger-*.sealed")
    box = SealedDir(tmp_path, load_key(tmp_path / "node.key"))
    assert len(NodeLedger.from_json(box.read(path.name).decode()).entries) == 1  # counted once
    assert len(again.ledger) == 1 and again.ledger[0]["round"] == 1
    # the release is sealed node state too: deleted, the node refuses rather than retrain
    (release,) = tmp_path.glob("release-*.npz")
    assert b"lora" not in release.read_bytes()
    release.unlink()
    lost = rt.train(request(cfg, arrays, 1), identity=ident, data=spec)
    assert lost.status == "refused" and "was deleted" in lost.reason


def test_class_stats_release_is_a_budgeted_replayable_round_zero(runtime_and_config,
                                                                   tmp_path):
    """PHASE_CENTER: one Gaussian release of class statistics (σ, q = 1, 1 step) recorded as
    round 0 before it leaves; a retry re-sends it; the training plan's σ leaves room for it; a
    train request's centre is applied to the cached model, and None resets it."""
    from fedllm.aggregate import estimate_class_stats
    from fedllm.privacy import compute_epsilon, plan_dp_sgd
    from fedllm.protocol import PHASE_CENTER, PHASE_COUNT, STATS_KEY

    rt, cfg, arrays = runtime_and_config
    assert cfg.centers_features  # "auto": DP seq-cls
    ident = NodeIdentity("node-0", tmp_path)
    spec = simulated_node_data(cfg, 0)
    zeros = {STATS_KEY: np.zeros((2, 385), np.float32)}
    sigma = cfg.privacy.center_noise_multiplier
    # Before the release the coordinator asks for the public count only: no ε, no ledger.
    count = rt.train(TrainRequest("run-a", 0, cfg, ("0", "1"), {}, phase=PHASE_COUNT),
                     identity=ident, data=spec)
    assert count.ok and count.metrics == {"num_examples": 54, "steps": 0}
    assert count.arrays == {} and count.ledger == [] and not list(tmp_path.glob("ledger-*"))
    center = TrainRequest("run-a", 0, cfg, ("0", "1"), zeros, phase=PHASE_CENTER)
    r0 = rt.train(center, identity=ident, data=spec)
    assert r0.ok and set(r0.arrays) == {STATS_KEY} and r0.arrays[STATS_KEY].shape == (2, 385)
    m = r0.metrics
    assert (m["noise_multiplier"], m["sample_rate"], m["steps"]) == (sigma, 1.0, 1) == (4.0, 1, 1)
    assert m["num_examples"] == 54 and r0.eval_counts is None  # nothing trained or evaluated
    alone = compute_epsilon([(sigma, 1.0, 1)], delta=1e-5, accountant="prv")
    assert m["epsilon"] == pytest.approx(alone) and alone == pytest.approx(0.928, abs=2e-3)
    assert [(e["round"], e["noise_multiplier"]) for e in r0.ledger] == [(0, sigma)]
    again = rt.train(center, identity=ident, data=spec)
    assert again.metrics["replayed"] == 1 and len(again.ledger) == 1
    assert np.array_equal(again.arrays[STATS_KEY], r0.arrays[STATS_KEY])
    # training composes on top, with σ calibrated around the release: ε ends at the target
    c = estimate_class_stats(r0.arrays[STATS_KEY], nodes=1, examples=54,
                             noise_multiplier=sigma).center
    r1 = rt.train(TrainRequest("run-a", 1, cfg, ("0", "1"), arrays, feature_center=c),
                  identity=ident, data=spec)
    plan = plan_dp_sgd(num_examples=54, batch_size=30, local_epochs=1, rounds=2,
                       target_epsilon=4.0, delta=1e-5, accountant="prv",
                       prior=((sigma, 1.0, 1),))
    assert r1.ok and r1.metrics["noise_multiplier"] == pytest.approx(plan.noise_multiplier)
    assert [e["round"] for e in r1.ledger] == [0, 1] and r1.metrics["epsilon"] > alone
    clf = rt.model(cfg, ("0", "1")).model.get_base_model()
    assert np.allclose(clf.feature_center.numpy(), c)
    # a node with no release of this run in its ledger (skipped as useless, or missed) plans
    # its rounds with the whole budget: a smaller σ
    skipped = rt.train(TrainRequest("run-s", 1, cfg, ("0", "1"), arrays),
                       identity=NodeIdentity("node-0", tmp_path / "s"), data=spec)
    whole = plan_dp_sgd(num_examples=54, batch_size=30, local_epochs=1, rounds=2,
                        target_epsilon=4.0, delta=1e-5, accountant="prv")
    assert skipped.metrics["noise_multiplier"] == pytest.approx(whole.noise_multiplier)
    assert whole.noise_multiplier < plan.noise_multiplier
    assert [e["round"] for e in skipped.ledger] == [1]
    # ... and it never releases round 0 after training: its σ left no room for it
    late = rt.train(TrainRequest("run-s", 0, cfg, ("0", "1"), zeros, phase=PHASE_CENTER),
                    identity=NodeIdentity("node-0", tmp_path / "s"), data=spec)
    assert late.status == "refused" and "round 0 comes before training" in late.reason
    assert [e["round"] for e in late.ledger] == [1]
    # the wire state stays uncentred: the reply loads into an uncentred model unchanged
    rt.train(request(cfg, arrays, 1, run_id="run-z"), identity=NodeIdentity("z", tmp_path / "z"),
             data=spec)
    assert not clf.feature_center.any()
    # a run that does not centre does not get a release out of the node
    off = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"center_features": "off"})})
    r = rt.train(TrainRequest("run-b", 0, off, ("0", "1"), zeros, phase=PHASE_CENTER),
                 identity=NodeIdentity("node-0", tmp_path / "b"), data=spec)
    assert r.status == "refused" and "does not centre features" in r.reason


def test_operator_refuses_larger_delta_and_dp_off(runtime_and_config, tmp_path):
    rt, cfg, arrays = runtime_and_config
    spec = simulated_node_data(cfg, 0)
    strict = NodeIdentity("node-0", tmp_path, max_delta=1e-6)
    r = rt.train(request(cfg, arrays, 1), identity=strict, data=spec)
    assert r.status == "refused" and "δ=1e-05" in r.reason and "1e-06" in r.reason
    no_dp = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(
        update={"enabled": False, "allow_no_dp": True})})
    r = rt.train(request(no_dp, arrays, 1), identity=NodeIdentity("node-0", tmp_path),
                 data=spec)
    assert r.status == "refused" and "does not allow training without DP" in r.reason
    assert not list(tmp_path.glob("ledger-*.json"))


def test_central_dp_clips_the_released_update(runtime_and_config, tmp_path):
    import numpy as np

    rt, cfg, arrays = runtime_and_config
    cdp = cfg.model_copy(update={"central_dp": cfg.central_dp.model_copy(
        update={"enabled": True, "clip_norm": 0.01})})
    r = rt.train(request(cdp, arrays, 1), identity=NodeIdentity("node-0", tmp_path),
                 data=simulated_node_data(cfg, 0))
    norm = np.sqrt(sum(float(np.sum((r.arrays[k].astype(np.float64) - arrays[k]) ** 2))
                       for k in arrays))
    assert r.ok and norm == pytest.approx(0.01, rel=1e-3)


def test_operator_limit_wins_over_the_plan(runtime_and_config, tmp_path):
    rt, cfg, arrays = runtime_and_config
    ident = NodeIdentity("node-0", tmp_path, epsilon_limit=0.5)
    reply = rt.train(request(cfg, arrays, 1), identity=ident, data=simulated_node_data(cfg, 0))
    assert reply.status == "refused" and "limit 0.5" in reply.reason
    assert not list(tmp_path.glob("ledger-*"))  # nothing trained, nothing spent


def test_a_restarted_node_continues_its_ledger(runtime_and_config, tmp_path):
    """No privacy state lives in memory: a fresh runtime (a restarted node process) reads the
    ledger file and composes on top of it."""
    _, cfg, arrays = runtime_and_config
    spec = simulated_node_data(cfg, 0)
    ident = NodeIdentity("node-0", tmp_path)
    r1 = NodeRuntime().train(request(cfg, arrays, 1), identity=ident, data=spec)
    r2 = NodeRuntime().train(request(cfg, arrays, 2), identity=ident, data=spec)
    assert r1.ok and r2.ok and r2.metrics["epsilon"] > r1.metrics["epsilon"]
    assert [e["round"] for e in r2.ledger] == [1, 2]
    r3 = NodeRuntime().train(request(cfg, arrays, 3), identity=ident, data=spec)
    assert r3.status == "refused"  # the 2-round plan is spent, across restarts


# -- node-side data protection (issue 9) --------------------------------------------------------


def capped_user_data(tmp_path):
    """A heavy user with 500 examples and 60 users with 2 each, real SST-2 sentences."""
    from fedllm.config import demo_data_dir
    from fedllm.data import read_table

    src = read_table(demo_data_dir() / "sst2_train_sample.tsv", text_column="sentence",
                     label_column="label", max_examples=620)
    users = ["heavy"] * 500 + [f"c{i}" for i in range(60) for _ in range(2)]
    path = tmp_path / "customers.tsv"
    path.write_text("customer\tsentence\tlabel\n" + "".join(
        f"{u}\t{t}\t{y}\n" for u, t, y in zip(users, src.texts, src.raw_labels, strict=True)),
        encoding="utf-8")
    return path


def test_user_cap_and_user_level_epsilon_in_the_reply(runtime_and_config, tmp_path):
    from fedllm.config import RedactionConfig
    from fedllm.node import NodeDataSpec
    from fedllm.privacy import group_privacy_bound

    rt, cfg, arrays = runtime_and_config
    spec = NodeDataSpec(str(capped_user_data(tmp_path)), "sentence", "label",
                        user_column="customer", max_examples_per_user=20,
                        redaction=RedactionConfig())
    reply = rt.train(request(cfg, arrays, 1), identity=NodeIdentity("n", tmp_path / "s"),
                     data=spec)
    assert reply.ok
    m = reply.metrics
    assert m["num_examples"] == 20 + 120  # the heavy user contributes 20 of its 500
    assert m["max_examples_per_user"] == 20 and m["num_users"] == 61
    assert (m["user_epsilon"], m["user_delta"]) == group_privacy_bound(m["epsilon"],
                                                                        m["delta"], 20)
    row = reply.record_fields()
    assert row["user_epsilon"] == pytest.approx(20 * m["epsilon"])
    assert set(row["redactions"]) == {"email", "phone", "url", "ip", "credit_card", "iban",
                                      "person"}


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_tampered_or_deleted_ledger_makes_the_node_refuse(runtime_and_config, tmp_path, damage):
    rt, cfg, arrays = runtime_and_config
    ident = NodeIdentity("node-0", tmp_path)
    spec = simulated_node_data(cfg, 0)
    assert rt.train(request(cfg, arrays, 1), identity=ident, data=spec).ok
    (sealed,) = tmp_path.glob("ledger-*.sealed")
    if damage == "flip":
        raw = bytearray(sealed.read_bytes())
        raw[40] ^= 0x01
        sealed.write_bytes(bytes(raw))
    else:
        sealed.unlink()
    reply = rt.train(request(cfg, arrays, 2), identity=ident, data=spec)
    assert reply.status == "refused" and reply.arrays == {}
    assert "refusing to train rather than restart from zero spent ε" in reply.reason
    assert ("not the latest version" if damage == "flip" else "was deleted") in reply.reason
    row = reply.record_fields()  # what the run store records for this node and round
    assert row["status"] == "refused" and row["reason"] == reply.reason
    assert "epsilon" not in row  # unknown, not zero




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


def test_local_steps_set_the_round_and_its_planned_sigma(runtime_and_config, tmp_path):
    """train.local_steps = 5 on a 54-example node at batch 30 (2 steps per epoch): the round
    takes 5 DP steps at q = 1/2, the ledger records them and σ is calibrated for 2 × 5."""
    from fedllm.privacy import plan_dp_sgd

    rt, base, arrays = runtime_and_config
    cfg = load_config(None, {"data.max_examples": 120, "federation.num_nodes": 2,
                             "federation.rounds": 2, "train.batch_size": 30,
                             "train.physical_batch_size": 30, "privacy.target_epsilon": 4.0,
                             "train.local_steps": 5})
    r1 = rt.train(request(cfg, arrays, 1), identity=NodeIdentity("node-0", tmp_path),
                  data=simulated_node_data(cfg, 0))
    plan = plan_dp_sgd(num_examples=54, batch_size=30, local_epochs=1, rounds=2,
                       target_epsilon=4.0, delta=1e-5, accountant="prv", local_steps=5)
    assert r1.ok and r1.metrics["steps"] == 5
    assert r1.metrics["noise_multiplier"] == pytest.approx(plan.noise_multiplier)
    assert [(e["round"], e["steps"]) for e in r1.ledger] == [(1, 5)]
    epochs = plan_dp_sgd(num_examples=54, batch_size=30, local_epochs=1, rounds=2,
                         target_epsilon=4.0, delta=1e-5, accountant="prv")
    assert epochs.steps_per_round == 2 and epochs.noise_multiplier < plan.noise_multiplier


def test_a_node_takes_its_batch_from_the_sampling_rate(runtime_and_config, tmp_path):
    """train.sample_rate: the node's logical batch is q × its examples (54 × 0.25 -> 14, so
    4 Poisson steps per epoch at q = 1/4), and its σ is planned at that q."""
    from fedllm.privacy import plan_dp_sgd

    rt, _, arrays = runtime_and_config
    cfg = load_config(None, {"data.max_examples": 120, "federation.num_nodes": 2,
                             "federation.rounds": 2, "train.sample_rate": 0.25,
                             "train.physical_batch_size": 30, "privacy.target_epsilon": 4.0,
                             "train.center_features": "off"})
    r = rt.train(request(cfg, arrays, 1), identity=NodeIdentity("node-0", tmp_path),
                 data=simulated_node_data(cfg, 0))
    plan = plan_dp_sgd(num_examples=54, batch_size=14, local_epochs=1, rounds=2,
                       target_epsilon=4.0, delta=1e-5, accountant="prv")
    assert r.ok and r.metrics["sample_rate"] == 0.25 == plan.sample_rate
    assert r.metrics["steps"] == 4 and r.metrics["noise_multiplier"] == plan.noise_multiplier


def test_logit_adjustment_takes_the_prior_from_the_release_under_dp(runtime_and_config,
                                                                     tmp_path, monkeypatch):
    """Under DP a node's label prior is the noisy counts of its own round-0 release (no data
    read beyond what is in its ε); without the release it trains plain cross-entropy and says
    so; without DP it uses its own labels. The real training runs; the spy only records the
    offset the node hands it."""
    import fedllm.node as node_module
    from fedllm.aggregate import released_counts
    from fedllm.protocol import PHASE_CENTER, STATS_KEY
    from fedllm.train import logit_adjustment

    offsets = []
    real = node_module.train_for_run

    def spy(*args, **kwargs):
        offsets.append(kwargs["logit_offset"])
        return real(*args, **kwargs)

    monkeypatch.setattr(node_module, "train_for_run", spy)
    rt, base, arrays = runtime_and_config
    cfg = load_config(None, {"data.max_examples": 120, "federation.num_nodes": 2,
                             "federation.rounds": 2, "train.batch_size": 30,
                             "train.physical_batch_size": 30, "privacy.target_epsilon": 4.0,
                             "train.logit_adjustment": 1.0})
    ident, spec = NodeIdentity("node-0", tmp_path), simulated_node_data(cfg, 0)
    zeros = {STATS_KEY: np.zeros((2, 385), np.float32)}
    r0 = rt.train(TrainRequest("run-a", 0, cfg, ("0", "1"), zeros, phase=PHASE_CENTER),
                  identity=ident, data=spec)
    r1 = rt.train(request(cfg, arrays, 1), identity=ident, data=spec)
    assert r0.ok and r1.ok and r1.metrics["logit_adjusted"] == 1.0
    counts = released_counts(r0.arrays[STATS_KEY], num_examples=54)
    np.testing.assert_array_equal(offsets[-1], logit_adjustment(counts, tau=1.0))
    assert not np.allclose(counts, np.round(counts))  # noisy: not the node's exact counts
    # no release of this run (the coordinator skipped it): plain cross-entropy, said
    skipped = rt.train(request(cfg, arrays, 1, run_id="run-s"),
                       identity=NodeIdentity("node-0", tmp_path / "s"), data=spec)
    assert skipped.ok and skipped.metrics["logit_adjusted"] == 0.0 and offsets[-1] is None
    # without DP: the node's own label counts (integers summing to its 54 examples)
    no_dp = load_config(None, {"data.max_examples": 120, "federation.num_nodes": 2,
                               "train.batch_size": 30, "train.physical_batch_size": 30,
                               "privacy.enabled": False, "privacy.allow_no_dp": True,
                               "train.logit_adjustment": 1.0})
    r = rt.train(request(no_dp, arrays, 1, run_id="run-n"),
                 identity=NodeIdentity("node-0", tmp_path / "n", allow_no_dp=True), data=spec)
    assert r.ok and r.metrics["logit_adjusted"] == 1.0
    own = np.exp(offsets[-1].astype(np.float64)) * (54 + 2) - 1  # undo the add-one smoothing
    np.testing.assert_allclose(own, np.round(own), atol=1e-3)
    assert round(own.sum()) == 54 and (own > 0).all()
    assert base.train.logit_adjustment == 0.0  # the default run is not adjusted
