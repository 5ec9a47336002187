"""Deployment commands: `fedllm certs init`, `fedllm coordinator start`, `fedllm node start`,
`fedllm node register`, and the waiting side of `fedllm run --federation`.

Thin: the Flower side (command lines, Control API calls) is in server/deploy.py, credentials in
fedllm/certs.py. `coordinator start` and `node start` *become* the Flower process (exec), so a
container's or test's signals reach Flower directly.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedllm.certs import DEFAULT_HOSTS, CertsError, init_certs
from fedllm.cli.common import (
    USER_ERRORS,
    HomeOpt,
    certs_app,
    coordinator_app,
    err,
    fmt,
    node_app,
)
from fedllm.cli.common import console as make_console
from fedllm.config import ConfigError, RunConfig, load_node_config
from fedllm.store import Store, StoreError, default_db_path, fedllm_home

InsecureOpt = Annotated[bool, typer.Option(
    "--insecure", help="plain-text gRPC/HTTP WITHOUT TLS (explicit opt-out; warned about and "
    "recorded in the run store)")]
FederationOpt = Annotated[str, typer.Option(
    "--federation", help="name of the SuperLink connection in Flower's config "
    "($FLWR_HOME/config.toml, default ~/.flwr); --superlink creates or updates it")]
SuperlinkOpt = Annotated[str | None, typer.Option(
    "--superlink", help="coordinator's Control API HOST:PORT (default port 9093)")]
RootCertOpt = Annotated[Path | None, typer.Option(
    "--root-certificates", help="the federation's CA certificate (ca.crt) for TLS")]

INSECURE_BANNER = ("[bold red]WARNING: INSECURE TRANSPORT (--insecure): no TLS. Model updates, "
                   "node credentials and run configs travel in clear text and the coordinator "
                   "is not authenticated. Never use this outside a test network.[/]")


def _deploy_errors() -> tuple[type[Exception], ...]:
    from fedllm.sealed import SealedError
    from server.deploy import DeployError

    return (*USER_ERRORS, CertsError, DeployError, SealedError)


def _exec(cmd: list[str], env: dict[str, str]) -> None:
    """Replace this process by ``cmd`` (signals go straight to Flower)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


# ------------------------------------------------------------------------------------ certs


@certs_app.command("init")
def certs_init(
    out: Annotated[Path | None, typer.Option(
        "--out", help="credentials folder (default $FEDLLM_HOME/certs)")] = None,
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="name or IP nodes use to reach the coordinator (repeat); "
        "default localhost and 127.0.0.1")] = None,
    node: Annotated[list[str] | None, typer.Option(
        "--node", help="create a key pair for this node name (repeat)")] = None,
    home: HomeOpt = None,
) -> None:
    """Create the federation's CA, the coordinator's TLS certificate and node key pairs.

    Existing files are kept (re-running adds missing node keys); private keys are 0600.
    """
    out_dir = out or fedllm_home(home) / "certs"
    try:
        result = init_certs(out_dir, hosts=tuple(host or DEFAULT_HOSTS),
                            nodes=tuple(node or ()))
    except CertsError as e:
        raise err(str(e)) from None
    c = make_console()
    for p in result.created:
        c.print(f"created {p}")
    for p in result.kept:
        c.print(f"kept    {p}")
    c.print(f"coordinator: fedllm coordinator start --certs {out_dir}")
    for n in node or ():
        c.print(f"node {n}: give it {result.ca_cert} and {result.node_private_key(n)}; "
                f"register it with: fedllm node register {result.node_public_key(n)}")


# ------------------------------------------------------------------------------ coordinator


@coordinator_app.command("start")
def coordinator_start(
    certs: Annotated[Path | None, typer.Option(
        "--certs", help="folder with ca.crt, server.crt, server.key "
        "(default $FEDLLM_HOME/certs)")] = None,
    fleet_address: Annotated[str, typer.Option(
        help="Fleet API (nodes, gRPC) HOST:PORT")] = "0.0.0.0:9092",
    control_address: Annotated[str, typer.Option(
        help="Control API (run submission, node registration) HOST:PORT")] = "127.0.0.1:9093",
    insecure: InsecureOpt = False,
    home: HomeOpt = None,
) -> None:
    """Run the coordinator: a Flower SuperLink with TLS and node authentication.

    Runs submitted to it (`fedllm run --federation`) are recorded in this $FEDLLM_HOME's run
    store; the SuperLink's own state is in $FEDLLM_HOME/superlink/state.db.
    """
    from server.deploy import SECURE_TRANSPORT_ENV, TlsFiles, flower_env, superlink_command

    home_dir = fedllm_home(home).resolve()
    try:
        tls = None if insecure else TlsFiles.from_dir((certs or home_dir / "certs").resolve())
        cmd = superlink_command(home=home_dir, tls=tls, fleet_address=fleet_address,
                                control_address=control_address)
    except _deploy_errors() as e:
        raise err(str(e)) from None
    c = make_console(stderr=True)
    if insecure:
        c.print(INSECURE_BANNER)
    c.print(f"fedllm coordinator: Fleet API {fleet_address} (gRPC), Control API "
            f"{control_address}, {'NO TLS' if insecure else 'TLS'}, node authentication on, "
            f"run store {default_db_path(home_dir)}")
    _exec(cmd, flower_env(home_dir, {SECURE_TRANSPORT_ENV: "0" if insecure else "1"}))


