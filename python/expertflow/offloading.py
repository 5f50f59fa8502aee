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

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    batched_mm_experts_forward,
    grouped_mm_experts_forward,
)

from expertflow.core import ExpertCache, ExpertLayout, HostPool, parse_bytes, parse_device

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
    name: str  # parameter name in the experts module
    shape: tuple[int, ...]  # of one expert's slice
    dtype: torch.dtype
    offset: int  # bytes from the start of the expert's blob


@dataclass
class _ExpertsPlan:
    """One experts module: which parameters are per-expert, and where they sit in a blob."""

    name: str
    module: torch.nn.Module
    num_experts: int
    tensors: list[_TensorSpec]
    blob_bytes: int

    @classmethod
    def of(cls, name: str, module: torch.nn.Module) -> _ExpertsPlan:
        params = dict(module.named_parameters(recurse=False))
        projections = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
        expected = projections + [p + "_bias" for p in projections if module.has_bias]
        num_experts = params["down_proj"].shape[0] if "down_proj" in params else None
        unknown = [
            n
            for n, p in params.items()
            if n not in expected and p.dim() > 0 and p.shape[0] == num_experts
        ]
        if (
            any(n not in params or params[n].shape[0] != num_experts for n in expected)
            or unknown
        ):
            raise ValueError(
                f"{name} ({type(module).__name__}) has an experts layout expertflow does not "
                f"know: with has_gate={module.has_gate} and has_bias={module.has_bias} it "
                f"expects per-expert parameters {expected}, and found "
                f"{ {n: tuple(p.shape) for n, p in params.items()} }"
            )
        tensors, offset = [], 0
        for n in expected:
            p = params[n]
            tensors.append(_TensorSpec(n, tuple(p.shape[1:]), p.dtype, offset))
            offset = _align(offset + p[0].numel() * p.element_size())
        return cls(name, module, num_experts, tensors, offset)


