"""Flower ClientApp: a thin adapter running one node's round with fedllm.node.

In simulation each virtual node is identified by Flower's ``partition-id`` and trains on its
share of the run's data; its privacy ledger lives under ``$FEDLLM_HOME/runs/<run>/nodes/``.
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
from fedllm.node import NodeIdentity, NodeRuntime, simulated_node_data, simulated_state_dir
from fedllm.protocol import TrainReply
from fedllm.store import fedllm_home
from server.messages import content_to_request, reply_to_content
from server.secagg import ADVERTISE, MASK, SHARE_KEYS, UNMASK

log = logging.getLogger(__name__)


@functools.cache
def node_runtime() -> NodeRuntime:
    """One runtime per node *process*. Flower's Ray backend unpickles a fresh ClientApp for
    every message, so the loaded base model and tokenised data can only be reused across rounds
    from process scope. It caches immutable loaded artefacts only, never privacy state."""
    return NodeRuntime()


def handle_train(msg: Message, context: Context, home: Path) -> Message:
    return Message(reply_to_content(train_reply(msg, context, home)), reply_to=msg)


def train_reply(msg: Message, context: Context, home: Path) -> TrainReply:
    """Train this node's round; the clear reply stays in the process (see client/secagg)."""
    request = content_to_request(msg.content)
    if "partition-id" not in context.node_config:
        raise RuntimeError(
            "this ClientApp runs simulated nodes only (node_config has no 'partition-id'); "
            "deployed nodes are started with `fedllm node start`"
        )
    pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    name = f"node-{pid}"
    # In simulation the person running `fedllm run` is every virtual node's operator, so the
    # run's explicit DP opt-out stands for theirs too.
    identity = NodeIdentity(name=name,
                            state_dir=simulated_state_dir(home, request.run_id, pid),
                            allow_no_dp=request.config.privacy.allow_no_dp)
    return node_runtime().train(request, identity=identity,
                                data=simulated_node_data(request.config, pid))


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

    register_secagg(app, lambda m, c: train_reply(m, c, home))
    return app


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    home = fedllm_home(str(context.run_config.get("fedllm-home", "") or "") or None)
    return handle_train(msg, context, home)


def _train_reply_run_config_home(msg: Message, context: Context) -> TrainReply:
    home = fedllm_home(str(context.run_config.get("fedllm-home", "") or "") or None)
    return train_reply(msg, context, home)


register_secagg(app, _train_reply_run_config_home)
