"""Decode time and stall time with and without prediction, over an emulated PCIe link,
and the recall of gate lookahead at distances 1, 2 and 3.

The CPU backend's link model stands in for PCIe. Its speed is scaled to the model: one
expert's copy takes `--copy-ratio` times the measured decode time of one layer with every
expert resident (default 3, about what Qwen3-30B-A3B's 9.4 MB bf16 experts cost over a
25 GB/s PCIe 4.0 link against one layer's decode on a 24 GB GPU). Every configuration
runs the same prompts at the same budget (a quarter of the experts) in one process, with
torch on one core fewer than the machine has so that the copies have one
(`expertflow.benchmark.core_for_copies`):

    lru            no prediction: every miss is a demand copy
    lru+prefetch   LRU eviction, combined predictor, prefetch one layer ahead
    expertflow     LRU plus prediction for eviction, same prefetch
    expertflow, every candidate
                   the same without the pay-off rule (Prefetcher.worth): every ranked
                   candidate is prefetched, to show what the rule saves

Gate-lookahead recall at distance d: for each decode step and MoE layer l, layer l+d's
router applied to layer l's input; the share of the experts layer l+d really chose that
it names (no cache involved).

    python bench/prefetch_bench.py [--layers 8] [--tokens 16]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import expertflow as ef
import expertflow.offloading
import torch
from common import describe, mixtral_like, save
from expertflow.benchmark import core_for_copies
from expertflow.experts import find_experts
from expertflow.prediction import find_router, router_choice

CONFIGS = [
    ("lru", {"policy": "lru", "prefetch": False}),
    ("lru+prefetch", {"policy": "lru", "prefetch": True}),
    ("expertflow", {"policy": "expertflow", "prefetch": True}),
    ("expertflow, every candidate", {"policy": "expertflow", "prefetch": True}),
]


def prefetch_every_candidate(model) -> None:
    """Turns the pay-off rule off: the prefetcher (one per offload) is told copies are free."""
    runner = find_experts(model)[0].module.__dict__["_expertflow"]
    runner.prefetcher.link_bytes_per_second = math.inf


def decode(model, prompt: torch.Tensor, tokens: int, after_prefill=None) -> float:
    """Seconds per decode step after the prompt's prefill. The steps are fed a fixed
    random text rather than their own argmax: a random-weight model's greedy output soon
    repeats one token, whose routing then repeats too, unlike a real model's."""
    text = torch.randint(
        0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        past = model(prompt, use_cache=True).past_key_values
        if after_prefill is not None:
            after_prefill()
        start = time.perf_counter()
        for i in range(tokens):
            past = model(text[:, i : i + 1], past_key_values=past, use_cache=True).past_key_values
        return (time.perf_counter() - start) / tokens


def lookahead_recall(model, prompt: torch.Tensor, tokens: int, distances: list[int]) -> dict:
    """Recall of each layer's router applied `d` layers early, over a decode run."""
    plans = find_experts(model)
    routers = [find_router(model, p.name, p.num_experts) for p in plans]
    steps: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
    index = {id(p.module): i for i, p in enumerate(plans)}

    def record(module, args, _out):
        if args[0].shape[0] == 1:  # decode steps only
            if index[id(module)] == 0:
                steps.append({})
            steps[-1][index[id(module)]] = (args[0], args[1])

    hooks = [p.module.register_forward_hook(record) for p in plans]
    try:
        decode(model, prompt, tokens)
    finally:
        for hook in hooks:
            hook.remove()
    recall = {}
    for d in distances:
        found = total = 0
        with torch.no_grad():
            for step in steps:
                for layer, (hidden, _) in step.items():
                    if layer + d not in step:
                        continue
                    predicted, _ = router_choice(routers[layer + d], hidden)
                    actual = set(step[layer + d][1].flatten().tolist())
                    found += len(actual & set(predicted.flatten().tolist()))
                    total += len(actual)
        recall[d] = found / total if total else 0.0
    return recall


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--copy-ratio", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    with core_for_copies("cpu"):
        measure(args)


def measure(args) -> None:
    model = mixtral_like(args.hidden, args.intermediate, args.layers)
    experts = model.config.num_local_experts
    prompt = torch.randint(
        0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    slots = args.layers * experts // 4

    # The link: one expert's copy lasts copy_ratio x one layer's resident decode time.
    with ef.offload(model, "cpu", slots=args.layers * experts, prefetch=False) as handle:
        for layer in range(args.layers):
            handle.cache.acquire(layer, range(experts))
            handle.cache.release(layer, range(experts))
        layer_seconds = decode(model, prompt, args.tokens) / args.layers
        expert_bytes = handle.slot_bytes
    link_gbps = expert_bytes / (args.copy_ratio * layer_seconds) / 1e9
    floor = expert_bytes / (link_gbps * 1e9)
    print(
        f"layer decode {layer_seconds * 1e3:.2f} ms, expert {expert_bytes / 2**20:.1f} MiB, "
        f"emulated link {link_gbps:.3f} GB/s ({floor * 1e3:.1f} ms per expert), {slots} slots"
    )

    runs: dict[str, list[dict]] = {name: [] for name, _ in CONFIGS}
    reference = None
    for _ in range(args.reps):
        for name, options in CONFIGS:
            with ef.offload(model, "cpu", slots=slots, link_gbps=link_gbps, **options) as handle:
                if name.endswith("every candidate"):
                    prefetch_every_candidate(model)
                seconds = decode(model, prompt, args.tokens, after_prefill=handle.reset_stats)
                stats = handle.stats()  # of the decode steps
                with torch.no_grad():
                    tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
            reference = tokens if reference is None else reference
            assert torch.equal(tokens, reference), f"{name} changed the output"
            runs[name].append(
                {
                    "ms_per_token": seconds * 1e3,
                    "stall_ms_per_token": stats["stall_seconds"] * 1e3 / args.tokens,
                    "misses": stats["misses"],
                    "hits": stats["hits"],
                    "hit_rate": stats["hit_rate"],
                    "prefetch_issued": stats["prefetch_issued"],
                    "prefetch_used": stats["prefetch_used"],
                    "prefetch_wasted": stats["prefetch_wasted"],
                    "precision": stats["precision"],
                    "recall": stats["recall"],
                    "bytes_demand": stats["bytes_demand"],
                    "bytes_prefetch": stats["bytes_prefetch"],
                }
            )

    summary = {}
    for name, _ in CONFIGS:
        medians = {k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]}
        summary[name] = medians
    base = summary["lru"]["ms_per_token"]
    print(
        f"{'config':28} {'ms/token':>9} {'stall ms':>9} {'speed-up':>9} {'misses':>7} "
        f"{'hit rate':>9} {'precision':>9} {'recall':>7}"
    )
    for name, row in summary.items():
        print(
            f"{name:28} {row['ms_per_token']:9.1f} {row['stall_ms_per_token']:9.1f} "
            f"{base / row['ms_per_token']:9.2f} {row['misses']:7.0f} {row['hit_rate']:9.3f} "
            f"{row['precision']:9.3f} {row['recall']:7.3f}"
        )
    recall = lookahead_recall(model, prompt, args.tokens, [1, 2, 3])
    print("gate-lookahead recall: " + ", ".join(f"d={d}: {r:.3f}" for d, r in recall.items()))
    save(
        f"prefetch_cpu_copy_ratio_{args.copy_ratio:g}",
        {
            "protocol": __doc__,
            "model": describe(model),
            "slots": slots,
            "decode_tokens": args.tokens,
            "reps": args.reps,
            "torch_threads": torch.get_num_threads(),
            "layer_decode_ms_resident": layer_seconds * 1e3,
            "copy_ratio": args.copy_ratio,
            "emulated_link_gbps": link_gbps,
            "configs": summary,
            "runs": runs,
            "speedup_over_lru": {name: base / row["ms_per_token"] for name, row in summary.items()},
            "gate_lookahead_recall": recall,
        },
    )


if __name__ == "__main__":
    main()
