"""The coordinator's round loop with real nodes in process (fedllm.local): resume, failing
nodes, budget stops with zero overrun, update rejection, central DP, the audit chain."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedllm.audit import verify_chain
from fedllm.config import load_config
from fedllm.coordinator import Coordinator, RunFailed, unpack_checkpoint
from fedllm.local import LocalTransport
from fedllm.node import simulated_state_dir
from fedllm.privacy import plan_dp_sgd
from fedllm.protocol import TrainReply, state_digest, unpack_state
from fedllm.store import CENTRAL_LEDGER_ID, Store

TINY = {"data.max_examples": 120, "data.max_eval_examples": 40, "train.batch_size": 20,
        "train.physical_batch_size": 20, "federation.num_nodes": 3, "federation.rounds": 2,
        "privacy.target_epsilon": 4.0}


def tiny_config(**over):
    return load_config(None, {**TINY, **over})


def run(home, cfg, transport, run_id="run-x", resume=False):
    with Store(home / "fedllm.db") as store:
        return Coordinator(cfg, store, run_id=run_id, home=home, resume=resume).run(transport)


def stored(home, run_id="run-x"):
    with Store(home / "fedllm.db", read_only=True) as store:
        return store.get_run(run_id), store.checkpoint(run_id), store.ledger(run_id)


def same_secrets(homes, run_id, n):
    """Give the virtual nodes of two homes the same secret (it seeds their DP noise), so two
    runs can be compared exactly."""
    for pid in range(n):
        secret = bytes([pid + 1]) * 32
        for home in homes:
            d = simulated_state_dir(home, run_id, pid)
            d.mkdir(parents=True, exist_ok=True)
            (d / "node.secret").write_bytes(secret)


class CrashAt(LocalTransport):
    """Dies (like a killed coordinator) in round ``rnd`` after ``after`` nodes trained."""

    def __init__(self, *a, rnd, after, **kw):
        super().__init__(*a, **kw)
        self.crash_round, self.after, self.done = rnd, after, 0

    def train(self, requests, *, timeout, on_reply):
        out = {}
        for nid, req in requests.items():
            if req.round == self.crash_round and self.done >= self.after:
                raise KeyboardInterrupt  # the process is gone mid-round
            out[nid] = self.train_one(nid, req)
            if req.round == self.crash_round:
                self.done += 1
        return out


@pytest.mark.parametrize("server", [{}, {"server_optimizer.kind": "fedadam",
                                         "server_optimizer.learning_rate": 0.01},
                                     {"server_optimizer.ema_decay": 0.5}],
                         ids=["fedavg", "fedadam", "ema"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, server):
    """Also with a server optimizer: its moments come back from the round's checkpoint (a
    fresh Adam state after the resume would step differently), and so does the moving
    average of the global adapter, which is then the run's output."""
    cfg = tiny_config(**{"federation.rounds": 3, **server})
    a, b = tmp_path / "a", tmp_path / "b"
    same_secrets([a, b], "run-x", 3)
    run(a, cfg, LocalTransport(a, 3))
    with pytest.raises(KeyboardInterrupt):
        run(b, cfg, CrashAt(b, 3, rnd=2, after=1))
    info, ck, _ = stored(b)
    assert info["state"] == "interrupted" and ck[0] == 1  # round 1 kept
    run(b, cfg, LocalTransport(b, 3), resume=True)
    (_, cka, la), (ib, ckb, lb) = stored(a), stored(b)
    assert ib["state"] == "finished" and ckb[0] == 3
    (xa, sa), (xb, sb) = unpack_checkpoint(cka[1]), unpack_checkpoint(ckb[1])
    for k in xa:
        np.testing.assert_allclose(xa[k], xb[k], rtol=0, atol=1e-6)
    assert sa.step == sb.step == (3 if "server_optimizer.kind" in server else 0)
    for k in sa.v:
        np.testing.assert_allclose(sa.v[k], sb.v[k], rtol=1e-5, atol=1e-12)
    assert set(sa.ema) == set(sb.ema) == (set(xa) if "server_optimizer.ema_decay" in server
                                          else set())
    for k in sa.ema:
        np.testing.assert_allclose(sa.ema[k], sb.ema[k], rtol=0, atol=1e-6)
    # The output (saved adapter, the run's final digest) is the average when one is kept.
    output = sa.ema or xa
    with Store(a / "fedllm.db", read_only=True) as store:
        done = [e.payload for e in store.audit_entries("run-x") if e.event == "run_finished"]
    assert done[0]["adapter_sha256"] == state_digest(output)
    saved = load_file(str(Path(stored(a)[0]["adapter_path"]) / "adapter_model.safetensors"))
    assert set(saved) == set(output)
    for k in output:
        np.testing.assert_allclose(saved[k], output[k], rtol=0, atol=1e-6)
    if sa.ema:
        assert state_digest(sa.ema) != state_digest(xa)
    # node-1 trained round 2 before the crash: it re-sent that release, ε counted once
    assert [(e["node_id"], e["entry_round"], e["steps"]) for e in la] == \
        [(e["node_id"], e["entry_round"], e["steps"]) for e in lb]
    assert [e["epsilon"] for e in la] == pytest.approx([e["epsilon"] for e in lb])
    replayed = [n for r in ib["rounds"] if r["round"] == 2 for n in r["nodes"]]
    assert len(replayed) == 3
    with Store(b / "fedllm.db", read_only=True) as store:
        events = [e.event for e in store.audit_entries("run-x")]
    assert "run_interrupted" in events and "run_resumed" in events
    assert verify_chain(Store(b / "fedllm.db", read_only=True).audit_entries("run-x")).ok
    # 36 examples a node at σ = 4: the centre's noise (norm ~1.9) would drown any mean. The
    # public counts say so before anything is released: no node spends ε on round 0 and the
    # rounds get the whole budget (σ planned without the release)
    fc = ib["feature_center"]
    assert fc["used"] is False and fc["released"] is False and fc["nodes"] == 3
    assert fc["examples"] == 108 and fc["expected_noise_norm"] == pytest.approx(
        np.sqrt(2 * 384 * 3) * 4.0 / (np.sqrt(0.9) * 108), rel=1e-5)
    assert "could never be used" in fc["reason"] and fc["head_init"] is False
    assert any("release not asked for" in e["message"] and "no node spent ε" in e["message"]
               for e in ib["events"])
    assert [e["entry_round"] for e in lb if e["node_id"] == "node-0"] == [1, 2, 3]
    assert ib["rounds"][0]["nodes"] == []
    plan = plan_dp_sgd(num_examples=36, batch_size=cfg.train.batch_size, local_epochs=1,
                       rounds=3, target_epsilon=cfg.privacy.target_epsilon, delta=1e-5,
                       accountant="prv")
    assert [e["noise_multiplier"] for e in lb] == pytest.approx([plan.noise_multiplier] * 9)
    assert lb[-1]["epsilon"] == pytest.approx(cfg.privacy.target_epsilon, abs=0.05)


