"""Flower ServerApp: a thin adapter running fedllm's coordinator over Flower's Grid.

``app`` is what ``flwr run`` loads (``[tool.flwr.app.components]`` in pyproject.toml): it reads
the fedllm config path from the run config key ``fedllm-config``. ``fedllm run`` builds its own
app with :func:`make_server_app` so it can pass the validated config and watch progress.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedllm.config import ConfigError, RunConfig, config_from_dict, load_config
from fedllm.coordinator import Coordinator, RunInterrupted, RunObserver, RunSummary
from fedllm.protocol import TrainReply, TrainRequest
from fedllm.secagg import SecureRoundResult
from fedllm.store import Store, default_db_path, fedllm_home, new_run_id
from server.grid import push_and_pull
from server.messages import content_to_reply, request_to_content
from server.secagg import train_secure

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2


class GridTransport:
    """fedllm.coordinator.Transport over a Flower Grid (simulation or SuperLink)."""

    def __init__(self, grid: Grid, should_stop: Callable[[], bool] | None = None) -> None:
        self.grid = grid
        self.should_stop = should_stop or (lambda: False)

    def _check_stop(self) -> None:
        if self.should_stop():
            raise RunInterrupted("interrupted by the user during a round")

    def node_ids(self, *, min_nodes: int, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            ids = list(self.grid.get_node_ids())
            if len(ids) >= min_nodes or time.monotonic() >= deadline:
                return ids
            self._check_stop()
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
        ex = push_and_pull(
            self.grid, {nid: Message(content=request_to_content(req), dst_node_id=nid,
                                     message_type=message_type)
                        for nid, req in requests.items()},
            timeout=timeout, poll_seconds=POLL_SECONDS, on_reply=on_reply,
            on_poll=self._check_stop)
        out: dict[int, TrainReply | str] = {
            nid: "the message was not accepted for this node (node gone?)" for nid in ex.unsent}
        for nid, reply in ex.replies.items():
            if reply.has_error():
                out[nid] = f"node error: {reply.error.reason}"
                continue
            try:
                out[nid] = content_to_reply(reply.content)
            except (KeyError, TypeError, ValueError) as e:
                out[nid] = f"malformed reply: {e}"
        for nid in ex.pending:
            out[nid] = f"no reply within the round timeout ({timeout:g} s)"
        return out

    def train_secure(self, requests: dict[int, TrainRequest], *, timeout: float,
                     on_reply: Callable[[int], None]) -> SecureRoundResult:
        return train_secure(self.grid, requests, timeout=timeout, on_reply=on_reply)


def coordinate(grid: Grid, config: RunConfig, *, home: Path, run_id: str,
               mode: str, secure_transport: bool, resume: bool = False,
               observer: RunObserver | None = None,
               should_stop: Callable[[], bool] | None = None) -> RunSummary:
    with Store(default_db_path(home)) as store:
        return Coordinator(config, store, run_id=run_id, home=home, mode=mode,
                           secure_transport=secure_transport,
                           secure_aggregation=config.secagg.enabled, resume=resume,
                           observer=observer, should_stop=should_stop,
                           ).run(GridTransport(grid, should_stop))


def make_server_app(config: RunConfig, *, home: Path, run_id: str, resume: bool = False,
                    observer: RunObserver | None = None,
                    result: list[RunSummary] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> ServerApp:
    """A ServerApp bound to an already validated config (used by ``fedllm run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = coordinate(grid, config, home=home, run_id=run_id, mode="simulation",
                             secure_transport=False, resume=resume, observer=observer,
                             should_stop=should_stop)
        if result is not None:
            result.append(summary)

    return app


# Set by `fedllm coordinator start` in the SuperLink's environment, which its ServerApp
# processes inherit: "1" = the SuperLink serves TLS, "0" = started with --insecure. Absent (a
# SuperLink started by hand) counts as insecure: transport security is never assumed.
SECURE_TRANSPORT_ENV = "FEDLLM_SECURE_TRANSPORT"


def deployment_transport() -> bool:
    return os.environ.get(SECURE_TRANSPORT_ENV) == "1"


def run_mode(grid: Grid) -> str:
    """"simulation" when Flower's in-memory grid (simulation engine) drives the run."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return "simulation" if isinstance(grid, InMemoryGrid) else "deployment"


def config_from_run_config(run_config: Mapping[str, object]) -> RunConfig:
    """The run's config from Flower's run config: ``fedllm-config-json`` (what ``fedllm run
    --federation`` sends: the submitter's validated config) or a ``fedllm-config`` TOML path
    (read where the ServerApp runs), else defaults."""
    text = str(run_config.get("fedllm-config-json", "") or "")
    if text:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"run config fedllm-config-json is not valid JSON: {e}") from None
        return config_from_dict(data, source="run config fedllm-config-json")
    return load_config(str(run_config.get("fedllm-config", "") or "") or None)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` / ``fedllm run --federation``."""
    config = config_from_run_config(context.run_config)
    mode = run_mode(grid)
    if mode == "deployment":
        # The run store is the coordinator's: $FEDLLM_HOME of the SuperLink process.
        home = fedllm_home()
        secure = deployment_transport()
    else:
        home = fedllm_home(str(context.run_config.get("fedllm-home", "") or "") or None)
        secure = False
    run_id = str(context.run_config.get("fedllm-run-id", "") or "") or new_run_id()
    coordinate(grid, config, home=home, run_id=run_id, mode=mode, secure_transport=secure)
