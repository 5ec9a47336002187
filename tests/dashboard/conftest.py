"""Dashboard test helpers: AppTest runner over a store, and a small synthetic store that covers
what the tiny real run does not (DP off, causal-lm, a live run, refusals, extra metric keys)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from fedllm.store import Store, default_db_path

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
PAGES = {
    "runs": "views/runs.py",
    "utility": "views/utility.py",
    "privacy": "views/privacy.py",
    "bias": "views/bias.py",
    "audit": "views/audit.py",
}

Open = Callable[..., AppTest]


@pytest.fixture
def open_page(monkeypatch: pytest.MonkeyPatch) -> Open:
    """``open_page(home, page, session=None)``: run the app on ``home`` and show ``page``."""

    def _open(home: Path, page: str = "runs", session: dict | None = None) -> AppTest:
        monkeypatch.setenv("FEDLLM_HOME", str(home))
        monkeypatch.delenv("FEDLLM_DASHBOARD_PASSWORD_SHA256", raising=False)
        at = AppTest.from_file(str(APP), default_timeout=60)
        for k, v in (session or {}).items():
            at.session_state[k] = v
        at.run()
        if page != "runs":
            at.switch_page(PAGES[page]).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return _open


def _node(node_id: str, status: str, **kw: object) -> dict:
    base = {"node_id": node_id, "status": status, "reason": None, "num_examples": 50,
            "steps": 2, "noise_multiplier": None, "sample_rate": None, "epsilon": None,
            "delta": None, "accountant": None, "epsilon_limit": None, "update_bytes": 1000,
            "train_loss": None, "seconds": 0.5}
    return {**base, **kw}


@pytest.fixture(scope="session")
def synthetic_home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two runs written through the store's own API:
    ``nodp``: finished causal-lm run, DP off, deployment with secure transport;
    ``live``: running seq-cls DP run in simulation where node-2 refused round 2, with an extra
    (non-utility) metric key."""
    home = tmp_path_factory.mktemp("dash-synth")
    t = time.time()
    with Store(default_db_path(home)) as s:
        s.create_run("nodp-1", name="llm-nodp", mode="deployment", task="causal-lm",
                     model_path="/models/tiny-gpt", num_rounds=1, num_nodes=2, dp_enabled=False,
                     target_epsilon=None, delta=None, accountant=None, secure_transport=True,
                     secure_aggregation=True,
                     config={"privacy": {"enabled": False}})
        s.record_round("nodp-1", 0, started_at=t, num_nodes=0,
                       metrics={"loss": 3.2, "perplexity": 24.53}, nodes=[])
        s.record_round("nodp-1", 1, started_at=t, num_nodes=2,
                       metrics={"loss": 2.9, "perplexity": 18.17},
                       nodes=[_node("a", "ok", train_loss=3.0), _node("b", "ok", train_loss=3.1)])
        s.finish_run("nodp-1", "finished")

        s.create_run("live-2", name="live-run", mode="simulation", task="seq-cls",
                     model_path="default:all-MiniLM-L6-v2", num_rounds=5, num_nodes=3,
                     dp_enabled=True, target_epsilon=2.0, delta=1e-5, accountant="rdp",
                     secure_transport=False, config={"privacy": {"enabled": True}})
        s.record_round("live-2", 0, started_at=t, num_nodes=0,
                       metrics={"loss": 0.7, "accuracy": 0.5}, nodes=[])
        dp = {"noise_multiplier": 1.1, "sample_rate": 0.25, "delta": 1e-5, "accountant": "rdp",
              "epsilon_limit": 2.0}
        s.record_round("live-2", 1, started_at=t, num_nodes=3,
                       metrics={"loss": 0.65, "accuracy": 0.6, "group_gap_accuracy": 0.12},
                       nodes=[_node(f"node-{i}", "ok", epsilon=1.5 + i / 10,
                                    train_loss=0.6 + i / 10, **dp) for i in range(3)])
        s.record_round("live-2", 2, started_at=t, num_nodes=2,
                       metrics={"loss": 0.6, "accuracy": 0.625, "group_gap_accuracy": 0.08},
                       nodes=[_node("node-0", "ok", epsilon=1.9, train_loss=0.55, **dp),
                              _node("node-1", "failed", reason="timeout after 3600 s"),
                              _node("node-2", "refused", epsilon=1.7,
                                    reason="privacy budget exhausted (ε 1.7 of 2.0)", **dp)])
        s.add_event("live-2", "warning", "node-2 refused round 2: privacy budget exhausted")
    return {"home": home, "nodp": "nodp-1", "live": "live-2"}
