"""Benchmark: round time and bytes per node with and without SecAgg+, at 3 and 10 nodes.

Method (stated in the JSON): one real local DP-SGD round of the bundled MiniLM (r=8 LoRA,
~75k adapter parameters) is timed once; then, in the same process, for each node count the
clear round (FedAvg of float32 adapters) and the SecAgg+ round (all four stages of every node
and the coordinator, on that real adapter's size, with real keys, shares and masks) are timed.
Nodes train and mask in parallel in a federation, so a round takes
    train + max(per-node protocol time) + coordinator time.
Bytes per node are the payload bytes of the Flower records a node uploads (same measure as the
run store's update_bytes) and downloads.

    python bench/secagg.py [--examples 512] [--nodes 3 10] [--dropouts 1]

Prints one JSON object and appends it as a line to bench/results/secagg.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fedllm.aggregate import fedavg
from fedllm.config import load_config
from fedllm.coordinator import resolve_label_names
from fedllm.data import encode_labels, read_table, tokenize
from fedllm.model import load_model
from fedllm.protocol import TrainReply, TrainRequest
from fedllm.secagg import NodeSession, RoundId, SecAggParams, ServerSession, unflatten
from fedllm.train import DPParams, train_local
from server.messages import reply_to_content, request_to_content
from server.secagg import (
    content_bytes,
    mask_content,
    masked_content,
    unmask_reply_to,
)

OUT = Path(__file__).resolve().parent / "results" / "secagg.jsonl"


def measure_training(examples: int) -> tuple[float, dict[str, np.ndarray], object]:
    cfg = load_config(None, {"data.max_examples": examples})
    labels = resolve_label_names(cfg)
    loaded = load_model(None, task="seq-cls", label_names=labels, pooling="auto", lora_r=8,
                        lora_alpha=16, lora_dropout=0.0, target_modules=None, device="cpu",
                        seed=0)
    d = cfg.data
    table = read_table(d.resolved_train_paths()[0], text_column=d.text_column,
                       label_column=d.label_column, max_examples=examples)
    ds = tokenize(loaded.tokenizer, table.texts, encode_labels(table, labels, d.label_column),
                  max_length=cfg.model.max_length)
    g0 = loaded.adapter_state()
    t0 = time.perf_counter()
    train_local(loaded, ds, epochs=1, batch_size=64, physical_batch_size=32,
                learning_rate=5e-3, dp=DPParams(noise_multiplier=1.0, max_grad_norm=1.0),
                seed=0)
    return time.perf_counter() - t0, g0, cfg


def clear_round(n: int, g0: dict[str, np.ndarray], cfg: object, rng: np.random.Generator
                ) -> dict[str, float]:
    updates = [({k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in g0.items()},
                float(rng.integers(500, 2000))) for _ in range(n)]
    up = content_bytes(reply_to_content(TrainReply("node-0", "ok", arrays=updates[0][0],
                                                   metrics={"num_examples": 1.0})))
    down = content_bytes(request_to_content(TrainRequest("r", 1, cfg, ("0", "1"), g0)))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    fedavg(updates)
    return {"server_s": time.perf_counter() - t0, "node_s": 0.0, "bytes_up": up,
            "bytes_down": down}


def secure_round(n: int, g0: dict[str, np.ndarray], cfg: object, rng: np.random.Generator,
                 dropouts: int) -> dict[str, float]:
    params = SecAggParams()
    names = sorted(g0)
    length = int(sum(v.size for v in g0.values()))
    rid = RoundId("bench", 1)
    ids = [int(rng.integers(1, 2**63)) for _ in range(n)]
    node_s = dict.fromkeys(ids, 0.0)
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)
    sessions, adverts = {}, {}
    for nid in ids:
        delta = rng.normal(0, 0.01, length).astype(np.float32)
        t = time.perf_counter()
        sessions[nid], adverts[nid] = NodeSession.start(rid, nid, params=params, update=delta,
                                                        weight=int(rng.integers(500, 2000)))
        node_s[nid] += time.perf_counter() - t
        up[nid] += 32 + 32 + 8 + 32
    server = ServerSession(rid, params, length)
    ts = time.perf_counter()
    req = server.share_keys_request(adverts)
    server_s = time.perf_counter() - ts
    shares = {}
    for nid in ids:
        down[nid] += n * (32 + 32 + 8 + 32 + 20)
        t = time.perf_counter()
        shares[nid] = sessions[nid].share_keys(req)
        node_s[nid] += time.perf_counter() - t
        up[nid] += sum(len(c) + 20 for c in shares[nid].values())
    ts = time.perf_counter()
    inbox = server.route_shares(shares)
    server_s += time.perf_counter() - ts
    gone = set(ids[:dropouts])  # shared keys, then vanished before uploading
    for nid in ids:
        down[nid] += content_bytes(mask_content(inbox[nid]))
        if nid in gone:
            continue
        t = time.perf_counter()
        data = sessions[nid].masked_input(inbox[nid])
        node_s[nid] += time.perf_counter() - t
        up[nid] += content_bytes(masked_content(data))
        ts = time.perf_counter()
        server.add_masked(nid, data)
        server_s += time.perf_counter() - ts
    ureq = server.unmask_request()
    replies = {}
    for nid in ureq.survivors:
        down[nid] += 20 * n
        t = time.perf_counter()
        replies[nid] = sessions[nid].unmask(ureq)
        node_s[nid] += time.perf_counter() - t
        up[nid] += sum(len(v) for v in unmask_reply_to(replies[nid]).values())  # type: ignore[arg-type]
    ts = time.perf_counter()
    agg = server.aggregate(replies)
    unflatten(agg.mean, g0, names)
    server_s += time.perf_counter() - ts
    live = [i for i in ids if i not in gone]
    down_global = content_bytes(request_to_content(TrainRequest("r", 1, cfg, ("0", "1"), g0)))  # type: ignore[arg-type]
    return {"server_s": server_s, "node_s": max(node_s[i] for i in live),
            "bytes_up": float(np.mean([up[i] for i in live])),
            "bytes_down": float(np.mean([down[i] for i in live])) + down_global,
            "ring_bits": server.k, "threshold": server.threshold}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--nodes", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--dropouts", type=int, default=1)
    args = ap.parse_args()
    train_s, g0, cfg = measure_training(args.examples)
    rng = np.random.default_rng(0)
    length = int(sum(v.size for v in g0.values()))
    results = {}
    for n in args.nodes:
        clear = clear_round(n, g0, cfg, rng)
        sec = secure_round(n, g0, cfg, rng, 0)
        drop = secure_round(n, g0, cfg, rng, min(args.dropouts, n - 2))
        t_clear = train_s + clear["server_s"]
        t_sec = train_s + sec["node_s"] + sec["server_s"]
        t_drop = train_s + drop["node_s"] + drop["server_s"]
        results[str(n)] = {
            "clear": {"round_s": t_clear, **clear},
            "secagg": {"round_s": t_sec, **sec},
            "secagg_with_dropouts": {"round_s": t_drop, "dropouts": min(args.dropouts, n - 2),
                                     **drop},
            # Absolute protocol cost, independent of how long local training takes here.
            "secagg_protocol_s": t_sec - t_clear,
            "overhead_fraction": (t_sec - t_clear) / t_clear,
            "overhead_fraction_with_dropouts": (t_drop - t_clear) / t_clear,
            "bytes_ratio": sec["bytes_up"] / clear["bytes_up"],
            "bytes_ratio_total": (sec["bytes_up"] + sec["bytes_down"])
            / (clear["bytes_up"] + clear["bytes_down"]),
        }
    at10 = results.get("10")
    out = {
        "bench": "secagg", "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_count": __import__("os").cpu_count(),
        "method": ("one real local DP-SGD round of the bundled MiniLM (LoRA r=8) timed; "
                   "SecAgg+ stages of all nodes + coordinator timed in-process on the real "
                   "adapter size; round = train + max node protocol time + coordinator time"),
        "adapter_params": length, "train_examples": args.examples, "train_round_s": train_s,
        "params": {"clip": 1.0, "bits": 20, "threshold_fraction": 2 / 3},
        "nodes": results,
        "targets": None if at10 is None else {
            "overhead_le_15pct": at10["overhead_fraction"] <= 0.15,
            "bytes_le_2x": at10["bytes_ratio"] <= 2.0},
    }
    print(json.dumps(out, indent=2))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
