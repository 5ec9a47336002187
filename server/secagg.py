"""The coordinator's side of SecAgg+ over Flower's Grid (Message API).

Drives the four stages of :mod:`fedllm.secagg` with messages of type ``train.secagg_<stage>``
(handled by ``client/secagg.py``). The coordinator holds public keys, ciphertexts it cannot
read and masked vectors; it never receives a node's clear update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedllm.protocol import TrainReply, TrainRequest
from fedllm.secagg import (
    KeyAdvert,
    MaskRequest,
    RoundId,
    SecAggError,
    SecAggParams,
    SecureRoundResult,
    ServerSession,
    UnmaskReply,
    UnmaskRequest,
    unflatten,
)
from server.grid import push_and_pull
from server.messages import content_to_reply, request_to_content

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
ADVERTISE, SHARE_KEYS, MASK, UNMASK = ("secagg_advertise", "secagg_share_keys", "secagg_mask",
                                       "secagg_unmask")


def content_bytes(rd: RecordDict) -> int:
    """Payload bytes of a message (arrays + bytes/str config values): the wire-size measure
    used for the per-node bytes of a round."""
    n = 0
    for rec in rd.array_records.values():
        n += sum(len(rec[k].data) for k in rec)
    for cr in rd.config_records.values():
        for v in cr.values():
            for item in (v if isinstance(v, list) else [v]):
                n += len(item) if isinstance(item, bytes | str) else 8
    return n


def exchange(grid: Grid, contents: dict[int, RecordDict], action: str, *, timeout: float,
             on_reply: Callable[[int], None] | None = None
             ) -> tuple[dict[int, RecordDict | str], dict[int, int]]:
    """Send one message per node, collect replies until ``timeout``: (reply content or failure
    reason per node, bytes received per node)."""
    ex = push_and_pull(
        grid, {nid: Message(content=content, dst_node_id=nid, message_type=f"train.{action}")
               for nid, content in contents.items()},
        timeout=timeout, poll_seconds=POLL_SECONDS, on_reply=on_reply)
    out: dict[int, RecordDict | str] = {
        nid: "the message was not accepted for this node (node gone?)" for nid in ex.unsent}
    sizes: dict[int, int] = {}
    for nid, reply in ex.replies.items():
        if reply.has_error():
            out[nid] = f"node error at {action}: {_last_line(reply.error.reason)}"
        else:
            out[nid] = reply.content
            sizes[nid] = content_bytes(reply.content)
    for nid in ex.pending:
        out[nid] = f"no reply at {action} within {timeout:g} s"
    return out, sizes


def _last_line(text: str, limit: int = 300) -> str:
    """The useful end of a node error (Ray wraps it in a whole traceback)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def _ids(values: list[int]) -> list[str]:
    return [str(v) for v in values]  # Flower node ids are uint64: strings survive every record


