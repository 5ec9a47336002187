"""ε from fedllm's ledger vs Google's independent dp-accounting library."""

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedllm.privacy import (
    NodeLedger,
    PrivacyError,
    calibrate_noise,
    canonical_history,
    compute_epsilon,
    ledger_path,
    plan_dp_sgd,
)

OPACUS_RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def reference_epsilon(history, delta, accountant):
    events = [dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in history]
    event = dp_event.ComposedDpEvent(events)
    if accountant == "prv":
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    else:
        acc = rdp_privacy_accountant.RdpAccountant(orders=OPACUS_RDP_ORDERS)
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_pinned_history_matches_dp_accounting(accountant):
    # 3 rounds x 8 steps at q=1/8, sigma=0.763 (the demo run's node schedule)
    history = [(0.763, 0.125, 8)] * 3
    ours = compute_epsilon(history, delta=1e-5, accountant=accountant)
    ref = reference_epsilon(history, 1e-5, accountant)
    assert ours == pytest.approx(ref, rel=0.02)
    assert 5 < ours < 15


@settings(max_examples=12, deadline=None)
@given(
    rounds=st.lists(st.tuples(st.floats(0.6, 3.0), st.floats(0.01, 0.3), st.integers(1, 40)),
                    min_size=1, max_size=4),
    accountant=st.sampled_from(["prv", "rdp"]),
)
def test_random_histories_match_dp_accounting(rounds, accountant):
    ours = compute_epsilon(rounds, delta=1e-5, accountant=accountant)
    # Above ε≈20 the RDP optimum sits at the edge of both libraries' order grids and each
    # handles that differently; such budgets offer no meaningful protection anyway.
    assume(accountant == "prv" or ours <= 20)
    ref = reference_epsilon(canonical_history(rounds), 1e-5, accountant)
    assert ours == pytest.approx(ref, rel=0.02)


def test_calibration_hits_target_for_whole_run():
    q, steps_per_round, rounds = 0.1, 10, 5
    sigma = calibrate_noise(target_epsilon=3.0, delta=1e-5, sample_rate=q,
                            steps=rounds * steps_per_round, accountant="prv")
    eps = compute_epsilon([(sigma, q, steps_per_round)] * rounds, delta=1e-5, accountant="prv")
    assert 2.9 < eps <= 3.0
    # after the first of 5 rounds only part of the budget is spent (≈ sqrt composition)
    first = compute_epsilon([(sigma, q, steps_per_round)], delta=1e-5, accountant="prv")
    assert 0.2 * 3.0 < first < 0.6 * 3.0


def gaussian_mechanism_delta(eps, sigma):
    """Exact δ(ε) of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Thm. 8)."""
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))  # noqa: E731
    return phi(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * phi(-eps * sigma - 1 / (2 * sigma))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_release_on_the_whole_data_is_the_gaussian_mechanism(accountant):
    """A class-statistics release is one Gaussian release with q = 1 (history (σ, 1, 1)): PRV
    gives the exact Gaussian mechanism's ε (analytic formula), RDP a valid upper bound, both as
    dp-accounting computes them. σ = 4 is the default (privacy.center_noise_multiplier)."""
    for sigma, exact in ((20.0, 0.161), (4.0, 0.928)):
        ours = compute_epsilon([(sigma, 1.0, 1)], delta=1e-5, accountant=accountant)
        assert ours == pytest.approx(reference_epsilon([(sigma, 1.0, 1)], 1e-5, accountant),
                                     rel=0.02)
        assert gaussian_mechanism_delta(ours, sigma) <= 1e-5 * 1.02
        if accountant == "prv":
            assert ours == pytest.approx(exact, abs=0.003)
            assert gaussian_mechanism_delta(0.98 * ours, sigma) > 1e-5  # tight, not just valid


def test_calibration_leaves_room_for_earlier_releases():
    q, steps, target = 0.5, 6, 1.0  # bench/utility --quick at ε = 1: 2 steps a round, 3 rounds
    prior = ((20.0, 1.0, 1),)
    alone = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps,
                            accountant="prv")
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps,
                            accountant="prv", prior=prior)
    assert sigma > alone
    total = compute_epsilon([*prior, (sigma, q, steps)], delta=1e-5, accountant="prv")
    assert target - 0.01 <= total <= target
    assert total == pytest.approx(reference_epsilon([*prior, (sigma, q, steps)], 1e-5, "prv"),
                                  rel=0.02)
    # A node's plan (3,000 examples, batch 1,536 -> q = 1/2, 2 steps a round, 3 rounds) passes
    # the prior on and projects ε with it.
    plan = plan_dp_sgd(num_examples=3000, batch_size=1536, local_epochs=1, rounds=3,
                       target_epsilon=target, delta=1e-5, accountant="prv", prior=prior)
    assert plan.noise_multiplier == sigma and plan.projected_epsilon[-1] == pytest.approx(total)
    # Nodes plan every round with the same inputs: the (seconds-long) calibration is memoised
    hits = calibrate_noise.cache_info().hits
    calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps,
                    accountant="prv", prior=prior)
    assert calibrate_noise.cache_info().hits == hits + 1
    with pytest.raises(PrivacyError, match="already spend"):
        calibrate_noise(target_epsilon=0.1, delta=1e-5, sample_rate=q, steps=steps,
                        accountant="prv", prior=prior)


