"""Peak host memory of offload(): the pool holds the experts once.

Runs in a fresh process: builds a Mixtral-shaped model whose experts dominate its size,
offloads it with the smallest budget (one layer's experts), runs a forward, and reports
the process's peak RSS against the model's expert bytes. Weights move into the pool layer
by layer and each layer's original storage is freed as it goes, so the peak stays near one
copy of the experts plus the rest of the model and the runtime. Target: <= 1.1x.

    python bench/offload_memory.py [--layers 16]
"""

from __future__ import annotations

import argparse
import resource

import expertflow as ef
import torch
from common import describe, expert_bytes, mixtral_like, save


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()

    baseline = rss_bytes()  # the interpreter, torch and transformers
    model = mixtral_like(args.hidden, args.intermediate, args.layers)
    experts = expert_bytes(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    after_build = rss_bytes()
    handle = ef.offload(model, "cpu", slots=model.config.num_local_experts, policy="lru")
    with torch.no_grad():
        model(torch.randint(0, 1024, (1, 8)))
    after_offload = rss_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arena = handle.num_slots * handle.slot_bytes
    handle.restore()

    # What offload() may add on top of the model: the device slots (host memory on the CPU
    # backend) and one layer in flight; the pool replaces the experts' own storage.
    ratio = (peak - baseline - (model_bytes - experts) - arena) / experts
    result = {
        "model": describe(model),
        "expert_bytes": experts,
        "non_expert_bytes": model_bytes - experts,
        "slot_arena_bytes": arena,
        "rss_baseline_bytes": baseline,
        "rss_after_build_bytes": after_build,
        "rss_after_offload_bytes": after_offload,
        "peak_rss_bytes": peak,
        "peak_expert_memory_over_expert_bytes": ratio,
        "peak_rss_over_expert_bytes_raw": peak / experts,
        "target": "<= 1.1",
        "meets_target": ratio <= 1.1,
    }
    gib = 2**30
    print(
        f"experts {experts / gib:.2f} GiB, rest of the model {(model_bytes - experts) / gib:.2f} GiB, "
        f"slots {arena / gib:.2f} GiB, runtime {baseline / gib:.2f} GiB"
    )
    print(
        f"peak RSS {peak / gib:.2f} GiB -> expert memory at peak {ratio:.3f}x the expert bytes "
        "(target <= 1.1)"
    )
    save("offload_memory_cpu", result)


if __name__ == "__main__":
    main()
