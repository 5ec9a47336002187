"""Privacy accounting speed: a node's whole-run DP plan with and without memoised RDP.

Every node (and ``fedllm run --dry-run``) calibrates σ for the whole run and projects ε after
each round before it trains. Opacus' PRV accountant sizes its discretisation domain from RDP
bounds, whose 99 fractional orders are a Python loop per (σ, q); fedllm computes the same ε
with that one-step RDP memoised (``fedllm.privacy._unit_rdp``). This benchmark times, in one
process and in ABBA order, ``plan_dp_sgd`` as fedllm runs it against the same code with the
memo switched off (each ε then recomputes its RDP as Opacus' own accountant does), and Opacus'
``PRVAccountant`` on the plan's final history to show the values are identical.

    python -m bench.accounting [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any
from unittest import mock

from bench._common import finish
from fedllm import privacy

PRIOR = ((4.0, 1.0, 1),)  # the class-statistics release (privacy.center_noise_multiplier)
SCENARIOS: dict[str, dict[str, Any]] = {
    # fedllm run's demo: 1,800 examples per node, batch 256 -> q = 1/8, 3 rounds of 8 steps
    "demo_node": {"num_examples": 1800, "batch_size": 256, "rounds": 3, "local_steps": None},
    # bench/utility --quick at ε = 8: 3,000 examples, batch 256, 18 rounds of 2 steps
    "utility_quick_node": {"num_examples": 3000, "batch_size": 256, "rounds": 18,
                           "local_steps": 2},
}


def clear_caches() -> None:
    for f in (privacy.calibrate_noise, privacy._epsilon_cached, privacy._unit_rdp):
        f.cache_clear()


def plan(scenario: dict[str, Any], *, memo: bool) -> tuple[float, privacy.DPSGDPlan]:
    clear_caches()
    # Without the memo every ε recomputes the RDP it needs, as Opacus' own accountant does.
    off = mock.patch.object(privacy, "_unit_rdp", privacy._unit_rdp.__wrapped__)
    with contextlib.nullcontext() if memo else off:
        t0 = time.perf_counter()
        p = privacy.plan_dp_sgd(local_epochs=1, target_epsilon=8.0, delta=1e-5,
                                accountant="prv", prior=PRIOR, **scenario)
        return time.perf_counter() - t0, p


def opacus_epsilon(p: privacy.DPSGDPlan) -> float:
    """ε of the plan's whole history from Opacus' PRVAccountant, refined as fedllm refines it."""
    from opacus.accountants import PRVAccountant

    history = [*PRIOR, (p.noise_multiplier, p.sample_rate, p.rounds * p.steps_per_round)]
    acc = PRVAccountant()
    acc.history = history
    rough = acc.get_epsilon(delta=1e-5, eps_error=0.01)
    return float(acc.get_epsilon(delta=1e-5, eps_error=privacy.refined_eps_error(rough)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the demo node only, one ABBA pass")
    ap.add_argument("--results-dir")
    a = ap.parse_args(argv)
    names = ["demo_node"] if a.quick else list(SCENARIOS)
    orders = [True, False] if a.quick else [True, False, False, True]  # memo first, then ABBA
    out: dict[str, Any] = {}
    for name in names:
        times: dict[str, list[float]] = {"memo": [], "no_memo": []}
        plans = []
        for memo in orders:
            seconds, p = plan(SCENARIOS[name], memo=memo)
            times["memo" if memo else "no_memo"].append(round(seconds, 2))
            plans.append(p)
        same = all(p == plans[0] for p in plans)
        final = plans[0].projected_epsilon[-1]
        out[name] = {
            "seconds": times,
            "speedup": round(min(times["no_memo"]) / min(times["memo"]), 2),
            "noise_multiplier": plans[0].noise_multiplier,
            "projected_epsilon": [round(e, 4) for e in plans[0].projected_epsilon],
            "same_plan_with_and_without_memo": same,
            "opacus_prv_epsilon_equal": opacus_epsilon(plans[0]) == final,
        }
        print(f"{name}: {out[name]}", flush=True)
    return finish("accounting", {
        "mode": "quick" if a.quick else "full",
        "config": {"scenarios": {n: SCENARIOS[n] for n in names}, "prior": PRIOR,
                   "target_epsilon": 8.0, "delta": 1e-5, "accountant": "prv",
                   "order": ["memo" if m else "no_memo" for m in orders]},
        "scenarios": out,
    }, out_dir=Path(a.results_dir) if a.results_dir else None)


if __name__ == "__main__":
    main()
