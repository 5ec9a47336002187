"""Privacy accounting: noise calibration for the whole run and each node's ε ledger.

The node's ledger is the authority on what it has spent. It is small (one entry per trained
round: noise multiplier σ, sampling rate q, steps), serialisable, persisted atomically on the
node's side, and ε is always recomputed from the *full* history, so composition across rounds
(and restarts) is never lost. ε is computed by an Opacus accountant (PRV by default).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedllm.sealed import SealedDir, SealedError

if TYPE_CHECKING:
    from fedllm.config import RunConfig

ACCOUNTANTS = ("prv", "rdp", "gdp")

History = list[tuple[float, float, int]]  # [(noise_multiplier, sample_rate, steps)]


class PrivacyError(RuntimeError):
    """A privacy invariant would be violated (budget, ledger integrity)."""


def _accountant(name: str) -> Any:
    from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    if name == "gdp":
        return GaussianAccountant()
    raise ValueError(f"unknown accountant {name!r} (choose from {', '.join(ACCOUNTANTS)})")


# Opacus' RDPAccountant.DEFAULT_ALPHAS (a test pins the two equal).
RDP_ORDERS: tuple[float, ...] = (*[1 + x / 10.0 for x in range(1, 100)], *range(12, 64))


@lru_cache(maxsize=1024)
def _unit_rdp(sigma: float, q: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at every order in RDP_ORDERS.

    Opacus' ``compute_rdp(steps=k)`` is this array times k, and it is the slow part of an ε:
    at the 99 fractional orders it sums a series in a Python loop (tenths of a second per
    (σ, q) on a 2-core VM).
    One ε evaluation asks for it several times at the same (σ, q) (the PRV safe-domain bound
    takes the RDP of the whole history and of each mechanism alone, at two error levels), and
    a calibration composes the same prior release each time; memoised, each (σ, q) costs it
    once. Read-only, so the cached array cannot be changed by a caller."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS)))
    rdp.flags.writeable = False
    return rdp


def _rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus' ``RDPAccountant(history).get_epsilon(delta)``, value for value (the same sum of
    the same arrays, the same conversion), from the memoised per-step RDP."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum([_unit_rdp(sigma, q) * steps for sigma, q, steps in history])
    eps, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def _prv_epsilon(history: Sequence[tuple[float, float, int]], delta: float,
                 eps_error: float) -> float:
    """Opacus' ``PRVAccountant(history).get_epsilon(delta, eps_error=eps_error)``, value for
    value: the same discretised privacy loss random variables on the same domain, whose size
    (Gopi et al., remark 5.6, as Opacus' ``compute_safe_domain_size``) comes from RDP bounds
    taken here from the memoised per-step RDP instead of recomputed on every call."""
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    delta_error = delta / 1000  # Opacus' default
    counts = [steps for _, _, steps in history]
    total = sum(counts)
    bound = _rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        bound = max(bound, _rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
    half_width = max(bound, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    dprvs = [discretize(TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma),
                                                       domain.t_min, domain.t_max), domain)
             for sigma, q, _ in history]
    dprv = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
    _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    return float(eps_upper)


def canonical_history(history: Iterable[tuple[float, float, int]]) -> History:
    """Merge entries with the same (σ, q): composing k then m steps of one mechanism is k+m
    steps of it. A canonical form makes ε independent of how rounds were split."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    return [(s, q, k) for (s, q), k in merged.items()]


@lru_cache(maxsize=256)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float,
                    name: str) -> float:
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf  # a noiseless release has no finite ε
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # RDP: "optimal order is the largest alpha" only means the bound could be a bit tighter.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        # PRV evaluates log(1 - q) in a branch np.where discards when q = 1 (a release on the
        # whole data, e.g. a private feature mean): harmless division by zero.
        return _get_epsilon(history, name, delta)


def refined_eps_error(rough: float) -> float:
    """PRV's ε is within an *absolute* eps_error. Opacus' default 0.01 is 2 % of ε≈0.5 and
    20 % of ε≈0.05, so fedllm refines relative to a first estimate: ≤ 0.4 % of ε (≥ 1e-4)."""
    return max(1e-4, min(0.002, 0.004 * rough))


