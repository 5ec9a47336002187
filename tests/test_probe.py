"""Counterfactual probe: the shipped template set, and its scores against predict_proba."""

import json

import numpy as np
import pytest

from fedllm.config import BiasConfig
from fedllm.evaluate import predict_proba
from fedllm.model import load_model
from fedllm.probe import ProbeCategory, load_templates, run_probe


@pytest.fixture(scope="module")
def model():
    return load_model(None, task="seq-cls", label_names=("0", "1"), seed=0)


def test_shipped_templates_are_valid():
    cats = {c.name: c for c in load_templates()}
    assert set(cats) == {"names", "nationalities", "religions"}
    assert all(len(c.groups) >= 2 and c.templates for c in cats.values())


def test_bad_template_file_names_the_problem(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"categories": {"x": {"templates": ["no slot here"],
                                                  "groups": {"a": ["A"], "b": ["B"]}}}}))
    with pytest.raises(ValueError, match="category 'x'.*no slot here"):
        load_templates(p)


def test_probe_metrics_match_direct_scores(model):
    cat = ProbeCategory("names", ("{X} wrote this review.", "I saw it with {X}."),
                        {"a": ("Emily", "Greg"), "b": ("Lakisha", "Jamal")})
    rows = {(r.metric, r.group): r for r in
            run_probe(model, positive=1, config=BiasConfig(probe_score_gap=0.0), templates=[cat])}
    p = predict_proba(model, [t.replace("{X}", n) for t in cat.templates
                              for n in ("Emily", "Greg", "Lakisha", "Jamal")]).reshape(2, 4, 2)
    a, b = p[:, :2, 1].mean(axis=1), p[:, 2:, 1].mean(axis=1)
    gap = rows[("probe_score_gap", "names")]
    assert gap.value == pytest.approx(np.abs(a - b).mean())
    assert gap.flagged == (gap.value > 0.0)  # threshold 0: any gap is flagged
    labels = p.argmax(axis=2)
    assert rows[("probe_flip_rate", "names")].value == pytest.approx(
        np.mean([len(set(row)) > 1 for row in labels]))
    assert rows[("probe_group_score", "names/a")].value == pytest.approx(a.mean())


def test_probe_on_causal_lm_is_unavailable(tiny_causal_lm):
    lm = load_model(str(tiny_causal_lm), task="causal-lm")
    rows = run_probe(lm, positive=0, config=BiasConfig())
    assert rows and all(r.value is None and "seq-cls" in r.note for r in rows)