# ------------------------------------------------------------------------------------ nodes


@node_app.command("start")
def node_start(
    config: Annotated[Path, typer.Option("--config", "-c", help="the node's node.toml")],
    insecure: InsecureOpt = False,
    home: HomeOpt = None,
) -> None:
    """Start this node (a Flower SuperNode) from the operator's node.toml.

    The node connects to the coordinator over TLS, authenticates with its registered key and
    trains on its own data within its own privacy limits.
    """
    from server.deploy import (
        SUPERNODE_REFUSED_MARKERS,
        check_tls,
        flower_env,
        run_child,
        supernode_command,
    )

    path = config.expanduser().resolve()
    try:
        overrides = {"connection.insecure": True} if insecure else None
        cfg = load_node_config(path, overrides)
        cmd = supernode_command(cfg, path)
        _check_node_data(cfg, path)
        first_start = _open_node_state(cfg, path, home)
    except _deploy_errors() as e:
        raise err(str(e)) from None
    assert cfg.connection is not None  # supernode_command checked it
    c = make_console(stderr=True)
    if cfg.connection.insecure:
        c.print(INSECURE_BANNER)
    c.print(f"fedllm node {cfg.node.name}: coordinator {cfg.connection.superlink} "
            f"({'NO TLS' if cfg.connection.insecure else 'TLS'}), data {cfg.data.path}, "
            f"ε limit {cfg.privacy.max_epsilon:g}, δ ≤ {cfg.privacy.delta:g}")
    if first_start:
        c.print(f"[yellow]node {cfg.node.name}: first start, created its sealed state and key "
                f"{first_start}: back it up (without it the node's privacy ledgers cannot be "
                "opened and the node refuses to train)[/]")
    if not cfg.connection.insecure:
        try:
            check_tls(cfg.connection.superlink,
                      _resolve_from(path, cfg.connection.root_certificates or ""))
        except _deploy_errors() as e:
            raise err(f"node {cfg.node.name} not started: {e}") from None
    # A child, not exec: Flower's refusal (exit 305) gets a clear line naming the cause.
    code, refused = run_child(cmd, flower_env(fedllm_home(home).resolve()),
                              SUPERNODE_REFUSED_MARKERS)
    if refused:
        raise err(f"node {cfg.node.name} was refused by the coordinator at "
                  f"{cfg.connection.superlink}: its key is not registered there (the coordinator "
                  f"operator runs `fedllm node register <{cfg.node.name}'s node.pub>`). "
                  "The node received no model.", code=3)
    raise typer.Exit(code)


