"""`expertflow bench`: the same prompts through every way of running the experts.

    resident      every expert on the device: the upper bound
    no cache      every expert a token needs copied every time (the accelerate-style
                  baseline: a static policy with an empty set)
    static        a fixed set, chosen from a calibration prompt's routing
    lru           demand copies, LRU eviction
    lru+prefetch  the same, with prediction and prefetch
    expertflow    LRU plus prediction for eviction, with prefetch

Every configuration must produce the resident tokens (the first configuration's, when the
whole model does not fit on the device and resident is skipped). The model stays on the
host between rows: each offloaded row moves only its non-expert weights to the device. On
the CPU backend copies go through the link model (`link_gbps`), which stands in for PCIe.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

from expertflow.experts import find_experts
from expertflow.offloading import offload
from expertflow.traces import calibrate_static

CONFIGS = {
    "resident": None,
    "no cache": {"policy": "static", "prefetch": False},
    "static": {"policy": "static", "prefetch": False},
    "lru": {"policy": "lru", "prefetch": False},
    "lru+prefetch": {"policy": "lru", "prefetch": True},
    "expertflow": {"policy": "expertflow", "prefetch": True},
}
# The stats a summary of one run shows.
SUMMARY = (
    "num_slots",
    "slot_bytes",
    "hit_rate",
    "hits",
    "misses",
    "prefetch_hits",
    "prefetch_issued",
    "bytes_demand",
    "bytes_prefetch",
    "stall_seconds",
    "precision",
    "recall",
)
# Code, since the embedded default model was trained on Python's standard library. No
# trailing newline: its tokenizer joins a newline with the next line's indentation, so a
# prompt ending in a bare newline asks for a token it rarely saw before an indented line.
DEFAULT_PROMPTS = [
    "def read_config(path):",
    "class Stack:\n    def __init__(self):",
    "import os\nimport sys\n\n\ndef main(argv):",
]


@dataclass
class Generated:
    tokens: torch.Tensor  # the new tokens
    seconds: float  # all of generate()
    prefill_seconds: float  # to the first new token: the prompt's forward; then decode


class _TokenClock(BaseStreamer):
    """When generate() hands out tokens: first the prompt, then each new one."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate(loaded, prompt: str, max_new_tokens: int, device: str) -> Generated:
    ids = loaded.tokenizer.encode(prompt).to(device)
    options = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}
    if loaded.sample:  # random weights: greedy output soon repeats one token; sample, seeded
        torch.manual_seed(0)
        options.update(do_sample=True, top_k=50)
    else:
        options.update(do_sample=False)
    clock = _TokenClock()  # put() copies each token to the host, so the times are synced
    start = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), streamer=clock, **options
        )
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Generated(out[0, ids.shape[1] :].cpu(), seconds, clock.times[1] - start)


# What a resident run needs beyond the weights: activations, the KV cache, the allocator's
# slack. Short prompts need far less; this keeps "fits" on the safe side.
RESIDENT_MARGIN = 0.05  # of the weights
RESIDENT_MARGIN_BYTES = 2**30


def resident_room(model, device: str) -> str | None:
    """Why the whole model cannot run resident on `device`, or None when it can."""
    if not str(device).startswith("cuda"):
        return None
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    need = int(weights * (1 + RESIDENT_MARGIN)) + RESIDENT_MARGIN_BYTES
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if need <= free:
        return None
    return (
        f"the whole model ({weights / 2**30:.1f} GiB of weights, {need / 2**30:.1f} GiB with "
        f"activations) does not fit in the {free / 2**30:.1f} GiB free on {device}"
    )


@contextlib.contextmanager
def resident(model, device: str):
    """Every weight on `device` for the block, then back to the host."""
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()