def _get_epsilon(history: Sequence[tuple[float, float, int]], name: str, delta: float, *,
                 refine: bool = True) -> float:
    """ε by the named accountant; ``refine=False``: PRV at Opacus' default eps_error only."""
    if name == "prv":
        rough = _prv_epsilon(history, delta, 0.01)
        return _prv_epsilon(history, delta, refined_eps_error(rough)) if refine else rough
    if name == "rdp":
        return _rdp_epsilon(history, delta)
    acc = _accountant(name)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def compute_epsilon(history: Iterable[tuple[float, float, int]], *, delta: float,
                    accountant: str) -> float:
    """ε(δ) of the composition of all DP-SGD steps in ``history``."""
    return _epsilon_cached(tuple(canonical_history(history)), float(delta), accountant)


def independent_epsilon(history: Iterable[tuple[float, float, int]], *, delta: float,
                        accountant: str) -> float:
    """ε of the same history from Google's dp-accounting (an implementation independent of
    Opacus): privacy loss distributions for "prv" and "gdp", RDP for "rdp". Used to verify
    every ε in the store (``fedllm privacy RUN --verify``)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    hist = canonical_history(history)
    if not hist:
        return 0.0
    if any(s == 0 for s, _, _ in hist):
        return math.inf
    event = dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in hist])
    acc: Any
    if accountant == "rdp":
        # Opacus' default orders, so the two RDP bounds are comparable.
        acc = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
    else:
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def check_prior_fits(prior: tuple[tuple[float, float, int], ...], *, epsilon_limit: float,
                     delta: float, accountant: str, what: str) -> float:
    """ε of the releases planned before training; PrivacyError if they alone reach the limit
    (every node would refuse them, or have nothing left to train with). Returns that ε."""
    eps = compute_epsilon(prior, delta=delta, accountant=accountant) if prior else 0.0
    if eps >= epsilon_limit:
        raise PrivacyError(f"{what} alone spends ε = {eps:.3f} ≥ the limit {epsilon_limit:g} "
                           f"(δ={delta:g}): raise its noise multiplier or turn it off")
    return eps


def check_center_budget(cfg: RunConfig) -> None:
    """A run's class-statistics release (train.center_features) must leave budget to train:
    PrivacyError otherwise (the CLI's pre-flight and the coordinator's start)."""
    if cfg.centers_features:
        p = cfg.privacy
        check_prior_fits(cfg.center_prior(), epsilon_limit=p.epsilon_limit, delta=p.delta,
                         accountant=p.accountant,
                         what="the class-statistics release (privacy.center_noise_multiplier)")


@lru_cache(maxsize=256)
def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str, prior: tuple[tuple[float, float, int], ...] = ()) -> float:
    """Smallest σ (to 0.01 in ε) such that ``steps`` DP-SGD steps at rate q give ≤ target ε.

    Called with the whole run's planned steps (rounds × local epochs × steps per epoch), so
    the target holds at the end of the run, not per round. ``prior``: releases composed with
    the steps (e.g. a private feature mean); σ then covers what the target leaves after them.
    """
    if steps <= 0:
        raise ValueError("calibration needs a positive number of steps")
    if prior:
        return _calibrate_after(target_epsilon, delta, sample_rate, steps, accountant, prior)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        # q = 1 (full-batch steps): PRV's harmless log(1 - q), as in _epsilon_cached.
        return _bisect_noise(target_epsilon, delta, sample_rate, steps, accountant)


def _bisect_noise(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """Opacus' ``get_noise_multiplier(..., epsilon_tolerance=0.01)``, step for step (the same
    σ out), with each ε from this module's memoised RDP: double σ from 20 until ε ≤ target,
    then bisect until ε is within 0.01 below it. ε as Opacus' accountants give it by default
    (PRV at eps_error 0.01); the refined ε of :func:`compute_epsilon` is what gets recorded."""
    def eps(sigma: float) -> float:
        return _get_epsilon([(sigma, q, steps)], accountant, delta, refine=False)

    eps_high = math.inf
    sigma_low, sigma_high = 0.0, 10.0
    while eps_high > target:
        sigma_high = 2 * sigma_high
        eps_high = eps(sigma_high)
        if sigma_high > 1e6:  # Opacus' MAX_SIGMA
            raise ValueError("The privacy budget is too low.")
    while target - eps_high > 0.01:
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e < target:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high


def _calibrate_after(target: float, delta: float, q: float, steps: int, accountant: str,
                     prior: tuple[tuple[float, float, int], ...]) -> float:
    """Bisection on σ for ε(prior + steps at (σ, q)) ≤ target (ε falls as σ grows)."""
    if compute_epsilon(prior, delta=delta, accountant=accountant) >= target:
        raise PrivacyError(f"the releases before training already spend the whole ε = "
                           f"{target:g}; nothing is left to train with")

    def eps(sigma: float) -> float:
        return compute_epsilon([*prior, (sigma, q, steps)], delta=delta, accountant=accountant)

    # Without the prior σ would suffice for the whole target: start there.
    lo = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps,
                         accountant=accountant)
    hi = lo * 2
    while eps(hi) > target:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-3 * hi and eps(hi) < target - 0.01:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


@dataclass(frozen=True)
class DPSGDPlan:
    """A node's DP-SGD plan for a whole run, fixed before the first round."""

    num_examples: int
    sample_rate: float  # Poisson rate q = 1 / steps per epoch (≈ batch_size / N)
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    projected_epsilon: tuple[float, ...]  # cumulative ε after each round of this run alone
    calibrated: bool  # σ calibrated to the target (False: σ given explicitly)

    def round_history(self) -> History:
        return [(self.noise_multiplier, self.sample_rate, self.steps_per_round)]


