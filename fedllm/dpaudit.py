"""Empirical privacy audit with canaries: is DP really applied?

One node's data gets ``k`` random canary sentences with secret random labels inserted; ``k``
more canaries of the same kind are held out. The node then trains exactly as in the planned run
(same DP-SGD plan: σ calibrated for this dataset's size and the run's rounds, clipping, batches).
A membership-inference attacker scores every canary by the log-probability the trained model
gives its secret label. Canaries the model was trained on score higher only if the training
leaks them.

From the scores we report the attack's advantage (max TPR − FPR) and an empirical lower bound on
ε (Jagielski et al. 2020; Nasr et al. 2021): for a threshold test with false-positive rate FPR
and false-negative rate FNR, (ε, δ)-DP implies FPR + e^ε·FNR ≥ 1 − δ and FNR + e^ε·FPR ≥ 1 − δ,
so ε ≥ log((1 − δ − FNR) / FPR) and ε ≥ log((1 − δ − FPR) / FNR). FPR and FNR are replaced by
their one-sided 95 % Clopper–Pearson upper bounds, and the threshold is chosen on one half of
the canaries and evaluated on the other half, so the bound is not fitted to the data it reports.

What it is and is not: a check that the noise and clipping are applied (a non-private control
shows a clearly higher bound), not a tight estimate of ε — with tens of canaries in one run the
lower bound is weak by construction (at most log of the number of canaries).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta

from fedllm.config import RunConfig
from fedllm.data import TokenizedDataset, tokenize
from fedllm.evaluate import predict_proba
from fedllm.model import LoadedModel, load_run_model
from fedllm.node import load_node_table, simulated_node_data
from fedllm.privacy import compute_epsilon, plan_dp_sgd
from fedllm.train import DPParams, dp_for_run, train_for_run


@dataclass(frozen=True)
class AuditResult:
    dp_enabled: bool
    canaries_inserted: int
    canaries_held_out: int
    num_examples: int  # the node's training set including the inserted canaries
    noise_multiplier: float | None
    accountant_epsilon: float | None  # what the accountant says for this training
    delta: float
    empirical_epsilon_lower_bound: float  # 95 % confidence, held-out threshold
    attack_advantage: float  # max over thresholds of TPR - FPR (all canaries)
    auc: float  # ROC-AUC of the attack score (0.5 = no better than chance)
    mean_score_inserted: float
    mean_score_held_out: float
    seconds: float


def make_canaries(n: int, *, words: list[str], num_labels: int, length: int,
                  rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """``n`` sentences of ``length`` random words, each with a uniformly random label."""
    texts = [" ".join(rng.choice(words, size=length)) for _ in range(n)]
    return texts, rng.integers(0, num_labels, size=n)


def _clopper_pearson_upper(k: int, n: int, alpha: float = 0.05) -> float:
    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def epsilon_lower_bound(inside: np.ndarray, outside: np.ndarray, *, delta: float,
                        threshold: float) -> float:
    """ε lower bound of the test "score ≥ threshold ⇒ member" at 95 % confidence."""
    fp = int(np.sum(outside >= threshold))
    fn = int(np.sum(inside < threshold))
    fpr = _clopper_pearson_upper(fp, len(outside))
    fnr = _clopper_pearson_upper(fn, len(inside))
    bounds = [0.0]
    if fpr > 0 and 1 - delta - fnr > 0:
        bounds.append(math.log((1 - delta - fnr) / fpr))
    if fnr > 0 and 1 - delta - fpr > 0:
        bounds.append(math.log((1 - delta - fpr) / fnr))
    return max(bounds)


def _best_threshold(inside: np.ndarray, outside: np.ndarray, delta: float) -> float:
    candidates = np.unique(np.concatenate([inside, outside]))
    return float(max(candidates, key=lambda t: epsilon_lower_bound(
        inside, outside, delta=delta, threshold=float(t))))


def _advantage_and_auc(inside: np.ndarray, outside: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    s = np.r_[inside, outside]
    fpr, tpr, _ = roc_curve(y, s)
    return float(np.max(tpr - fpr)), float(roc_auc_score(y, s))


def _vocabulary(loaded: LoadedModel) -> list[str]:
    """Whole, alphabetic wordpieces of the tokenizer: canaries look like (odd) text."""
    vocab = loaded.tokenizer.get_vocab()
    return sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 4)


def run_canary_audit(config: RunConfig, *, canaries: int = 32, canary_length: int = 8,
                     seed: int = 0) -> AuditResult:
    """Insert ``canaries`` canaries at node 0 of ``config``'s simulation, train it as planned
    (``rounds × local_epochs`` with the run's DP settings), and attack. Sequence
    classification only (the secret is the label)."""
    if config.model.task != "seq-cls":
        raise ValueError("the canary audit needs a seq-cls run (the secret is the label)")
    from fedllm.coordinator import resolve_label_names

    t0 = time.time()
    label_names = resolve_label_names(config)
    m, t, p = config.model, config.train, config.privacy
    loaded = load_run_model(config, label_names)
    rng = np.random.default_rng(seed)
    texts, labels = make_canaries(2 * canaries, words=_vocabulary(loaded),
                                  num_labels=len(label_names), length=canary_length, rng=rng)
    inserted = rng.permutation(2 * canaries)[:canaries]
    is_in = np.zeros(2 * canaries, dtype=bool)
    is_in[inserted] = True
    table, node_labels = load_node_table(simulated_node_data(config, 0), label_names)
    assert node_labels is not None
    train_texts = list(table.texts) + [texts[i] for i in inserted]
    train_labels = np.concatenate([node_labels, labels[inserted]])
    ds: TokenizedDataset = tokenize(loaded.tokenizer, train_texts, train_labels,
                                    max_length=m.max_length)
    rounds = config.federation.rounds
    dp: DPParams | None = None
    eps: float | None = None
    sigma: float | None = None
    if p.enabled:
        plan = plan_dp_sgd(num_examples=len(ds), batch_size=t.batch_for(len(ds)),
                           local_epochs=t.local_epochs, rounds=rounds,
                           target_epsilon=p.target_epsilon, delta=p.delta,
                           accountant=p.accountant, noise_multiplier=p.noise_multiplier,
                           project=False, local_steps=t.local_steps)
        sigma = plan.noise_multiplier
        dp = dp_for_run(config, noise_multiplier=sigma)
    history: list[tuple[float, float, int]] = []
    for rnd in range(rounds):  # one node federated with itself: its update is the model
        result = train_for_run(loaded, ds, t, dp=dp, seed=seed * 1000 + rnd,
                               round=rnd + 1, rounds=rounds)
        history += result.history
    if p.enabled:
        eps = compute_epsilon(history, delta=p.delta, accountant=p.accountant)
    probs = predict_proba(loaded, texts, max_length=m.max_length)  # (2k, C)
    scores = np.log(np.clip(probs[np.arange(len(texts)), labels], 1e-12, 1.0))
    inside, outside = scores[is_in], scores[~is_in]
    # choose the threshold on one half of the canaries, report the bound on the other half
    half = rng.permutation(2 * canaries) < canaries
    thr = _best_threshold(scores[is_in & half], scores[~is_in & half], p.delta)
    bound = epsilon_lower_bound(scores[is_in & ~half], scores[~is_in & ~half], delta=p.delta,
                                threshold=thr)
    adv, auc = _advantage_and_auc(inside, outside)
    return AuditResult(p.enabled, canaries, canaries, len(ds), sigma, eps, p.delta, bound, adv,
                       auc, float(inside.mean()), float(outside.mean()), time.time() - t0)


def result_dict(result: AuditResult) -> dict[str, object]:
    return asdict(result)
