"""expertflow.offload(): one call that runs a transformers MoE model with its experts cached.

How it fits transformers v5: every experts class decorated with `use_experts_implementation`
dispatches its forward through `ALL_EXPERTS_FUNCTIONS` by the model's experts
implementation. ExpertFlow registers "expertflow" there and switches the model to it. Its
forward acquires the experts the router chose, then runs transformers' own grouped_mm (or
batched_mm) math on a stand-in module whose weights are the cache's device slots, indexed
by slot instead of by expert. The math, the layout flags (`is_transposed`,
`is_concatenated`, `has_bias`, `has_gate`, `has_post_expert_norm`) and the class's own
`_apply_gate` are therefore exactly the stock ones; only where the weights live changes.

Expert weights move into the HostPool once, layer by layer: each experts parameter
becomes a strided view of the pool, so `state_dict()` still returns it and host memory
holds one copy. Everything else (attention, routers, shared experts, norms) moves to the
device and stays there.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    batched_mm_experts_forward,
    grouped_mm_experts_forward,
)

from expertflow.core import ExpertCache, ExpertLayout, HostPool, parse_bytes, parse_device
from expertflow.prediction import Prefetcher, find_router
from expertflow.traces import Trace

IMPLEMENTATION = "expertflow"
_ALIGNMENT = 256
# The inner math for each experts implementation a model may have had; eager and the
# kernel-specific ones run grouped_mm, transformers' own default.
_INNER = {"batched_mm": batched_mm_experts_forward}


def _align(n: int) -> int:
    return -(-n // _ALIGNMENT) * _ALIGNMENT


def _is_experts_module(module: torch.nn.Module) -> bool:
    """Whether transformers' use_experts_implementation decorated the module's class."""
    flags = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
    return all(hasattr(module, f) for f in flags) and hasattr(type(module).forward, "__wrapped__")


@dataclass
class _TensorSpec:
    name: str  # parameter name, in the experts module or in one expert's module
    shape: tuple[int, ...]  # of one expert's tensor
    dtype: torch.dtype
    offset: int  # bytes from the start of the expert's blob


def _blob_specs(named: list[tuple[str, torch.Tensor]]) -> tuple[list[_TensorSpec], int]:
    """Where one expert's tensors go in its blob: back to back, each 256-byte aligned."""
    specs, offset = [], 0
    for name, tensor in named:
        specs.append(_TensorSpec(name, tuple(tensor.shape), tensor.dtype, offset))
        offset = _align(offset + tensor.numel() * tensor.element_size())
    return specs, offset


@dataclass
class _ExpertsPlan:
    """One layer's experts: which tensors are per-expert, and where they sit in a blob.

    Two kinds: a fused experts module decorated by transformers (one parameter per tensor
    kind, indexed by expert), or a ModuleList of expert MLPs (older and remote-code
    models), whose experts keep their own forward.
    """

    name: str
    module: torch.nn.Module
    num_experts: int
    tensors: list[_TensorSpec]
    blob_bytes: int
    # params[spec.name][e]: expert e's tensor as a Parameter (ModuleList), or [the fused
    # Parameter holding all experts].
    params: dict[str, list[torch.nn.Parameter]]
    fused: bool

    @property
    def experts_per_token(self) -> int:
        config = getattr(self.module, "config", None)
        for name in ("num_experts_per_tok", "moe_k", "top_k"):
            if isinstance(getattr(config, name, None), int):
                return getattr(config, name)
        return 1

    @property
    def offloaded(self) -> bool:
        patched = self.module if self.fused else self.module[0]
        return "_expertflow" in patched.__dict__ or "forward" in patched.__dict__

    @classmethod
    def fused_module(cls, name: str, module: torch.nn.Module) -> _ExpertsPlan:
        params = dict(module.named_parameters(recurse=False))
        projections = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
        expected = projections + [p + "_bias" for p in projections if module.has_bias]
        num_experts = params["down_proj"].shape[0] if "down_proj" in params else None
        unknown = [
            n
            for n, p in params.items()
            if n not in expected and p.dim() > 0 and p.shape[0] == num_experts
        ]
        if any(n not in params or params[n].shape[0] != num_experts for n in expected) or unknown:
            raise ValueError(
                f"{name} ({type(module).__name__}) has an experts layout expertflow does not "
                f"know: with has_gate={module.has_gate} and has_bias={module.has_bias} it "
                f"expects per-expert parameters {expected}, and found "
                f"{ {n: tuple(p.shape) for n, p in params.items()} }"
            )
        specs, blob_bytes = _blob_specs([(n, params[n][0]) for n in expected])
        return cls(
            name, module, num_experts, specs, blob_bytes, {n: [params[n]] for n in expected}, True
        )

    @classmethod
    def module_list(cls, name: str, experts: torch.nn.ModuleList) -> _ExpertsPlan:
        named = [list(expert.named_parameters()) for expert in experts]
        shapes = [[(n, p.shape, p.dtype) for n, p in expert] for expert in named]
        if any(type(e) is not type(experts[0]) for e in experts) or any(
            s != shapes[0] for s in shapes
        ):
            raise ValueError(
                f"{name} is a ModuleList of experts whose members differ in class or in their "
                "parameters; expertflow needs equal experts"
            )
        specs, blob_bytes = _blob_specs(named[0])
        params = {n: [dict(expert)[n] for expert in named] for n, _ in named[0]}
        return cls(name, experts, len(experts), specs, blob_bytes, params, False)