# (σ, q, steps) histories as nodes record them: a run's DP-SGD steps, with a class-statistics
# release (q = 1) before them, and two schedules composed (a run resumed at another σ).
OPACUS_CASES = [
    [(0.708, 1 / 12, 36)],
    [(4.0, 1.0, 1), (0.776, 1 / 12, 36)],
    [(1.2, 0.02, 300), (0.9, 0.3, 5)],
]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha",
                            "ignore:divide by zero encountered in log")
@pytest.mark.parametrize("history", OPACUS_CASES)
def test_epsilon_is_opacus_accountants_value_for_value(history):
    """fedllm computes PRV and RDP ε from memoised per-step RDP (privacy._unit_rdp) instead of
    calling Opacus' accountants, which recompute it several times per ε: the numbers must be
    exactly Opacus', not merely close."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    from fedllm import privacy

    assert list(privacy.RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert privacy._rdp_epsilon(history, 1e-5) == rdp.get_epsilon(delta=1e-5)
    for eps_error in (0.01, 0.002):
        prv = PRVAccountant()
        prv.history = list(history)
        assert privacy._prv_epsilon(history, 1e-5, eps_error) == \
            prv.get_epsilon(delta=1e-5, eps_error=eps_error)
    with pytest.raises(ValueError, match="read-only"):
        privacy._unit_rdp(*history[0][:2])[0] = 0.0  # the cache cannot be corrupted


@pytest.mark.parametrize(("accountant", "q", "steps", "target"),
                         [("prv", 0.1, 10, 3.0), ("rdp", 1 / 12, 36, 8.0),
                          ("gdp", 0.05, 100, 2.0)])
def test_calibration_is_opacus_get_noise_multiplier(accountant, q, steps, target):
    """The same search as Opacus' get_noise_multiplier, on fedllm's memoised ε: the same σ."""
    from opacus.accountants.utils import get_noise_multiplier

    ours = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps,
                           accountant=accountant)
    assert ours == get_noise_multiplier(target_epsilon=target, target_delta=1e-5,
                                        sample_rate=q, steps=steps, accountant=accountant,
                                        epsilon_tolerance=0.01)


def test_no_noise_means_infinite_epsilon_and_empty_is_zero():
    assert math.isinf(compute_epsilon([(0.0, 0.1, 3)], delta=1e-5, accountant="rdp"))
    assert compute_epsilon([], delta=1e-5, accountant="prv") == 0.0


def test_ledger_composes_persists_and_refuses_replays(tmp_path):
    path = ledger_path(tmp_path, "abc")
    led = NodeLedger.load_or_create(path, node="n0", dataset="abc", accountant="prv", delta=1e-5)
    e1 = led.record("run1", 1, [(1.0, 0.1, 10)])
    e2 = led.record("run1", 2, [(1.0, 0.1, 10)])
    assert 0 < e1 < e2
    led.save(path)
    again = NodeLedger.load_or_create(path, node="n0", dataset="abc", accountant="prv",
                                      delta=1e-5)
    assert again.epsilon() == pytest.approx(e2)
    assert again.epsilon() == pytest.approx(compute_epsilon([(1.0, 0.1, 20)], delta=1e-5,
                                                            accountant="prv"))
    with pytest.raises(PrivacyError, match="already recorded"):
        again.record("run1", 2, [(1.0, 0.1, 10)])


def test_ledger_never_silently_resets(tmp_path):
    path = ledger_path(tmp_path, "abc")
    path.write_text("{corrupted")
    with pytest.raises(PrivacyError, match="refusing to train"):
        NodeLedger.load_or_create(path, node="n0", dataset="abc", accountant="prv", delta=1e-5)
    led = NodeLedger(node="n0", dataset="abc", accountant="prv", delta=1e-5)
    led.save(path)
    with pytest.raises(PrivacyError, match="one accountant and δ"):
        NodeLedger.load_or_create(path, node="n0", dataset="abc", accountant="rdp", delta=1e-5)


# -- user-level privacy and the sealed ledger (issue 9) -----------------------------------------


def test_group_privacy_bound_formula():
    from fedllm.privacy import group_privacy_bound

    assert group_privacy_bound(0.5, 1e-6, 1) == (0.5, 1e-6)
    eps, delta = group_privacy_bound(0.1, 1e-8, 20)
    assert eps == pytest.approx(2.0)
    assert delta == pytest.approx(20 * math.exp(19 * 0.1) * 1e-8)  # 1.337e-06
    assert group_privacy_bound(4.0, 1e-5, 20) == (80.0, 1.0)  # vacuous δ, reported as such
    with pytest.raises(ValueError):
        group_privacy_bound(1.0, 1e-5, 0)


def test_ledger_user_level_is_the_group_bound_of_the_cap_or_unknown():
    from fedllm.privacy import USER_LEVEL_GROUP, USER_LEVEL_UNKNOWN, group_privacy_bound

    capped = NodeLedger(node="n", dataset="d", accountant="rdp", delta=1e-5)
    capped.record("r", 1, [(4.0, 0.01, 100)], user_cap=20)
    capped.record("r", 2, [(4.0, 0.01, 100)], user_cap=5)
    u = capped.user_level()
    assert u.method == USER_LEVEL_GROUP == "group-privacy bound" and u.cap == 20
    assert (u.epsilon, u.delta) == group_privacy_bound(capped.epsilon(), 1e-5, 20)
    assert '"group-privacy bound"' in capped.to_json()
    uncapped = NodeLedger(node="n", dataset="d", accountant="rdp", delta=1e-5)
    uncapped.record("r", 1, [(4.0, 0.01, 100)])
    assert uncapped.user_level().method == USER_LEVEL_UNKNOWN
    assert uncapped.user_level().epsilon is None
    # entries of older ledgers (no user_cap field) load as unknown
    assert NodeLedger.from_json(uncapped.to_json()).entries[0].user_cap is None


def test_sealed_ledger_roundtrip_tamper_delete_and_migration(tmp_path):
    from fedllm.sealed import SealedDir, create_key_file

    box = SealedDir.initialise(tmp_path, create_key_file(tmp_path / "node.key"))
    kw = dict(node="n", dataset="abc", accountant="rdp", delta=1e-5)
    plain = ledger_path(tmp_path, "abc")
    # an older fedllm's plain ledger is taken over, not forgotten
    old = NodeLedger(**kw)
    old.record("r", 1, [(1.0, 0.1, 10)])
    old.save(plain)
    led = NodeLedger.load_or_create(plain, box=box, **kw)
    assert len(led.entries) == 1 and not plain.exists()
    assert (tmp_path / "ledger-abc.sealed").exists()
    led.record("r", 2, [(1.0, 0.1, 10)])
    led.save_sealed(box)
    assert len(NodeLedger.load_or_create(plain, box=box, **kw).entries) == 2
    sealed = tmp_path / "ledger-abc.sealed"
    raw = bytearray(sealed.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    sealed.write_bytes(bytes(raw))
    with pytest.raises(PrivacyError, match="cannot be trusted.*not the latest version"):
        NodeLedger.load_or_create(plain, box=box, **kw)
    sealed.unlink()
    with pytest.raises(PrivacyError, match="was deleted"):
        NodeLedger.load_or_create(plain, box=box, **kw)
