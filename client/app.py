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
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client import secagg
from fedllm.config import load_node_config
from fedllm.node import (
    NodeDataSpec,
    NodeIdentity,
    NodeRuntime,
    release_free_memory,
    simulated_node_data,
    simulated_state_dir,
)
from fedllm.node import deployed_node as node_from_config
from fedllm.protocol import TrainReply, TrainRequest
from fedllm.store import fedllm_home
from server.messages import content_to_request, reply_to_content
from server.secagg import ADVERTISE, MASK, SHARE_KEYS, UNMASK

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
    """Identity and data of a deployed node from its operator's node.toml (relative paths are
    relative to that file)."""
    return node_from_config(load_node_config(config_path), home, base_dir=config_path.parent,
                            task=request.config.model.task)


def handle_train(msg: Message, context: Context, home: Path, *, evaluate: bool = False
                 ) -> Message:
    return Message(reply_to_content(train_reply(msg, context, home, evaluate=evaluate)),
                   reply_to=msg)


def train_reply(msg: Message, context: Context, home: Path, *, evaluate: bool = False
                ) -> TrainReply:
    """Train (or, for the final model, only evaluate) this node's round; the clear reply stays
    in the process when it is securely aggregated (see client/secagg)."""
    request = content_to_request(msg.content)
    if NODE_CONFIG_KEY in context.node_config:
        identity, data = deployed_node(Path(str(context.node_config[NODE_CONFIG_KEY])),
                                       request, home)
    elif "partition-id" in context.node_config:
        pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        name = f"node-{pid}"
        # In simulation the person running `fedllm run` is every virtual node's operator, so
        # the run's explicit DP opt-out stands for theirs too.
        identity = NodeIdentity(name=name,
                                state_dir=simulated_state_dir(home, request.run_id, pid),
                                allow_no_dp=request.config.privacy.allow_no_dp)
        data = simulated_node_data(request.config, pid)
    else:
        raise RuntimeError(
            "this SuperNode has neither a 'node-config' (deployed node: start it with "
            "`fedllm node start --config node.toml`) nor a 'partition-id' (simulation)"
        )
    handler = node_runtime().evaluate if evaluate else node_runtime().train
    try:
        return handler(request, identity=identity, data=data)
    finally:
        release_free_memory()  # the node process lives on: keep its RSS flat across rounds


def register_secagg(app: ClientApp, train: Callable[[Message, Context], TrainReply]) -> None:
    """SecAgg+ stage handlers (``train.secagg_*`` messages) on ``app``, see client/secagg.py.
    ``train`` runs the node's round and returns its *clear* reply, which never leaves the
    node: a deployed node passes its own (NodeConfig-based) train function here."""

    @app.train(ADVERTISE)
    def secagg_advertise(msg: Message, context: Context) -> Message:
        return secagg.advertise(msg, context, train)

    @app.train(SHARE_KEYS)
    def secagg_share_keys(msg: Message, context: Context) -> Message:
        return secagg.share_keys(msg, context)

    @app.train(MASK)
    def secagg_mask(msg: Message, context: Context) -> Message:
        return secagg.mask(msg, context)

    @app.train(UNMASK)
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return secagg.unmask(msg, context)


def make_client_app(home: Path, *, mods: list[Mod] | None = None) -> ClientApp:
    """``mods``: Flower client mods around every handler (tests use one to drop a node)."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, home)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        # The final global model, evaluated on each node's held-out split (counts only).
        return handle_train(msg, context, home, evaluate=True)

    register_secagg(app, lambda m, c: train_reply(m, c, home))
    return app


def context_home(context: Context) -> Path:
    """Deployed: the node operator's $FEDLLM_HOME (inherited from `fedllm node start`); the
    run config's `fedllm-home` is the submitter's and only applies in simulation."""
    if NODE_CONFIG_KEY in context.node_config:
        return fedllm_home()
    return fedllm_home(str(context.run_config.get("fedllm-home", "") or "") or None)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context, context_home(context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_train(msg, context, context_home(context), evaluate=True)


register_secagg(app, lambda m, c: train_reply(m, c, context_home(c)))