def plan_dp_sgd(*, num_examples: int, batch_size: int, local_epochs: int, rounds: int,
                target_epsilon: float, delta: float, accountant: str,
                noise_multiplier: float | None = None, project: bool = True,
                prior: tuple[tuple[float, float, int], ...] = (),
                local_steps: int | None = None) -> DPSGDPlan:
    """Calibrate σ once for the whole horizon (rounds × local steps at the node's rate) so the
    target ε holds after the *last* round; optionally project ε after each round. ``prior``:
    the node's releases before training (e.g. a private feature mean), composed with it.
    ``local_steps``: that many DP steps per round instead of ``local_epochs`` whole epochs
    (the same rate q)."""
    steps_per_epoch = math.ceil(num_examples / batch_size)
    q = 1.0 / steps_per_epoch  # what Opacus' DPDataLoader uses for this dataset size
    round_steps = local_steps if local_steps is not None else local_epochs * steps_per_epoch
    if round_steps <= 0:
        raise ValueError("a round needs at least one local step")
    calibrated = noise_multiplier is None
    sigma = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=q,
                            steps=rounds * round_steps, accountant=accountant, prior=prior) \
        if noise_multiplier is None else float(noise_multiplier)
    projected = tuple(compute_epsilon([*prior, (sigma, q, r * round_steps)], delta=delta,
                                      accountant=accountant)
                      for r in range(1, rounds + 1)) if project else ()
    return DPSGDPlan(num_examples, q, round_steps, rounds, sigma, projected, calibrated)


@dataclass(frozen=True)
class CentralPlan:
    """Node-level DP at aggregation (see config.CentralDPConfig): one Gaussian release per
    round, each node sampled independently with probability ``sample_rate``."""

    sample_rate: float
    expected_nodes: float  # the fixed denominator q·N of the average
    clip_norm: float
    noise_multiplier: float
    noise_std: float  # per coordinate of the averaged update: σ·C / (q·N)
    rounds: int
    projected_epsilon: tuple[float, ...]


def plan_central_dp(*, num_nodes: int, nodes_per_round: int, rounds: int, clip_norm: float,
                    target_epsilon: float, delta: float, accountant: str,
                    noise_multiplier: float | None = None) -> CentralPlan:
    q = nodes_per_round / num_nodes
    sigma = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=q,
                            steps=rounds, accountant=accountant) \
        if noise_multiplier is None else float(noise_multiplier)
    expected = q * num_nodes
    projected = tuple(compute_epsilon([(sigma, q, r)], delta=delta, accountant=accountant)
                      for r in range(1, rounds + 1))
    return CentralPlan(q, expected, clip_norm, sigma, sigma * clip_norm / expected, rounds,
                       projected)


