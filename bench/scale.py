"""Scale: many virtual nodes in Flower's simulation engine, with tiny local work.

100 virtual nodes, 10 sampled per round, 20 rounds (``--quick``: 6 rounds), DP on. Reports each
round's wall time and the peak resident memory of the whole process tree during the round
(driver + Ray + node worker processes), sampled every 0.2 s. Target: no failure and flat memory
(no growth after round 3: node processes cache the model and do not rebuild it per round).

    python -m bench.scale [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from bench._common import finish, sst2_paths
from fedllm.config import RunConfig
from fedllm.coordinator import RoundReport


def _tree_rss_mb(root: int) -> tuple[float, float]:
    """(total RSS of ``root`` and all its descendants, largest single descendant), in MB."""
    parent: dict[int, int] = {}
    rss: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            # the command name may contain spaces; ppid is the 2nd field after ") "
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            status = Path(f"/proc/{d}/status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        parent[int(d)] = ppid
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(d)] = int(line.split()[1]) / 1024
                break
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = sum(rss.get(p, 0.0) for p in tree)
    largest_child = max((rss.get(p, 0.0) for p in tree if p != root), default=0.0)
    return total, largest_child


class _Sampler:
    """Background thread: peak tree RSS since the last :meth:`take`."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_total = 0.0
        self.peak_child = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total, child = _tree_rss_mb(me)
            with self._lock:
                self.peak_total = max(self.peak_total, total)
                self.peak_child = max(self.peak_child, child)
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def take(self) -> tuple[float, float]:
        with self._lock:
            out = (self.peak_total, self.peak_child)
            self.peak_total = self.peak_child = 0.0
        return out


class _Observer:
    def __init__(self, sampler: _Sampler) -> None:
        self.sampler = sampler
        self.rounds: list[dict] = []
        self.round0: dict = {}
        self._t0 = time.perf_counter()

    def round_started(self, rnd: int, num_nodes: int) -> None:
        self.sampler.take()  # the round's peak starts here
        self._t0 = time.perf_counter()

    def node_replied(self, rnd: int) -> None:
        pass

    def round_finished(self, report: RoundReport) -> None:
        total, child = self.sampler.take()
        if report.round == 0:  # the public counts (and the class-statistics release, if asked)
            self.round0 = {"seconds": round(time.perf_counter() - self._t0, 2),
                           "released_by": len(report.nodes), "rss_mb": round(total, 1)}
            return
        ok = sum(1 for n in report.nodes if n.get("status") == "ok")
        self.rounds.append({"round": report.round, "seconds": time.perf_counter() - self._t0,
                            "rss_mb": total, "largest_worker_rss_mb": child,
                            "nodes_ok": ok, "nodes": len(report.nodes),
                            "accuracy": report.metrics.get("accuracy")})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="6 rounds")
    size.add_argument("--smoke", action="store_true", help="20 nodes, 4 per round, 4 rounds")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--per-round", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--results-dir")
    args = ap.parse_args(argv)
    nodes = args.nodes or (20 if args.smoke else 100)
    per_round = args.per_round or (4 if args.smoke else 10)
    rounds = args.rounds or (4 if args.smoke else 6 if args.quick else 20)
    examples_per_node = 20
    train, dev = sst2_paths()
    cfg = RunConfig.model_validate({
        "name": "bench-scale", "seed": 0,
        "model": {"max_length": 32},
        "data": {"train_paths": [str(train)], "eval_path": str(dev),
                 "max_examples": nodes * examples_per_node, "max_eval_examples": 64},
        "partition": {"scheme": "iid"},
        "federation": {"num_nodes": nodes, "nodes_per_round": per_round, "rounds": rounds},
        "train": {"batch_size": 10, "physical_batch_size": 10, "learning_rate": 0.01},
        "privacy": {"target_epsilon": 8.0},
    })
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from server.simulation import simulate

    sampler = _Sampler()
    observer = _Observer(sampler)
    sampler.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedllm-bench-scale-") as home:
        summary = simulate(cfg, home=Path(home), run_id="bench-scale", observer=observer)
        from fedllm.store import Store, default_db_path

        with Store(default_db_path(Path(home)), read_only=True) as store:
            center = store.get_run("bench-scale").get("feature_center") or {}
            ledger = store.ledger("bench-scale")
    total_seconds = time.perf_counter() - t0
    sampler.stop()
    rss = [round(r["rss_mb"], 1) for r in observer.rounds]
    # Growth after round 3: the largest later peak minus round 3's peak.
    growth = round(max(rss[3:]) - rss[2], 1) if len(rss) > 3 else None
    result = {
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "config": {"num_nodes": nodes, "nodes_per_round": per_round, "rounds": rounds,
                   "examples_per_node": examples_per_node, "batch_size": 10, "max_length": 32,
                   "eval_examples": 64, "dp": True, "target_epsilon": 8.0,
                   "backend": "flwr simulation (ray), 1 CPU per virtual node"},
        "state": summary.state,
        "rounds_completed": len(observer.rounds),
        "failures": sum(r["nodes"] - r["nodes_ok"] for r in observer.rounds),
        "round_seconds": [round(r["seconds"], 2) for r in observer.rounds],
        "rss_mb_per_round": rss,
        "largest_worker_rss_mb_per_round": [round(r["largest_worker_rss_mb"], 1)
                                            for r in observer.rounds],
        "rss_growth_after_round3_mb": growth,
        "accuracy_per_round": [r["accuracy"] for r in observer.rounds],
        "total_seconds": round(total_seconds, 1),
        # Round 0: is the class-statistics release asked for, and what do nodes spend on it?
        "round0": observer.round0 | {
            "released": center.get("released"), "centre_used": center.get("used"),
            "expected_noise_norm": center.get("expected_noise_norm"),
            "ledger_entries_round0": sum(1 for e in ledger if e["entry_round"] == 0)},
        "max_node_epsilon": max((e["epsilon"] for e in ledger), default=None),
    }
    return finish("scale", result, out_dir=Path(args.results_dir) if args.results_dir else None)


if __name__ == "__main__":
    main()
