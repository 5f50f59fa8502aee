"""expertflow.offload(): one call that runs a transformers MoE model with its experts cached.

How it fits transformers v5: every experts class decorated with `use_experts_implementation`
dispatches its forward through `ALL_EXPERTS_FUNCTIONS` by the model's experts
implementation. ExpertFlow registers "expertflow" there (expertflow.runners) and switches
the model to it.

offload() works in four steps, so that a model larger than the device never reaches it:
1. plan: find the experts, size the slots, and check every option, the device and its free
   memory, before anything changes;
2. pool: move the expert weights, layer by layer, into one host buffer laid out as the
   pool (each parameter becomes a strided view of it, so `state_dict()` still returns it);
   each original is freed as its copy lands, so host memory stays near the model's size;
3. cache: page-lock that buffer in place as the HostPool and allocate the device slots;
4. patch: move the rest of the model (attention, routers, shared experts, norms) to the
   device and route every experts module through its slots.
Any failure puts the model back as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward

from expertflow import _C
from expertflow.core import ExpertCache, ExpertLayout, HostPool, parse_bytes, parse_device
from expertflow.experts import ExpertsPlan, align, find_experts, strided_view
from expertflow.prediction import Prefetcher, find_router
from expertflow.runners import (
    IMPLEMENTATION,
    CacheAwareRouting,
    ExpertRunner,
    FusedRunner,
    HostReads,
    Recorder,
    SlotExperts,
    Slots,
    arena_tensor,
)
from expertflow.traces import Trace

# The inner math for each experts implementation a model may have had; eager and the
# kernel-specific ones run grouped_mm, transformers' own default.
_INNER = {"batched_mm": batched_mm_experts_forward}
_PAGE = 4096
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


def _return_freed_memory() -> None:
    """glibc keeps freed blocks in its heap (below its mmap threshold, which grows as large
    blocks are freed); trimming gives them back to the OS, so that the expert tensors freed
    as the pool fills really leave. Elsewhere there is nothing to do."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


@dataclass
class _Undo:
    """What offload() changed, so that restore() can put it back."""

    implementation: dict | None = None
    moved: list[tuple[torch.Tensor, torch.device]] = field(default_factory=list)
    pooled: list[tuple[torch.nn.Parameter, torch.device]] = field(default_factory=list)
    patched: list[tuple[torch.nn.Module, str]] = field(default_factory=list)


class OffloadHandle:
    """An offloaded model: stats(), reset_stats(), restore(), and context-manager use."""

    def __init__(
        self, model, cache: ExpertCache, plans: list[ExpertsPlan], undo: _Undo, slots: Slots
    ):
        self.model = model
        self.cache = cache
        self.layer_names = [p.name for p in plans]
        self._undo = undo
        self._slots = slots
        self._experts = plans[0].num_experts
        self._top_k = max(p.experts_per_token for p in plans)

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def slot_bytes(self) -> int:
        return self.cache.slot_bytes

    def stats(self) -> dict[str, Any]:
        """The cache's counters (see the README), with each layer's module name, and the
        predictions' precision (used / predicted) and recall (used / acquired)."""
        stats = self.cache.stats()
        for name, layer in zip(self.layer_names, stats["layers"]):
            layer["name"] = name
        for counters in [stats, *stats["layers"]]:
            looked_up = counters["hits"] + counters["misses"]
            counters["precision"] = (
                counters["predicted_used"] / counters["predicted"] if counters["predicted"] else 0.0
            )
            counters["recall"] = counters["predicted_used"] / looked_up if looked_up else 0.0
        stats.update(num_slots=self.num_slots, slot_bytes=self.slot_bytes, policy=self.cache.policy)
        return stats

    def reset_stats(self) -> None:
        self.cache.reset_stats()

    @contextlib.contextmanager
    def trace(self, path: str | Path | None, source: str = ""):
        """Records the routing of the runs inside the block and writes it to `path` (if
        given) as an expertflow trace (see expertflow.traces); yields the Trace."""
        trace = Trace(
            len(self.layer_names),
            self._experts,
            self._top_k,
            self.slot_bytes,
            source or type(self.model).__name__,
        )
        self._slots.recorder = Recorder(trace)
        try:
            yield trace
        finally:
            self._slots.recorder = None
            if path is not None:
                trace.write(path)

    def restore(self) -> None:
        """Gives the model back its stock experts forward, with its weights where they were."""
        _undo(self.model, self._undo)
        self.cache.close()

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _undo(model, undo: _Undo) -> None:
    for module, attribute in undo.patched:
        module.__dict__.pop(attribute, None)
    undo.patched.clear()
    if undo.implementation is not None:
        model.set_experts_implementation(undo.implementation)
        undo.implementation = None
    for param, device in undo.pooled:  # out of the pool: own memory again
        param.data = param.data.to(device, copy=True).contiguous()
    undo.pooled.clear()
    for tensor, device in undo.moved:
        tensor.data = tensor.data.to(device)
    undo.moved.clear()