@dataclass(frozen=True)
class LedgerEntry:
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float  # cumulative ε after this entry, as computed when recorded
    # Examples per user trained on in this round (the node's cap); None = no user column, so
    # nothing bounds one user's contribution.
    user_cap: int | None = None


@dataclass
class NodeLedger:
    """Per-node, per-dataset record of every DP release, persisted by the node."""

    node: str
    dataset: str  # fingerprint of the node's data: the ledger follows the data
    accountant: str
    delta: float
    entries: list[LedgerEntry] = field(default_factory=list)
    # Explicit operator resets, kept forever: {time, operator, reason, epsilon_before, entries}.
    resets: list[dict[str, Any]] = field(default_factory=list)

    def reset(self, *, operator: str, reason: str, now: float) -> dict[str, Any]:
        """Start again from zero spent ε, keeping the old entries in ``resets`` (an operator's
        explicit, recorded decision, e.g. after the data was replaced)."""
        if not reason.strip():
            raise PrivacyError("a ledger reset needs a reason (it is kept in the ledger)")
        record = {"time": now, "operator": operator, "reason": reason,
                  "epsilon_before": self.epsilon(), "entries": [asdict(e) for e in self.entries]}
        self.resets.append(record)
        self.entries = []
        return record

    def history(self) -> History:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self, extra: Sequence[tuple[float, float, int]] = ()) -> float:
        return compute_epsilon(self.history() + list(extra), delta=self.delta,
                               accountant=self.accountant)

    def has_round(self, run_id: str, rnd: int) -> bool:
        return any(e.run_id == run_id and e.round == rnd for e in self.entries)

    def record(self, run_id: str, rnd: int, history: Sequence[tuple[float, float, int]],
               *, user_cap: int | None = None) -> float:
        """Append a trained round's releases; returns the new cumulative ε."""
        if self.has_round(run_id, rnd):
            raise PrivacyError(
                f"ledger of {self.node}: round {rnd} of run {run_id} already recorded")
        for sigma, q, steps in canonical_history(history):
            eps = self.epsilon(extra=[(sigma, q, steps)])
            self.entries.append(LedgerEntry(run_id, rnd, sigma, q, steps, eps, user_cap))
        return self.epsilon()

    def user_level(self) -> UserLevel:
        """User-level (ε, δ) of everything in the ledger (see :func:`user_level_bound`)."""
        return user_level_bound(self.epsilon(), self.delta,
                                [e.user_cap for e in self.entries])

    # -- persistence (atomic: a crash leaves either the old or the new file) ------------------

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "dataset": self.dataset,
                           "accountant": self.accountant, "delta": self.delta,
                           "entries": [asdict(e) for e in self.entries],
                           "resets": self.resets,
                           # informational (recomputed on load): how user-level ε is known
                           "user_level": asdict(self.user_level())}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> NodeLedger:
        d = json.loads(text)
        return cls(node=d["node"], dataset=d["dataset"], accountant=d["accountant"],
                   delta=float(d["delta"]), entries=[LedgerEntry(**e) for e in d["entries"]],
                   resets=list(d.get("resets", [])))

    def save(self, path: Path) -> None:
        from fedllm.sealed import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.to_json().encode("utf-8"))

    def save_sealed(self, box: SealedDir) -> None:
        """Persist sealed (AES-GCM) under the node key, tracked by the state manifest."""
        box.write(sealed_ledger_name(self.dataset), self.to_json().encode("utf-8"))

    @classmethod
    def load_or_create(cls, path: Path, *, node: str, dataset: str, accountant: str,
                       delta: float, box: SealedDir | None = None) -> NodeLedger:
        """The node's ledger for ``dataset``. With ``box`` (a node key is configured) it is
        read from the sealed state folder: deleted, tampered or rolled back is a
        PrivacyError, never a fresh ledger. A plain JSON ledger left at ``path`` by an older
        fedllm is taken over (sealed, then removed) so no spend is forgotten."""
        text: str | None
        if box is not None:
            name = sealed_ledger_name(dataset)
            try:
                raw = box.read(name)
            except SealedError as e:
                raise PrivacyError(f"privacy ledger of {node} cannot be trusted: {e}; refusing "
                                   "to train rather than restart from zero spent ε") from None
            text = raw.decode("utf-8") if raw is not None else None
            where = str(box.root / name)
            if text is None and path.exists():  # migrate a plain ledger into sealed state
                ledger = cls._parse(path.read_text(encoding="utf-8"), str(path))
                ledger.save_sealed(box)
                path.unlink()
                text = ledger.to_json()
        else:
            text = path.read_text(encoding="utf-8") if path.exists() else None
            where = str(path)
        if text is None:
            return cls(node=node, dataset=dataset, accountant=accountant, delta=delta)
        ledger = cls._parse(text, where)
        if (ledger.accountant, ledger.delta) != (accountant, delta):
            raise PrivacyError(
                f"privacy ledger {where} uses accountant={ledger.accountant} δ={ledger.delta}, "
                f"the run asks for accountant={accountant} δ={delta}; a node keeps one "
                "accountant and δ per dataset"
            )
        return ledger

    @classmethod
    def _parse(cls, text: str, where: str) -> NodeLedger:
        try:
            return cls.from_json(text)
        except (ValueError, KeyError, TypeError) as e:
            raise PrivacyError(f"privacy ledger {where} is unreadable ({e}); refusing to train "
                               "rather than restart from zero spent ε") from None