def _find_experts(model: torch.nn.Module) -> list[_ExpertsPlan]:
    plans = []
    for name, module in model.named_modules():
        if _is_experts_module(module):
            plans.append(_ExpertsPlan.fused_module(name, module))
        elif (
            isinstance(module, torch.nn.ModuleList)
            and name.rsplit(".", 1)[-1] == "experts"
            and len(module) > 1
            and any(True for _ in module.parameters())
        ):
            plans.append(_ExpertsPlan.module_list(name, module))
    return plans


def _arena_tensor(cache: ExpertCache, device: torch.device) -> torch.Tensor:
    """The cache's slots as one uint8 tensor on `device`, without a copy."""
    address, nbytes = cache.slot_address(0), cache.num_slots * cache.slot_bytes
    if device.type == "cpu":
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)

    class _CudaMemory:  # __cuda_array_interface__ lets torch view memory it did not allocate
        __cuda_array_interface__: ClassVar[dict] = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }

    return torch.as_tensor(_CudaMemory(), device=device)


def _strided_view(
    memory: torch.Tensor, spec: _TensorSpec, count: int, stride_bytes: int, base: int = 0
) -> torch.Tensor:
    """`count` copies of spec's tensor, `stride_bytes` apart from byte `base` of `memory`."""
    itemsize = spec.dtype.itemsize
    typed = memory.view(spec.dtype)
    inner = torch.empty(spec.shape, device="meta").stride()
    return typed.as_strided(
        (count, *spec.shape), (stride_bytes // itemsize, *inner), (base + spec.offset) // itemsize
    )


class _SlotExperts:
    """What transformers' experts math sees: the module, with weights indexed by slot."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor], slots: int):
        self.__dict__.update(weights)
        self._module = module
        self.num_experts = slots
        self._is_expert_parallel = False

    def __getattr__(self, name: str) -> Any:  # act_fn, _apply_gate, layout flags, norms
        return getattr(self._module, name)


class _Recorder:
    """Writes the routing of live runs as a trace (expertflow.traces), step by step."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.request = -1
        self.base = 0  # token index of the current forward's first token
        self.last_tokens = 0

    def record(self, layer: int, index: list[float], weights: list[float], top_k: int) -> None:
        tokens = len(index) // top_k
        if layer == 0:  # a new forward: a prefill starts a request, a decode step follows
            if tokens > 1 or self.request < 0:
                self.request, self.base = self.request + 1, 0
            else:
                self.base += self.last_tokens
            self.last_tokens = tokens
        for t in range(tokens):
            row = slice(t * top_k, (t + 1) * top_k)
            self.trace.add(
                self.request, self.base + t, layer, [int(e) for e in index[row]], weights[row]
            )


@dataclass
class _Slots:
    """The cache of one offload() and what a layer's forward needs to use it."""

    cache: ExpertCache
    arena: torch.Tensor  # every slot, as bytes on the device
    address: int  # of slot 0
    device: torch.device
    recorder: _Recorder | None = None

    def stream(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.current_stream(self.device).cuda_stream
        return 0

    def to_device(self, small: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the device, without the stream synchronisation of a
        pageable copy: staged in pinned memory, copied asynchronously."""
        if self.device.type == "cpu":
            return small
        return small.pin_memory().to(self.device, non_blocking=True)

    def slot_of(self, address: int) -> int:
        return (address - self.address) // self.cache.slot_bytes

    def views(self, spec: _TensorSpec) -> torch.Tensor:
        """Tensor `spec` of every slot: [num_slots, *spec.shape]."""
        return _strided_view(self.arena, spec, self.cache.num_slots, self.cache.slot_bytes)


@dataclass
class _CacheAwareRouting:
    """LOSSY, off by default: when a token's chosen expert is not resident and a resident
    expert it did not choose has a router probability within `margin` of it, the token
    uses the resident one (with the chosen expert's routing weight). Trades exactness for
    fewer copies; the POPE harness measures what it costs."""

    margin: float
    cache: ExpertCache
    routers: list[torch.nn.Module | None]
    num_experts: int

    def __call__(self, layer: int, hidden_states, top_k_index):
        router = self.routers[layer]
        if router is None:
            return top_k_index
        out = type(router).forward(router, hidden_states)
        logits = next(
            (
                t
                for t in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(t, torch.Tensor)
                and t.is_floating_point()
                and t.shape[-1] == self.num_experts
            ),
            None,
        )
        if logits is None:
            return top_k_index
        probs = logits.float().reshape(-1, self.num_experts).softmax(-1)
        resident = torch.tensor(
            [self.cache.resident(layer, e) for e in range(self.num_experts)], device=probs.device
        )
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_k_index, True)
        # The best resident expert each token did not choose, and its probability.
        spare = probs.masked_fill(~resident | chosen, -1.0)
        best_prob, best = spare.max(-1, keepdim=True)
        own = probs.gather(1, top_k_index)
        swap = ~resident[top_k_index] & (best_prob >= own - self.margin) & (best_prob >= 0)
        # At most one swap per token, for its weakest non-resident choice, so that no
        # expert appears twice in a token's top-k.
        weakest = own.masked_fill(~swap, float("inf")).argmin(-1, keepdim=True)
        one = torch.zeros_like(swap).scatter_(1, weakest, True) & swap
        return torch.where(one, best.expand_as(top_k_index), top_k_index)


@dataclass
class _FusedRunner:
    """The experts forward of one fused experts module, registered with transformers."""

    layer: int
    slots: _Slots
    slot_experts: _SlotExperts
    inner: Callable
    prefetcher: Prefetcher | None
    lossy: _CacheAwareRouting | None = None

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        if self.lossy is not None:  # LOSSY: outputs differ from the stock model's
            top_k_index = self.lossy(self.layer, hidden_states, top_k_index)
        experts, rank = torch.unique(top_k_index, sorted=True, return_inverse=True)
        gate = self.prefetcher.gate_scores(self.layer, hidden_states) if self.prefetcher else []
        recorder = self.slots.recorder
        routing = [top_k_index.flatten(), top_k_weights.flatten()] if recorder else []
        # The layer's one device-to-host read: the chosen experts, the lookahead scores and,
        # while a trace is recorded, every token's routing.
        packed = [experts, *(scores for _, scores in gate), *routing]
        host = torch.cat([t.to(torch.float32) for t in packed]).tolist()
        if recorder is not None:
            n = top_k_index.numel()
            recorder.record(self.layer, host[-2 * n : -n], host[-n:], top_k_index.shape[-1])
            host = host[: -2 * n]
        width = len(gate[0][1]) if gate else 0
        count = len(host) - width * len(gate)
        chosen = [int(e) for e in host[:count]]
        predicted = [
            (target, host[count + i * width : count + (i + 1) * width])
            for i, (target, _) in enumerate(gate)
        ]
        prefetch = None
        if self.prefetcher is not None:
            self.prefetcher.observe(self.layer, chosen, hidden_states.shape[0])
            prefetch = functools.partial(self.prefetcher.prefetch, self.layer, predicted)

        per_pass = self.slots.cache.max_acquire
        if len(chosen) <= per_pass:  # prefetch once this layer's experts are pinned
            return self._run(chosen, rank, hidden_states, top_k_weights, then=prefetch)
        # More experts than slots (a long prefill on a small budget): one pass per group of
        # experts, with the routing weights of the others zeroed, and the passes summed.
        out = None
        for start in range(0, len(chosen), per_pass):
            group = chosen[start : start + per_pass]
            in_group = (rank >= start) & (rank < start + len(group))
            part = self._run(
                group,
                (rank - start).clamp(0, len(group) - 1),
                hidden_states,
                top_k_weights * in_group,
            )
            out = part if out is None else out + part
        if prefetch is not None:
            prefetch()
        return out

    def _run(self, chosen: list[int], rank, hidden_states, top_k_weights, then=None):
        """transformers' experts math over `chosen`; rank[i, k] indexes into chosen."""
        stream = self.slots.stream()
        addresses = self.slots.cache.acquire(self.layer, chosen, stream)
        try:
            if then is not None:
                then()
            slot_ids = torch.tensor([self.slots.slot_of(a) for a in addresses])
            slot_index = self.slots.to_device(slot_ids)[rank]
            return self.inner(self.slot_experts, hidden_states, slot_index, top_k_weights)
        finally:
            self.slots.cache.release(self.layer, chosen, stream)


@dataclass
class _ExpertRunner:
    """The forward of one expert of a ModuleList: its own forward, on its slot's weights."""

    layer: int
    expert: int
    module: torch.nn.Module
    slots: _Slots
    params: dict[str, torch.nn.Parameter]
    slot_views: dict[str, torch.Tensor]

    def __call__(self, *args, **kwargs):
        stream = self.slots.stream()
        (address,) = self.slots.cache.acquire(self.layer, [self.expert], stream)
        slot = self.slots.slot_of(address)
        pooled = {name: p.data for name, p in self.params.items()}
        try:
            for name, param in self.params.items():
                param.data = self.slot_views[name][slot]
            return type(self.module).forward(self.module, *args, **kwargs)
        finally:
            for name, param in self.params.items():
                param.data = pooled[name]
            self.slots.cache.release(self.layer, [self.expert], stream)


def _experts_forward(module, hidden_states, top_k_index, top_k_weights):
    runner = module.__dict__.get("_expertflow")
    if runner is None:
        raise RuntimeError(
            f"{type(module).__name__} uses experts_implementation={IMPLEMENTATION!r} but was "
            "not offloaded by expertflow.offload(); call offload() or set another implementation"
        )
    return runner(hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _experts_forward)


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
        self, model, cache: ExpertCache, plans: list[_ExpertsPlan], undo: _Undo, slots: _Slots
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
        self._slots.recorder = _Recorder(trace)
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
    slots (a long prefill) runs in several passes. Non-expert weights move to `device`.

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
    parse_device(device)  # "cpu", "cuda" or "cuda:N", with a clear error otherwise
    torch_device = torch.device(device)
    plans = _find_experts(model)
    if not plans:
        raise ValueError(
            f"{type(model).__name__} has no experts module expertflow can offload: none of its "
            "modules is decorated with transformers' use_experts_implementation or is a "
            "ModuleList named experts"
        )
    if any(p.offloaded for p in plans):
        raise ValueError("this model is already offloaded; call restore() on its handle first")
    fused = any(p.fused for p in plans)
    if fused and not model._can_set_experts_implementation():
        raise ValueError(
            f"{type(model).__name__} does not let transformers set its experts implementation"
        )
    counts = {p.num_experts for p in plans}
    if len(counts) != 1:
        raise ValueError(
            f"expertflow needs the same number of experts in every layer, found {sorted(counts)}"
        )
    num_experts = counts.pop()
    slot_bytes = _align(max(p.blob_bytes for p in plans))
    if (budget is None) == (slots is None):
        raise ValueError("give exactly one of budget= or slots=")
    num_slots = slots if slots is not None else parse_bytes(budget) // slot_bytes
    minimum = max(p.experts_per_token for p in plans)
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

    # Everything that can fail for want of memory or a device happens before the model changes.
    layout = ExpertLayout(
        len(plans), num_experts, [p.blob_bytes for p in plans for _ in range(num_experts)]
    )
    pool = HostPool(
        layout, str(torch_device), link_gbps=link_gbps or 0.0, link_latency_us=link_latency_us
    )
    cache = ExpertCache(
        pool, slots=num_slots, policy=policy, prefetch_streams=prefetch_streams, **policy_options
    )
    pool_bytes = torch.frombuffer(memoryview(pool._pool), dtype=torch.uint8)
    slot_table = _Slots(
        cache, _arena_tensor(cache, torch_device), cache.slot_address(0), torch_device
    )
    before = model.get_experts_implementation() if fused else None

    undo = _Undo()
    try:
        prefetcher = None
        if prefetch and fused:
            prefetcher = Prefetcher(
                cache,
                [find_router(model, p.name, num_experts) if p.fused else None for p in plans],
                num_experts,
                max(p.experts_per_token for p in plans),
                predictor,
                lookahead,
                _link_bytes_per_second(torch_device, link_gbps, slot_bytes),
            )
        lossy = None
        if cache_aware_routing is not None:
            if not cache_aware_routing >= 0.0:
                raise ValueError(
                    f"cache_aware_routing is a margin >= 0, got {cache_aware_routing!r}"
                )
            lossy = _CacheAwareRouting(
                float(cache_aware_routing),
                cache,
                [find_router(model, p.name, num_experts) if p.fused else None for p in plans],
                num_experts,
            )
        _move_non_experts(model, plans, torch_device, undo)
        for layer, plan in enumerate(plans):
            base = layout.offset(layer, 0)
            for spec in plan.tensors:  # into the pool; each original is freed as it goes
                pooled = _strided_view(pool_bytes, spec, num_experts, plan.blob_bytes, base)
                tensors = plan.params[spec.name]
                for param, target in zip(tensors, [pooled] if plan.fused else pooled):
                    target.copy_(param.data)
                    undo.pooled.append((param, param.device))
                    param.data = target
            if plan.fused:
                implementation = plan.module.config._experts_implementation
                weights = {spec.name: slot_table.views(spec) for spec in plan.tensors}
                plan.module.__dict__["_expertflow"] = _FusedRunner(
                    layer,
                    slot_table,
                    _SlotExperts(plan.module, weights, num_slots),
                    _INNER.get(implementation, grouped_mm_experts_forward),
                    prefetcher,
                    lossy,
                )
                undo.patched.append((plan.module, "_expertflow"))
            else:
                views = {spec.name: slot_table.views(spec) for spec in plan.tensors}
                for e, expert in enumerate(plan.module):
                    params = {n: plan.params[n][e] for n in plan.params}
                    expert.__dict__["forward"] = _ExpertRunner(
                        layer, e, expert, slot_table, params, views
                    )
                    undo.patched.append((expert, "forward"))
        if fused:
            undo.implementation = before
            model.set_experts_implementation(IMPLEMENTATION)
    except BaseException:
        _undo(model, undo)
        cache.close()
        raise
    return OffloadHandle(model, cache, plans, undo, slot_table)


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


def _move_non_experts(model, plans: list[_ExpertsPlan], device: torch.device, undo: _Undo) -> None:
    experts = {id(p) for plan in plans for params in plan.params.values() for p in params}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in experts or tensor.device == device:
            continue
        undo.moved.append((tensor, tensor.device))
        tensor.data = tensor.data.to(device)
