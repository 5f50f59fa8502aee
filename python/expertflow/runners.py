"""The experts forward on cached slots: what runs in each MoE layer of an offloaded model.

A fused experts module's forward (registered as the "expertflow" experts implementation)
reads the layer's routing from the device once, acquires the chosen experts' slots, and
runs transformers' own grouped_mm (or batched_mm) math on a stand-in module whose weights
are the slots, indexed by slot instead of by expert. The math, the layout flags and the
class's own `_apply_gate` are therefore exactly the stock ones; only where the weights
live changes. Experts kept as a ModuleList run their own forward on their slot's weights.

The decode path is hot. On CUDA it synchronises with the device once per MoE layer: one
asynchronous copy of the chosen-expert mask (with the lookahead scores, and the routing
while a trace is recorded) into a pinned buffer allocated once, then one event wait. The
expert-to-slot table goes back the same way, asynchronously, so nothing else waits.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from expertflow.core import ExpertCache
from expertflow.experts import TensorSpec, strided_view
from expertflow.prediction import Prefetcher
from expertflow.traces import Trace

IMPLEMENTATION = "expertflow"


def arena_tensor(cache: ExpertCache, device: torch.device) -> torch.Tensor:
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

    arena = torch.as_tensor(_CudaMemory(), device=device)
    # as_tensor copies when the memory is not on `device`: a view is the whole point.
    if arena.data_ptr() != address:
        raise RuntimeError(
            f"the slots at 0x{address:x} are not on {device}: torch copied them to "
            f"0x{arena.data_ptr():x}"
        )
    return arena


class HostReads:
    """The layer's traffic between host and device, without stray synchronisation.

    `read` brings a few device tensors to the host in one copy and one event wait (the
    layer's only synchronisation); `slot_table` sends an expert-to-slot table back
    asynchronously. Both use pinned buffers allocated once: a table's host row is written
    again only after the next read, which waits for every copy queued before it."""

    def __init__(self, device: torch.device, num_experts: int):
        self.device = device
        self.num_experts = num_experts
        self.cuda = device.type == "cuda"
        self.reads = 0  # synchronisations so far (tests count them)
        self._buffer = torch.empty(0, dtype=torch.float32)
        self._tables: list[torch.Tensor] = []  # one host row per pass of a layer
        self._done = torch.cuda.Event() if self.cuda else None

    def read(self, tensors: list[torch.Tensor]) -> np.ndarray:
        """The tensors, flattened and concatenated as float32 on the host."""
        packed = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        self.reads += 1
        if not self.cuda:
            return packed.numpy()
        if self._buffer.numel() < packed.numel():
            size = max(packed.numel(), 2 * self._buffer.numel())
            self._buffer = torch.empty(size, dtype=torch.float32, pin_memory=True)
        host = self._buffer[: packed.numel()]
        host.copy_(packed, non_blocking=True)
        self._done.record(torch.cuda.current_stream(self.device))
        self._done.synchronize()
        return host.numpy()

    def slot_table(self, row: int, experts: list[int], slots: list[int]) -> torch.Tensor:
        """[num_experts] int64 on the device: each expert's slot, -1 for the others."""
        while len(self._tables) <= row:
            self._tables.append(
                torch.empty(self.num_experts, dtype=torch.int64, pin_memory=self.cuda)
            )
        table = self._tables[row]
        table.fill_(-1)
        table[experts] = torch.tensor(slots, dtype=torch.int64)
        return table.to(self.device, non_blocking=True) if self.cuda else table


@dataclass
class Slots:
    """The cache of one offload() and what a layer's forward needs to use it."""

    cache: ExpertCache
    arena: torch.Tensor  # every slot, as bytes on the device
    device: torch.device
    reads: HostReads
    address: int = field(init=False)  # of slot 0
    recorder: Recorder | None = None

    def __post_init__(self) -> None:
        self.address = self.cache.slot_address(0)

    def stream(self):
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else 0

    def slot_of(self, address: int) -> int:
        return (address - self.address) // self.cache.slot_bytes

    def views(self, spec: TensorSpec) -> torch.Tensor:
        """Tensor `spec` of every slot: [num_slots, *spec.shape]."""
        return strided_view(self.arena, spec, self.cache.num_slots, self.cache.slot_bytes)


class SlotExperts:
    """What transformers' experts math sees: the module, with weights indexed by slot."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor], slots: int):
        self.__dict__.update(weights)
        self._module = module
        self.num_experts = slots
        self._is_expert_parallel = False

    def __getattr__(self, name: str) -> Any:  # act_fn, _apply_gate, layout flags, norms
        return getattr(self._module, name)


class Recorder:
    """Writes the routing of live runs as a trace (expertflow.traces), step by step."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.request = -1
        self.base = 0  # token index of the current forward's first token
        self.last_tokens = 0

    def record(self, layer: int, index, weights, top_k: int) -> None:
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
                self.request,
                self.base + t,
                layer,
                [int(e) for e in index[row]],
                [float(w) for w in weights[row]],
            )