@dataclass
class _Plan:
    """What offload() will do, worked out before anything changes."""

    model: torch.nn.Module
    device: torch.device
    layers: list[ExpertsPlan]
    num_experts: int
    slot_bytes: int
    num_slots: int

    @property
    def fused(self) -> bool:
        return any(p.fused for p in self.layers)

    @property
    def top_k(self) -> int:
        return max(p.experts_per_token for p in self.layers)

    @property
    def layout(self) -> ExpertLayout:
        sizes = [p.blob_bytes for p in self.layers for _ in range(self.num_experts)]
        return ExpertLayout(len(self.layers), self.num_experts, sizes)

    def non_experts(self) -> list[torch.Tensor]:
        """The parameters and buffers that are not experts' and not on the device yet."""
        experts = {id(p) for plan in self.layers for ps in plan.params.values() for p in ps}
        return [
            t
            for t in [*self.model.parameters(), *self.model.buffers()]
            if id(t) not in experts and t.device != self.device
        ]

    def routers(self) -> list[torch.nn.Module | None]:
        return [
            find_router(self.model, p.name, self.num_experts) if p.fused else None
            for p in self.layers
        ]


def offload(
    model,
    device: str = "cuda",
    *,
    budget: int | str | None = None,
    slots: int | None = None,
    policy: str = "expertflow",
    prefetch: bool = True,
    predictor: str = "combined",
    lookahead: int = 1,
    link_gbps: float | None = None,
    link_latency_us: float = 0.0,
    cache_aware_routing: float | None = None,
    prefetch_streams: int = 1,
    **policy_options: Any,
) -> OffloadHandle:
    """Runs `model`'s experts from a host pool through a cache of device slots.

    Give `budget` (bytes or a string such as "12GiB") or `slots`. The minimum is one slot
    per expert a token uses (top-k); a forward that needs more experts than there are
    slots (a long prefill) runs in several passes. Load the model on the CPU (in its own
    dtype): the experts move into the pool and only the rest moves to `device` ("cuda" is
    torch's current device), so a model larger than the device runs.

    With `prefetch`, each layer predicts the experts of the next `lookahead` layers
    (`predictor`: "gate" lookahead through their routers, transition "history", or both
    "combined") and prefetches the best of them whose copy pays on average, given how often
    their rank was right and how much of a copy the compute hides (see
    expertflow.prediction). On the CPU backend `link_gbps` and `link_latency_us` pace
    copies like a PCIe link, to emulate one (CUDA uses the real link and refuses them).
    `cache_aware_routing=margin` is a LOSSY mode, off by default: a token whose chosen
    expert is not resident uses a resident one whose router probability is within the
    margin. Policy options (`static_experts`, `lfu_decay`, ...) pass to ExpertCache. On any
    error the model is left as it was.
    """
    plan = _plan(model, device, budget, slots, link_gbps, link_latency_us)
    _check_options(plan, policy, prefetch_streams, policy_options)
    if prefetch and plan.fused:
        Prefetcher.check(predictor, lookahead)
    if cache_aware_routing is not None and not cache_aware_routing >= 0.0:
        raise ValueError(f"cache_aware_routing is a margin >= 0, got {cache_aware_routing!r}")
    _check_device_memory(plan)

    undo, cache = _Undo(), None
    try:
        memory = _pool_experts(plan, undo)
        pool = HostPool(
            plan.layout,
            str(plan.device),
            buffer=memory,
            link_gbps=link_gbps or 0.0,
            link_latency_us=link_latency_us,
        )
        cache = ExpertCache(
            pool,
            slots=plan.num_slots,
            policy=policy,
            prefetch_streams=prefetch_streams,
            **policy_options,
        )
        _move_non_experts(plan, undo)
        reads = HostReads(plan.device, plan.num_experts)
        table = Slots(cache, arena_tensor(cache, plan.device), plan.device, reads)
        routers = plan.routers() if prefetch or cache_aware_routing is not None else []
        prefetcher = None
        if prefetch and plan.fused:
            prefetcher = Prefetcher(
                cache,
                routers,
                plan.num_experts,
                plan.top_k,
                predictor,
                lookahead,
                _link_bytes_per_second(plan.device, link_gbps, plan.slot_bytes),
                plan.device,
            )
        lossy = None
        if cache_aware_routing is not None:
            lossy = CacheAwareRouting(float(cache_aware_routing), cache, routers, plan.num_experts)
        _patch(plan, table, prefetcher, lossy, undo)
    except BaseException:
        _undo(model, undo)
        if cache is not None:
            cache.close()
        raise
    return OffloadHandle(model, cache, plan.layers, undo, table)