def _resolve_from(config_path: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else config_path.parent / q


def _open_node_state(cfg: Any, config_path: Path, home: Path | None) -> Path | None:
    """Open the node's sealed state (key + manifest) before connecting, creating both on the
    very first start (as `fedllm node init` does). A key missing next to existing sealed state
    is refused (SealedError). Returns the new key file on a first start, else None."""
    from fedllm.node import deployed_node
    from fedllm.sealed import MANIFEST, SealedDir

    identity, _ = deployed_node(cfg, fedllm_home(home), base_dir=config_path.parent)
    assert identity.key_file is not None
    created = not identity.key_file.exists() and not (identity.state_dir / MANIFEST).exists()
    SealedDir.open_or_create(identity.state_dir, identity.key_file)
    return identity.key_file if created else None


def _check_node_data(cfg: Any, config_path: Path) -> None:
    """Fail before connecting if the node's own data is unreadable (file, columns)."""
    from fedllm.data import read_table

    read_table(str(_resolve_from(config_path, cfg.data.path)), text_column=cfg.data.text_column,
               label_column=cfg.data.label_column, max_examples=cfg.data.max_examples)


def _connection(federation: str, superlink: str | None, root_certificates: Path | None,
                insecure: bool) -> Any:
    from server.deploy import Connection

    return Connection(federation, superlink,
                      root_certificates.expanduser().resolve() if root_certificates else None,
                      insecure)


@node_app.command("register")
def node_register(
    public_key: Annotated[Path, typer.Argument(help="the node's node.pub (OpenSSH, P-384)")],
    name: Annotated[str | None, typer.Option(help="name shown by Flower")] = None,
    federation: FederationOpt = "fedllm",
    superlink: SuperlinkOpt = None,
    root_certificates: RootCertOpt = None,
    insecure: InsecureOpt = False,
    home: HomeOpt = None,
) -> None:
    """Allow a node to join: register its public key with the coordinator (SuperLink).

    Only registered nodes are accepted; any other node is refused when it connects.
    """
    from server.deploy import flower_env, register_node

    try:
        node_id = register_node(public_key.expanduser(), _connection(
            federation, superlink, root_certificates, insecure),
            flower_env(fedllm_home(home)), name=name)
    except _deploy_errors() as e:
        raise err(str(e)) from None
    if insecure:
        make_console(stderr=True).print(INSECURE_BANNER)
    make_console().print(f"registered {public_key} as node {node_id}")


# ------------------------------------------------------------------ run --federation (waiting)


def submit_and_wait(cfg: RunConfig, run_id: str, *, federation: str, superlink: str | None,
                    root_certificates: Path | None, insecure: bool, home: Path,
                    console: Console, as_json: bool, timeout: float) -> None:
    """Submit ``cfg`` to a running SuperLink, follow it in the coordinator's run store (when it
    is this machine's $FEDLLM_HOME) or through Flower's run status, and print the summary."""
    from server.deploy import flower_env, flower_run_status, submit_run

    env = flower_env(home)
    conn = _connection(federation, superlink, root_certificates, insecure)
    if insecure:
        console.print(INSECURE_BANNER)
    try:
        with tempfile.TemporaryDirectory(prefix="fedllm-submit-") as tmp:
            flower_id = submit_run(cfg, run_id, conn, env, Path(tmp))
    except _deploy_errors() as e:
        raise err(str(e)) from None
    console.print(f"submitted run [bold]{run_id}[/] to federation {federation} "
                  f"(Flower run {flower_id}); waiting for it to finish")
    db = default_db_path(home)
    deadline = time.monotonic() + timeout
    printed = 0
    flower_status = "pending"
    next_flower_check = 0.0
    state: str | None = None
    while time.monotonic() < deadline:
        info = _read_run(db, run_id)
        if info is not None:
            state = info["state"]
            for r in info["rounds"][printed:]:
                eps = [n["epsilon"] for n in r["nodes"] if n.get("epsilon") is not None]
                acc = r["metrics"].get("accuracy", r["metrics"].get("perplexity"))
                console.print(f"round {r['round']:>3}  nodes {r['num_nodes']}  "
                              f"loss {fmt(r['metrics'].get('loss'))}  "
                              f"{'accuracy' if 'accuracy' in r['metrics'] else 'perplexity'} "
                              f"{fmt(acc)}  max ε {fmt(max(eps), 3) if eps else '-'}")
            printed = len(info["rounds"])
            if state != "running":
                break
        if time.monotonic() >= next_flower_check:
            next_flower_check = time.monotonic() + 5.0
            try:
                flower_status = flower_run_status(flower_id, conn, env)
            except _deploy_errors() as e:
                console.print(f"[yellow]cannot read the Flower run status: {e}[/]")
            if flower_status.startswith("finished"):
                time.sleep(1.0)  # the store's last write precedes Flower's status change
                info = _read_run(db, run_id)
                state = info["state"] if info else None
                if info is None or state == "running":
                    break
        time.sleep(1.0)
    else:
        raise err(f"run {run_id} did not finish within {timeout:g} s (still {flower_status}); "
                  "it keeps running on the coordinator", code=1)
    info = _read_run(db, run_id)
    if info is None:
        if flower_status == "finished:completed":
            console.print(f"run {run_id} finished (Flower: {flower_status}); its record is in "
                          "the coordinator's run store: `fedllm status " + run_id +
                          "` on the coordinator")
            return
        raise err(f"run {run_id} ended as {flower_status} without a record in {db}; see the "
                  "coordinator's log (`flwr log " + str(flower_id) + f" {federation}`)", code=1)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    if info["state"] != "finished":
        raise err(f"run {run_id} {info['state']}: {info.get('error') or flower_status}", code=1)
    if not as_json:
        from fedllm.cli.run import print_stored_summary

        print_stored_summary(console, info, db)


def _read_run(db: Path, run_id: str) -> dict[str, Any] | None:
    if not db.exists():
        return None
    try:
        with Store(db, read_only=True) as store:
            return store.get_run(run_id)
    except StoreError:
        return None


__all__ = ["ConfigError", "submit_and_wait"]
