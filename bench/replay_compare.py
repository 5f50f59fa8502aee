"""Strategies compared on real routing traces by the replay's performance model.

Protocol (expertflow.traces.compare: the native cache, policies and timeline):
- Mixtral-8x7B decode (GSM8K, 2 problems): one cache per layer, 2-7 experts per layer,
  reset per problem, every token counted. Each problem is replayed with static sets
  calibrated on the other problem, and the two replays are summed.
- DeepSeek-V2-Lite prefill: the first 40 CSVs of the tar in path order (a subsample, so
  that a run takes minutes on 2 cores), token-major, one global cache of 5-20% of the
  26 x 64 experts, reset per prompt, the first 10 tokens of each prompt not counted;
  static sets calibrated on CSVs 41-200. Every token is one pass (batch 1).
- Model sizes (bf16): Mixtral expert 336 MiB, hidden 4096, attention 80 MiB per layer;
  DeepSeek-V2-Lite expert 16.5 MiB, hidden 2048, attention + shared experts 59.5 MiB per
  layer. An expert does 2 FLOPs per weight per token.
- Profiles: consumer_pcie4, h200_pcie5, gh200 (python/expertflow/profiles.json, sources
  there) and here (bench/profile_here.py). lru_spec's guess: an oracle with recall 0.85
  (mixtral-offloading reports 0.8-0.9 one layer ahead).
- Phase map: consumer_pcie4 with the link bandwidth swept; each cell's fastest strategy
  (belady, an oracle, left out) and hybrid's margin over the best strategy other than
  hybrid and expertflow.
- Hybrid and lru_spec share one modelled gate lookahead: the true next-layer experts, each
  with probability 0.85, the rest of the guess wrong. Hybrid also gets static_cpu's
  calibration: its hot experts are predicted (so guesses never displace them) and only
  they are copied in after the CPU served them.
- Hybrid check: every row (sweep and phase map) where a strategy other than belady beats
  hybrid.

    python bench/replay_compare.py [--data ../shared/data/traces]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS, save
from expertflow import profiles, traces
from replay_plots import plot_phase, plot_time

PROFILES = ["consumer_pcie4", "h200_pcie5", "gh200", "here"]
PHASE_PROFILE = "consumer_pcie4"
PHASE_LINKS = [8, 16, 25, 50, 100, 200, 400]
OURS = ("hybrid", "expertflow")
SUMMED = (
    "tokens",
    "accesses",
    "hits",
    "modelled_seconds",
    "bound_seconds",
    "compute_floor_seconds",
    "device_busy_seconds",
    "link_busy_seconds",
    "cpu_busy_seconds",
    "bytes_demand",
    "bytes_prefetch",
)


def summary(r: dict) -> dict:
    """One strategy's figures per token."""
    tokens = r["tokens"]
    seconds = r["modelled_seconds"]
    return {
        "ms_per_token": seconds / tokens * 1e3,
        "bound_ms_per_token": r["bound_seconds"] / tokens * 1e3,
        "floor_ms_per_token": r["compute_floor_seconds"] / tokens * 1e3,
        "link_gib_per_token": (r["bytes_demand"] + r["bytes_prefetch"]) / tokens / 2**30,
        "prefetch_gib_per_token": r["bytes_prefetch"] / tokens / 2**30,
        "hit_rate": r["hits"] / r["accesses"],
        "device_busy": r["device_busy_seconds"] / seconds,
        "link_busy": r["link_busy_seconds"] / seconds,
        "cpu_busy": r["cpu_busy_seconds"] / seconds,
    }


def run_parts(parts, capacity, profile, scope, warmup) -> dict:
    """compare() over each (trace, calibration) part, summed per strategy."""
    total: dict[str, dict] = {}
    for trace, ranking in parts:
        rows = traces.compare(
            trace,
            capacity,
            profile=profile,
            scope=scope,
            warmup_tokens=warmup,
            static_ranking=ranking,
        )
        for r in rows:
            into = total.setdefault(r["strategy"], dict.fromkeys(SUMMED, 0))
            for k in SUMMED:
                into[k] += r[k]
    return {name: summary(r) for name, r in total.items()}


def sweep(name, spec, checks: list) -> dict:
    """Time per token against capacity, per profile. Adds hybrid's losses to `checks`."""
    out = {}
    for profile in PROFILES:
        out[profile] = {}
        for capacity in spec["capacities"]:
            started = time.perf_counter()
            rows = run_parts(spec["parts"], capacity, profile, spec["scope"], spec["warmup"])
            out[profile][capacity] = rows
            check(checks, name, profile, capacity, rows)
            print(
                f"{name:9} {profile:15} {capacity:4}: hybrid {rows['hybrid']['ms_per_token']:8.2f}"
                f" ms/token, lru {rows['lru']['ms_per_token']:8.2f}, cpu "
                f"{rows['cpu']['ms_per_token']:8.2f} ({time.perf_counter() - started:.1f} s)"
            )
    return out


