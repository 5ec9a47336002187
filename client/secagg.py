"""A node's side of SecAgg+ over Flower's Message API (``train.secagg_<stage>`` messages).

The node trains when the first stage message arrives, masks its update, and keeps its clear
update and protocol secrets only in its own Flower ``Context.state`` (persisted per node per
run by the SuperNode / simulation engine, never sent). The protocol maths is fedllm.secagg.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedllm.protocol import TrainReply
from fedllm.secagg import (
    KeyAdvert,
    NodeSession,
    RoundId,
    SecAggError,
    SecAggParams,
    ShareKeysRequest,
    flatten,
)
from server.messages import content_to_request, reply_to_content
from server.secagg import (
    mask_request_from,
    masked_content,
    unmask_reply_to,
    unmask_request_from,
)

STATE_KEY = "fedllm-secagg"


def _save(context: Context, sess: NodeSession) -> None:
    context.state[STATE_KEY] = ConfigRecord(sess.to_state())  # type: ignore[arg-type]


def _load(context: Context) -> NodeSession:
    if STATE_KEY not in context.state:
        raise SecAggError("no secure aggregation round in progress on this node")
    rec = context.state.config_records[STATE_KEY]
    return NodeSession.from_state({k: bytes(v) for k, v in rec.items()})  # type: ignore[arg-type]


def clear_update(context: Context) -> np.ndarray:
    """The node's own clear update of the round in progress (flattened delta). For the node
    operator's inspection and tests; never sent."""
    return _load(context).update


def advertise(msg: Message, context: Context,
              train: Callable[[Message, Context], TrainReply]) -> Message:
    """Stage 1: train, keep the clear delta here, reply with metadata + public keys."""
    request = content_to_request(msg.content)
    if STATE_KEY in context.state:
        del context.state[STATE_KEY]  # an abandoned earlier round: its secrets are useless now
    reply = train(msg, context)
    if not reply.ok:
        return Message(reply_to_content(reply), reply_to=msg)
    names = sorted(request.arrays)
    delta = flatten(reply.arrays, names) - flatten(request.arrays, names)
    sa = request.config.secagg
    params = SecAggParams(clip=sa.clip, bits=sa.bits, threshold_fraction=sa.threshold_fraction)
    sess, adv = NodeSession.start(RoundId(request.run_id, request.round),
                                  int(msg.metadata.dst_node_id), params=params, update=delta,
                                  weight=int(reply.metrics["num_examples"]))
    _save(context, sess)
    content = reply_to_content(replace(reply, arrays={}))  # metadata only: no clear update
    content["secagg-advert"] = ConfigRecord({"c-pk": adv.c_pk, "s-pk": adv.s_pk,
                                             "weight": adv.weight, "commit": adv.b_commit})
    return Message(content, reply_to=msg)


def share_keys(msg: Message, context: Context) -> Message:
    sess = _load(context)
    rec = msg.content.config_records["keys"]
    adverts = {int(i): KeyAdvert(bytes(c), bytes(s), int(w), bytes(b))  # type: ignore[arg-type]
               for i, w, c, s, b in zip(rec["ids"], rec["weights"], rec["c-pks"],  # type: ignore[arg-type]
                                        rec["s-pks"], rec["commits"], strict=True)}
    cts = sess.share_keys(ShareKeysRequest(adverts))
    _save(context, sess)
    to = sorted(cts)
    return Message(RecordDict({"shares": ConfigRecord({
        "to": [str(t) for t in to], "ct": [cts[t] for t in to]})}), reply_to=msg)


def mask(msg: Message, context: Context) -> Message:
    sess = _load(context)
    data = sess.masked_input(mask_request_from(msg.content.config_records["inbox"]))
    _save(context, sess)
    return Message(masked_content(data), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    sess = _load(context)
    try:
        rep = sess.unmask(unmask_request_from(msg.content.config_records["unmask"]))
    finally:
        del context.state[STATE_KEY]  # one unmask per round, whatever happens: secrets gone
    return Message(RecordDict({"shares": unmask_reply_to(rep)}), reply_to=msg)
