"""Run a fedllm federation in Flower's simulation engine (virtual nodes, one machine)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedllm.config import RunConfig
from fedllm.coordinator import RunObserver, RunSummary


def simulate(config: RunConfig, *, home: Path, run_id: str,
             observer: RunObserver | None = None, verbose: bool = False,
             client_mods: list[Any] | None = None) -> RunSummary:
    """Federate ``config`` over ``federation.num_nodes`` virtual nodes; returns the summary.

    Exceptions of the coordinator (bad data, failed rounds) propagate to the caller after the
    run has been recorded as failed in the store. ``client_mods``: Flower mods wrapped around
    every node handler (tests use them to observe or drop a node).
    """
    import torch
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    # Quieter Ray: no dashboard, no accelerator env override warning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cpus = os.cpu_count() or 1
    use_gpu = torch.cuda.is_available() and config.train.device != "cpu"
    n = config.federation.num_nodes
    backend_config = {
        # One CPU per virtual node; nodes beyond the core count queue on the actor pool.
        "client_resources": {"num_cpus": 1, "num_gpus": (1.0 / min(n, 4)) if use_gpu else 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False,
                      "logging_level": "error" if not verbose else "info",
                      "log_to_driver": verbose},
    }
    result: list[RunSummary] = []
    run_simulation(
        server_app=make_server_app(config, home=home, run_id=run_id, observer=observer,
                                   result=result),
        client_app=make_client_app(home, mods=client_mods),
        num_supernodes=n,
        backend_config=backend_config,  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
    if not result:
        raise RuntimeError("the simulation ended without a result (see the log above)")
    return result[0]
