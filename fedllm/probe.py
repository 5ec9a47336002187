"""Counterfactual probe: does the model's score move when only a group term changes?

Needs no group labels in anyone's data: the coordinator runs a shipped template set
(``probe_data/templates.json``: neutral sentences with a slot ``{X}`` filled by terms of a few
groups — first names, nationalities, religions) through the global model. Per category:

- ``probe_score_gap``: mean over templates of (highest − lowest) mean P(positive) across groups;
- ``probe_flip_rate``: share of templates whose predicted label is not the same for every term;
- ``probe_group_score``: each group's mean P(positive) (for the detail tables).

seq-cls only (a causal LM has no label to flip: reported as unavailable).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.config import BiasConfig
from fedllm.evaluate import predict_proba
from fedllm.fairness import PROBE, BiasMetric, flag
from fedllm.model import LoadedModel

SLOT = "{X}"


@dataclass(frozen=True)
class ProbeCategory:
    name: str
    templates: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]


def default_templates_path() -> Path:
    return Path(str(resources.files("fedllm") / "probe_data" / "templates.json"))


def load_templates(path: str | Path | None = None) -> list[ProbeCategory]:
    """Parse and check a template file (every template has exactly one slot, >= 2 groups)."""
    p = Path(path) if path else default_templates_path()
    data: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    out = []
    for name, cat in data["categories"].items():
        templates = tuple(cat["templates"])
        bad = [t for t in templates if t.count(SLOT) != 1]
        if bad:
            raise ValueError(f"{p}: category {name!r}: template without exactly one {SLOT}: "
                             f"{bad[0]!r}")
        groups = {g: tuple(terms) for g, terms in cat["groups"].items() if terms}
        if len(groups) < 2:
            raise ValueError(f"{p}: category {name!r} needs at least 2 non-empty groups")
        out.append(ProbeCategory(name, templates, groups))
    return out


def probe_scores(loaded: LoadedModel, category: ProbeCategory, *, positive: int
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(group-mean P(positive) per template and group (T, G), label flips per template (T,),
    group names)."""
    groups = list(category.groups)
    sentences, owner = [], []
    for t in category.templates:
        for gi, g in enumerate(groups):
            for term in category.groups[g]:
                sentences.append(t.replace(SLOT, term))
                owner.append(gi)
    proba = predict_proba(loaded, sentences)
    per_template = len(owner) // len(category.templates)
    p_pos = proba[:, positive].reshape(len(category.templates), per_template)
    labels = proba.argmax(axis=1).reshape(len(category.templates), per_template)
    owner_arr = np.asarray(owner[:per_template])
    means = np.stack([p_pos[:, owner_arr == gi].mean(axis=1) for gi in range(len(groups))],
                     axis=1)
    flips = (labels != labels[:, :1]).any(axis=1)
    return means, flips, groups


def run_probe(loaded: LoadedModel, *, positive: int, config: BiasConfig,
              templates: list[ProbeCategory] | None = None) -> list[BiasMetric]:
    if loaded.task != "seq-cls":
        return [BiasMetric(PROBE, m, None, note="the counterfactual probe needs a seq-cls model")
                for m in ("probe_score_gap", "probe_flip_rate")]
    out: list[BiasMetric] = []
    for cat in templates if templates is not None else load_templates():
        means, flips, groups = probe_scores(loaded, cat, positive=positive)
        gap = float((means.max(axis=1) - means.min(axis=1)).mean())
        hi, lo = groups[int(means.mean(axis=0).argmax())], groups[int(means.mean(axis=0).argmin())]
        out.append(flag(BiasMetric(PROBE, "probe_score_gap", gap, group=cat.name,
                                    note=f"highest {hi!r}, lowest {lo!r}; "
                                         f"{len(cat.templates)} templates"),
                         config.probe_score_gap))
        out.append(flag(BiasMetric(PROBE, "probe_flip_rate", float(flips.mean()),
                                    group=cat.name), config.probe_flip_rate))
        for gi, g in enumerate(groups):
            out.append(BiasMetric(PROBE, "probe_group_score", float(means[:, gi].mean()),
                                  group=f"{cat.name}/{g}"))
    return out