class Faulty(LocalTransport):
    """Some nodes fail: raise inside the node, vanish (no reply), or time out."""

    def __init__(self, *a, faults, **kw):
        super().__init__(*a, **kw)
        self.faults = faults  # nid -> "raise" | "exit" | "timeout"

    def train(self, requests, *, timeout, on_reply):
        out = {}
        for nid, req in requests.items():
            kind = self.faults.get(nid)
            if kind == "raise":
                out[nid] = "node error: RuntimeError('disk on fire')"
            elif kind == "timeout":
                out[nid] = f"no reply within the round timeout ({timeout:g} s)"
            elif kind is None:
                out[nid] = self.train_one(nid, req)
            # "exit": the node is gone; no entry at all
        return out


def test_round_completes_with_the_nodes_that_replied(tmp_path):
    cfg = tiny_config(**{"data.max_examples": 400, "federation.num_nodes": 10,
                         "federation.rounds": 1, "federation.min_nodes": 7})
    faults = {2: "raise", 5: "exit", 9: "timeout"}
    summary = run(tmp_path, cfg, Faulty(tmp_path, 10, faults=faults))
    (r1,) = summary.rounds[1:]
    assert r1.num_aggregated == 7
    statuses = sorted(n["status"] for n in r1.nodes)
    assert statuses == ["failed"] * 3 + ["ok"] * 7
    assert {n["reason"] for n in r1.nodes if n["status"] == "failed"} >= {
        "node error: RuntimeError('disk on fire')", "no reply before the round timeout"}


