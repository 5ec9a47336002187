"""An in-process federation: every virtual node runs in this process, one after the other.

Implements :class:`fedllm.coordinator.Transport` without Flower, with the same node code
(:class:`fedllm.node.NodeRuntime`) and the same per-node state directories as the simulation,
so the coordinator's behaviour (retries, resume, budget stops, central DP) can be exercised and
audited quickly and deterministically. Not a deployment: there is no isolation between nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedllm.node import NodeIdentity, NodeRuntime, simulated_node_data, simulated_state_dir
from fedllm.protocol import TrainReply, TrainRequest


class LocalTransport:
    """Nodes 1..N of a simulated run (transport id = partition id + 1)."""

    def __init__(self, home: Path, num_nodes: int, *, epsilon_limits: dict[int, float] | None
                 = None) -> None:
        self.home = home
        self.num_nodes = num_nodes
        self.epsilon_limits = epsilon_limits or {}
        self.runtime = NodeRuntime()

    def node_ids(self, *, min_nodes: int, timeout: float) -> list[int]:
        return list(range(1, self.num_nodes + 1))

    def train_one(self, nid: int, request: TrainRequest) -> TrainReply:
        pid = nid - 1
        identity = NodeIdentity(
            name=f"node-{pid}", state_dir=simulated_state_dir(self.home, request.run_id, pid),
            epsilon_limit=self.epsilon_limits.get(pid),
            allow_no_dp=request.config.privacy.allow_no_dp)
        return self.runtime.train(request, identity=identity,
                                  data=simulated_node_data(request.config, pid))

    def evaluate(self, requests: dict[int, TrainRequest], *, timeout: float
                 ) -> dict[int, TrainReply | str]:
        """Evaluate-only requests (the final global model) on each node's held-out split."""
        out: dict[int, TrainReply | str] = {}
        for nid, req in requests.items():
            pid = nid - 1
            identity = NodeIdentity(name=f"node-{pid}",
                                    state_dir=simulated_state_dir(self.home, req.run_id, pid))
            out[nid] = self.runtime.evaluate(req, identity=identity,
                                             data=simulated_node_data(req.config, pid))
        return out

    def train(self, requests: dict[int, TrainRequest], *, timeout: float,
              on_reply: Callable[[int], None]) -> dict[int, TrainReply | str]:
        out: dict[int, TrainReply | str] = {}
        for nid, req in requests.items():
            out[nid] = self.train_one(nid, req)
            on_reply(nid)
        return out
