"""report / export / predict / generate on the session's real tiny run (Flower simulation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate ."]


def test_report_json_has_utility_nodes_and_bias(tiny_run):
    proc = run_cli(["report", tiny_run["run_id"], "--json"], tiny_run["home"])
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    rounds = tiny_run["status"]["num_rounds"]
    by = {(u["round"], u["source"]): u for u in r["utility"]}
    # coordinator every round; nodes evaluated every model they received plus the final one
    for rnd in range(rounds + 1):
        assert {(rnd, "coordinator"), (rnd, "federated")} <= set(by)
    final = by[(rounds, "coordinator")]
    assert final["accuracy"] == tiny_run["status"]["rounds"][-1]["metrics"]["accuracy"]
    assert 0.0 <= final["roc_auc"] <= 1.0 and 0.0 <= final["ece"] <= 1.0
    # federated examples = sum of the nodes' held-out splits (10 % of 120 each)
    assert by[(rounds, "federated")]["num_examples"] == sum(
        n["eval_examples"] for n in r["nodes"]) == 36
    assert {n["node_id"] for n in r["nodes"]} == {"node-0", "node-1", "node-2"}
    assert all(n["epsilon"] is not None and n["eval_round"] == rounds for n in r["nodes"])
    flags = [b["flagged"] for b in r["bias"]]
    assert flags == sorted(flags, reverse=True)  # flagged first
    dpd = [b for b in r["bias"] if b["metric"] == "demographic_parity_difference"]
    assert dpd and all(b["value"] is None and "group_column" in b["note"] for b in dpd)
    assert any(b["source"] == "probe" and b["value"] is not None for b in r["bias"])
    text = run_cli(["report", tiny_run["run_id"]], tiny_run["home"])
    assert text.returncode == 0 and "unavailable" in text.stdout and "probe" in text.stdout


def test_export_reload_with_peft_gives_the_same_predictions(tiny_run, tmp_path):
    from peft import PeftModel

    from fedllm.evaluate import predict_proba
    from fedllm.model import build_base, load_trained

    out = tmp_path / "export"
    proc = run_cli(["export", tiny_run["run_id"], "--out", str(out)], tiny_run["home"])
    assert proc.returncode == 0, proc.stderr
    card = (out / "README.md").read_text()
    for needle in ("all-MiniLM-L6-v2", "seq-cls", "Privacy spent per node", "node-0",
                   "Known limitations", "prv", "## Bias", "not differentially private"):
        assert needle in card, needle
    meta = json.loads((out / "fedllm_model.json").read_text())
    base, tok = build_base(meta)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    import torch

    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        exported = torch.softmax(model(input_ids=enc["input_ids"],
                                       attention_mask=enc["attention_mask"]), -1).numpy()
    inside = predict_proba(load_trained(tiny_run["status"]["adapter_path"]), TEXTS)
    np.testing.assert_allclose(exported, inside, atol=1e-6)
    pred = run_cli(["predict", tiny_run["run_id"], *TEXTS, "--json"], tiny_run["home"])
    assert pred.returncode == 0, pred.stderr
    rows = json.loads(pred.stdout)
    got = np.array([[r["probabilities"]["0"], r["probabilities"]["1"]] for r in rows])
    np.testing.assert_allclose(got, inside, atol=1e-6)
    assert [r["label"] for r in rows] == [("0", "1")[int(i)] for i in inside.argmax(1)]
    # exporting again into the now non-empty directory is refused, nothing overwritten
    again = run_cli(["export", tiny_run["run_id"], "--out", str(out)], tiny_run["home"])
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["report", "no-such-run"], "unknown run"),
    (["predict", "latest"], "no input"),
    (["generate", "latest", "Once upon"], "use `fedllm predict`"),
])
def test_bad_input_exits_2(tiny_run, args, message):
    proc = run_cli(args, tiny_run["home"])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_predict_from_file(tiny_run, tmp_path: Path):
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(TEXTS) + "\n\n")
    proc = run_cli(["predict", tiny_run["run_id"], "--file", str(f), "--json"], tiny_run["home"])
    assert proc.returncode == 0, proc.stderr
    assert [r["text"] for r in json.loads(proc.stdout)] == TEXTS