def test_too_many_failures_fail_the_run_after_retries(tmp_path):
    cfg = tiny_config(**{"data.max_examples": 400, "federation.num_nodes": 10,
                         "federation.rounds": 2, "federation.min_nodes": 8,
                         "federation.max_round_retries": 1})
    faults = {1: "raise", 2: "exit", 3: "timeout"}
    with pytest.raises(RunFailed, match=r"round 1: fewer than federation.min_nodes=8 .* 2 "):
        run(tmp_path, cfg, Faulty(tmp_path, 10, faults=faults))
    info, _, _ = stored(tmp_path)
    assert info["state"] == "failed" and "min_nodes=8" in info["error"]
    assert [r["round"] for r in info["rounds"]] == [0, 1]  # round 0 and the failed attempts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_overrun_with_random_small_budgets(tmp_path, seed):
    rnd = random.Random(seed)
    cfg = tiny_config(**{"federation.rounds": 4, "privacy.target_epsilon": 4.0, "seed": seed})
    limits = {pid: rnd.uniform(1.5, 5.0) for pid in range(3)}
    summary = run(tmp_path, cfg, LocalTransport(tmp_path, 3, epsilon_limits=limits))
    info, _, ledger = stored(tmp_path)
    for r in info["rounds"]:
        for n in r["nodes"]:
            pid = int(n["node_id"].split("-")[1])
            assert n["epsilon"] is None or n["epsilon"] <= limits[pid] + 1e-9
            if n["status"] == "refused":
                assert "budget exhausted" in n["reason"] and n["steps"] == 0
    for e in ledger:
        assert e["epsilon"] <= limits[int(e["node_id"].split("-")[1])] + 1e-9
    # every refusing node's own ledger file still holds what it spent
    for pid in range(3):
        files = list(simulated_state_dir(tmp_path, "run-x", pid).glob("ledger-*.sealed"))
        spent = [e for e in ledger if e["node_id"] == f"node-{pid}"]
        assert bool(files) == bool(spent)
    if summary.stopped_early:
        assert "privacy budget exhausted" in summary.stopped_early


def test_the_run_stops_cleanly_when_every_node_is_out_of_budget(tmp_path):
    cfg = tiny_config(**{"federation.rounds": 3, "privacy.target_epsilon": 4.0})
    # limits that allow exactly one round of the 3-round plan
    summary = run(tmp_path, cfg, LocalTransport(tmp_path, 3, epsilon_limits={
        0: 2.5, 1: 2.5, 2: 2.5}))
    assert summary.state == "finished" and summary.stopped_early
    assert "privacy budget exhausted at node-0, node-1, node-2" in summary.stopped_early
    info, _, _ = stored(tmp_path)
    assert any("run stopped before round" in e["message"] for e in info["events"])


class Corrupting(LocalTransport):
    def __init__(self, *a, how, **kw):
        super().__init__(*a, **kw)
        self.how = how  # nid -> "nan" | "shape" | "norm"

    def train(self, requests, *, timeout, on_reply):
        out = super().train(requests, timeout=timeout, on_reply=on_reply)
        if any(r.phase == "count" for r in requests.values()):
            return out  # the counts before round 0 carry no update to corrupt
        for nid, kind in self.how.items():
            rep = out[nid]
            assert isinstance(rep, TrainReply)
            name = sorted(rep.arrays)[0]
            a = rep.arrays[name].copy()
            if kind == "nan":
                a.flat[0] = np.nan
            elif kind == "shape":
                a = a[:-1]
            else:
                a = a + 100.0
            rep.arrays[name] = a
        return out


