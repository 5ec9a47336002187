"""Malformed data files and configs: always a clear DataError / ConfigError, never another
exception (property tests), and at the CLI never a traceback and never a changed store."""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedllm.config import ConfigError, load_config
from fedllm.data import DataError, read_table
from tests.conftest import DEMO, run_cli_many

CELLS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def table_text(draw):
    sep = draw(st.sampled_from(["\t", ",", ";", "|"]))
    header = draw(st.lists(st.sampled_from(["sentence", "label", "text", "", "x", "label"]),
                           min_size=0, max_size=4))
    rows = draw(st.lists(st.lists(CELLS, min_size=0, max_size=4), max_size=6))
    lines = [sep.join(header)] + [sep.join(r) for r in rows]
    if draw(st.booleans()):
        lines.append(draw(st.text(max_size=30)))
    return "\n".join(lines)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=table_text(), ext=st.sampled_from(["tsv", "csv", "jsonl"]),
       raw=st.binary(max_size=64), use_raw=st.booleans())
def test_any_data_file_reads_or_fails_clearly(tmp_path, text, ext, raw, use_raw):
    path = tmp_path / f"data.{ext}"
    if use_raw:
        path.write_bytes(raw)
    else:
        path.write_text(text, encoding="utf-8")
    try:
        table = read_table(path, text_column="sentence", label_column="label")
    except DataError as e:
        assert str(path) in str(e) or path.name in str(e)
        return
    assert len(table.texts) == len(table.raw_labels) > 0
    assert all(isinstance(t, str) and t.strip() for t in table.texts)


TOML_VALUES = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans(),
                        st.text(max_size=8).map(lambda s: '"' + s.replace('"', "") + '"'),
                        st.just("[1, 2]"), st.just("{a = 1}"))


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(["model", "lora", "data", "federation", "train", "privacy",
                                "central_dp", "partition", "nope"]),
       key=st.sampled_from(["rounds", "num_nodes", "batch_size", "target_epsilon", "delta",
                            "path", "r", "scheme", "enabled", "min_nodes", "clip_norm",
                            "learning_rate", "task", "bogus"]),
       value=TOML_VALUES, garbage=st.text(max_size=20), broken=st.booleans())
def test_any_config_loads_or_fails_clearly(tmp_path, section, key, value, garbage, broken):
    path = tmp_path / "run.toml"
    body = f"[{section}]\n{key} = {value}\n"
    path.write_text(body + (garbage if broken else ""), encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in str(e)


def _digest(home):
    db = home / "fedllm.db"
    return hashlib.sha256(db.read_bytes()).hexdigest() if db.exists() else None


def test_cli_bad_inputs_never_traceback_never_touch_the_store(tmp_path, tiny_run):
    home = tiny_run["home"]
    before = _digest(home)
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("sentence\tlabel\nok text\t1\n\t0\nmore\t1\n")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[train]\nbatch_size = -3\n[privacy\n")
    cases = [
        ["run", "--train-data", str(tmp_path / "missing.tsv")],
        ["run", "--train-data", str(bad_tsv)],
        ["run", "--config", str(bad_toml)],
        ["run", "--config", str(tmp_path / "nope.toml")],
        ["run", "-s", "privacy.enabled=false"],
        ["run", "--eval-data", str(DEMO / "sst2_dev.tsv"), "--label-column", "nolabel"],
        ["run", "--resume", "no-such-run"],
        ["run", "--run-id", tiny_run["run_id"]],
        ["status", "no-such-run"],
        ["privacy", "no-such-run"],
        ["audit", "verify", "no-such-run"],
        ["node", "reset-ledger", "--state-dir", str(tmp_path), "--reason", "x", "--yes"],
    ]
    # Two at a time: each is its own CLI process, mostly start-up; the store must stay
    # untouched by all of them (checked once they have all exited).
    procs = run_cli_many(cases, home, timeout=300)
    for args, proc in zip(cases, procs, strict=True):
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, (args, out)
        assert "Traceback" not in out and "error:" in out, (args, out)
    assert _digest(home) == before
