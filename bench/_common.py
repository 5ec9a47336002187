"""Shared benchmark plumbing: machine info, result rows, data paths, thread settings."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED_SST2 = REPO.parent / "shared" / "data" / "sst2"
DEMO = REPO / "fedllm" / "demo_data"


def sst2_paths() -> tuple[Path, Path]:
    """(train, dev) of SST-2: the shared full copy when present, else the shipped sample."""
    if (SHARED_SST2 / "train.tsv").is_file():
        return SHARED_SST2 / "train.tsv", SHARED_SST2 / "dev.tsv"
    return DEMO / "sst2_train_sample.tsv", DEMO / "sst2_dev.tsv"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
    }
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # > cpu_count: a loaded machine
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def set_threads(requested: int) -> int:
    """torch intra-op threads for a benchmark: ``requested`` if > 0, else 1 when the machine is
    oversubscribed (1-minute load average above the core count), else torch's default.

    Measured here (2 cores, load average ~10): a MiniLM forward+backward ran at 7.7 samples/s
    with 2 threads and 33-71 with 1; OpenMP threads that wait for each other at every op
    barrier lose badly when other processes hold the cores.
    """
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
    else:
        with contextlib.suppress(OSError):
            if os.getloadavg()[0] > (os.cpu_count() or 1):
                torch.set_num_threads(1)
    return torch.get_num_threads()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(pid: int | None = None) -> float:
    """Current resident set size of a process (this one by default), from /proc."""
    path = Path(f"/proc/{pid or os.getpid()}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def finish(name: str, result: dict[str, Any], *, out_dir: Path | None = None) -> dict[str, Any]:
    """Add machine info and a timestamp, print the JSON, append it to results/<name>.jsonl."""
    row = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": machine(), **result}
    out = out_dir or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    print(json.dumps(row, indent=2, sort_keys=True))
    return row
