"""Bytes per node per round: the LoRA adapter update vs sending the full model.

Measures, for the bundled MiniLM (and LoRA ranks given by ``--ranks``): the raw float32 bytes of
the adapter state (what fedllm records as ``update_bytes``), the serialised size of the actual
Flower messages fedllm sends (coordinator → node request with the run plan, node → coordinator
reply; protobuf, as on the gRPC wire), and the bytes of the full model for comparison.

    python -m bench.communication [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from bench._common import finish
from fedllm.config import RunConfig
from fedllm.model import load_model
from fedllm.protocol import STATUS_OK, TrainReply, TrainRequest, state_bytes

LABELS = ("0", "1")


def wire_bytes(content: object) -> int:
    """Size of a Flower RecordDict serialised as the protobuf that travels over gRPC."""
    from flwr.common.serde import recorddict_to_proto

    return len(recorddict_to_proto(content).SerializeToString())  # type: ignore[arg-type]


def measure(r: int) -> dict:
    from server.messages import reply_to_content, request_to_content

    lm = load_model(None, task="seq-cls", label_names=LABELS, lora_r=r, lora_alpha=2.0 * r)
    state = lm.adapter_state()
    config = RunConfig.model_validate({"lora": {"r": r, "alpha": 2.0 * r}})
    req = TrainRequest(run_id="bench", round=1, config=config, label_names=LABELS, arrays=state)
    metrics = {"num_examples": 3000.0, "steps": 12.0, "noise_multiplier": 1.1,
               "sample_rate": 0.085, "epsilon": 3.2, "delta": 1e-5, "epsilon_limit": 8.0,
               "train_loss": 0.5, "seconds": 30.0}
    reply = TrainReply(node="node-0", status=STATUS_OK, accountant="prv", arrays=state,
                       metrics=metrics)
    adapter = state_bytes(state)
    up = wire_bytes(reply_to_content(reply))
    down = wire_bytes(request_to_content(req))
    full = lm.full_model_bytes
    return {
        "lora_r": r,
        "adapter_tensors": len(state),
        "adapter_params": int(sum(a.size for a in state.values())),
        "adapter_bytes": adapter,
        "full_model_bytes": full,
        "adapter_fraction": round(adapter / full, 5),
        "reply_wire_bytes": up,  # node -> coordinator, per node per round
        "request_wire_bytes": down,  # coordinator -> node, per node per round
        "reply_wire_fraction": round(up / full, 5),
        "bytes_per_node_per_round": up + down,
        "full_model_bytes_per_node_per_round": 2 * full,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="r = 8 only (the default)")
    ap.add_argument("--smoke", action="store_true", help="same as --quick")
    ap.add_argument("--ranks", default="4,8,16", help="LoRA ranks to measure")
    ap.add_argument("--results-dir")
    args = ap.parse_args(argv)
    ranks = [8] if args.quick or args.smoke else [int(x) for x in args.ranks.split(",")]
    rows = [measure(r) for r in ranks]
    default = next((row for row in rows if row["lora_r"] == 8), rows[0])
    # Secure aggregation changes what travels (masked updates + key exchange); fedllm has no
    # secagg module on this branch yet, so only the plain numbers are measured.
    has_secagg = importlib.util.find_spec("fedllm.secagg") is not None
    result = {
        "mode": "quick" if args.quick or args.smoke else "full",
        "config": {"model": "all-MiniLM-L6-v2 (bundled)", "task": "seq-cls", "ranks": ranks,
                   "lora_targets": "PEFT default (query, value)", "dtype": "float32"},
        "per_rank": rows,
        "adapter_bytes": default["adapter_bytes"],
        "full_model_bytes": default["full_model_bytes"],
        "adapter_fraction": default["adapter_fraction"],
        "bytes_per_node_per_round": default["bytes_per_node_per_round"],
        "target_adapter_fraction_max": 0.01,
        "meets_target": default["reply_wire_fraction"] <= 0.01,
        "secagg": "not measured: no fedllm.secagg on this branch" if not has_secagg
        else "fedllm.secagg present but not yet benchmarked",
    }
    return finish("communication", result,
                  out_dir=Path(args.results_dir) if args.results_dir else None)


if __name__ == "__main__":
    main()