def phase(spec, checks: list, name: str) -> list[list[dict]]:
    """Per capacity (rows) and link bandwidth (columns): the fastest strategy and hybrid's
    margin over the best strategy that is not ExpertFlow's. Adds hybrid's losses to
    `checks`."""
    cells = []
    for capacity in spec["capacities"]:
        line = []
        for link in PHASE_LINKS:
            profile = profiles.load(PHASE_PROFILE, link_gbps=link)
            rows = run_parts(spec["parts"], capacity, profile, spec["scope"], spec["warmup"])
            check(checks, name, f"{PHASE_PROFILE} at {link} GB/s", capacity, rows)
            ms = {s: r["ms_per_token"] for s, r in rows.items() if s != "belady"}
            peer = min((s for s in ms if s not in OURS), key=ms.get)
            line.append(
                {
                    "fastest": min(ms, key=ms.get),
                    "best_peer": peer,
                    "hybrid_ms": ms["hybrid"],
                    "peer_ms": ms[peer],
                    "speedup_over_peer": ms[peer] / ms["hybrid"],
                    "belady_ms": rows["belady"]["ms_per_token"],
                }
            )
        cells.append(line)
    return cells


def check(checks: list, name: str, profile: str, capacity: int, rows: dict) -> None:
    """Records a row where a strategy other than belady (an oracle) beats hybrid."""
    hybrid = rows["hybrid"]["ms_per_token"]
    faster = [
        s for s, r in rows.items() if s != "belady" and r["ms_per_token"] < hybrid * (1 - 1e-9)
    ]
    if faster:
        checks.append({"trace": name, "profile": profile, "capacity": capacity, "faster": faster})


def markdown(name, swept, capacity) -> str:
    lines = [f"\n### {name}, capacity {capacity}\n"]
    for profile, by_capacity in swept.items():
        rows = by_capacity[capacity]
        lines.append(f"\n{profile}\n")
        lines.append(
            "| strategy | ms/token | bound | link GiB/token | hit rate | link busy | CPU busy |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for s, r in rows.items():
            lines.append(
                f"| {s} | {r['ms_per_token']:.2f} | {r['bound_ms_per_token']:.2f} "
                f"| {r['link_gib_per_token']:.3f} | {r['hit_rate']:.3f} | {r['link_busy']:.0%} "
                f"| {r['cpu_busy']:.0%} |"
            )
    return "\n".join(lines)


def mixtral_spec(data: Path) -> dict:
    trace = traces.from_mixtral_jsonl(data / "mixtral-8x7b-decode-gsm8k.jsonl")
    a, b = trace.request_ids()
    parts = [
        (trace.select([a]), traces.calibrate_ranking(trace.select([b]))),
        (trace.select([b]), traces.calibrate_ranking(trace.select([a]))),
    ]
    capacities = [2, 3, 4, 5, 6, 7]
    return {
        "parts": parts,
        "scope": "layer",
        "warmup": 0,
        "capacities": capacities,
        "fractions": [c / 8 for c in capacities],
        "trace": trace,
    }


def deepseek_spec(data: Path) -> dict:
    started = time.perf_counter()
    everything = traces.from_deepseek_tar(data / "deepseek-v2-lite-prefill-train.tar.xz", 200)
    print(f"read 200 DeepSeek CSVs in {time.perf_counter() - started:.0f} s")
    ids = everything.request_ids()
    trace, held_out = everything.select(ids[:40]), everything.select(ids[40:])
    total = trace.layers * trace.experts_per_layer
    fractions = [0.05, 0.10, 0.15, 0.20]
    return {
        "parts": [(trace, traces.calibrate_ranking(held_out))],
        "scope": "global",
        "warmup": 10,
        "capacities": [round(total * f) for f in fractions],
        "fractions": fractions,
        "trace": trace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/traces")
    )
    args = parser.parse_args()
    data = Path(args.data)
    result = {"protocol": __doc__, "profiles": {p: profiles.load(p) for p in PROFILES}}
    checks = []
    for name, load in [("mixtral", mixtral_spec), ("deepseek", deepseek_spec)]:
        spec = load(data)
        swept = sweep(name, spec, checks)
        cells = phase(spec, checks, name)
        trace = spec["trace"]
        result[name] = {
            "scope": spec["scope"],
            "expert_bytes": trace.expert_bytes,
            "dense_bytes": trace.dense_bytes,
            "hidden": trace.hidden,
            "capacities": spec["capacities"],
            "fractions": spec["fractions"],
            "by_profile": swept,
            "phase": {"profile": PHASE_PROFILE, "link_gbps": PHASE_LINKS, "cells": cells},
        }
        print(markdown(name, swept, spec["capacities"][1]))
        plot_time(name, result[name], RESULTS / f"replay_{name}.png")
        plot_phase(name, result[name], RESULTS / f"replay_phase_{name}.png")
    result["hybrid_check"] = checks or "hybrid no slower than any non-oracle strategy on any row"
    print(f"\nhybrid check: {result['hybrid_check']}")
    save("replay_compare", result)


if __name__ == "__main__":
    main()
