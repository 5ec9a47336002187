"""Flower ClientApp: a thin adapter running one node's round with fedllm.node.

In simulation each virtual node is identified by Flower's ``partition-id`` and trains on its
share of the run's data; its privacy ledger lives under ``$FEDLLM_HOME/runs/<run>/nodes/``.

Deployed (``fedllm node start --config node.toml``), the SuperNode's node config carries
``node-config`` = the absolute path of the operator's node.toml: the node's name, state folder,
data and privacy limits come from that file, never from the coordinator.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedllm.config import NodeConfig, load_node_config
from fedllm.node import NodeDataSpec, NodeIdentity, NodeRuntime, simulated_node_data
from fedllm.protocol import TrainRequest
from fedllm.store import fedllm_home
from server.messages import content_to_request, reply_to_content

log = logging.getLogger(__name__)

NODE_CONFIG_KEY = "node-config"  # SuperNode --node-config key: path of the node.toml


@functools.cache
def node_runtime() -> NodeRuntime:
    """One runtime per node *process*. Flower's Ray backend unpickles a fresh ClientApp for
    every message, so the loaded base model and tokenised data can only be reused across rounds
    from process scope. It caches immutable loaded artefacts only, never privacy state."""
    return NodeRuntime()


def deployed_node(config_path: Path, request: TrainRequest, home: Path
                  ) -> tuple[NodeIdentity, NodeDataSpec]:
    """Identity and data of a deployed node from its operator's node.toml."""
    cfg: NodeConfig = load_node_config(config_path)
    base = config_path.parent

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    state_dir = resolve(cfg.node.state_dir) if cfg.node.state_dir \
        else home / "nodes" / cfg.node.name
    identity = NodeIdentity(name=cfg.node.name, state_dir=state_dir,
                            epsilon_limit=cfg.privacy.max_epsilon,
                            max_delta=cfg.privacy.delta, allow_no_dp=cfg.privacy.allow_no_dp)
    label_col = cfg.data.label_column if request.config.model.task == "seq-cls" else None
    data = NodeDataSpec(str(resolve(cfg.data.path)), cfg.data.text_column, label_col,
                        cfg.data.max_examples)
    return identity, data


def handle_train(msg: Message, context: Context, home: Path) -> Message:
    request = content_to_request(msg.content)
    if NODE_CONFIG_KEY in context.node_config:
        identity, data = deployed_node(Path(str(context.node_config[NODE_CONFIG_KEY])),
                                       request, home)
    elif "partition-id" in context.node_config:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        name = f"node-{pid}"
        identity = NodeIdentity(name=name,
                                state_dir=home / "runs" / request.run_id / "nodes" / name)
        data = simulated_node_data(request.config, pid)
    else:
        raise RuntimeError(
            "this SuperNode has neither a 'node-config' (deployed node: start it with "
            "`fedllm node start --config node.toml`) nor a 'partition-id' (simulation)"
        )
    reply = node_runtime().train(request, identity=identity, data=data)
    return Message(reply_to_content(reply), reply_to=msg)


def make_client_app(home: Path) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, home)

    return app


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    # Deployed: the node operator's $FEDLLM_HOME (inherited from `fedllm node start`); the run
    # config's `fedllm-home` is the submitter's and only applies in simulation.
    if NODE_CONFIG_KEY in context.node_config:
        return handle_train(msg, context, fedllm_home())
    home = fedllm_home(str(context.run_config.get("fedllm-home", "") or "") or None)
    return handle_train(msg, context, home)