def train_secure(grid: Grid, requests: dict[int, TrainRequest], *, timeout: float,
                 on_reply: Callable[[int], None],
                 on_masked: Callable[[int, bytes], None] | None = None) -> SecureRoundResult:
    """One SecAgg+ round. All requests carry the same plan (run, round, config, global)."""
    req = next(iter(requests.values()))
    sa = req.config.secagg
    params = SecAggParams(clip=sa.clip, bits=sa.bits, threshold_fraction=sa.threshold_fraction)
    names = sorted(req.arrays)
    length = int(sum(req.arrays[n].size for n in names))
    server = ServerSession(RoundId(req.run_id, req.round), params, length)
    replies: dict[int, TrainReply | str] = {}
    reasons: dict[int, str] = {}
    sent: dict[int, int] = {nid: 0 for nid in requests}

    def fail(nid: int, reason: str) -> None:
        # A node that trained keeps its reply metadata (ε spent, examples); the reason says
        # at which stage it dropped out.
        if isinstance(replies.get(nid), TrainReply):
            reasons[nid] = reason
        else:
            replies[nid] = reason
        log.warning("secagg round %d: node %s: %s", req.round, nid, reason)

    def add_sizes(sizes: dict[int, int]) -> None:
        for nid, n in sizes.items():
            sent[nid] += n

    # Stage 1: train + advertise keys (the round timeout covers local training).
    got, sizes = exchange(grid, {nid: request_to_content(r) for nid, r in requests.items()},
                          ADVERTISE, timeout=timeout, on_reply=on_reply)
    add_sizes(sizes)
    adverts: dict[int, KeyAdvert] = {}
    for nid, content in got.items():
        if isinstance(content, str):
            fail(nid, content)
            continue
        try:
            reply = content_to_reply(content)
            if reply.ok:
                a = content.config_records["secagg-advert"]
                adverts[nid] = KeyAdvert(bytes(a["c-pk"]), bytes(a["s-pk"]),  # type: ignore[arg-type]
                                         int(a["weight"]), bytes(a["commit"]))  # type: ignore[arg-type]
            replies[nid] = reply
        except (KeyError, TypeError, ValueError) as e:
            fail(nid, f"malformed advert: {e}")
    result = SecureRoundResult(replies=replies, bytes_sent=sent, reasons=reasons)
    try:
        # Stage 2: broadcast U1's public keys; collect encrypted shares.
        share_req = server.share_keys_request(adverts)
        ids = sorted(share_req.adverts)
        keys = RecordDict({"keys": ConfigRecord({
            "ids": _ids(ids), "weights": [share_req.adverts[i].weight for i in ids],
            "c-pks": [share_req.adverts[i].c_pk for i in ids],
            "s-pks": [share_req.adverts[i].s_pk for i in ids],
            "commits": [share_req.adverts[i].b_commit for i in ids]})})
        got, sizes = exchange(grid, dict.fromkeys(ids, keys), SHARE_KEYS,
                              timeout=sa.stage_timeout)
        add_sizes(sizes)
        shares: dict[int, dict[int, bytes]] = {}
        for nid, content in got.items():
            if isinstance(content, str):
                fail(nid, content)
                continue
            rec = content.config_records["shares"]
            shares[nid] = {int(to): bytes(ct) for to, ct in  # type: ignore[arg-type]
                           zip(rec["to"], rec["ct"], strict=True)}  # type: ignore[arg-type]
        # Stage 3: relay ciphertexts; collect masked vectors.
        inbox = server.route_shares(shares)
        got, sizes = exchange(grid, {nid: mask_content(m) for nid, m in inbox.items()}, MASK,
                              timeout=sa.stage_timeout)
        add_sizes(sizes)
        for nid, content in got.items():
            if isinstance(content, str):
                fail(nid, content)
                continue
            data = content.array_records["masked"]["y"].numpy().tobytes()
            if on_masked:
                on_masked(nid, data)
            server.add_masked(nid, data)
        # Stage 4: survivors reveal the shares needed to remove the masks.
        ureq = server.unmask_request()
        content_u = RecordDict({"unmask": ConfigRecord({
            "survivors": _ids(ureq.survivors), "dropped": _ids(ureq.dropped)})})
        got, sizes = exchange(grid, dict.fromkeys(ureq.survivors, content_u), UNMASK,
                              timeout=sa.stage_timeout)
        add_sizes(sizes)
        unmask: dict[int, UnmaskReply] = {}
        for nid, content in got.items():
            if isinstance(content, str):
                # Uploaded, then gone: its masked vector is still in the sum.
                log.warning("secagg round %d: node %s (aggregated): %s", req.round, nid,
                            content)
                continue
            unmask[nid] = unmask_reply_from(content.config_records["shares"])
        agg = server.aggregate(unmask)
    except (SecAggError, KeyError, TypeError, ValueError) as e:
        result.error = f"secure aggregation failed: {e}"
        return result
    result.mean = unflatten(agg.mean, req.arrays, names)
    result.total_weight = agg.total_weight
    result.clipped = agg.clipped
    result.aggregated = agg.aggregated
    result.dropped = [n for n in adverts if n not in agg.aggregated]
    return result


def mask_content(m: MaskRequest) -> RecordDict:
    return RecordDict({"inbox": ConfigRecord({
        "from": _ids([s for s, _ in m.ciphertexts]), "ct": [c for _, c in m.ciphertexts]})})


def unmask_reply_to(rep: UnmaskReply) -> ConfigRecord:
    def cols(lst: list[tuple[int, int, int]], p: str) -> dict[str, list[str] | list[int]
                                                             | list[bytes]]:
        return {f"{p}-owner": _ids([o for o, _, _ in lst]), f"{p}-x": [x for _, x, _ in lst],
                f"{p}-y": [y.to_bytes(66, "big") for _, _, y in lst]}
    return ConfigRecord({**cols(rep.b_shares, "b"), **cols(rep.sk_shares, "sk")})  # type: ignore[arg-type]


def unmask_reply_from(rec: ConfigRecord) -> UnmaskReply:
    def rows(p: str) -> list[tuple[int, int, int]]:
        return [(int(o), int(x), int.from_bytes(y, "big"))  # type: ignore[arg-type]
                for o, x, y in zip(rec[f"{p}-owner"], rec[f"{p}-x"], rec[f"{p}-y"],  # type: ignore[arg-type]
                                   strict=True)]
    return UnmaskReply(rows("b"), rows("sk"))


def mask_request_from(rec: ConfigRecord) -> MaskRequest:
    return MaskRequest([(int(s), bytes(c)) for s, c in  # type: ignore[arg-type]
                        zip(rec["from"], rec["ct"], strict=True)])  # type: ignore[arg-type]


def unmask_request_from(rec: ConfigRecord) -> UnmaskRequest:
    return UnmaskRequest([int(s) for s in rec["survivors"]],  # type: ignore[union-attr]
                         [int(s) for s in rec["dropped"]])  # type: ignore[union-attr]


def masked_content(data: bytes) -> RecordDict:
    return RecordDict({"masked": ArrayRecord({
        "y": Array(np.frombuffer(data, dtype=np.uint8).copy())})})
