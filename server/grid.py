"""Send one message per node over Flower's Grid and collect the replies: the push/pull loop
shared by the plain round (server/app.py) and the SecAgg+ stages (server/secagg.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid


@dataclass
class Exchange:
    replies: dict[int, Message] = field(default_factory=dict)  # node id -> its reply
    unsent: list[int] = field(default_factory=list)  # the Grid did not accept the message
    pending: list[int] = field(default_factory=list)  # no reply before the timeout


def push_and_pull(grid: Grid, messages: dict[int, Message], *, timeout: float,
                  poll_seconds: float, on_reply: Callable[[int], None] | None = None,
                  on_poll: Callable[[], None] | None = None) -> Exchange:
    """Push each node's message (one at a time: the returned ids map to nodes), then pull
    until every node replied or ``timeout`` s passed. ``on_poll`` runs between polls (it may
    raise to abandon the exchange, e.g. on Ctrl-C)."""
    out = Exchange()
    pending: dict[str, int] = {}
    for nid, msg in messages.items():
        ids = list(grid.push_messages([msg]))
        if ids:
            pending[ids[0]] = nid
        else:
            out.unsent.append(nid)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            nid = pending.pop(reply.metadata.reply_to_message_id, None)
            if nid is None:
                continue
            out.replies[nid] = reply
            if on_reply:
                on_reply(nid)
        if pending:
            if on_poll:
                on_poll()
            time.sleep(poll_seconds)
    out.pending = list(pending.values())
    return out