def test_nan_wrong_shape_and_oversize_updates_are_rejected(tmp_path):
    # σ_c = 1 (ε 16): 40 examples a node give a release that could help, so it is asked for
    cfg = tiny_config(**{"data.max_examples": 200, "federation.num_nodes": 5,
                         "federation.rounds": 1, "federation.max_update_norm": 50.0,
                         "privacy.center_noise_multiplier": 1.0,
                         "privacy.target_epsilon": 16.0})
    summary = run(tmp_path, cfg, Corrupting(tmp_path, 5, how={2: "nan", 3: "shape",
                                                               4: "norm"}))
    rows = {n["node_id"]: n for n in summary.rounds[1].nodes}
    assert rows["node-0"]["status"] == rows["node-4"]["status"] == "ok"
    assert "NaN" in rows["node-1"]["reason"]
    assert "shape" in rows["node-2"]["reason"]
    assert "exceeds the bound" in rows["node-3"]["reason"]
    assert summary.rounds[1].num_aggregated == 2
    with Store(tmp_path / "fedllm.db", read_only=True) as store:
        rejected = [(e.payload["round"], e.payload["node"], e.payload["reason"])
                    for e in store.audit_entries("run-x") if e.event == "update_rejected"]
    assert sorted(r[:2] for r in rejected) == [(r, f"node-{i}") for r in (0, 1) for i in (1, 2, 3)]
    # round 0: their feature means went the same way (a mean no honest release can have too)
    centre = {node: why for rnd, node, why in rejected if rnd == 0}
    assert "NaN" in centre["node-1"] and "shape" in centre["node-2"]
    assert "exceeds the bound" in centre["node-3"]


def test_central_dp_is_applied_and_accounted(tmp_path):
    from fedllm.model import is_lora_a, load_run_model
    from fedllm.privacy import compute_epsilon

    # With lora.freeze_a (FFA-LoRA), A is nobody's to train: the release keeps it at the shared
    # initialisation exactly, instead of adding noise to it each round; B gets the noise.
    cfg = tiny_config(**{"central_dp.enabled": True, "central_dp.noise_multiplier": 1.0,
                         "central_dp.clip_norm": 0.05, "federation.rounds": 2,
                         "lora.freeze_a": True})
    run(tmp_path, cfg, LocalTransport(tmp_path, 3))
    _, ck, ledger = stored(tmp_path)
    init, final = load_run_model(cfg, ("0", "1")).adapter_state(), unpack_state(ck[1])
    a_keys = [k for k in init if is_lora_a(k)]
    b_keys = [k for k in init if ".lora_B." in k]
    assert a_keys and len(b_keys) == len(a_keys)
    assert all(np.array_equal(final[k], init[k]) for k in a_keys)
    assert all(np.abs(final[k] - init[k]).max() > 0 for k in b_keys)
    central = [e for e in ledger if e["node_id"] == CENTRAL_LEDGER_ID]
    assert [e["entry_round"] for e in central] == [1, 2] and central[0]["kind"] == "node"
    # q = 3/3 = 1, σ = 1, two releases: ε of a 2-fold Gaussian mechanism
    assert central[1]["epsilon"] == pytest.approx(
        compute_epsilon([(1.0, 1.0, 2)], delta=1e-3, accountant="rdp"))


def test_audit_chain_detects_one_changed_byte(tmp_path):
    cfg = tiny_config(**{"federation.rounds": 1})
    run(tmp_path, cfg, LocalTransport(tmp_path, 3))
    db = tmp_path / "fedllm.db"
    with Store(db, read_only=True) as store:
        entries = store.audit_entries("run-x")
    assert verify_chain(entries).ok and len(entries) >= 4
    target = entries[2]
    conn = sqlite3.connect(db)
    text = target.payload_json
    i = text.index(":") + 1  # change one character of the payload
    altered = text[:i] + ("1" if text[i] != "1" else "2") + text[i + 1:]
    conn.execute("UPDATE audit_log SET payload_json = ? WHERE run_id = 'run-x' AND seq = ?",
                 (altered, target.seq))
    conn.commit()
    conn.close()
    with Store(db, read_only=True) as store:
        check = verify_chain(store.audit_entries("run-x"))
    assert not check.ok and check.first_bad_seq == target.seq and "payload" in check.reason


