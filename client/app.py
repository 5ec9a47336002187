"""Flower ClientApp: a thin adapter running one node's round with fedllm.node.

In simulation each virtual node is identified by Flower's ``partition-id`` and trains on its
share of the run's data; its privacy ledger lives under ``$FEDLLM_HOME/runs/<run>/nodes/``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedllm.node import NodeIdentity, NodeRuntime, simulated_node_data
from fedllm.store import fedllm_home
from server.messages import content_to_request, reply_to_content

log = logging.getLogger(__name__)


@functools.cache
def node_runtime() -> NodeRuntime:
    """One runtime per node *process*. Flower's Ray backend unpickles a fresh ClientApp for
    every message, so the loaded base model and tokenised data can only be reused across rounds
    from process scope. It caches immutable loaded artefacts only, never privacy state."""
    return NodeRuntime()


def handle_train(msg: Message, context: Context, home: Path, *, evaluate: bool = False
                 ) -> Message:
    request = content_to_request(msg.content)
    if "partition-id" not in context.node_config:
        raise RuntimeError(
            "this ClientApp runs simulated nodes only (node_config has no 'partition-id'); "
            "deployed nodes are started with `fedllm node start`"
        )
    pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    name = f"node-{pid}"
    identity = NodeIdentity(name=name,
                            state_dir=home / "runs" / request.run_id / "nodes" / name)
    handler = node_runtime().evaluate if evaluate else node_runtime().train
    reply = handler(request, identity=identity, data=simulated_node_data(request.config, pid))
    return Message(reply_to_content(reply), reply_to=msg)


def make_client_app(home: Path) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, home)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        # The final global model, evaluated on each node's held-out split (counts only).
        return handle_train(msg, context, home, evaluate=True)

    return app


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    home = fedllm_home(str(context.run_config.get("fedllm-home", "") or "") or None)
    return handle_train(msg, context, home)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    home = fedllm_home(str(context.run_config.get("fedllm-home", "") or "") or None)
    return handle_train(msg, context, home, evaluate=True)