def _resolve_device(device: str, link_gbps: float | None, link_latency_us: float) -> torch.device:
    """The device, with "cuda" as torch's current device; a clear error for one this
    machine cannot use, or a link model on CUDA."""
    kind, index = parse_device(device)
    _C.make_backend(kind, index, link_gbps or 0.0, link_latency_us)  # checks, allocates nothing
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} cannot use CUDA here")
    if ":" not in str(device):
        index = torch.cuda.current_device()
    return torch.device("cuda", index)


def _plan(model, device, budget, slots, link_gbps, link_latency_us) -> _Plan:
    layers = find_experts(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no experts module expertflow can offload: none of its "
            "modules is decorated with transformers' use_experts_implementation or is a "
            "ModuleList named experts"
        )
    if any(p.offloaded for p in layers):
        raise ValueError("this model is already offloaded; call restore() on its handle first")
    if any(p.fused for p in layers) and not model._can_set_experts_implementation():
        raise ValueError(
            f"{type(model).__name__} does not let transformers set its experts implementation"
        )
    counts = {p.num_experts for p in layers}
    if len(counts) != 1:
        raise ValueError(
            f"expertflow needs the same number of experts in every layer, found {sorted(counts)}"
        )
    slot_bytes = align(max(p.blob_bytes for p in layers))
    if (budget is None) == (slots is None):
        raise ValueError("give exactly one of budget= or slots=")
    num_slots = slots if slots is not None else parse_bytes(budget) // slot_bytes
    minimum = max(p.experts_per_token for p in layers)
    if num_slots < minimum:
        given = (
            f"{num_slots} slots"
            if budget is None
            else f"a budget of {parse_bytes(budget)} bytes ({num_slots} slots)"
        )
        raise ValueError(
            f"{given} is below the minimum of {minimum} slots = {minimum * slot_bytes} bytes: "
            f"one slot of {slot_bytes} bytes for each of the {minimum} experts a token uses"
        )
    torch_device = _resolve_device(device, link_gbps, link_latency_us)
    return _Plan(model, torch_device, layers, counts.pop(), slot_bytes, num_slots)