@contextlib.contextmanager
def core_for_copies(device: str):
    """On the CPU backend a copy is a memcpy on a host core: torch gets one core fewer
    meanwhile, so that copies run beside the compute as a GPU's copy engine does."""
    threads = torch.get_num_threads()
    if str(device).startswith("cpu"):
        torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_slots(model) -> int:
    plans = find_experts(model)
    return max(max(p.experts_per_token for p in plans), sum(p.num_experts for p in plans) // 4)


def run(
    loaded,
    prompts,
    *,
    device="cpu",
    slots=None,
    budget=None,
    max_new_tokens=32,
    link_gbps=None,
    configs=tuple(CONFIGS),
    reps=3,
    progress=True,
) -> dict:
    """Every configuration over `prompts`, `reps` rounds interleaved so that a slow spell
    of a shared machine hits them all alike; each row is the round of median time. Every
    row, resident included, runs with the same threads (see `core_for_copies`)."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    if slots is None and budget is None:
        slots = default_slots(loaded.model)
    sizing = {"slots": slots} if slots is not None else {"budget": budget}
    link = {"link_gbps": link_gbps} if link_gbps else {}
    skipped = {}
    if "resident" in configs and (reason := resident_room(loaded.model, device)) is not None:
        skipped["resident"] = reason
        configs = tuple(c for c in configs if c != "resident")
    with core_for_copies(device):
        static_set = _calibrate(loaded, prompts[0], device, sizing, link, max_new_tokens)
        rounds = {name: [] for name in configs}
        bar = tqdm(total=reps * len(configs) * len(prompts), desc="bench", disable=not progress)
        for _ in range(reps):
            for name in configs:
                bar.set_postfix_str(name)
                extra = {"static_experts": static_set} if name == "static" else {}
                rounds[name].append(
                    _one_round(
                        loaded,
                        prompts,
                        device,
                        max_new_tokens,
                        bar,
                        CONFIGS[name],
                        {**sizing, **link, **extra},
                    )
                )
        bar.close()
        torch_threads = torch.get_num_threads()
    reference = rounds[configs[0]][0]["tokens"]  # resident's, when it ran
    results = {}
    for name, runs in rounds.items():
        median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        generated = sum(len(t) for t in median["tokens"])
        decoded = generated - len(median["tokens"])  # each prompt's first token is its prefill's
        row = {
            "tokens_per_second": generated / median["seconds"],
            "decode_tokens_per_second": (
                decoded / (median["seconds"] - median["prefill_seconds"]) if decoded else None
            ),
            "prefill_seconds": median["prefill_seconds"],
            "seconds": median["seconds"],
            "tokens": generated,
            "tokens_per_second_by_round": [generated / r["seconds"] for r in runs],
            "same_tokens_as_reference": all(
                torch.equal(a, b) for r in runs for a, b in zip(r["tokens"], reference)
            ),
        }
        if median["stats"] is not None:
            row.update({k: median["stats"][k] for k in SUMMARY})
        results[name] = row
    return {
        "model": loaded.name,
        "device": device,
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "link_gbps": link_gbps,
        **sizing,
        "reps": reps,
        "torch_threads": torch_threads,
        "static_set_size": len(static_set),
        "reference": configs[0],
        "skipped": skipped,
        "configs": results,
    }


def _one_round(loaded, prompts, device, max_new_tokens, bar, options, offload_options) -> dict:
    """The prompts through one configuration (None: every expert resident)."""
    handle, stats = None, None
    with contextlib.ExitStack() as stack:
        if options is None:
            stack.enter_context(resident(loaded.model, device))
        else:
            handle = stack.enter_context(
                offload(loaded.model, device, **offload_options, **options)
            )
        tokens, seconds, prefill = [], 0.0, 0.0
        for prompt in prompts:
            out = generate(loaded, prompt, max_new_tokens, device)
            tokens.append(out.tokens)
            seconds += out.seconds
            prefill += out.prefill_seconds
            bar.update()
        if handle is not None:
            stats = handle.stats()
    return {"tokens": tokens, "seconds": seconds, "prefill_seconds": prefill, "stats": stats}


def _calibrate(loaded, prompt, device, sizing, link, max_new_tokens) -> list[tuple[int, int]]:
    """The static set: the experts a calibration run of the first prompt used most."""
    handle = offload(loaded.model, device, **sizing, **link, policy="lru", prefetch=False)
    try:
        with handle.trace(None) as trace:
            generate(loaded, prompt, max_new_tokens, device)
        return calibrate_static(trace, handle.num_slots, "global")
    finally:
        handle.restore()


def table(result: dict) -> str:
    lines = [
        (
            f"{result['model']} on {result['device']}, "
            f"{result.get('slots') or result.get('budget')} slots/budget, link "
            f"{result['link_gbps'] or 'real'} GB/s"
        ),
        (
            f"{'config':14} {'tokens/s':>9} {'decode':>9} {'hit rate':>9} {'GiB moved':>10} "
            f"{'stall s':>8}  same tokens as {result['reference']}"
        ),
    ]
    for name, row in result["configs"].items():
        moved = (row.get("bytes_demand", 0) + row.get("bytes_prefetch", 0)) / 2**30
        hit = f"{row['hit_rate']:.3f}" if "hit_rate" in row else "-"
        stall = f"{row['stall_seconds']:.2f}" if "stall_seconds" in row else "-"
        decode = row["decode_tokens_per_second"]
        decode = f"{decode:.2f}" if decode else "-"
        lines.append(
            f"{name:14} {row['tokens_per_second']:9.2f} {decode:>9} {hit:>9} {moved:10.2f} "
            f"{stall:>8}  "
            f"{'yes' if row['same_tokens_as_reference'] else 'NO'}"
        )
    lines += [f"{name:14} skipped: {why}" for name, why in result.get("skipped", {}).items()]
    return "\n".join(lines)


def save(result: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "bench.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configs"])
    rows = [result["configs"][n] for n in names]
    fig, (speed, hits) = plt.subplots(1, 2, figsize=(11, 4))
    at = range(len(names))
    speed.bar([x - 0.2 for x in at], [r["tokens_per_second"] for r in rows], 0.4, label="all")
    decode = [r["decode_tokens_per_second"] or 0.0 for r in rows]
    speed.bar([x + 0.2 for x in at], decode, 0.4, label="decode (after the first token)")
    speed.set(ylabel="tokens/s", title="throughput")
    speed.legend()
    hits.bar(at, [r.get("hit_rate", 1.0) for r in rows])
    hits.set(ylabel="hit rate", title="expert hit rate", ylim=(0, 1))
    for ax in (speed, hits):
        ax.set_xticks(list(at), names, rotation=30)
    fig.tight_layout()
    png_path = folder / "bench.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [json_path, png_path]
