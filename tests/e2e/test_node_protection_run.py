"""A real simulated run with a user column, a per-user cap and redaction (Flower, MiniLM)."""

import json

from fedllm.config import demo_data_dir
from fedllm.data import read_table
from fedllm.privacy import group_privacy_bound
from tests.conftest import run_cli


def test_capped_redacted_run_records_user_epsilon_and_counts(tmp_path):
    src = read_table(demo_data_dir() / "sst2_train_sample.tsv", text_column="sentence",
                     label_column="label", max_examples=240)
    data = tmp_path / "users.tsv"
    with data.open("w", encoding="utf-8") as f:
        f.write("user\tsentence\tlabel\n")
        for i, (t, y) in enumerate(zip(src.texts, src.raw_labels, strict=True)):
            user = "heavy" if i % 3 == 0 else f"u{i % 40}"
            f.write(f"{user}\t{t} write to fan{i}@example.com\t{y}\n")
    proc = run_cli(["run", "--nodes", "2", "--rounds", "1", "--epsilon", "4",
                    "-s", "train.batch_size=20", "-s", "train.physical_batch_size=20",
                    "-s", "data.max_eval_examples=60", "-s", f"data.train_paths=['{data}']",
                    "-s", "data.user_column='user'", "-s", "data.max_examples_per_user=10",
                    "-s", "redaction.enabled=true",
                    # every row is trained on (no held-out split) so the counts are exact
                    "-s", "data.node_eval_fraction=0"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(run_cli(["status", "latest", "--json"], tmp_path).stdout)
    nodes = status["rounds"][1]["nodes"]
    assert len(nodes) == 2 and all(n["status"] == "ok" for n in nodes)
    for n in nodes:
        # every kept example had one planted e-mail, and nothing else is PII
        assert n["redactions"]["email"] == n["num_examples"]
        assert sum(n["redactions"].values()) == n["num_examples"]
        assert n["max_examples_per_user"] == 10 and 30 < n["num_users"] <= 41
        assert (n["user_epsilon"], n["user_delta"]) == group_privacy_bound(
            n["epsilon"], n["delta"], 10)
    # the "heavy" user's 80 rows (about 40 per node) are cut to 10 per node
    assert sum(n["num_examples"] for n in nodes) == 240 - 80 + 2 * 10
    text = run_cli(["status", "latest"], tmp_path).stdout
    assert "node data protection" in text and "1 (vacuous)" in text
