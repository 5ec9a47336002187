import pytest

from fedllm.store import Store, StoreError


def make_run(store, run_id="r1"):
    store.create_run(run_id, name="t", mode="simulation", task="seq-cls", model_path="m",
                     num_rounds=2, num_nodes=2, dp_enabled=True, target_epsilon=8.0,
                     delta=1e-5, accountant="prv", secure_transport=False, config={"seed": 1})


def test_run_lifecycle_and_status_shape(tmp_path):
    db = tmp_path / "s.db"
    with Store(db) as s:
        make_run(s)
        s.update_run("r1", model_bytes=1000, adapter_bytes=10, label_names=("0", "1"))
        s.record_round("r1", 0, started_at=0.0, num_nodes=0, metrics={"accuracy": 0.5}, nodes=[])
        s.record_round("r1", 1, started_at=1.0, num_nodes=1, metrics={"accuracy": 0.7}, nodes=[
            {"node_id": "node-0", "status": "ok", "num_examples": 10, "epsilon": 1.5,
             "delta": 1e-5, "update_bytes": 10},
            {"node_id": "node-1", "status": "refused", "reason": "budget", "epsilon": 7.9}])
        s.finish_run("r1", "finished")
    with Store(db, read_only=True) as s:
        run = s.get_run("latest")
        assert run["run_id"] == "r1" and run["state"] == "finished"
        assert run["label_names"] == ["0", "1"] and run["config"] == {"seed": 1}
        assert [r["round"] for r in run["rounds"]] == [0, 1]
        n0 = run["rounds"][1]["nodes"][0]
        assert (n0["node_id"], n0["epsilon"], n0["update_bytes"]) == ("node-0", 1.5, 10)
        assert run["rounds"][1]["nodes"][1]["reason"] == "budget"
        (listed,) = s.list_runs()
        assert listed["max_epsilon"] == 7.9 and listed["final_metrics"] == {"accuracy": 0.7}
        with pytest.raises(StoreError, match="read-only"):
            s.add_event("r1", "info", "x")


def test_unknown_run_and_empty_store(tmp_path):
    with Store(tmp_path / "s.db") as s:
        with pytest.raises(StoreError, match="no runs"):
            s.get_run("latest")
        make_run(s)
        with pytest.raises(StoreError, match="unknown run 'nope'"):
            s.get_run("nope")
    with pytest.raises(StoreError, match="not found"):
        Store(tmp_path / "missing.db", read_only=True)


def test_old_store_gains_new_columns(tmp_path):
    """A store written before `secure_aggregation` existed opens and reads as False."""
    import sqlite3

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE runs (run_id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL,"
        " created_at REAL NOT NULL, finished_at REAL, mode TEXT NOT NULL, task TEXT NOT NULL,"
        " model_path TEXT NOT NULL, model_bytes INTEGER, adapter_bytes INTEGER,"
        " num_rounds INTEGER NOT NULL, num_nodes INTEGER NOT NULL, dp_enabled INTEGER NOT NULL,"
        " target_epsilon REAL, delta REAL, accountant TEXT,"
        " secure_transport INTEGER NOT NULL DEFAULT 1, label_names TEXT,"
        " config_json TEXT NOT NULL, adapter_path TEXT, error TEXT);"
        "INSERT INTO runs (run_id, name, state, created_at, mode, task, model_path, num_rounds,"
        " num_nodes, dp_enabled, config_json) VALUES"
        " ('r1', 'old', 'finished', 1.0, 'simulation', 'seq-cls', 'm', 1, 1, 1, '{}');")
    conn.commit()
    conn.close()
    with Store(db) as store:
        assert store.get_run("r1")["secure_aggregation"] is False


def test_node_data_protection_is_stored_as_counts(tmp_path):
    """Issue 9: user-level ε, the cap, users and redaction counts per node and round."""
    from fedllm.protocol import TrainReply

    reply = TrainReply(node="node-0", status="ok", metrics={
        "num_examples": 140, "epsilon": 0.4, "user_epsilon": 8.0, "user_delta": 0.02,
        "max_examples_per_user": 20, "num_users": 61, "redacted_email": 3,
        "redacted_person": 0})
    with Store(tmp_path / "s.db") as s:
        make_run(s)
        s.record_round("r1", 1, started_at=0.0, num_nodes=1, metrics={},
                       nodes=[reply.record_fields(), {"node_id": "node-1", "status": "ok"}])
    with Store(tmp_path / "s.db", read_only=True) as s:
        n0, n1 = s.get_run("r1")["rounds"][0]["nodes"]
    assert (n0["user_epsilon"], n0["user_delta"], n0["max_examples_per_user"],
            n0["num_users"]) == (8.0, 0.02, 20, 61)
    assert n0["redactions"] == {"email": 3, "person": 0}
    assert n1["redactions"] is None and n1["user_epsilon"] is None  # unknown, not 0


def test_evaluations_and_bias_round_trip_and_old_store(tmp_path):
    import sqlite3

    from fedllm.store import Store

    with Store(tmp_path / "s.db") as s:
        s.create_run("r", name="n", mode="simulation", task="seq-cls", model_path="m",
                     num_rounds=1, num_nodes=1, dp_enabled=True, target_epsilon=1.0,
                     delta=1e-5, accountant="prv", secure_transport=False, config={})
        s.record_evaluations("r", 1, evaluations=[
            {"source": "node", "node_id": "node-0", "num_examples": 4,
             "metrics": {"accuracy": 0.5, "roc_auc": None}, "counts": {"num_examples": 4}}],
            bias=[{"source": "federated", "metric": "accuracy_gap", "value": None,
                   "note": "needs 2 groups"},
                  {"source": "probe", "metric": "probe_score_gap", "group": "names",
                   "value": 0.3, "threshold": 0.1, "flagged": True}])
        ev = s.get_evaluations("r")
        assert ev[0]["node_id"] == "node-0" and ev[0]["metrics"]["roc_auc"] is None
        b = {x["metric"]: x for x in s.get_bias("r")}
        assert b["accuracy_gap"]["value"] is None and b["accuracy_gap"]["note"]
        assert b["probe_score_gap"]["flagged"] and b["probe_score_gap"]["group"] == "names"
    # a store written before these tables existed reads as "no evaluations", not a crash
    old = tmp_path / "old.db"
    with Store(old) as s:
        s.create_run("r", name="n", mode="simulation", task="seq-cls", model_path="m",
                     num_rounds=1, num_nodes=1, dp_enabled=True, target_epsilon=1.0,
                     delta=1e-5, accountant="prv", secure_transport=False, config={})
    with sqlite3.connect(old) as c:
        c.execute("DROP TABLE evaluations")
        c.execute("DROP TABLE bias_metrics")
    with Store(old, read_only=True) as s:
        assert s.get_evaluations("r") == [] and s.get_bias("r") == []