class Recording(CrashAt):
    """Keeps every request's centre and adapter, and the round-0 (class-statistics) replies."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.centers, self.released, self.sent, self.phases = {}, {}, {}, {}

    def train(self, requests, *, timeout, on_reply):
        out = super().train(requests, timeout=timeout, on_reply=on_reply)
        for nid, req in requests.items():
            self.centers.setdefault(req.round, []).append(req.feature_center)
            self.sent.setdefault(req.round, []).append(req.arrays)
            self.phases.setdefault(req.round, []).append(req.phase)
            if req.phase == "center":
                self.released[nid] = out[nid]
        return out


def test_class_stats_centre_and_start_the_head_and_survive_a_resume(tmp_path):
    """train.center_features: every node releases DP class statistics in round 0 (in its
    ledger); their example-weighted mean gives the run's centre, stored with the run and sent
    in every train request, also after a resume, and the head round 1 starts from (the class
    means' head, train.head_init); σ is calibrated around the release (ε ends at the target).
    200 examples a node need σ = 0.5 (ε 10 alone) for usable class means."""
    from fedllm.aggregate import estimate_class_stats, fedavg
    from fedllm.protocol import STATS_KEY

    cfg = tiny_config(**{"data.max_examples": 600, "privacy.center_noise_multiplier": 0.5,
                         "privacy.target_epsilon": 16.0})
    first = Recording(tmp_path, 3, rnd=2, after=0)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, cfg, first)
    second = Recording(tmp_path, 3, rnd=-1, after=0)
    run(tmp_path, cfg, second, resume=True)
    info, _, ledger = stored(tmp_path)
    fc = info["feature_center"]
    assert fc["used"] is True and fc["nodes"] == 3 and fc["noise_multiplier"] == 0.5
    assert fc["head_init"] is True
    assert fc["expected_noise_norm"] < 0.5 * fc["signal_norm"]
    with Store(tmp_path / "fedllm.db", read_only=True) as store:
        center = np.asarray(store.feature_center_vector("run-x"), np.float32)
        audit = {e.event: e.payload for e in store.audit_entries("run-x")}
    replies = [(r.arrays, r.metrics["num_examples"]) for r in first.released.values()]
    est = estimate_class_stats(fedavg(replies)[STATS_KEY], nodes=3,
                               examples=int(sum(n for _, n in replies)), noise_multiplier=0.5)
    np.testing.assert_allclose(center, est.center, atol=1e-6)
    assert fc["spread_signal"] == pytest.approx(est.spread_signal, abs=1e-6)
    # Round 1's global adapter has the class means' head, in the uncentred wire form.
    w, b = est.head()
    start = first.sent[1][0]
    (wkey,) = [k for k in start if k.endswith("head.weight")]
    (bkey,) = [k for k in start if k.endswith("head.bias")]
    np.testing.assert_allclose(start[wkey], w, rtol=1e-5)
    np.testing.assert_allclose(start[bkey], b - w @ est.center, rtol=1e-4, atol=1e-4)
    assert info["rounds"][0]["metrics"]["accuracy"] > 0.6  # the release alone classifies
    assert fc["examples"] == sum(n for _, n in replies) and fc["norm"] == pytest.approx(
        float(np.linalg.norm(center)), abs=1e-5)
    assert audit["feature_center"]["used"] is True and audit["feature_center"]["center_sha256"]
    # round 0: the public counts (600 examples at σ = 0.5: noise norm 0.057, it can help),
    # then the release itself, computed uncentred
    assert first.phases[0] == ["count"] * 3 + ["center"] * 3
    assert first.centers[0] == [None] * 6
    for c in first.centers[1] + second.centers[2]:  # before and after the resume
        np.testing.assert_array_equal(c, center)
    round0 = info["rounds"][0]["nodes"]
    assert [(n["status"], n["noise_multiplier"], n["sample_rate"], n["steps"])
            for n in round0] == [("ok", 0.5, 1.0, 1)] * 3
    for pid in range(3):
        mine = [e for e in ledger if e["node_id"] == f"node-{pid}"]
        assert [e["entry_round"] for e in mine] == [0, 1, 2]
        assert mine[0]["noise_multiplier"] == 0.5 and mine[0]["sample_rate"] == 1.0
        assert 15.9 < mine[-1]["epsilon"] <= 16.0


def test_a_centre_release_that_spends_the_budget_fails_before_anything_runs(tmp_path):
    cfg = tiny_config(**{"privacy.center_noise_multiplier": 0.3})
    with pytest.raises(RunFailed, match=r"class-statistics release .* alone spends ε = .* ≥ the "
                                        r"limit 4"):
        run(tmp_path, cfg, LocalTransport(tmp_path, 3))
    info, ck, ledger = stored(tmp_path)
    assert info["state"] == "failed" and ck is None and ledger == []
    assert not list(tmp_path.glob("runs/run-x/nodes/*/ledger-*"))