def ledger_path(state_dir: Path, dataset: str) -> Path:
    return state_dir / f"ledger-{dataset}.json"


def sealed_ledger_name(dataset: str) -> str:
    return f"ledger-{dataset}.sealed"


# --------------------------------------------------------------------------------------------
# User-level privacy (issue 9): per-user contribution bounding + group privacy

USER_LEVEL_GROUP = "group-privacy bound"
USER_LEVEL_UNKNOWN = "unknown (no user column or no per-user cap)"


def group_privacy_bound(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """Group privacy: a mechanism that is (ε, δ)-DP for one example is, for any group of k
    examples (here: everything one user contributes when each user is capped at k examples),

        (k·ε,  k·e^{(k-1)·ε}·δ)-DP.

    (Induction over a chain of k neighbouring datasets; Dwork & Roth, Thm. 2.2 for δ = 0, and
    Vadhan 2017, Lemma 2.2 for δ > 0.) The δ term grows like e^{(k-1)ε}, so for large k·ε it
    is ≥ 1, i.e. the bound says nothing — the ledger reports it as it is rather than hide it.
    """
    if k < 1:
        raise ValueError(f"group size must be ≥ 1, got {k}")
    if math.isinf(epsilon):
        return math.inf, 1.0
    try:
        d = k * math.exp((k - 1) * epsilon) * delta
    except OverflowError:
        d = math.inf
    return k * epsilon, min(1.0, d)


@dataclass(frozen=True)
class UserLevel:
    """User-level guarantee of a ledger: ``method`` says how it was obtained."""

    method: str  # USER_LEVEL_GROUP or USER_LEVEL_UNKNOWN
    epsilon: float | None = None
    delta: float | None = None
    cap: int | None = None  # the largest per-user cap over the ledger's entries


def user_level_bound(epsilon: float, delta: float,
                     caps: Sequence[int | None]) -> UserLevel:
    """User-level (ε, δ) of releases with example-level (ε, δ) whose rounds capped each user
    at ``caps`` examples. Any round without a cap (no user column) makes it unknown; with caps
    the bound uses the largest one (a user contributes at most that many to every round)."""
    if not caps:
        return UserLevel(USER_LEVEL_GROUP, 0.0, 0.0, None)
    if any(c is None for c in caps):
        return UserLevel(USER_LEVEL_UNKNOWN)
    k = max(int(c) for c in caps if c is not None)
    eps_u, delta_u = group_privacy_bound(epsilon, delta, k)
    return UserLevel(USER_LEVEL_GROUP, eps_u, delta_u, k)
