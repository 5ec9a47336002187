"""Every dashboard page, rendered with Streamlit's AppTest over real run stores: the numbers shown
must be the store's (the tiny real run from tests/conftest.py, and a synthetic store)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dashboard.common import FIRST_RUN, PICKER_KEY, RUN_KEY

from .conftest import PAGES, Open


def _texts(at) -> str:  # noqa: ANN001 - AppTest
    parts = [e.value for kind in ("title", "header", "subheader", "markdown", "caption", "info",
                                  "warning", "error", "success") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def _metrics(at) -> dict[str, str]:  # noqa: ANN001
    return {m.label: m.value for m in at.metric}


def _frame_with(at, column: str):  # noqa: ANN001, ANN202
    frames = [d.value for d in at.dataframe if column in d.value.columns]
    assert frames, f"no table with column {column!r}"
    return frames[0]


def _last_eps(status: dict) -> dict[str, float]:
    last: dict[str, float] = {}
    for rd in status["rounds"]:
        for n in rd["nodes"]:
            if n["epsilon"] is not None:
                last[n["node_id"]] = n["epsilon"]
    return last


# -- tiny real run ------------------------------------------------------------------------------

def test_runs_page(tiny_run: dict, open_page: Open) -> None:
    status = tiny_run["status"]
    at = open_page(tiny_run["home"], "runs")
    assert at.title[0].value == "Runs"
    table = _frame_with(at, "Run ID")
    row = table[table["Run ID"] == tiny_run["run_id"]].iloc[0]
    final = status["rounds"][-1]["metrics"]
    assert row["Final accuracy"] == final["accuracy"]
    assert row["Max ε"] == max(_last_eps(status).values())
    assert row["Rounds done"] == status["rounds"][-1]["round"] == status["num_rounds"]
    assert row["Nodes"] == status["num_nodes"]
    assert row["State"] == "finished" and row["DP"] == "on"
    assert "Final accuracy" in table.columns and "Final perplexity" not in table.columns
    m = _metrics(at)
    assert m["Final accuracy"] == f"{final['accuracy']:.4f}"
    assert m["Rounds done"] == f"{status['num_rounds']} / {status['num_rounds']}"
    assert at.session_state[RUN_KEY] == tiny_run["run_id"]
    assert at.sidebar.selectbox[0].value == tiny_run["run_id"]


def test_utility_page(tiny_run: dict, open_page: Open) -> None:
    status = tiny_run["status"]
    at = open_page(tiny_run["home"], "utility")
    assert at.title[0].value == "Utility"
    final = status["rounds"][-1]["metrics"]
    m = _metrics(at)
    assert m["Final accuracy"] == f"{final['accuracy']:.4f}"
    assert m["Final loss"] == f"{final['loss']:.4f}"
    assert m["Final f1 (macro)"] == f"{final['f1_macro']:.4f}"
    assert m["Rounds recorded"] == f"{status['num_rounds']} / {status['num_rounds']}"
    per_round = _frame_with(at, "accuracy")
    assert list(per_round["round"]) == [rd["round"] for rd in status["rounds"]]
    for key in ("loss", "accuracy", "f1_macro", "f1_weighted"):
        assert list(per_round[key]) == [rd["metrics"][key] for rd in status["rounds"]]
    # loss, accuracy/F1, per-node train loss
    assert len(at.get("vega_lite_chart")) == 3
    assert tiny_run["run_id"] in _texts(at)


def test_privacy_page(tiny_run: dict, open_page: Open) -> None:
    status = tiny_run["status"]
    at = open_page(tiny_run["home"], "privacy")
    assert at.title[0].value == "Privacy budget"
    assert status["dp_enabled"] and not status["secure_transport"]
    assert not at.error  # DP was on
    assert len(at.warning) == 2
    assert "No secure aggregation." in at.warning[0].value
    # the tiny run's nodes are too small for the feature centre: their public counts showed
    # it before anything was released, and the page says no node spent ε on it
    assert status["feature_center"]["used"] is False
    assert status["feature_center"]["released"] is False
    assert "class statistics (σ = 4.0000) were not asked for: the nodes' public counts" \
        in at.warning[1].value and "No node spent ε on them" in at.warning[1].value
    table = _frame_with(at, "ε spent (last recorded)").set_index("Node")
    last = _last_eps(status)
    assert sorted(table.index) == sorted(last) and len(last) == status["num_nodes"]
    last_nodes = {n["node_id"]: n for n in status["rounds"][-1]["nodes"]}
    for node, eps in last.items():
        assert table.loc[node, "ε spent (last recorded)"] == eps
        assert table.loc[node, "ε limit"] == last_nodes[node]["epsilon_limit"]
        assert table.loc[node, "Noise multiplier σ"] == last_nodes[node]["noise_multiplier"]
        assert table.loc[node, "Sample rate q"] == last_nodes[node]["sample_rate"]
        assert table.loc[node, "δ"] == last_nodes[node]["delta"]
        assert table.loc[node, "Accountant"] == last_nodes[node]["accountant"]
        assert table.loc[node, "Rounds trained"] == status["num_rounds"]
        assert table.loc[node, "Rounds refused"] == 0
    m = _metrics(at)
    assert m["Accountant"] == status["accountant"]
    assert m["Target ε (run)"] == f"{status['target_epsilon']:.3f}"
    assert m["Max ε spent (any node)"] == f"{max(last.values()):.3f}"
    assert len(at.get("vega_lite_chart")) == 1
    ledger = _frame_with(at, "entry_round")
    assert len(ledger) == 3 * status["num_rounds"]  # no round-0 release
    assert sorted(set(ledger["entry_round"])) == list(range(1, status["num_rounds"] + 1))
    assert max(ledger["epsilon"]) == pytest.approx(max(last.values()))


def test_bias_page(tiny_run: dict, open_page: Open) -> None:
    status = tiny_run["status"]
    at = open_page(tiny_run["home"], "bias")
    assert at.title[0].value == "Bias"
    # the store's bias rows of the latest model, flagged first, unavailable never shown as 0
    from fedllm.store import Store, default_db_path

    with Store(default_db_path(tiny_run["home"]), read_only=True) as store:
        bias = store.get_bias(status["run_id"])
    summary = _frame_with(at, "Threshold")
    flags = list(summary["Flag"])
    assert flags == sorted(flags, key=lambda f: f == "")
    dpd = summary[summary["Metric"] == "demographic_parity_difference"]
    assert set(dpd["Status"]) == {"unavailable"} and dpd["Value"].isna().all()
    assert "group_column" in dpd["Note"].iloc[0]
    last = max(b["round"] for b in bias if b["source"] == "probe")
    gap = next(b for b in bias if b["round"] == last and b["metric"] == "probe_score_gap"
               and b["group"] == "names")
    shown = summary[(summary["Metric"] == "probe_score_gap")
                    & (summary["Group / category"] == "names")]
    assert shown["Value"].iloc[0] == gap["value"]
    spread = _frame_with(at, "Spread (highest − lowest)").set_index("Round")
    trained = [rd for rd in status["rounds"] if rd["round"] > 0 and rd["nodes"]]
    assert list(spread.index) == [rd["round"] for rd in trained]
    for rd in trained:
        losses = [n["train_loss"] for n in rd["nodes"]]
        assert spread.loc[rd["round"], "Lowest train loss"] == min(losses)
        assert spread.loc[rd["round"], "Highest train loss"] == max(losses)
        assert spread.loc[rd["round"], "Nodes reporting"] == len(losses)


def test_audit_page(tiny_run: dict, open_page: Open) -> None:
    status = tiny_run["status"]
    at = open_page(tiny_run["home"], "audit")
    assert at.title[0].value == "Audit"
    shown = [json.loads(j.proto.body) for j in at.json]
    assert status["config"] in shown
    assert any(s.get("run_id") == tiny_run["run_id"] for s in shown)
    counts = _frame_with(at, "Aggregated").set_index("Round")
    for rd in status["rounds"][1:]:
        assert counts.loc[rd["round"], "Aggregated"] == rd["num_nodes"]
        assert counts.loc[rd["round"], "ok"] == sum(n["status"] == "ok" for n in rd["nodes"])
    events = _frame_with(at, "Message")
    assert list(events["Message"]) == [e["message"] for e in status["events"]]
    chain = _frame_with(at, "Hash")
    assert chain["Event"].iloc[0] == "run_started" and chain["Event"].iloc[-1] == "run_finished"
    assert any("Chain verifies" in s.value for s in at.success)


# -- no store -----------------------------------------------------------------------------------

@pytest.mark.parametrize("page", list(PAGES))
def test_missing_store_shows_first_run_message(tmp_path: Path, open_page: Open, page: str) -> None:
    at = open_page(tmp_path / "nothing-here", page)
    assert any(FIRST_RUN in i.value for i in at.info)
    assert not at.error


def test_empty_store_shows_first_run_message(tmp_path: Path, open_page: Open) -> None:
    from fedllm.store import Store, default_db_path

    Store(default_db_path(tmp_path)).close()  # schema, no runs
    for page in PAGES:
        at = open_page(tmp_path, page)
        assert any(FIRST_RUN in i.value for i in at.info), page


# -- synthetic store: DP off, causal-lm, live run, refusals --------------------------------------

def test_dp_off_banner_and_perplexity(synthetic_home: dict, open_page: Open) -> None:
    session = {RUN_KEY: synthetic_home["nodp"]}
    at = open_page(synthetic_home["home"], "privacy", session)
    assert any("Differential privacy was OFF" in e.value for e in at.error)
    assert not at.warning  # deployment with secure transport
    at = open_page(synthetic_home["home"], "utility", session)
    m = _metrics(at)
    assert m["Final perplexity"] == "18.1700" and m["Final loss"] == "2.9000"
    assert "Final accuracy" not in m
    at = open_page(synthetic_home["home"], "runs", session)
    table = _frame_with(at, "Run ID").set_index("Run ID")
    assert table.loc["nodp-1", "Final perplexity"] == 18.17
    assert table.loc["nodp-1", "DP"] == "OFF"
    assert table.loc["live-2", "Final accuracy"] == 0.625


def test_live_run_refusals_and_extra_metrics(synthetic_home: dict, open_page: Open) -> None:
    home = synthetic_home["home"]
    at = open_page(home, "privacy")  # newest run is the live one
    assert at.session_state[RUN_KEY] == "live-2"
    assert "live, refreshes every" in _texts(at)
    assert "No secure aggregation." in at.warning[0].value
    table = _frame_with(at, "ε spent (last recorded)").set_index("Node")
    assert table.loc["node-0", "ε spent (last recorded)"] == 1.9
    assert table.loc["node-1", "ε spent (last recorded)"] == 1.6  # failed in round 2: no ε
    assert table.loc["node-2", "ε spent (last recorded)"] == 1.7
    assert table.loc["node-2", "Rounds refused"] == 1
    assert table.loc["node-2", "Last status"] == "refused"
    refused = _frame_with(at, "reason")
    assert list(refused["node_id"]) == ["node-2"]
    assert "budget exhausted" in refused["reason"].iloc[0]

    at = open_page(home, "bias")
    assert not any("once recorded" in i.value for i in at.info)
    recorded = _frame_with(at, "group_gap_accuracy")
    assert list(recorded["group_gap_accuracy"]) == [0.12, 0.08]

    at = open_page(home, "audit")
    grid = _frame_with(at, "node-1").set_index("Round")
    assert grid.loc[2, "node-1"] == "failed" and grid.loc[2, "node-2"] == "refused"
    problems = _frame_with(at, "status")
    assert set(problems["reason"].dropna()) >= {"timeout after 3600 s"}


def test_selection_carries_across_pages(synthetic_home: dict, open_page: Open) -> None:
    at = open_page(synthetic_home["home"], "runs")
    assert at.session_state[RUN_KEY] == "live-2"
    at.sidebar.selectbox(key=PICKER_KEY).select("nodp-1").run()
    assert at.session_state[RUN_KEY] == "nodp-1"
    for page in ("utility", "privacy", "bias", "audit"):
        at.switch_page(PAGES[page]).run()
        assert not at.exception
        assert "`nodp-1`" in _texts(at), page
    assert at.query_params["run"] == "nodp-1"


def test_query_param_selects_run(synthetic_home: dict, open_page: Open,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from .conftest import APP

    monkeypatch.setenv("FEDLLM_HOME", str(synthetic_home["home"]))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = "nodp-1"
    at.run()
    assert at.session_state[RUN_KEY] == "nodp-1"


def test_dashboard_never_writes_the_store(synthetic_home: dict, open_page: Open) -> None:
    home = synthetic_home["home"]

    def snapshot() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(home.iterdir()) if p.is_file()}

    before = snapshot()
    for page in PAGES:
        open_page(home, page)
    assert snapshot() == before


# -- access control -----------------------------------------------------------------------------

def test_password_gate(synthetic_home: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from .conftest import APP

    monkeypatch.setenv("FEDLLM_HOME", str(synthetic_home["home"]))
    monkeypatch.setenv("FEDLLM_DASHBOARD_PASSWORD_SHA256", hashlib.sha256(b"s3cret").hexdigest())
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert not at.dataframe and not at.metric  # nothing shown before signing in
    at.text_input[0].input("wrong")
    at.button[0].click().run()
    assert any("Wrong password" in e.value for e in at.error)
    assert not at.dataframe
    at.text_input[0].input("s3cret")
    at.button[0].click().run()
    assert not at.exception
    assert at.title[0].value == "Runs" and at.dataframe