def _check_options(plan: _Plan, policy: str, prefetch_streams: int, options: dict) -> None:
    """Policy and cache options checked by the core itself, on a stand-in pool of one-byte
    experts of the same shape: a mistake is found before any weight moves."""
    layout = ExpertLayout(len(plan.layers), plan.num_experts, 1)
    with ExpertCache(
        HostPool(layout, "cpu"),
        slots=plan.num_slots,
        policy=policy,
        prefetch_streams=prefetch_streams,
        **options,
    ):
        pass


def _check_device_memory(plan: _Plan) -> None:
    if plan.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(plan.device)
        require_device_memory(plan, free)


def require_device_memory(plan: _Plan, free: int) -> None:
    """A clear error when the non-expert weights and the slots do not fit in `free` bytes."""
    weights = sum(t.numel() * t.element_size() for t in plan.non_experts())
    arena = plan.num_slots * plan.slot_bytes
    if weights > free:
        raise ValueError(
            f"{plan.device} has {free} bytes free, too few even for the non-expert weights "
            f"({weights} bytes), which must stay on the device"
        )
    if weights + arena > free:
        raise ValueError(
            f"{plan.device} has {free} bytes free: the non-expert weights ({weights} bytes) "
            f"and {plan.num_slots} slots of {plan.slot_bytes} bytes ({arena} bytes) need "
            f"{weights + arena}; a budget of at most {free - weights} bytes fits "
            "(leave room for activations too)"
        )


def _pool_experts(plan: _Plan, undo: _Undo) -> np.ndarray:
    """Every expert's weights in one page-aligned host buffer laid out as the pool.

    The buffer is ordinary memory, committed by the OS as it is written, and each layer's
    original tensors are freed as soon as their copy lands, so host memory grows by about
    one layer's experts, not by the whole pool. It is page-locked afterwards, in place."""
    layout = plan.layout
    raw = np.empty(layout.total_bytes + _PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % _PAGE
    memory = raw[start : start + layout.total_bytes]
    pool_bytes = torch.from_numpy(memory)
    for layer, experts in enumerate(plan.layers):
        base = layout.offset(layer, 0)
        for spec in experts.tensors:
            pooled = strided_view(pool_bytes, spec, plan.num_experts, experts.blob_bytes, base)
            params = experts.params[spec.name]
            for param, target in zip(params, [pooled] if experts.fused else pooled):
                target.copy_(param.data)
                undo.pooled.append((param, param.device))
                param.data = target
        _return_freed_memory()
    return memory


def _move_non_experts(plan: _Plan, undo: _Undo) -> None:
    for tensor in plan.non_experts():
        undo.moved.append((tensor, tensor.device))
        tensor.data = tensor.data.to(plan.device)


def _patch(plan: _Plan, slots: Slots, prefetcher, lossy, undo: _Undo) -> None:
    """Routes every experts module through the slots."""
    for layer, experts in enumerate(plan.layers):
        views = {spec.name: slots.views(spec) for spec in experts.tensors}
        if experts.fused:
            implementation = experts.module.config._experts_implementation
            experts.module.__dict__["_expertflow"] = FusedRunner(
                layer,
                slots,
                SlotExperts(experts.module, views, plan.num_slots),
                _INNER.get(implementation, grouped_mm_experts_forward),
                prefetcher,
                lossy,
            )
            undo.patched.append((experts.module, "_expertflow"))
            continue
        for e, expert in enumerate(experts.module):
            params = {n: experts.params[n][e] for n in experts.params}
            expert.__dict__["forward"] = ExpertRunner(layer, e, expert, slots, params, views)
            undo.patched.append((expert, "forward"))
    if plan.fused:
        before = plan.model.get_experts_implementation()
        plan.model.set_experts_implementation(IMPLEMENTATION)
        undo.implementation = before


def _link_bytes_per_second(device: torch.device, link_gbps: float | None, nbytes: int) -> float:
    """The host-to-device bandwidth prefetch decisions assume: the CPU's emulated link
    (unlimited without one), or on CUDA the best of three timed copies of one slot's bytes
    from pinned memory."""
    if device.type == "cpu":
        return link_gbps * 1e9 if link_gbps else math.inf
    source = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = math.inf
    for _ in range(3):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(source, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best
