"""Translation between fedllm.protocol dataclasses and Flower Messages (both directions).

The only place that knows how a request/reply is laid out in a Flower RecordDict; used by the
server and the client adapters alike.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.config import config_from_dict
from fedllm.protocol import CENTER_KEY, PHASE_TRAIN, REPLY_METRICS, TrainReply, TrainRequest


def _arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _arrays_dict(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record}


def request_to_content(req: TrainRequest) -> RecordDict:
    rd = RecordDict({
        "arrays": _arrays_record(req.arrays),
        "plan": ConfigRecord({
            "run-id": req.run_id,
            "round": req.round,
            "phase": req.phase,
            "config-json": json.dumps(req.config.to_dict()),
            "label-names-json": json.dumps(list(req.label_names)),
        }),
    })
    if req.feature_center is not None:
        rd["center"] = _arrays_record({CENTER_KEY: req.feature_center})
    return rd


def content_to_request(content: RecordDict) -> TrainRequest:
    plan = content.config_records["plan"]
    center = content.array_records.get("center")
    return TrainRequest(
        run_id=str(plan["run-id"]),
        round=int(plan["round"]),  # type: ignore[arg-type]
        config=config_from_dict(json.loads(str(plan["config-json"])), "coordinator's plan"),
        label_names=tuple(json.loads(str(plan["label-names-json"]))),
        arrays=_arrays_dict(content.array_records["arrays"]),
        phase=str(plan.get("phase", PHASE_TRAIN)),
        feature_center=None if center is None else center[CENTER_KEY].numpy(),
    )


def reply_to_content(reply: TrainReply) -> RecordDict:
    rd = RecordDict({
        "info": ConfigRecord({"node": reply.node, "status": reply.status,
                              "reason": reply.reason, "accountant": reply.accountant,
                              "ledger-json": json.dumps(reply.ledger)}),
        "metrics": MetricRecord({k: float(v) for k, v in reply.metrics.items()
                                 if k in REPLY_METRICS and v is not None}),
    })
    if reply.arrays:
        rd["arrays"] = _arrays_record(reply.arrays)
    if reply.eval_counts is not None or reply.eval_note:
        # Aggregate evaluation counts as JSON (nested per-group matrices; no Flower record type
        # holds them natively). Only counts: see fedllm.evaluate.EvalCounts.
        rd["eval"] = ConfigRecord({"counts-json": json.dumps(reply.eval_counts),
                                   "note": reply.eval_note})
    return rd


def content_to_reply(content: RecordDict) -> TrainReply:
    info = content.config_records["info"]
    metrics = content.metric_records.get("metrics", MetricRecord())
    arrays = content.array_records.get("arrays")
    ev = content.config_records.get("eval")
    return TrainReply(
        node=str(info["node"]),
        status=str(info["status"]),
        reason=str(info.get("reason", "")),
        accountant=str(info.get("accountant", "")),
        arrays=_arrays_dict(arrays) if arrays is not None else {},
        metrics={k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
        ledger=list(json.loads(str(info.get("ledger-json", "[]")))),
        eval_counts=json.loads(str(ev["counts-json"])) if ev is not None else None,
        eval_note=str(ev.get("note", "")) if ev is not None else "",
    )
