"""`fedllm privacy`, `audit`, `run --dry-run` and `node reset-ledger` on a real run."""

from __future__ import annotations

import json
import sqlite3

from fedllm.privacy import NodeLedger
from tests.conftest import TINY_RUN_ARGS, run_cli, run_cli_many


def test_privacy_ledger_verifies_against_dp_accounting(tiny_run):
    proc = run_cli(["privacy", tiny_run["run_id"], "--json", "--verify"], tiny_run["home"])
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert sorted(rep["nodes"]) == ["node-0", "node-1", "node-2"]
    for node in rep["nodes"].values():
        # no round 0: the tiny nodes' public counts showed the class-statistics release could
        # never be used, so it was not asked for (the q = 1 release's ε against the analytic
        # Gaussian mechanism is pinned in tests/test_privacy.py)
        assert [e["round"] for e in node["entries"]] == [1, 2]
        for e in node["entries"]:
            assert e["accountant"] == "prv" and e["delta"] == 1e-5 and e["steps"] > 0
            assert abs(e["epsilon"] - e["epsilon_dp_accounting"]) <= 0.02 * e["epsilon"]
            assert e["epsilon"] == e["epsilon_recomputed"]
        assert node["epsilon"] <= 8.0
    table = run_cli(["privacy", tiny_run["run_id"], "--verify"], tiny_run["home"])
    assert table.returncode == 0 and "node-2: example-level DP-SGD" in table.stdout
    assert "largest relative difference to dp-accounting" in table.stdout


def test_audit_verify_and_show(tiny_run, tmp_path):
    home, run_id = tiny_run["home"], tiny_run["run_id"]
    ok = run_cli(["audit", "verify", run_id], home)
    assert ok.returncode == 0 and "verifies" in ok.stdout, ok.stdout + ok.stderr
    shown = json.loads(run_cli(["audit", "show", run_id, "--json"], home).stdout)
    events = [e["event"] for e in shown]
    assert events[0] == "run_started" and events[-1] == "run_finished"
    assert events.count("round_completed") == 3  # rounds 0, 1, 2
    # alter one byte of one entry in a copy of the store: verify fails at that entry
    copy = tmp_path / "home"
    copy.mkdir()
    src = sqlite3.connect(home / "fedllm.db")
    dst = sqlite3.connect(copy / "fedllm.db")
    src.backup(dst)
    src.close()
    seq = shown[3]["seq"]
    dst.execute("UPDATE audit_log SET event = event || 'x' WHERE run_id = ? AND seq = ?",
                (run_id, seq))
    dst.commit()
    dst.close()
    bad = run_cli(["audit", "verify", run_id], copy)
    assert bad.returncode == 1 and f"FAILS at entry {seq}" in bad.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    # Three independent dry runs (default; class statistics at σ = 1; at σ = 0.3), two at a
    # time: each is mostly σ calibration in its own process.
    variants = [["--json"], ["--json", "-s", "privacy.center_noise_multiplier=1"],
                ["-s", "privacy.center_noise_multiplier=0.3"]]
    proc, planned_proc, bad = run_cli_many(
        [["run", *TINY_RUN_ARGS, "--dry-run", *extra] for extra in variants], tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert len(plan["nodes"]) == 3 and plan["target_epsilon"] == 8
    assert plan["trains"] == ["lora", "head"]
    for n in plan["nodes"]:
        eps = n["projected_epsilon"]
        assert len(eps) == 2 and eps[0] < eps[1] <= 8.0 and n["calibrated"]
        assert eps[1] > 7.5  # calibrated for the whole run, not per round
    # the tiny nodes are too small for the round-0 class-statistics release at σ = 4: the plan
    # says it will not be asked for, and the projected ε has none of it
    fc = plan["feature_center"]
    assert (fc["noise_multiplier"], fc["sample_rate"], fc["steps"]) == (4.0, 1.0, 1)
    assert abs(fc["epsilon"] - 0.928) < 2e-3 and fc["asked"] is False
    # at σ = 1 it could help: it is in the plan, and in the projected ε (σ leaves room for it)
    assert planned_proc.returncode == 0, planned_proc.stderr
    planned = json.loads(planned_proc.stdout)
    assert planned["feature_center"]["asked"] is True
    for n, m in zip(plan["nodes"], planned["nodes"], strict=True):
        assert m["noise_multiplier"] > n["noise_multiplier"]
        assert m["projected_epsilon"][0] > planned["feature_center"]["epsilon"] > 4.0
    assert not (tmp_path / "fedllm.db").exists()
    # a release that alone would spend the budget is refused before anything starts
    assert bad.returncode == 2 and "class-statistics release" in bad.stderr + bad.stdout
    assert "alone spends ε" in bad.stderr + bad.stdout


def test_reset_ledger_needs_reason_and_confirmation_and_keeps_history(tiny_run, tmp_path):
    import shutil

    src = tiny_run["home"] / "runs" / tiny_run["run_id"] / "nodes" / "node-0"
    state = tmp_path / "node-0"
    shutil.copytree(src, state)
    from fedllm.sealed import SealedDir, load_key

    (path,) = state.glob("ledger-*.sealed")

    def read():
        box = SealedDir(state, load_key(state / "node.key"))
        return NodeLedger.from_json(box.read(path.name).decode())

    before = read()
    assert before.epsilon() > 0
    no = run_cli(["node", "reset-ledger", "--state-dir", str(state), "--reason", "new data"],
                 tmp_path)
    assert no.returncode == 2 and "--yes" in no.stderr
    yes = run_cli(["node", "reset-ledger", "--state-dir", str(state), "--reason",
                   "data replaced", "--yes"], tmp_path)
    assert yes.returncode == 0, yes.stderr
    after = read()
    assert after.epsilon() == 0 and after.entries == []
    (rec,) = after.resets
    assert rec["reason"] == "data replaced" and len(rec["entries"]) == len(before.entries)
    assert rec["epsilon_before"] == before.epsilon()
