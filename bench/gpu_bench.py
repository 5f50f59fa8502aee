"""The GPU benchmark in one call: decode tokens/s per policy on a model sized to stress
the PCIe link, against the all-resident bound and the link floor.

Model: Mixtral-shaped, random bf16 weights, 16 layers x 8 experts of 66 MiB (hidden 2048,
intermediate 5632), top-2; budget a quarter of the experts. Every configuration of
`expertflow bench` runs the same prompts and must give the resident tokens. The pinned
host-to-device bandwidth (one large copy of a pinned tensor) sets the floors of each
policy: all its bytes moved over that bandwidth (link floor), and its demand misses' bytes
alone (demand floor, the target's "link floor implied by its own demand misses"). JSON to
--out.

    python bench/gpu_bench.py [--out bench/results/gpu_bench.json]   # minutes on one H200
    python bench/gpu_bench.py --device cpu --small                   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import machine
from expertflow import benchmark, models


def pinned_h2d_gbps(device: str, gib: float = 2.0) -> float:
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8).pin_memory()
    target = torch.empty_like(source, device=device)
    target.copy_(source)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    return source.numel() / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny model, to check the script")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_bench.json"))
    args = parser.parse_args()

    shape = {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
    }
    if args.small:
        shape = {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    loaded = models.random_default(**shape)  # a size that stresses the link, not a trained model
    loaded.model.to(torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    gbps = pinned_h2d_gbps(args.device) if args.device.startswith("cuda") else None
    result = benchmark.run(
        loaded,
        benchmark.DEFAULT_PROMPTS,
        device=args.device,
        max_new_tokens=args.max_new_tokens,
        link_gbps=None if gbps else 4.0,
    )
    result["machine"] = machine()
    result["pinned_h2d_gbps"] = gbps
    result["model_shape"] = shape
    if gbps:  # the time its copies take at that bandwidth: all of them, and the demand ones
        for row in result["configs"].values():
            for floor, moved in (
                ("link_floor", row.get("bytes_demand", 0) + row.get("bytes_prefetch", 0)),
                ("demand_floor", row.get("bytes_demand", 0)),
            ):
                row[f"{floor}_seconds"] = moved / (gbps * 1e9)
                row[f"seconds_over_{floor}"] = (
                    row["seconds"] / row[f"{floor}_seconds"] if moved else None
                )
    decode = {name: row["decode_tokens_per_second"] for name, row in result["configs"].items()}
    result["decode_ratios"] = {
        "expertflow_over_lru": decode["expertflow"] / decode["lru"],
        "expertflow_over_no_cache": decode["expertflow"] / decode["no cache"],
    }
    print(benchmark.table(result))
    print(json.dumps(result["decode_ratios"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
