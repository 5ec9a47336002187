"""Real deployment on 127.0.0.1: coordinator (SuperLink) and nodes (SuperNodes) as separate
processes started with the same `fedllm` commands compose/compose.yml runs, TLS and node
authentication on, free ports, every process killed in a finally block.

- always on: credentials, a registered node is accepted, an unregistered node and a node
  trusting a wrong CA are rejected (the node gets no model), clear messages.
- slow: the full loopback run: 3 authenticated TLS nodes finish a 2-round DP-LoRA run while a
  rogue (unregistered) node and a wrong-CA node are rejected.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DEMO, REPO

ROWS_PER_NODE = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """A coordinator, nodes and the CLI calls around them, all in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "coordinator-home"
        self.certs = root / "certs"
        self.fleet = free_port()
        self.control = free_port()
        self.env = {**os.environ, "FEDLLM_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                    "FLWR_HOME": str(root / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PYTHONPATH": str(REPO)}
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.logs: dict[str, Path] = {}

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedllm.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        # Own process group: Flower spawns helpers (SuperExec, app processes) we must reap.
        p = subprocess.Popen([sys.executable, "-m", "fedllm.cli", *args], env=self.env,
                             stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                             cwd=self.root, start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        """The process's output, whitespace collapsed (rich wraps long lines)."""
        return " ".join(self.logs[name].read_text(errors="replace").split())

    def init(self, nodes: list[str]) -> None:
        r = self.cli("certs", "init", "--out", str(self.certs),
                     *[a for n in nodes for a in ("--node", n)])
        assert r.returncode == 0, r.stderr

    def start_coordinator(self) -> None:
        self.start("coordinator", "coordinator", "start", "--certs", str(self.certs),
                   "--fleet-address", f"127.0.0.1:{self.fleet}",
                   "--control-address", f"127.0.0.1:{self.control}")
        wait_for(lambda: "Starting Fleet API" in self.log("coordinator"), 120,
                 lambda: self.log("coordinator"))

    def register(self, name: str) -> None:
        r = self.cli("node", "register", str(self.certs / "nodes" / name / "node.pub"),
                     "--name", name, "--federation", "loop",
                     "--superlink", f"127.0.0.1:{self.control}",
                     "--root-certificates", str(self.certs / "ca.crt"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"registered .* as node \d+", r.stdout)

    def node_toml(self, name: str, rows: slice, *, ca: Path | None = None,
                  key_of: str | None = None) -> Path:
        d = self.root / name
        d.mkdir()
        lines = (DEMO / "sst2_train_sample.tsv").read_text().splitlines()
        (d / "train.tsv").write_text("\n".join([lines[0], *lines[1:][rows]]) + "\n")
        (d / "node.toml").write_text(f"""
[node]
name = "{name}"

[data]
path = "train.tsv"

[privacy]
max_epsilon = 10.0

[connection]
superlink = "127.0.0.1:{self.fleet}"
root_certificates = "{ca or self.certs / 'ca.crt'}"
auth_private_key = "{self.certs / 'nodes' / (key_of or name) / 'node.key'}"
runtime_port = {free_port()}
""")
        return d / "node.toml"

    def start_node(self, name: str, toml: Path) -> subprocess.Popen[str]:
        return self.start(name, "node", "start", "--config", str(toml),
                          "--home", str(self.root / f"{name}-home"))

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
            # Flower's helpers may outlive the leader of the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def wait_for(cond, timeout: float, describe) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s:\n{describe()[-4000:]}")


def assert_rejected(dep: Deployment) -> None:
    """The unregistered node and the wrong-CA node stop on their own, with clear messages,
    and the coordinator logged the refused key."""
    rogue, wrong = dep.procs["rogue"], dep.procs["wrongca"]
    assert wrong.wait(timeout=180) == 2, dep.log("wrongca")
    assert "TLS verification of the coordinator" in dep.log("wrongca")
    assert "not signed by" in dep.log("wrongca")
    assert rogue.wait(timeout=240) == 3, dep.log("rogue")
    assert "was refused by the coordinator" in dep.log("rogue")
    assert "No SuperNode found with the given public key" in dep.log("coordinator")


def test_certs_files_and_permissions(tmp_path):
    dep = Deployment(tmp_path)
    dep.init(["a"])
    for key in ("ca.key", "server.key", "nodes/a/node.key"):
        assert (dep.certs / key).stat().st_mode & 0o777 == 0o600
    assert (dep.certs / "nodes/a/node.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    r = dep.cli("certs", "init", "--out", str(dep.certs), "--host", "bad host")
    assert r.returncode == 2 and "invalid host" in r.stderr


def test_registered_node_joins_unregistered_and_wrong_ca_rejected(tmp_path):
    dep = Deployment(tmp_path)
    try:
        dep.init(["alpha", "rogue"])
        assert dep.cli("certs", "init", "--out", str(tmp_path / "other" / "certs")
                       ).returncode == 0
        dep.start_coordinator()
        dep.register("alpha")
        dep.start_node("alpha", dep.node_toml("alpha", slice(0, 120)))
        dep.start_node("rogue", dep.node_toml("rogue", slice(120, 240)))
        dep.start_node("wrongca", dep.node_toml(
            "wrongca", slice(240, 360), ca=tmp_path / "other" / "certs" / "ca.crt",
            key_of="alpha"))
        assert_rejected(dep)
        wait_for(lambda: dep.log("coordinator").count("[Fleet.ActivateNode] Activated") == 1,
                 120, lambda: dep.log("coordinator") + dep.log("alpha"))
        assert dep.procs["alpha"].poll() is None, dep.log("alpha")
    finally:
        dep.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_loopback_tls_auth_dp_run(tmp_path):
    """Three authenticated TLS nodes finish a 2-round DP-LoRA run, securely aggregated
    (SecAgg+, on by default for deployments), submitted with `fedllm run --federation`; a rogue
    and a wrong-CA node are rejected meanwhile."""
    dep = Deployment(tmp_path)
    names = ["alpha", "beta", "gamma"]
    try:
        dep.init([*names, "rogue"])
        assert dep.cli("certs", "init", "--out", str(tmp_path / "other")).returncode == 0
        dep.start_coordinator()
        for i, n in enumerate(names):
            dep.register(n)
            dep.start_node(n, dep.node_toml(n, slice(i * ROWS_PER_NODE,
                                                     (i + 1) * ROWS_PER_NODE)))
        dep.start_node("rogue", dep.node_toml("rogue", slice(360, 480)))
        dep.start_node("wrongca", dep.node_toml("wrongca", slice(480, 600),
                                                ca=tmp_path / "other" / "ca.crt",
                                                key_of="alpha"))
        r = dep.cli("run", "--federation", "loop", "--nodes", "3", "--rounds", "2",
                    "--epsilon", "8", "-s", "train.batch_size=40",
                    "-s", "train.physical_batch_size=20", "-s", "train.learning_rate=0.01",
                    "-s", "data.max_eval_examples=200", "-s", "name='loopback'",
                    "--timeout", "1200", timeout=1300)
        assert r.returncode == 0, r.stdout + r.stderr + dep.log("coordinator")[-3000:]
        assert "privacy spent per node" in r.stdout and "transport: TLS" in r.stdout
        assert_rejected(dep)
        st = dep.cli("status", "latest", "--json")
        run = json.loads(st.stdout)
        assert run["state"] == "finished" and run["mode"] == "deployment"
        assert run["secure_transport"]
        assert run["secure_aggregation"]  # deployments: SecAgg+ on by default
        assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
        for rnd in run["rounds"][1:]:
            assert sorted(n["node_id"] for n in rnd["nodes"]) == names
            assert all(n["status"] == "ok" for n in rnd["nodes"])
        eps = {n["node_id"]: n["epsilon"] for n in run["rounds"][2]["nodes"]}
        assert all(0 < e <= 8.0 for e in eps.values())
        # Each node's ledger is in its own home, never in the coordinator's.
        for n in names:
            assert list((tmp_path / f"{n}-home" / "nodes" / n).glob("ledger*"))
    finally:
        dep.stop_all()
