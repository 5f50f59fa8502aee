"""A model several times the budget, end to end on a GPU: device memory stays within the
budget plus the non-expert weights, and greedy tokens equal the resident model's.

Model: Mixtral-8x7B-shaped layers (hidden 4096, intermediate 14336, 8 experts of 336 MiB in
bf16, top-2), random weights, as many layers as --expert-gib asks (default 16 GiB of
experts, 6 layers), a small vocabulary. It still fits an H200 whole, which gives the
reference: greedy tokens resident on the GPU. Then the model goes back to the host and is
offloaded with a --budget-gib budget (default 4), and must produce the same tokens (a
difference counts as a failure unless the reference's top two logits were within NEAR_TIE
there: the slots' order can round a bf16 near-tie the other way), with:

- torch's peak allocation (torch.cuda.max_memory_allocated, reset after the model left the
  device) within the non-expert weights plus ACTIVATION_MARGIN: experts never reach torch;
- the slot arena (cudaMalloc'd by the core, outside torch) within the budget;
- the device memory the process holds (cudaMemGetInfo, before and after) within
  budget + non-expert weights + ACTIVATION_MARGIN.

    python bench/big_model_check.py [--expert-gib 16] [--budget-gib 4] [--out PATH]
    python bench/big_model_check.py --device cpu --expert-gib 0.05 --budget-gib 0.02  # smoke

Exit status 1 when a check fails. JSON to --out (default bench/results/big_model_check.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import expertflow as ef
import torch
from common import large_mixtral, machine
from expertflow.experts import find_experts

ACTIVATION_MARGIN = 2**30  # activations, KV cache and the allocator's rounding, 32 tokens
PROMPT_TOKENS, NEW_TOKENS = 32, 16
NEAR_TIE = 0.0625  # a logit margin within a few bf16 roundings at this scale


def greedy(model, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The new tokens, each step's margin between the best and second-best logit, seconds."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    if prompt.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    top2 = torch.stack([s[0].float().topk(2).values for s in out.scores]).cpu()
    return out.sequences[0, prompt.shape[1] :].cpu(), top2[:, 0] - top2[:, 1], seconds


def agreement(tokens: torch.Tensor, reference: torch.Tensor, margins: torch.Tensor) -> dict:
    """Identical, or where the first difference is and how close the reference's choice
    was there: bf16 experts summed in slot order instead of expert order may round a
    near-tie the other way, which is not a fault; a clear margin is."""
    differ = (tokens != reference).nonzero()
    if len(differ) == 0:
        return {"same_tokens_as_resident": True}
    step = int(differ[0])
    return {
        "same_tokens_as_resident": False,
        "first_difference": step,
        "reference_margin_there": float(margins[step]),
    }


def non_expert_bytes(model) -> int:
    experts = {id(p) for e in find_experts(model) for ps in e.params.values() for p in ps}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in experts)


def check(args) -> dict:
    cuda = args.device.startswith("cuda")
    per_layer = 8 * 3 * args.hidden * args.intermediate * 2  # bf16 experts
    layers = max(2, round(args.expert_gib * 2**30 / per_layer))
    model = large_mixtral(layers, args.hidden, args.intermediate)
    experts = sum(
        p.numel() * p.element_size()
        for e in find_experts(model)
        for ps in e.params.values()
        for p in ps
    )
    weights = non_expert_bytes(model)
    prompt = torch.randint(
        0, 1024, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)
    ).to(args.device)

    model.to(args.device)
    reference, margins, resident_seconds = greedy(model, prompt)
    model.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free_before = torch.cuda.mem_get_info()[0]
    budget = int(args.budget_gib * 2**30)
    rows = {}
    for policy in ("lru", "expertflow"):
        options = {"policy": policy, "prefetch": policy == "expertflow"}
        with ef.offload(model, args.device, budget=budget, **options) as handle:
            tokens, _, seconds = greedy(model, prompt)
            stats = handle.stats()
            row = {
                **agreement(tokens, reference, margins),
                "seconds": seconds,
                "slots": handle.num_slots,
                "arena_bytes": handle.num_slots * handle.slot_bytes,
                **{k: stats[k] for k in ("hit_rate", "misses", "bytes_demand", "bytes_prefetch")},
            }
            if cuda:
                row["torch_peak_bytes"] = torch.cuda.max_memory_allocated()
                row["process_device_bytes"] = free_before - torch.cuda.mem_get_info()[0]
        rows[policy] = row
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return {
        "expert_bytes": experts,
        "non_expert_bytes": weights,
        "budget_bytes": budget,
        "experts_over_budget": experts / budget,
        "activation_margin_bytes": ACTIVATION_MARGIN,
        "layers": model.config.num_hidden_layers,
        "resident_seconds": resident_seconds,
        "policies": rows,
    }


def failures(result: dict) -> list[str]:
    found = []
    for policy, row in result["policies"].items():
        if row.get("reference_margin_there", 0.0) > NEAR_TIE:
            found.append(
                f"{policy}: token {row['first_difference']} differs from the resident model's, "
                f"which led by {row['reference_margin_there']:.3f} there"
            )
        if row["arena_bytes"] > result["budget_bytes"]:
            found.append(f"{policy}: the arena ({row['arena_bytes']} bytes) exceeds the budget")
        if "torch_peak_bytes" in row:
            limit = result["non_expert_bytes"] + ACTIVATION_MARGIN
            if row["torch_peak_bytes"] > limit:
                found.append(f"{policy}: torch allocated {row['torch_peak_bytes']} > {limit}")
            limit += result["budget_bytes"]
            if row["process_device_bytes"] > limit:
                found.append(f"{policy}: the device holds {row['process_device_bytes']} > {limit}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--expert-gib", type=float, default=16.0)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "big_model_check.json")
    )
    args = parser.parse_args()
    result = {"machine": machine(), "device": args.device, **check(args)}
    result["failures"] = failures(result)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
