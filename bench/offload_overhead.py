"""Decode time of an offloaded model whose budget holds every expert, against the same
model unpatched, measured alternately in one run.

With every expert resident the cache only adds bookkeeping: one device-to-host read of
the chosen experts per MoE layer, an acquire and a release, and the slot remapping. The
target is at most 1.15x the unpatched decode time.

    python bench/offload_overhead.py [--device cpu] [--tokens 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import expertflow as ef
import torch
from common import describe, mixtral_like, save


def decode_seconds_per_token(model, prompt: torch.Tensor, tokens: int) -> float:
    """Time of `tokens` greedy decode steps after the prompt's prefill, per token."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(prompt.device)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(prompt.device)
        return (time.perf_counter() - start) / tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values' new name
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    model = mixtral_like(args.hidden, args.intermediate, args.layers).to(args.device)
    experts = model.config.num_local_experts
    prompt = torch.randint(
        0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    ).to(args.device)
    stock, patched = [], []
    decode_seconds_per_token(model, prompt, 4)  # warm-up
    for _ in range(args.reps):
        stock.append(decode_seconds_per_token(model, prompt, args.tokens))
        with ef.offload(model, args.device, slots=args.layers * experts, policy="lru") as handle:
            for layer in range(args.layers):  # load every expert once
                handle.cache.acquire(layer, range(experts))
                handle.cache.release(layer, range(experts))
            handle.reset_stats()
            patched.append(decode_seconds_per_token(model, prompt, args.tokens))
            stats = handle.stats()
        assert stats["misses"] == 0, "a budget holding every expert must not miss"

    ratio = statistics.median(p / s for p, s in zip(patched, stock))
    result = {
        "model": describe(model),
        "device": args.device,
        "tokens_per_rep": args.tokens,
        "stock_ms_per_token": [s * 1e3 for s in stock],
        "offloaded_ms_per_token": [p * 1e3 for p in patched],
        "ratio_median": ratio,
        "target": "<= 1.15",
        "meets_target": ratio <= 1.15,
        "offloaded_stats": {k: stats[k] for k in ("hits", "misses", "acquires")},
    }
    print(f"stock     {statistics.median(stock) * 1e3:8.2f} ms/token")
    print(f"offloaded {statistics.median(patched) * 1e3:8.2f} ms/token")
    print(f"ratio     {ratio:8.3f}  (target <= 1.15)")
    save(f"offload_overhead_{args.device.split(':')[0]}", result)


if __name__ == "__main__":
    main()
