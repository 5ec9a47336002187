"""Real processes: Ctrl-C ends a run as `interrupted` and `--resume` finishes it; a coordinator
killed with SIGKILL resumes to the same adapter and ε as an uninterrupted run (slow)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from fedllm.protocol import unpack_state
from tests.conftest import REPO, TINY_RUN_ARGS, run_cli


def start_run(home, args):
    env = {**os.environ, "FEDLLM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedllm.cli", "run", *args], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_round(home, rnd, proc, timeout=600):
    deadline = time.monotonic() + timeout
    db = home / "fedllm.db"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                    row = c.execute("SELECT MAX(round) FROM checkpoints").fetchone()
                if row and row[0] is not None and row[0] >= rnd:
                    return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"round {rnd} not recorded within {timeout} s")


@pytest.mark.slow
def test_ctrl_c_interrupts_cleanly_and_resume_finishes(tmp_path):
    args = [*TINY_RUN_ARGS, "--rounds", "3", "--run-id", "run-c"]
    proc = start_run(tmp_path, args)
    try:
        wait_for_round(tmp_path, 1, proc)
        proc.send_signal(signal.SIGINT)
        out, errs = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out + errs
    assert "interrupted" in errs and "--resume run-c" in errs
    st = json.loads(run_cli(["status", "run-c", "--json"], tmp_path).stdout)
    assert st["state"] == "interrupted"
    done = max(r["round"] for r in st["rounds"] if r["metrics"])
    res = run_cli(["run", "--resume", "run-c"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    st = json.loads(run_cli(["status", "run-c", "--json"], tmp_path).stdout)
    assert st["state"] == "finished" and [r["round"] for r in st["rounds"]] == [0, 1, 2, 3]
    assert done >= 1
    for r in st["rounds"][1:]:  # every node's ε grows by exactly one round each round
        assert all(n["status"] == "ok" for n in r["nodes"])
    events = json.loads(run_cli(["audit", "show", "run-c", "--json"], tmp_path).stdout)
    names = [e["event"] for e in events]
    assert "run_interrupted" in names and "run_resumed" in names and names[-1] == "run_finished"
    assert run_cli(["audit", "verify", "run-c"], tmp_path).returncode == 0


def _final(home, run_id):
    with sqlite3.connect(home / "fedllm.db") as c:
        rnd, blob = c.execute("SELECT round, adapter_npz FROM checkpoints WHERE run_id = ?",
                              (run_id,)).fetchone()
        ledger = c.execute("SELECT node_id, entry_round, steps, epsilon FROM privacy_ledger "
                           "WHERE run_id = ? ORDER BY node_id, seq", (run_id,)).fetchall()
    return rnd, unpack_state(blob), ledger


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*TINY_RUN_ARGS, "--rounds", "3", "--run-id", "run-k"]
    for home in (a, b):  # same node secrets => same DP noise => comparable runs
        for pid in range(3):
            d = home / "runs" / "run-k" / "nodes" / f"node-{pid}"
            d.mkdir(parents=True)
            (d / "node.secret").write_bytes(bytes([7 + pid]) * 32)
    full = run_cli(["run", *args], a, timeout=1200)
    assert full.returncode == 0, full.stderr
    proc = start_run(b, args)
    try:
        wait_for_round(b, 1, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    res = run_cli(["run", "--resume", "run-k"], b, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    (ra, xa, la), (rb, xb, lb) = _final(a, "run-k"), _final(b, "run-k")
    assert ra == rb == 3
    for k in xa:
        np.testing.assert_allclose(xa[k], xb[k], rtol=0, atol=1e-5)
    assert [row[:3] for row in la] == [row[:3] for row in lb]  # no round counted twice
    assert [row[3] for row in la] == pytest.approx([row[3] for row in lb])
