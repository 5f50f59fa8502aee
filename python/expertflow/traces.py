"""Routing traces: read, write, convert, and replay through the native core.

Format (JSON lines). The first line is the header:

    {"format": "expertflow-trace", "version": 1, "layers": 32, "experts_per_layer": 8,
     "top_k": 2, "expert_bytes": 352321536, "hidden": 4096, "dense_bytes": 83886080,
     "source": "..."}

`expert_bytes` (one expert's weights), `hidden` (the model's width, for the activations a
CPU expert moves) and `dense_bytes` (the non-expert weights one layer reads per token) feed
the replay's performance model; each is optional in the file and can be given at replay.

then one line per step, one token at one MoE layer, in the order the model ran them:

    {"request": 0, "token": 5, "layer": 3, "experts": [7, 0], "scores": [0.8, 0.2]}

`scores` (router weights of the experts, in order) is optional. A request's steps are
contiguous; `token` counts from 0 within the request. Layers are numbered 0.. over the
MoE layers only.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertflow import _C, profiles

STRATEGIES = tuple(_C.strategy_names())
# Offline oracles: they know the future, so hybrid cannot make their decisions.
ORACLES = ("belady",)
FORMAT = "expertflow-trace"
VERSION = 1


@dataclass
class Trace:
    layers: int
    experts_per_layer: int
    top_k: int
    expert_bytes: int | None = 1
    source: str = ""
    requests: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    layer_of_step: list[int] = field(default_factory=list)
    experts: list[list[int]] = field(default_factory=list)
    scores: list[list[float] | None] = field(default_factory=list)
    hidden: int | None = None
    dense_bytes: int | None = None

    def add(self, request: int, token: int, layer: int, experts, scores=None) -> None:
        self.requests.append(int(request))
        self.tokens.append(int(token))
        self.layer_of_step.append(int(layer))
        self.experts.append([int(e) for e in experts])
        self.scores.append(None if scores is None else [float(s) for s in scores])

    def __len__(self) -> int:
        return len(self.experts)

    def header(self) -> dict:
        header = {
            "format": FORMAT,
            "version": VERSION,
            "layers": self.layers,
            "experts_per_layer": self.experts_per_layer,
            "top_k": self.top_k,
        }
        for name in ("expert_bytes", "hidden", "dense_bytes"):
            if getattr(self, name) is not None:
                header[name] = getattr(self, name)
        return header | {"source": self.source}

    def write(self, path: str | Path) -> None:
        with open(path, "w") as out:
            out.write(json.dumps(self.header()) + "\n")
            out.writelines(json.dumps(self.step(i)) + "\n" for i in range(len(self)))

    def step(self, i: int) -> dict:
        record = {
            "request": self.requests[i],
            "token": self.tokens[i],
            "layer": self.layer_of_step[i],
            "experts": self.experts[i],
        }
        if self.scores[i] is not None:
            record["scores"] = self.scores[i]
        return record

    def select(self, requests) -> Trace:
        """The steps of the given requests only (in trace order)."""
        keep = set(requests)
        part = Trace(
            self.layers, self.experts_per_layer, self.top_k, self.expert_bytes, self.source
        )
        part.hidden, part.dense_bytes = self.hidden, self.dense_bytes
        for i in range(len(self)):
            if self.requests[i] in keep:
                part.add(
                    self.requests[i],
                    self.tokens[i],
                    self.layer_of_step[i],
                    self.experts[i],
                    self.scores[i],
                )
        return part

    def request_ids(self) -> list[int]:
        return list(dict.fromkeys(self.requests))


def read(path: str | Path) -> Trace:
    """Reads a trace; a malformed line raises ValueError naming the file and line."""
    with open(path) as lines:
        return _parse(lines, str(path))


def _parse(lines, name: str) -> Trace:
    def fail(number: int, message: str):
        raise ValueError(f"{name}:{number}: {message}")

    first = next(iter(lines), None)
    if first is None:
        fail(1, "empty file: expected an expertflow-trace header")
    try:
        header = json.loads(first)
    except json.JSONDecodeError as error:
        fail(1, f"the header is not JSON ({error.msg})")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fail(
            1,
            f"not an expertflow trace: the header's format is {header.get('format') if isinstance(header, dict) else header!r}, expected {FORMAT!r}",
        )
    if header.get("version") != VERSION:
        fail(1, f"trace version {header.get('version')!r} is not {VERSION}")
    try:
        optional = {k: header.get(k) for k in ("expert_bytes", "hidden", "dense_bytes")}
        trace = Trace(
            int(header["layers"]),
            int(header["experts_per_layer"]),
            int(header["top_k"]),
            None if optional["expert_bytes"] is None else int(optional["expert_bytes"]),
            str(header.get("source", "")),
        )
        for size in ("hidden", "dense_bytes"):
            if optional[size] is not None:
                setattr(trace, size, int(optional[size]))
    except (KeyError, TypeError, ValueError) as error:
        fail(1, f"the header lacks or mangles {error}")
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            request, token, layer, experts = (
                record[k] for k in ("request", "token", "layer", "experts")
            )
        except json.JSONDecodeError as error:
            fail(number, f"not JSON ({error.msg}); a truncated file?")
        except (KeyError, TypeError) as error:
            fail(number, f"a step needs request, token, layer and experts; missing {error}")
        if not isinstance(layer, int) or not 0 <= layer < trace.layers:
            fail(number, f"layer {layer!r} out of range [0, {trace.layers})")
        if not isinstance(experts, list) or not experts:
            fail(number, f"experts must be a non-empty list, got {experts!r}")
        for e in experts:
            if not isinstance(e, int) or not 0 <= e < trace.experts_per_layer:
                fail(number, f"expert id {e!r} out of range [0, {trace.experts_per_layer})")
        if len(set(experts)) != len(experts):
            fail(number, f"expert ids repeat in {experts}")
        trace.add(request, token, layer, experts, record.get("scores"))
    return trace


# Non-expert weights one layer reads per token, bf16. Mixtral-8x7B: q and o 4096 x 4096,
# k and v 4096 x 1024 (8 KV heads), router 4096 x 8.
MIXTRAL_DENSE_BYTES = (2 * 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 8) * 2
# DeepSeek-V2-Lite (MLA, 16 heads): q 2048 x 16*192, kv_a 2048 x (512 + 64), kv_b
# 512 x 16*256, o 16*128 x 2048; two shared experts 3 x 2048 x 1408 each; router 2048 x 64.
DEEPSEEK_DENSE_BYTES = (
    2048 * 3072 + 2048 * 576 + 512 * 4096 + 2048 * 2048 + 2 * 3 * 2048 * 1408 + 2048 * 64
) * 2


def from_mixtral_jsonl(path: str | Path, expert_bytes: int = 3 * 4096 * 14336 * 2) -> Trace:
    """The Mixtral-8x7B decode trace (one JSON object per problem, layer and token),
    replayed in time order: by problem, then token, then layer."""
    rows = []
    with open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append(
                        (
                            row["problem_id"],
                            row["token_idx"],
                            row["layer"],
                            row["experts"],
                            row.get("gating_probs"),
                        )
                    )
                except (json.JSONDecodeError, KeyError) as error:
                    raise ValueError(
                        f"{path}:{number}: not a Mixtral routing row ({error})"
                    ) from None
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    layers = 1 + max(r[2] for r in rows)
    experts = 1 + max(e for r in rows for e in r[3])
    trace = Trace(
        layers, max(experts, 8), len(rows[0][3]), expert_bytes, f"mixtral decode: {Path(path).name}"
    )
    trace.hidden, trace.dense_bytes = 4096, MIXTRAL_DENSE_BYTES
    for problem, token, layer, chosen, scores in rows:
        trace.add(problem, token, layer, chosen, scores)
    return trace


def from_deepseek_tar(
    path: str | Path, members: int | None = None, expert_bytes: int = 3 * 2048 * 1408 * 2
) -> Trace:
    """The DeepSeek-V2-Lite prefill trace: one CSV per prompt (rows grouped by layer, a
    row's position within its layer being the token index), taken in lexicographic path
    order, the first `members` of them, and replayed token-major. Layers 1-26 (layer 0 is
    dense) become 0-25."""
    with tarfile.open(path) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.name.endswith(".csv"))[:members]
        trace = Trace(
            26,
            64,
            6,
            expert_bytes,
            f"deepseek-v2-lite prefill: {Path(path).name}, {len(names)} prompts",
        )
        trace.hidden, trace.dense_bytes = 2048, DEEPSEEK_DENSE_BYTES
        for request, name in enumerate(names):
            text = io.TextIOWrapper(tar.extractfile(name), encoding="utf-8")
            by_layer: dict[int, list[list[int]]] = {}
            reader = csv.reader(text)
            next(reader, None)
            for number, row in enumerate(reader, start=2):
                try:
                    layer, chosen = int(row[0]), json.loads(row[3])
                except (IndexError, ValueError) as error:
                    raise ValueError(f"{name}:{number}: not a routing row ({error})") from None
                by_layer.setdefault(layer - 1, []).append(chosen)
            tokens = min(len(v) for v in by_layer.values())
            for token in range(tokens):
                for layer in sorted(by_layer):
                    trace.add(request, token, layer, by_layer[layer][token])
    return trace


def calibrate_ranking(trace: Trace) -> list[tuple[int, int]]:
    """Every (layer, expert) that `trace` uses, most used first (ties: lower key)."""
    counts: dict[tuple[int, int], int] = {}
    for layer, experts in zip(trace.layer_of_step, trace.experts):
        for e in experts:
            counts[(layer, e)] = counts.get((layer, e), 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k))


def calibrate_static(trace: Trace, capacity: int, scope: str = "global") -> list[tuple[int, int]]:
    """The static set a capacity can hold, chosen by frequency in `trace`: the most used
    experts, leaving top_k slots (per layer, with scope "layer") to stream the others."""
    ranked = calibrate_ranking(trace)
    keep = max(0, capacity - trace.top_k)
    if scope == "global":
        return ranked[:keep]
    return [k for layer in range(trace.layers) for k in [r for r in ranked if r[0] == layer][:keep]]


def model_costs(
    trace: Trace,
    *,
    expert_bytes: int | None = None,
    hidden: int | None = None,
    dense_bytes: int | None = None,
    expert_flops: float | None = None,
    layer_compute_us: float = 0.0,
) -> dict[str, float]:
    """The model's sizes for the cost model: the trace's, unless given. An expert does 2
    FLOPs per weight per token; with bf16 weights that is its byte count (the default).
    Activations: hidden x 2 bytes each way per token. Raises ValueError when the expert
    bytes are neither in the trace nor given."""
    size = expert_bytes if expert_bytes is not None else trace.expert_bytes
    if size is None:
        raise ValueError(
            f"the trace ({trace.source or 'no source'}) has no expert_bytes: give them "
            "(--expert-bytes, e.g. 336MiB)"
        )
    width = hidden if hidden is not None else trace.hidden
    dense = dense_bytes if dense_bytes is not None else trace.dense_bytes
    return {
        "expert_bytes": float(size),
        "expert_flops_per_token": float(size if expert_flops is None else expert_flops),
        "activation_bytes_per_token": float(2 * (width or 0)),
        "dense_bytes_per_layer": float(dense or 0),
        "dense_extra_seconds": layer_compute_us * 1e-6,
    }


def _arrays(trace: Trace) -> list:
    offsets = np.zeros(len(trace) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(e) for e in trace.experts])
    return [
        np.asarray(trace.requests, dtype=np.int32),
        np.asarray(trace.tokens, dtype=np.int32),
        np.asarray(trace.layer_of_step, dtype=np.int32),
        offsets,
        np.fromiter((e for step in trace.experts for e in step), dtype=np.int32),
    ]


def _options(trace: Trace, policy: str, capacity: int, scope: str, **rest) -> dict:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    keys = [layer * trace.experts_per_layer + e for layer, e in rest.pop("static_experts")]
    return {
        "policy": policy,
        "capacity": capacity,
        "per_layer": scope == "layer",
        "static_keys": keys,
        "prefetch_top": 0,
        **rest,
    }


def _costs(trace: Trace, profile: str | dict, link_gbps: float | None, sizes: dict) -> dict:
    if isinstance(profile, dict):
        chosen = profiles.check(profile | ({"link_gbps": link_gbps} if link_gbps else {}))
    else:
        chosen = profiles.load(profile, link_gbps=link_gbps)
    return profiles.rates(chosen) | model_costs(trace, **sizes)


def _per_token(result: dict, warmup_tokens: int) -> dict:
    tokens = result["tokens"]
    seconds = result["modelled_seconds"]
    for name in ("modelled_seconds", "bound_seconds", "compute_floor_seconds"):
        result[name.replace("seconds", "seconds_per_token")] = (
            result[name] / tokens if tokens else 0
        )
    result["link_floor_seconds_per_token"] = result["link_busy_seconds"] / tokens if tokens else 0
    result["link_bytes"] = result["bytes_demand"] + result["bytes_prefetch"]
    for resource in ("device", "link", "cpu"):
        busy = result[f"{resource}_busy_seconds"]
        result[f"{resource}_busy_share"] = busy / seconds if seconds else 0.0
    return result


def replay(
    trace: Trace,
    policy: str = "lru",
    capacity: int = 1,
    *,
    scope: str = "global",
    predictor: str = "none",
    reset_per_request: bool = True,
    warmup_tokens: int = 0,
    profile: str | dict = "consumer_pcie4",
    link_gbps: float | None = None,
    layer_compute_us: float = 0.0,
    static_experts: list[tuple[int, int]] = (),
    lfu_decay: float = 1.0,
    lfu_decay_period: int = 0,
    **sizes,
) -> dict:
    """Runs the trace through one native cache policy, misses copied on demand (and the
    history predictor's prefetches), timed on `profile`; see `compare` for strategies.
    `sizes`: expert_bytes, hidden, dense_bytes, expert_flops (see model_costs)."""
    if predictor not in ("none", "history"):
        raise ValueError(f"replay predictor must be 'none' or 'history', got {predictor!r}")
    options = _options(
        trace,
        policy,
        capacity,
        scope,
        static_experts=static_experts,
        reset_per_request=reset_per_request,
        warmup_tokens=warmup_tokens,
        history=predictor == "history",
        lfu_decay=lfu_decay,
        lfu_decay_period=lfu_decay_period,
        speculative_recall=0.0,
    )
    costs = _costs(trace, profile, link_gbps, {"layer_compute_us": layer_compute_us, **sizes})
    result = _C.replay(trace.layers, trace.experts_per_layer, *_arrays(trace), options, costs)
    return _per_token(result, warmup_tokens)


def compare(
    trace: Trace,
    capacity: int,
    strategies: list[str] | str = "all",
    *,
    profile: str | dict = "consumer_pcie4",
    scope: str = "global",
    reset_per_request: bool = True,
    warmup_tokens: int = 0,
    static_ranking: list[tuple[int, int]] = (),
    speculative_recall: float = 0.85,
    layer_compute_us: float = 0.0,
    **sizes,
) -> list[dict]:
    """Every strategy (or those named) over the same trace and profile, in one native run:
    one dict per strategy with modelled time per token, link bytes, hit rate, busy shares
    and bounds. static_ranking: calibration experts, most used first (static and
    static_cpu keep a prefix of it). Raises ValueError naming an unknown strategy."""
    names = _C.strategy_names() if strategies == "all" else list(strategies)
    options = _options(
        trace,
        "lru",
        capacity,
        scope,
        static_experts=static_ranking,
        reset_per_request=reset_per_request,
        warmup_tokens=warmup_tokens,
        history=False,
        lfu_decay=1.0,
        lfu_decay_period=0,
        speculative_recall=speculative_recall,
    )
    costs = _costs(trace, profile, None, {"layer_compute_us": layer_compute_us, **sizes})
    rows = _C.replay_strategies(
        trace.layers, trace.experts_per_layer, *_arrays(trace), options, costs, names
    )
    return [_per_token(row, warmup_tokens) for row in rows]


def hybrid_losses(rows: list[dict], tolerance: float = 1e-9) -> list[str]:
    """The strategies other than the oracles that beat hybrid in `rows` (one compare()
    result): hybrid can make each one's decisions, so any name here shows a flaw in its
    cost model or its choices."""
    hybrid = next((r for r in rows if r["strategy"] == "hybrid"), None)
    if hybrid is None:
        return []
    limit = hybrid["modelled_seconds"] * (1 - tolerance)
    return [
        r["strategy"]
        for r in rows
        if r["strategy"] not in ORACLES and r["modelled_seconds"] < limit
    ]


def strategy_table(rows: list[dict]) -> str:
    """compare()'s rows as a markdown table, with the floor and the hybrid check."""
    lines = [
        (
            "| strategy | ms/token | bound ms | link GiB/token | hit rate | device busy "
            "| link busy | CPU busy |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tokens = max(r["tokens"], 1)
        lines.append(
            f"| {r['strategy']} | {r['modelled_seconds_per_token'] * 1e3:.2f} "
            f"| {r['bound_seconds_per_token'] * 1e3:.2f} | {r['link_bytes'] / tokens / 2**30:.3f} "
            f"| {r['hit_rate']:.3f} | {r['device_busy_share']:.0%} | {r['link_busy_share']:.0%} "
            f"| {r['cpu_busy_share']:.0%} |"
        )
    if rows:
        floor = rows[0]["compute_floor_seconds_per_token"] * 1e3
        lines.append(f"\ncompute floor (any strategy): {floor:.2f} ms/token")
    losses = hybrid_losses(rows)
    if any(r["strategy"] == "hybrid" for r in rows):
        verdict = f"SLOWER than {', '.join(losses)}" if losses else "no slower than any peer"
        lines.append(f"hybrid check: {verdict}")
    return "\n".join(lines)
