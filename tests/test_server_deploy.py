"""server/deploy.py and the deployment half of server/app.py: Flower command lines built from
fedllm's inputs, and the run config the ServerApp receives (no processes started here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.certs import init_certs
from fedllm.config import ConfigError, load_config, load_node_config
from server.app import config_from_run_config
from server.deploy import (
    Connection,
    DeployError,
    TlsFiles,
    save_connection,
    superlink_command,
    supernode_command,
)


def _opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_superlink_tls_auth_offline_by_default(tmp_path):
    certs = init_certs(tmp_path / "certs")
    cmd = superlink_command(home=tmp_path, tls=TlsFiles.from_dir(certs.out_dir),
                            fleet_address="0.0.0.0:9092", control_address="127.0.0.1:9093")
    assert "--insecure" not in cmd
    assert _opt(cmd, "--ssl-ca-certfile") == str(certs.ca_cert)
    assert _opt(cmd, "--ssl-certfile") == str(certs.server_cert)
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(cmd)
    assert _opt(cmd, "--fleet-api-type") == "grpc-rere"
    assert (_opt(cmd, "--host"), _opt(cmd, "--port")) == ("127.0.0.1", "9093")
    assert _opt(cmd, "--database") == str(tmp_path / "superlink" / "state.db")
    insecure = superlink_command(home=tmp_path, tls=None, fleet_address="h:1",
                                 control_address="h:2")
    assert "--insecure" in insecure and "--enable-supernode-auth" in insecure
    with pytest.raises(DeployError, match="TLS file missing: .*ca.crt"):
        TlsFiles.from_dir(tmp_path / "nowhere")
    with pytest.raises(DeployError, match="invalid control address 'nope'"):
        superlink_command(home=tmp_path, tls=None, fleet_address="h:1", control_address="nope")


def _node_toml(d: Path, key: str, extra: str = "") -> Path:
    (d / "node.toml").write_text(f"""
[node]
name = "alpha"
[data]
path = "train.tsv"
[connection]
superlink = "coord.example:9092"
root_certificates = "certs/ca.crt"
auth_private_key = "{key}"
runtime_port = 9101
{extra}
""")
    return d / "node.toml"


def test_supernode_command_resolves_paths_from_the_node_file(tmp_path):
    init_certs(tmp_path / "certs", nodes=("alpha",))
    path = _node_toml(tmp_path, "certs/nodes/alpha/node.key")
    cmd = supernode_command(load_node_config(path), path)
    assert _opt(cmd, "--root-certificates") == str(tmp_path / "certs" / "ca.crt")
    assert _opt(cmd, "--auth-supernode-private-key") == \
        str(tmp_path / "certs" / "nodes" / "alpha" / "node.key")
    assert _opt(cmd, "--superlink") == "coord.example:9092" and "--grpc-rere" in cmd
    assert _opt(cmd, "--port") == "9101"
    assert _opt(cmd, "--node-config") == f"node-config={json.dumps(str(path))}"
    assert "--insecure" not in cmd


def test_supernode_refuses_a_key_flower_cannot_use(tmp_path):
    init_certs(tmp_path / "certs")
    # The CA's PEM key is not an OpenSSH node key: named, before any process starts.
    path = _node_toml(tmp_path, "certs/ca.key")
    with pytest.raises(DeployError, match="connection.auth_private_key: .*ca.key is not an "
                                          "OpenSSH private key"):
        supernode_command(load_node_config(path), path)


def test_save_connection_needs_a_ca_unless_insecure(tmp_path):
    with pytest.raises(DeployError, match="--root-certificates .* needed for TLS"):
        save_connection(Connection("x", "127.0.0.1:9093"), {})
    with pytest.raises(DeployError, match="file not found"):
        save_connection(Connection("x", "127.0.0.1:9093", tmp_path / "ca.crt"), {})


def test_run_config_carries_the_validated_config(tmp_path):
    cfg = load_config(None, {"federation.rounds": 2, "name": "naïve 'quoted' \"run\""})
    got = config_from_run_config({"fedllm-config-json": json.dumps(cfg.to_dict())})
    assert got == cfg
    with pytest.raises(ConfigError, match="fedllm-config-json is not valid JSON"):
        config_from_run_config({"fedllm-config-json": "{"})
    with pytest.raises(ConfigError, match="federation.rounds"):
        config_from_run_config({"fedllm-config-json": json.dumps(
            {"federation": {"rounds": 0}})})
    assert config_from_run_config({}) == load_config(None)
