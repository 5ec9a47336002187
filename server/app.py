"""Flower ServerApp: a thin adapter running fedllm's coordinator over Flower's Grid.

``app`` is what ``flwr run`` loads (``[tool.flwr.app.components]`` in pyproject.toml): it reads
the fedllm config path from the run config key ``fedllm-config``. ``fedllm run`` builds its own
app with :func:`make_server_app` so it can pass the validated config and watch progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedllm.config import RunConfig, load_config
from fedllm.coordinator import Coordinator, RunObserver, RunSummary
from fedllm.protocol import TrainReply, TrainRequest
from fedllm.store import Store, default_db_path, fedllm_home, new_run_id
from server.messages import content_to_reply, request_to_content

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2


class GridTransport:
    """fedllm.coordinator.Transport over a Flower Grid (simulation or SuperLink)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def node_ids(self, *, min_nodes: int, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            ids = list(self.grid.get_node_ids())
            if len(ids) >= min_nodes or time.monotonic() >= deadline:
                return ids
            time.sleep(POLL_SECONDS)

    def train(self, requests: dict[int, TrainRequest], *, timeout: float,
              on_reply: Callable[[int], None]) -> dict[int, TrainReply | str]:
        return self._exchange(requests, MessageType.TRAIN, timeout=timeout, on_reply=on_reply)

    def evaluate(self, requests: dict[int, TrainRequest], *, timeout: float
                 ) -> dict[int, TrainReply | str]:
        """Evaluate-only messages (the final global model): replies carry counts only."""
        return self._exchange(requests, MessageType.EVALUATE, timeout=timeout,
                              on_reply=lambda _nid: None)

    def _exchange(self, requests: dict[int, TrainRequest], message_type: str, *,
                  timeout: float, on_reply: Callable[[int], None]
                  ) -> dict[int, TrainReply | str]:
        out: dict[int, TrainReply | str] = {}
        pending: dict[str, int] = {}
        for nid, req in requests.items():
            msg = Message(content=request_to_content(req), dst_node_id=nid,
                          message_type=message_type)
            ids = list(self.grid.push_messages([msg]))  # one at a time: ids map to nodes
            if ids:
                pending[ids[0]] = nid
            else:
                out[nid] = "the message was not accepted for this node (node gone?)"
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                nid = pending.pop(reply.metadata.reply_to_message_id, None)
                if nid is None:
                    continue
                if reply.has_error():
                    out[nid] = f"node error: {reply.error.reason}"
                else:
                    try:
                        out[nid] = content_to_reply(reply.content)
                    except (KeyError, TypeError, ValueError) as e:
                        out[nid] = f"malformed reply: {e}"
                on_reply(nid)
            if pending:
                time.sleep(POLL_SECONDS)
        for nid in pending.values():
            out[nid] = f"no reply within the round timeout ({timeout:g} s)"
        return out


def coordinate(grid: Grid, config: RunConfig, *, home: Path, run_id: str,
               mode: str, secure_transport: bool,
               observer: RunObserver | None = None) -> RunSummary:
    with Store(default_db_path(home)) as store:
        return Coordinator(config, store, run_id=run_id, home=home, mode=mode,
                           secure_transport=secure_transport,
                           observer=observer).run(GridTransport(grid))


def make_server_app(config: RunConfig, *, home: Path, run_id: str,
                    observer: RunObserver | None = None,
                    result: list[RunSummary] | None = None) -> ServerApp:
    """A ServerApp bound to an already validated config (used by ``fedllm run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = coordinate(grid, config, home=home, run_id=run_id, mode="simulation",
                             secure_transport=False, observer=observer)
        if result is not None:
            result.append(summary)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: config from the run config key ``fedllm-config``."""
    path = str(context.run_config.get("fedllm-config", "") or "") or None
    config = load_config(path)
    home = fedllm_home(str(context.run_config.get("fedllm-home", "") or "") or None)
    coordinate(grid, config, home=home, run_id=new_run_id(), mode="simulation",
               secure_transport=False)
