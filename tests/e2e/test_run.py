"""End to end: `fedllm run` on the real MiniLM in Flower's simulation engine."""

import numpy as np
import pytest

from fedllm.config import config_from_dict
from fedllm.coordinator import eval_dataset
from fedllm.evaluate import evaluate
from fedllm.model import load_trained
from tests.conftest import TINY_RUN_ARGS, build_tiny_causal_lm, run_cli


def test_status_json_shape_and_metrics(tiny_run):
    st = tiny_run["status"]
    assert st["state"] == "finished" and st["model_bytes"] > 0
    assert [r["round"] for r in st["rounds"]] == [0, 1, 2]
    for r in st["rounds"][1:]:
        assert {"loss", "accuracy", "f1_macro", "f1_weighted"} <= set(r["metrics"])
        assert len(r["nodes"]) == 3
        for n in r["nodes"]:
            assert n["status"] == "ok"
            assert {"node_id", "num_examples", "epsilon", "delta", "update_bytes"} <= set(n)
    assert "run " in tiny_run["stdout"] and "privacy spent per node" in tiny_run["stdout"]


def test_epsilon_positive_within_target_and_composes(tiny_run):
    st = tiny_run["status"]
    eps = {r["round"]: {n["node_id"]: n["epsilon"] for n in r["nodes"]} for r in st["rounds"]}
    for node in eps[1]:
        assert 0 < eps[1][node] < eps[2][node] <= st["target_epsilon"]
    assert st["delta"] == 1e-5


def test_update_is_under_one_percent_of_model(tiny_run):
    st = tiny_run["status"]
    for r in st["rounds"][1:]:
        for n in r["nodes"]:
            assert n["update_bytes"] <= 0.01 * st["model_bytes"]


def test_adapter_reloads_with_peft_and_reproduces_accuracy(tiny_run):
    st = tiny_run["status"]
    model = load_trained(st["adapter_path"])
    cfg = config_from_dict(st["config"])
    ds = eval_dataset(cfg, model, tuple(st["label_names"]))
    metrics = evaluate(model, ds)
    recorded = st["rounds"][-1]["metrics"]
    assert metrics["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(recorded["loss"], rel=1e-4)


def test_runs_and_status_cli(tiny_run):
    out = run_cli(["runs"], tiny_run["home"])
    assert out.returncode == 0 and tiny_run["run_id"] in out.stdout
    txt = run_cli(["status", tiny_run["run_id"]], tiny_run["home"])
    assert txt.returncode == 0 and "finished" in txt.stdout and "node-2" in txt.stdout
    missing = run_cli(["status", "no-such-run"], tiny_run["home"])
    assert missing.returncode == 2 and "unknown run 'no-such-run'" in missing.stderr


@pytest.mark.slow  # ~75 s; the causal-LM DP step stays in the default suite (test_train.py)
def test_causal_lm_run_on_tiny_local_model(tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "tiny-llama")
    home = tmp_path / "home"
    proc = run_cli(["run", "--task", "causal-lm", "--model-path", str(model_dir),
                    "--nodes", "2", "--rounds", "2", "--max-examples", "120",
                    "-s", "train.batch_size=20", "-s", "train.physical_batch_size=20",
                    "-s", "data.max_eval_examples=60", "-s", "model.max_length=32",
                    "-s", "train.learning_rate=0.02"], home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = __import__("json").loads(run_cli(["status", "latest", "--json"], home).stdout)
    assert st["task"] == "causal-lm" and st["state"] == "finished"
    ppl = [r["metrics"]["perplexity"] for r in st["rounds"]]
    assert len(ppl) == 3 and all(np.isfinite(ppl)) and ppl[-1] < ppl[0]
    assert all(0 < n["epsilon"] <= 8 for n in st["rounds"][-1]["nodes"])
    # issue 4: coordinator-side samples each round, node-side perplexity, `fedllm generate`
    rep = __import__("json").loads(run_cli(["report", "latest", "--json"], home).stdout)
    assert rep["samples"] and rep["samples"][0]["prompt"] == "The movie was"
    assert {u["source"] for u in rep["utility"]} == {"coordinator", "federated"}
    assert all(np.isfinite(n["perplexity"]) for n in rep["nodes"])
    gen = run_cli(["generate", "latest", "The movie", "--max-new-tokens", "4", "--json"], home)
    assert gen.returncode == 0, gen.stderr
    assert __import__("json").loads(gen.stdout)[0]["prompt"] == "The movie"
    wrong = run_cli(["predict", "latest", "some text"], home)
    assert wrong.returncode == 2 and "use `fedllm generate`" in wrong.stderr


@pytest.mark.parametrize("extra, needle", [
    (["--train-data", "/nonexistent/train.tsv"], "data file not found: /nonexistent/train.tsv"),
    (["--text-column", "text"], "missing column(s) 'text'"),
    (["--max-examples", "30"], "fewer than train.batch_size"),
    (["--rounds", "0"], "federation.rounds"),
    (["-s", "privacy.enabled=false"], "allow_no_dp"),
])
def test_bad_input_fails_fast_and_clearly(tmp_path, extra, needle):
    proc = run_cli(["run", *TINY_RUN_ARGS, *extra], tmp_path)
    assert proc.returncode == 2
    assert needle in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "fedllm.db").exists()  # nothing was recorded for a bad start


def test_bad_label_and_empty_text(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tsentence\n" + "1\tfine\n" * 200 + "7\toops\n")
    proc = run_cli(["run", *TINY_RUN_ARGS, "--train-data", str(bad)], tmp_path)
    assert proc.returncode == 2 and "bad.tsv:202: unknown label '7'" in " ".join(
        proc.stderr.split())
    empty = tmp_path / "empty.tsv"
    empty.write_text("label\tsentence\n1\tok\n0\t \n")
    proc = run_cli(["run", *TINY_RUN_ARGS, "--train-data", str(empty)], tmp_path)
    assert proc.returncode == 2 and "empty.tsv:3: empty text" in " ".join(proc.stderr.split())