@dataclass
class CacheAwareRouting:
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
class FusedRunner:
    """The experts forward of one fused experts module, registered with transformers."""

    layer: int
    slots: Slots
    slot_experts: SlotExperts
    inner: Callable
    prefetcher: Prefetcher | None
    lossy: CacheAwareRouting | None = None

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        if self.prefetcher is not None:
            self.prefetcher.layer_ends()
        if self.lossy is not None:  # LOSSY: outputs differ from the stock model's
            top_k_index = self.lossy(self.layer, hidden_states, top_k_index)
        chosen, predicted = self._read(hidden_states, top_k_index, top_k_weights)
        prefetch = None
        if self.prefetcher is not None:
            self.prefetcher.observe(self.layer, chosen, hidden_states.shape[0])
            prefetch = functools.partial(self.prefetcher.prefetch, self.layer, predicted)

        per_pass = self.slots.cache.max_acquire
        if len(chosen) <= per_pass:  # prefetch once this layer's experts are pinned
            return self._run(0, chosen, hidden_states, top_k_index, top_k_weights, prefetch)
        # More experts than slots (a long prefill on a small budget): one pass per group of
        # experts, with the routing weights of the others zeroed, and the passes summed.
        out = None
        for row, start in enumerate(range(0, len(chosen), per_pass)):
            group = chosen[start : start + per_pass]
            group_out = self._run(row, group, hidden_states, top_k_index, top_k_weights, part=True)
            out = group_out if out is None else out + group_out
        if prefetch is not None:
            prefetch()
        return out

    def _read(self, hidden_states, top_k_index, top_k_weights):
        """The layer's one device-to-host read: which experts the tokens chose, the
        lookahead scores and, while a trace is recorded, every token's routing."""
        num_experts = self.slots.reads.num_experts
        used = torch.zeros(num_experts, dtype=torch.float32, device=top_k_index.device)
        used.index_fill_(0, top_k_index.reshape(-1), 1.0)
        gate = self.prefetcher.gate_scores(self.layer, hidden_states) if self.prefetcher else []
        recorder = self.slots.recorder
        routing = [top_k_index, top_k_weights] if recorder is not None else []
        host = self.slots.reads.read([used, *(scores for _, scores in gate), *routing])
        chosen = np.flatnonzero(host[:num_experts]).tolist()
        at = num_experts
        predicted = []
        for target, _ in gate:
            predicted.append((target, host[at : at + num_experts].tolist()))
            at += num_experts
        if recorder is not None:
            n = top_k_index.numel()
            index, weights = host[at : at + n], host[at + n : at + 2 * n]
            recorder.record(self.layer, index, weights, top_k_index.shape[-1])
        return chosen, predicted

    def _run(self, row, chosen, hidden_states, top_k_index, top_k_weights, then=None, part=False):
        """transformers' experts math over the experts `chosen`: all of the layer's, or with
        `part` the group of pass `row` (the routing weights of the others count as zero).
        `then` runs once the experts are acquired."""
        stream = self.slots.stream()
        addresses = self.slots.cache.acquire(self.layer, chosen, stream)
        try:
            if then is not None:
                then()
            slot_ids = [self.slots.slot_of(a) for a in addresses]
            slot_index = self.slots.reads.slot_table(row, chosen, slot_ids)[top_k_index]
            if part:
                top_k_weights = top_k_weights * (slot_index >= 0)
                slot_index = slot_index.clamp(min=0)
            return self.inner(self.slot_experts, hidden_states, slot_index, top_k_weights)
        finally:
            self.slots.cache.release(self.layer, chosen, stream)


@dataclass
class ExpertRunner:
    """The forward of one expert of a ModuleList: its own forward, on its slot's weights."""

    layer: int
    expert: int
    module: torch.nn.Module
    slots: Slots
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