def _arena_tensor(cache: ExpertCache, device: torch.device) -> torch.Tensor:
    """The cache's slots as one uint8 tensor on `device`, without a copy."""
    address, nbytes = cache.slot_address(0), cache.num_slots * cache.slot_bytes
    if device.type == "cpu":
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)

    class _CudaMemory:  # __cuda_array_interface__ lets torch view memory it did not allocate
        __cuda_array_interface__ = {
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


@dataclass
class _LayerRunner:
    """The experts forward of one offloaded layer."""

    layer: int
    cache: ExpertCache
    slot_experts: _SlotExperts
    inner: Callable
    arena_address: int
    slot_bytes: int
    device: torch.device

    def stream(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.current_stream(self.device).cuda_stream
        return 0

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        experts, inverse = torch.unique(top_k_index, sorted=True, return_inverse=True)
        chosen = experts.tolist()  # the layer's one device-to-host synchronisation
        stream = self.stream()
        addresses = self.cache.acquire(self.layer, chosen, stream)
        try:
            slots = [(a - self.arena_address) // self.slot_bytes for a in addresses]
            slot_index = torch.tensor(slots, device=self.device)[inverse]
            return self.inner(self.slot_experts, hidden_states, slot_index, top_k_weights)
        finally:
            self.cache.release(self.layer, chosen, stream)


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
    runners: list[torch.nn.Module] = field(default_factory=list)


class OffloadHandle:
    """An offloaded model: stats(), reset_stats(), restore(), and context-manager use."""

    def __init__(self, model, cache: ExpertCache, plans: list[_ExpertsPlan], undo: _Undo):
        self.model = model
        self.cache = cache
        self.layer_names = [p.name for p in plans]
        self._undo = undo

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def slot_bytes(self) -> int:
        return self.cache.slot_bytes

    def stats(self) -> dict[str, Any]:
        """The cache's counters (see the README), with each layer's module name."""
        stats = self.cache.stats()
        for name, layer in zip(self.layer_names, stats["layers"]):
            layer["name"] = name
        stats.update(num_slots=self.num_slots, slot_bytes=self.slot_bytes, policy=self.cache.policy)
        return stats

    def reset_stats(self) -> None:
        self.cache.reset_stats()

    def restore(self) -> None:
        """Gives the model back its stock experts forward, with its weights where they were."""
        _undo(self.model, self._undo)
        self.cache.close()

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _undo(model, undo: _Undo) -> None:
    for module in undo.runners:
        module.__dict__.pop("_expertflow", None)
    undo.runners.clear()
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
    prefetch_streams: int = 1,
    **policy_options: Any,
) -> OffloadHandle:
    """Runs `model`'s experts from a host pool through a cache of device slots.

    Give `budget` (bytes or a string such as "12GiB") or `slots`. The minimum is one slot
    per expert of the largest layer, since one forward of a layer may use all of them.
    Non-expert weights move to `device`. On any error the model is left as it was.
    """
    parse_device(device)  # "cpu", "cuda" or "cuda:N", with a clear error otherwise
    torch_device = torch.device(device)
    plans = [_ExpertsPlan.of(n, m) for n, m in model.named_modules() if _is_experts_module(m)]
    if any("_expertflow" in p.module.__dict__ for p in plans):
        raise ValueError("this model is already offloaded; call restore() on its handle first")
    if not plans:
        raise ValueError(
            f"{type(model).__name__} has no experts module expertflow can offload: none of its "
            "modules is decorated with transformers' use_experts_implementation"
        )
    if not model._can_set_experts_implementation():
        raise ValueError(f"{type(model).__name__} does not let transformers set its experts implementation")
    counts = {p.num_experts for p in plans}
    if len(counts) != 1:
        raise ValueError(f"expertflow needs the same number of experts in every layer, found {sorted(counts)}")
    num_experts = counts.pop()
    slot_bytes = _align(max(p.blob_bytes for p in plans))
    if (budget is None) == (slots is None):
        raise ValueError("give exactly one of budget= or slots=")
    num_slots = slots if slots is not None else parse_bytes(budget) // slot_bytes
    if num_slots < num_experts:
        given = f"{num_slots} slots" if budget is None else f"a budget of {parse_bytes(budget)} bytes ({num_slots} slots)"
        raise ValueError(
            f"{given} is below the minimum of {num_experts} slots = {num_experts * slot_bytes} "
            f"bytes: one slot of {slot_bytes} bytes per expert of a layer, since one forward of "
            "a layer may use all of them"
        )

    # Everything that can fail for want of memory or a device happens before the model changes.
    layout = ExpertLayout(len(plans), num_experts, [p.blob_bytes for p in plans for _ in range(num_experts)])
    pool = HostPool(layout, str(torch_device))
    cache = ExpertCache(pool, slots=num_slots, policy=policy, prefetch_streams=prefetch_streams, **policy_options)
    pool_bytes = torch.frombuffer(memoryview(pool._pool), dtype=torch.uint8)
    arena = _arena_tensor(cache, torch_device)
    before = model.get_experts_implementation()

    undo = _Undo()
    try:
        _move_non_experts(model, plans, torch_device, undo)
        for layer, plan in enumerate(plans):
            inner = _INNER.get(plan.module.config._experts_implementation, grouped_mm_experts_forward)
            params = dict(plan.module.named_parameters(recurse=False))
            slot_weights = {}
            for spec in plan.tensors:
                param = params[spec.name]
                pooled = _strided_view(pool_bytes, spec, num_experts, plan.blob_bytes, layout.offset(layer, 0))
                pooled.copy_(param.data)
                undo.pooled.append((param, param.device))
                param.data = pooled  # the original storage is freed here, layer by layer
                slot_weights[spec.name] = _strided_view(arena, spec, num_slots, slot_bytes)
            plan.module.__dict__["_expertflow"] = _LayerRunner(
                layer, cache, _SlotExperts(plan.module, slot_weights, num_slots), inner,
                cache.slot_address(0), slot_bytes, torch_device,
            )
            undo.runners.append(plan.module)
        undo.implementation = before
        model.set_experts_implementation(IMPLEMENTATION)
    except BaseException:
        _undo(model, undo)
        cache.close()
        raise
    handle = OffloadHandle(model, cache, plans, undo)
    return handle


def _move_non_experts(model, plans: list[_ExpertsPlan], device: torch.device, undo: _Undo) -> None:
    experts = {id(p) for plan in plans for p in plan.module.parameters(recurse=False)}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in experts or tensor.device == device:
            continue
        undo.moved.append((tensor, tensor.device))
        tensor.data = tensor.data.to(device)
