"""Real deployments over Flower 1.39's gRPC Fleet API: command lines and Control API calls.

What ``fedllm coordinator start``, ``fedllm node start``, ``fedllm node register`` and ``fedllm
run --federation`` do on the Flower side lives here (the CLI stays thin). The pieces:

- SuperLink (coordinator): Fleet API (gRPC-rere, default port 9092) for SuperNodes, Control API
  (HTTP, default 9093) for ``flwr run`` / registration, TLS with the federation's certificates,
  SuperNode authentication always on, runtime dependency installation off (offline).
- SuperNode (node): TLS trusting the federation's CA, authenticated with the node's P-384 key,
  ``--node-config node-config=<node.toml>`` so the ClientApp reads the operator's own file.
- Submitting: a Flower app folder (pyproject + the thin ``server``/``client`` adapters) is built
  on the fly and sent with ``flwr run``; the fedllm config travels as JSON in the run config.

Processes are started with this Python (``sys.executable``) so a venv or container image with
fedllm installed is all a machine needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import NodeConfig, RunConfig

# Flower's own defaults in earlier 1.x releases; the README, compose and this module agree.
DEFAULT_FLEET_ADDRESS = "0.0.0.0:9092"
DEFAULT_CONTROL_ADDRESS = "127.0.0.1:9093"
SECURE_TRANSPORT_ENV = "FEDLLM_SECURE_TRANSPORT"  # read by server.app (ServerApp process)

# Run each Flower entry point with this interpreter (console scripts may belong to another).
_LAUNCH = ("import sys; from {mod} import {fn} as f; sys.argv[0] = {name!r}; "
           "sys.exit(f())")


class DeployError(ValueError):
    """A deployment step cannot be done; the message says what and where."""


def _entry(mod: str, fn: str, name: str) -> list[str]:
    return [sys.executable, "-c", _LAUNCH.format(mod=mod, fn=fn, name=name)]


def flower_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a Flower process: fedllm home, no update check or telemetry (offline
    machines), models from local folders only."""
    env = dict(os.environ)
    env.update({"FEDLLM_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    env.update(extra or {})
    return env


def _split(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"invalid {what} {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, certs: Path) -> TlsFiles:
        tls = cls(certs / "ca.crt", certs / "server.crt", certs / "server.key")
        for p in (tls.ca_cert, tls.server_cert, tls.server_key):
            if not p.is_file():
                raise DeployError(f"TLS file missing: {p} (create the credentials with "
                                  f"`fedllm certs init --out {certs}`, or pass --insecure)")
        return tls


def superlink_command(*, home: Path, tls: TlsFiles | None, fleet_address: str,
                      control_address: str) -> list[str]:
    """``flower-superlink`` with TLS (``tls=None`` means the explicit ``--insecure``), node
    authentication on, state in ``home/superlink/state.db``."""
    _split(fleet_address, "fleet address")
    host, port = _split(control_address, "control address")
    cmd = _entry("flwr.superlink.cli", "flower_superlink", "flower-superlink")
    if tls is None:
        cmd += ["--insecure"]
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    (home / "superlink").mkdir(parents=True, exist_ok=True)
    return cmd + [
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--isolation", "subprocess",
        "--database", str(home / "superlink" / "state.db"),
        "--fleet-api-type", "grpc-rere", "--fleet-api-address", fleet_address,
        "--host", host, "--port", str(port),
    ]


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return (q if q.is_absolute() else base / q).resolve()


def supernode_command(config: NodeConfig, config_path: Path) -> list[str]:
    """``flower-supernode`` for the operator's node.toml (its [connection] section)."""
    conn = config.connection
    if conn is None:
        raise DeployError(f"{config_path}: no [connection] section (superlink, "
                          "root_certificates, auth_private_key) to start the node with")
    base = config_path.parent
    key = _resolve(base, conn.auth_private_key or "")
    check_node_private_key(key, where=f"{config_path} connection.auth_private_key")
    cmd = _entry("flwr.supernode.cli", "flower_supernode", "flower-supernode")
    if conn.insecure:
        cmd += ["--insecure"]
    else:
        ca = _resolve(base, conn.root_certificates or "")
        if not ca.is_file():
            raise DeployError(f"{config_path} connection.root_certificates: file not found: "
                              f"{ca}")
        cmd += ["--root-certificates", str(ca)]
    return cmd + [
        "--grpc-rere", "--superlink", conn.superlink,
        "--auth-supernode-private-key", str(key),
        "--isolation", "subprocess",
        "--port", str(conn.runtime_port),
        # A TOML string: json.dumps quotes and escapes it compatibly.
        "--node-config", f"node-config={json.dumps(str(config_path.resolve()))}",
        # Keep retrying a coordinator that restarts, but not forever on a dead address.
        "--max-wait-time", "600",
    ]


def check_node_private_key(path: Path, *, where: str) -> None:
    """The node key must be what Flower 1.39 accepts: an OpenSSH EC private key (NIST curve)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if not path.is_file():
        raise DeployError(f"{where}: file not found: {path}")
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as e:
        raise DeployError(f"{where}: {path} is not an OpenSSH private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{where}: {path} is not an elliptic-curve (P-384) key")


# --------------------------------------------------------------------------------------------
# Control API through Flower's own CLI (`flwr`), run with this Python.


@dataclass(frozen=True)
class Connection:
    """A SuperLink Control API connection as Flower's CLI config names it."""

    name: str
    address: str | None = None  # None = use the existing entry in Flower's config
    root_certificates: Path | None = None
    insecure: bool = False


def save_connection(conn: Connection, env: dict[str, str]) -> None:
    """Add or update ``[superlink.<name>]`` in Flower's config ($FLWR_HOME/config.toml), so
    that plain ``flwr run . <name>`` reaches the same SuperLink."""
    if conn.address is None:
        return
    _split(conn.address, "superlink (Control API) address")
    if not conn.insecure and conn.root_certificates is None:
        raise DeployError("--root-certificates (the federation's ca.crt) is needed for TLS; "
                          "plain text needs an explicit --insecure")
    if conn.root_certificates is not None and not conn.root_certificates.is_file():
        raise DeployError(f"--root-certificates: file not found: {conn.root_certificates}")
    code = ("import sys, json; from flwr.cli.flower_config import write_superlink_connection;"
            "from flwr.cli.typing import SuperLinkConnection; a = json.loads(sys.argv[1]);"
            "write_superlink_connection(SuperLinkConnection(**a))")
    args = {"name": conn.name, "address": conn.address, "insecure": conn.insecure or None,
            "root_certificates": str(conn.root_certificates.resolve())
            if conn.root_certificates else None}
    _run([sys.executable, "-c", code, json.dumps(args)], env, what="saving the connection")


def _run(cmd: list[str], env: dict[str, str], *, what: str,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise DeployError(f"{what}: no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise DeployError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc


def _flwr(args: list[str], env: dict[str, str], *, what: str) -> dict[str, Any]:
    proc = _run([sys.executable, "-m", "flwr.cli.app", *args, "--format", "json"], env,
                what=what)
    out = proc.stdout[proc.stdout.find("{"):]
    try:
        data: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        raise DeployError(f"{what}: unexpected answer from flwr: {proc.stdout[-1000:]}"
                          ) from None
    if not data.get("success", False):
        raise DeployError(f"{what} failed: {data.get('error-message') or data}")
    return data


def register_node(public_key: Path, conn: Connection, env: dict[str, str], *,
                  name: str | None = None) -> int:
    """Register a node's public key with the SuperLink; returns Flower's node id."""
    if not public_key.is_file():
        raise DeployError(f"public key file not found: {public_key}")
    save_connection(conn, env)
    args = ["supernode", "register", str(public_key), conn.name]
    if name:
        args += ["--name", name]
    data = _flwr(args, env, what=f"registering {public_key}")
    return int(data["node-id"])


def list_nodes(conn: Connection, env: dict[str, str]) -> list[dict[str, Any]]:
    save_connection(conn, env)
    return list(_flwr(["supernode", "list", conn.name], env, what="listing nodes")["nodes"])


APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedllm"
version = "0.1.0"
description = "fedllm ServerApp/ClientApp (the fedllm library is installed on every machine)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedllm"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
fedllm-config = ""
fedllm-config-json = ""
fedllm-run-id = ""
"""


def build_app_dir(dest: Path) -> Path:
    """A Flower app folder holding only the thin adapters (server/, client/) of this install,
    whatever the install (editable, wheel, container)."""
    import client
    import server

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    for pkg in (server, client):
        src = Path(pkg.__file__).parent  # type: ignore[arg-type]
        out = dest / src.name
        out.mkdir(exist_ok=True)
        for f in src.glob("*.py"):
            shutil.copy2(f, out / f.name)
    return dest


def submit_run(config: RunConfig, run_id: str, conn: Connection, env: dict[str, str],
               work_dir: Path) -> int:
    """``flwr run`` of fedllm's app with ``config`` on the SuperLink; returns Flower's run id."""
    save_connection(conn, env)
    app_dir = build_app_dir(work_dir / "app")
    # A TOML file, not KEY=VALUE pairs: Flower's inline parser cannot take a value holding
    # double quotes. JSON string escapes are valid TOML basic-string escapes; non-ASCII stays
    # raw (TOML rejects the surrogate pairs ensure_ascii would write).
    overrides = work_dir / "run-config.toml"
    config_json = json.dumps(config.to_dict(), ensure_ascii=False)
    overrides.write_text(f"fedllm-config-json = {json.dumps(config_json, ensure_ascii=False)}\n"
                         f"fedllm-run-id = {json.dumps(run_id)}\n", encoding="utf-8")
    data = _flwr(["run", str(app_dir), conn.name, "--run-config", str(overrides)], env,
                 what="submitting the run")
    return int(data["run-id"])


def flower_run_status(flower_run_id: int, conn: Connection, env: dict[str, str]) -> str:
    """Flower's status of a run: ``pending``, ``starting``, ``running``,
    ``finished:completed``, ``finished:failed``, ``finished:stopped``."""
    data = _flwr(["list", conn.name, "--run-id", str(flower_run_id)], env,
                 what="reading the run status")
    runs = data.get("runs") or []
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """True once something listens on host:port (used by tests and `node start` hints)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.2)
    return False


def check_tls(address: str, ca_cert: Path, *, wait: float = 120.0) -> None:
    """Check, before starting the SuperNode, that the coordinator at ``address`` presents a
    certificate signed by ``ca_cert`` and valid for that host name: a wrong CA or host gives a
    clear error here instead of Flower's generic connection failure. Waits up to ``wait``
    seconds for a coordinator that is not listening yet (containers start in any order)."""
    import socket
    import ssl

    host, port = _split(address, "superlink address")
    try:
        ctx = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as e:
        raise DeployError(f"cannot load the root certificate {ca_cert}: {e}") from None
    ctx.set_alpn_protocols(["h2"])  # what a gRPC client offers
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=10) as sock, \
                    ctx.wrap_socket(sock, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as e:
            raise DeployError(
                f"TLS verification of the coordinator at {address} failed: {e.verify_message}. "
                f"Its certificate is not signed by {ca_cert} or not valid for {host!r}: check "
                "connection.root_certificates (the federation's ca.crt) and the --host names "
                "given to `fedllm certs init`") from None
        except ssl.SSLError as e:
            raise DeployError(f"TLS handshake with the coordinator at {address} failed: {e} "
                              "(is it running with --insecure?)") from None
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DeployError(f"the coordinator at {address} is not reachable: {e}"
                                  ) from None
            time.sleep(2.0)


# What Flower 1.39's SuperNode logs when the SuperLink refuses its key (it exits with 1 for
# every error, so the log line is the only way to tell a refusal from other failures).
SUPERNODE_REFUSED_MARKERS = ("Failed to activate SuperNode", "[code: 2004]")


def run_child(cmd: list[str], env: dict[str, str],
              markers: tuple[str, ...] = ()) -> tuple[int, bool]:
    """Run ``cmd`` in the foreground, its output passed through to our stderr and SIGINT /
    SIGTERM forwarded to it. Returns (exit code, whether any of ``markers`` was logged).

    The child gets its own process group, ended when it exits: a SuperNode that gives up can
    leave its SuperExec helper behind, retrying forever and holding the output pipe open."""
    import signal
    import threading

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=True)
    seen = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
            if any(m in line for m in markers):
                seen.set()

    def signal_group(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    old = {s: signal.signal(s, lambda signum, _frame: signal_group(signum))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal_group(signal.SIGTERM)  # helpers the child left behind
        reader.join(timeout=10)
    return code, seen.is_set()
