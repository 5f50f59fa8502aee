"""Routing traces: read, write, convert, and replay through the native core.

Format (JSON lines). The first line is the header:

    {"format": "expertflow-trace", "version": 1, "layers": 32, "experts_per_layer": 8,
     "top_k": 2, "expert_bytes": 352321536, "source": "..."}

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

from expertflow import _C

FORMAT = "expertflow-trace"
VERSION = 1


@dataclass
class Trace:
    layers: int
    experts_per_layer: int
    top_k: int
    expert_bytes: int = 1
    source: str = ""
    requests: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    layer_of_step: list[int] = field(default_factory=list)
    experts: list[list[int]] = field(default_factory=list)
    scores: list[list[float] | None] = field(default_factory=list)

    def add(self, request: int, token: int, layer: int, experts, scores=None) -> None:
        self.requests.append(int(request))
        self.tokens.append(int(token))
        self.layer_of_step.append(int(layer))
        self.experts.append([int(e) for e in experts])
        self.scores.append(None if scores is None else [float(s) for s in scores])

    def __len__(self) -> int:
        return len(self.experts)

    def header(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "layers": self.layers,
            "experts_per_layer": self.experts_per_layer,
            "top_k": self.top_k,
            "expert_bytes": self.expert_bytes,
            "source": self.source,
        }

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
        trace = Trace(
            int(header["layers"]),
            int(header["experts_per_layer"]),
            int(header["top_k"]),
            int(header.get("expert_bytes", 1)),
            str(header.get("source", "")),
        )
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


def calibrate_static(trace: Trace, capacity: int, scope: str = "global") -> list[tuple[int, int]]:
    """The static set a capacity can hold, chosen by frequency in `trace`: the most used
    experts, leaving top_k slots (per layer, with scope "layer") to stream the others."""
    counts: dict[tuple[int, int], int] = {}
    for layer, experts in zip(trace.layer_of_step, trace.experts):
        for e in experts:
            counts[(layer, e)] = counts.get((layer, e), 0) + 1
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    keep = max(0, capacity - trace.top_k)
    if scope == "global":
        return ranked[:keep]
    return [k for layer in range(trace.layers) for k in [r for r in ranked if r[0] == layer][:keep]]


def replay(
    trace: Trace,
    policy: str = "lru",
    capacity: int = 1,
    *,
    scope: str = "global",
    predictor: str = "none",
    reset_per_request: bool = True,
    warmup_tokens: int = 0,
    link_gbps: float = 16.0,
    layer_compute_us: float = 0.0,
    static_experts: list[tuple[int, int]] = (),
    lfu_decay: float = 1.0,
    lfu_decay_period: int = 0,
) -> dict:
    """Runs the trace through the native cache and policy; see `_C.replay`."""
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if predictor not in ("none", "history"):
        raise ValueError(f"replay predictor must be 'none' or 'history', got {predictor!r}")
    offsets = np.zeros(len(trace) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(e) for e in trace.experts])
    per_layer = scope == "layer"
    keys = [layer * trace.experts_per_layer + e for layer, e in static_experts]
    result = _C.replay(
        trace.layers,
        trace.experts_per_layer,
        np.asarray(trace.requests, dtype=np.int32),
        np.asarray(trace.tokens, dtype=np.int32),
        np.asarray(trace.layer_of_step, dtype=np.int32),
        offsets,
        np.fromiter((e for step in trace.experts for e in step), dtype=np.int32),
        policy=policy,
        capacity=capacity,
        per_layer=per_layer,
        reset_per_request=reset_per_request,
        warmup_tokens=warmup_tokens,
        history=predictor == "history",
        expert_bytes=trace.expert_bytes,
        link_gbps=link_gbps,
        layer_compute_us=layer_compute_us,
        static_keys=keys,
        lfu_decay=lfu_decay,
        lfu_decay_period=lfu_decay_period,
    )
    tokens = len({(r, t) for r, t in zip(trace.requests, trace.tokens) if t >= warmup_tokens})
    result["tokens"] = tokens
    if tokens:
        result["modelled_seconds_per_token"] = result["modelled_seconds"] / tokens
        result["link_floor_seconds_per_token"] = result["link_floor_seconds"] / tokens
    return result
