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

    expertflow, history only
                   the same with the transition-history predictor alone (no gate
                   lookahead): its precision and recall

The model is the embedded default (trained on the Python stdlib, `bench/train_default.py`);
the prompt and the decode steps are held-out Python source (the first validation file of
that script's split), fed token by token, so that routing is what the model does on text
like its training data. `--random` runs the random-weight Mixtral shape instead (hidden
`--hidden`, `--layers` layers; decode steps fed a fixed random text, since such a model's
greedy output soon repeats one token, and its routing with it).

Gate-lookahead recall at distance d: for each decode step and MoE layer l, layer l+d's
router applied to layer l's input; the share of the experts layer l+d really chose that
it names (no cache involved).

    python bench/prefetch_bench.py [--copy-ratio 3] [--tokens 32] [--random --layers 8]
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
from expertflow import models
from expertflow.benchmark import core_for_copies
from expertflow.experts import find_experts
from expertflow.prediction import find_router, router_choice

CONFIGS = [
    ("lru", {"policy": "lru", "prefetch": False}),
    ("lru+prefetch", {"policy": "lru", "prefetch": True}),
    ("expertflow", {"policy": "expertflow", "prefetch": True}),
    ("expertflow, every candidate", {"policy": "expertflow", "prefetch": True}),
    (
        "expertflow, history only",
        {"policy": "expertflow", "prefetch": True, "predictor": "history"},
    ),
]


def prefetch_every_candidate(model) -> None:
    """Turns the pay-off rule off: the prefetcher (one per offload) is told copies are free."""
    runner = find_experts(model)[0].module.__dict__["_expertflow"]
    runner.prefetcher.link_bytes_per_second = math.inf


def decode(model, prompt: torch.Tensor, text: torch.Tensor, after_prefill=None) -> float:
    """Seconds per decode step after the prompt's prefill, the steps fed `text` (1 x tokens)
    one token at a time rather than their own argmax, so that every config sees the same."""
    tokens = text.shape[1]
    with torch.no_grad():
        past = model(prompt, use_cache=True).past_key_values
        if after_prefill is not None:
            after_prefill()
        start = time.perf_counter()
        for i in range(tokens):
            past = model(text[:, i : i + 1], past_key_values=past, use_cache=True).past_key_values
        return (time.perf_counter() - start) / tokens


def lookahead_recall(model, prompt: torch.Tensor, text: torch.Tensor, distances: list[int]) -> dict:
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
        decode(model, prompt, text)
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
    parser.add_argument("--random", action="store_true", help="the random Mixtral shape")
    parser.add_argument("--hidden", type=int, default=1024, help="--random: width")
    parser.add_argument("--intermediate", type=int, default=2048, help="--random: expert width")
    parser.add_argument("--layers", type=int, default=8, help="--random: layers")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--copy-ratio", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    with core_for_copies("cpu"):
        measure(args)


def workload(args) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """The model, a 16-token prompt, the decode steps' tokens, and the result file's name."""
    name = f"prefetch_cpu_copy_ratio_{args.copy_ratio:g}"
    if args.random:
        model = mixtral_like(args.hidden, args.intermediate, args.layers)
        ids = torch.randint(
            0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
        )
        text = torch.randint(
            0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1)
        )
        return model, ids, text, name.replace("cpu_", "cpu_random_")
    from train_default import corpus_files, read_text

    loaded = models.default_model()
    held_out = read_text(corpus_files()[1][0])
    ids = loaded.tokenizer.encode(held_out)[:, : 16 + args.tokens]
    return loaded.model, ids[:, :16], ids[:, 16:], name


def measure(args) -> None:
    model, prompt, text, result_name = workload(args)
    experts = model.config.num_local_experts
    layers = model.config.num_hidden_layers
    slots = layers * experts // 4

    # The link: one expert's copy lasts copy_ratio x one layer's resident decode time.
    with ef.offload(model, "cpu", slots=layers * experts, prefetch=False) as handle:
        for layer in range(layers):
            handle.cache.acquire(layer, range(experts))
            handle.cache.release(layer, range(experts))
        layer_seconds = decode(model, prompt, text) / layers
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
                seconds = decode(model, prompt, text, after_prefill=handle.reset_stats)
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
    recall = lookahead_recall(model, prompt, text, [1, 2, 3])
    print("gate-lookahead recall: " + ", ".join(f"d={d}: {r:.3f}" for d, r in recall.items()))
    save(
        result_name,
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
