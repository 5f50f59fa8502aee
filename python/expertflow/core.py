"""Facades over the native core: device strings, byte budgets, buffers and lifetimes.

The native classes do the work; these add what a Python caller expects: `close()` and
context-manager use, budgets such as "12GiB", (layer, expert) pairs instead of flat keys,
and streams given as integers or as objects with `cuda_stream` and `device` attributes
(torch.cuda.Stream), whose device is checked against the cache's.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable, Sequence
from typing import Any

from expertflow import _C

ExpertLayout = _C.ExpertLayout

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SLOT_ALIGNMENT = 256


def build_info() -> dict[str, Any]:
    """Which backends this build contains and which are usable now, with the reasons."""
    return _C.build_info()


def parse_bytes(size: int | str) -> int:
    """Bytes from an int or a string such as "12GiB", "512 MB" or "1.5GB"."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"expected a byte count (int) or a size string, got {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"byte count must be >= 0, got {size}")
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {size!r} as a size; use bytes or e.g. '12GiB', '512MB'")
    count = float(match.group(1)) * _UNITS[unit]
    if count != int(count):
        raise ValueError(f"{size!r} is not a whole number of bytes")
    return int(count)


def parse_device(device: str) -> tuple[str, int]:
    """("cuda", 1) from "cuda:1"; "cpu" and "cuda" mean device 0."""
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", str(device))
    if match is None:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    return match.group(1), int(match.group(2) or 0)


def _device_name(device: Any) -> tuple[str, int | None]:
    """("cuda", 1) from torch.device("cuda", 1) or "cuda:1"; the index is None if unnamed."""
    kind = getattr(device, "type", None)
    if kind is not None:
        return str(kind), getattr(device, "index", None)
    match = re.fullmatch(r"(\w+)(?::(\d+))?", str(device))
    if match is None:
        raise ValueError(f"cannot read the device of a stream: {device!r}")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def _stream_args(stream: Any, cache_device: tuple[str, int]) -> tuple[int, int]:
    """(handle, device index or -1) for a stream given to a cache on `cache_device`
    (kind and index, parsed once: this runs on every acquire and release). A plain int is
    a raw handle of unknown device (-1): it must name a live stream, and the core checks
    what the runtime can tell about it."""
    if not hasattr(stream, "cuda_stream"):  # the common CPU case first: no work
        return int(stream), -1
    return _stream_object_args(stream, cache_device)


def _stream_object_args(stream: Any, cache_device: tuple[str, int]) -> tuple[int, int]:
    """_stream_args for a stream object.

    A stream object (torch.cuda.Stream: `cuda_stream` and `device`) names its device, and
    one of another device than the cache's is refused here, before its handle reaches any
    CUDA call.
    """
    handle = int(stream.cuda_stream)
    device = getattr(stream, "device", None)
    if device is None:
        return handle, -1
    kind, index = _device_name(device)
    cache_kind, cache_index = cache_device
    if kind != cache_kind or (kind == "cuda" and index is not None and index != cache_index):
        named = kind if index is None else f"{kind}:{index}"
        cache = cache_kind if cache_kind == "cpu" else f"{cache_kind}:{cache_index}"
        raise ValueError(
            f"stream {handle:#x} belongs to {named}, but the cache is on {cache}; "
            f"pass a stream of {cache}"
        )
    return handle, -1 if index is None or kind != "cuda" else index


class HostPool:
    """Every expert's bytes, one contiguous 256-byte aligned blob per expert.

    With `buffer=None` the pool allocates (page-locked on CUDA); with a writable buffer
    that already holds the blobs at the layout's offsets, it page-locks that memory in
    place and keeps the buffer alive. The link model (`link_gbps`, `link_latency_us`)
    paces CPU-backend copies like a PCIe link, for experiments.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        device: str = "cpu",
        *,
        buffer: Any = None,
        link_gbps: float = 0.0,
        link_latency_us: float = 0.0,
    ) -> None:
        kind, index = parse_device(device)
        backend = _C.make_backend(kind, index, link_gbps, link_latency_us)
        self.device = f"{kind}:{index}" if kind == "cuda" else kind
        self._buffer = buffer
        if buffer is None:
            self._pool = _C.HostPool(backend, layout)
        else:
            view = memoryview(buffer)
            if not view.c_contiguous:
                raise ValueError("the buffer for a HostPool must be C-contiguous")
            view = view.cast("B")
            if view.readonly:
                raise ValueError("the buffer for a HostPool must be writable")
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
            self._pool = _C.HostPool(backend, layout, address, view.nbytes)

    @property
    def layout(self) -> ExpertLayout:
        return self._pool.layout

    @property
    def address(self) -> int:
        return self._pool.address

    @property
    def nbytes(self) -> int:
        return self._pool.nbytes

    def blob_address(self, layer: int, expert: int) -> int:
        return self._pool.blob_address(layer, expert)

    def view(self, layer: int, expert: int) -> memoryview:
        """The expert's blob, writable, without a copy."""
        offset = self.layout.offset(layer, expert)
        return memoryview(self._pool)[offset : offset + self.layout.bytes(layer, expert)]

    def __repr__(self) -> str:
        layout = self.layout
        return (
            f"HostPool({layout.num_layers} layers x {layout.experts_per_layer} experts, "
            f"{self.nbytes} bytes, device={self.device!r})"
        )


class ExpertCache:
    """Device slots caching experts of a HostPool.

    Give either `slots` or `budget` (bytes or a string such as "12GiB"; slots are sized
    to the largest expert). Policies: "lru", "lfu", "static" (keeps `static_experts`,
    (layer, expert) pairs), "expertflow" (LRU plus the predictions passed to prefetch)
    and "belady" (needs `future`: the (layer, experts) of every acquire, in order).
    """

    def __init__(
        self,
        pool: HostPool,
        *,
        slots: int | None = None,
        budget: int | str | None = None,
        policy: str = "lru",
        prefetch_streams: int = 1,
        lfu_decay: float = 1.0,
        lfu_decay_period: int = 0,
        static_experts: Iterable[tuple[int, int]] = (),
        future: Iterable[tuple[int, Sequence[int]]] = (),
    ) -> None:
        if (slots is None) == (budget is None):
            raise ValueError("give exactly one of slots= or budget=")
        layout = pool.layout
        if budget is not None:
            slot_bytes = -(-layout.max_bytes // _SLOT_ALIGNMENT) * _SLOT_ALIGNMENT
            slots = parse_bytes(budget) // slot_bytes
            if slots < 1:
                raise ValueError(
                    f"a budget of {parse_bytes(budget)} bytes holds no slot: one slot "
                    f"takes {slot_bytes} bytes (the largest expert)"
                )
        self.pool = pool
        self._device = parse_device(pool.device)  # parsed once for the stream checks
        self._cache = _C.ExpertCache(
            pool._pool,
            slots,
            policy=policy,
            prefetch_streams=prefetch_streams,
            lfu_decay=lfu_decay,
            lfu_decay_period=lfu_decay_period,
            static_keys=[layout.key(layer, expert) for layer, expert in static_experts],
            future=[[layout.key(layer, e) for e in experts] for layer, experts in future],
        )

    def acquire(self, layer: int, experts: Sequence[int], stream: Any = 0) -> list[int]:
        """Slot addresses of the experts, safe to read on `stream`; pinned until release."""
        return self._cache.acquire(layer, list(experts), *_stream_args(stream, self._device))

    def prefetch(
        self, layer: int, experts: Sequence[int], scores: Sequence[float] | None = None
    ) -> None:
        """Predict that `layer` will use `experts` (confidence `scores`) and copy them ahead."""
        self._cache.prefetch(layer, list(experts), [] if scores is None else list(scores))

    def predict(
        self, layer: int, experts: Sequence[int], scores: Sequence[float] | None = None
    ) -> None:
        """Record predictions as prefetch() does, without copying anything."""
        self._cache.predict(layer, list(experts), [] if scores is None else list(scores))

    def release(self, layer: int, experts: Sequence[int], stream: Any = 0) -> None:
        """`stream` has enqueued its last read of the experts' slots."""
        self._cache.release(layer, list(experts), *_stream_args(stream, self._device))

    def stats(self) -> dict[str, Any]:
        """Counters since creation or reset_stats(), as plain data; see the README."""
        stats = self._cache.stats()
        looked_up = stats["hits"] + stats["misses"]
        stats["hit_rate"] = stats["hits"] / looked_up if looked_up else 0.0
        return stats

    def reset_stats(self) -> None:
        self._cache.reset_stats()

    def resident(self, layer: int, expert: int) -> bool:
        """Whether the expert holds a slot: copied, or with its copy queued or in flight."""
        return self._cache.resident(layer, expert)

    def pending_prefetches(self) -> int:
        """Prefetch copies queued or in flight."""
        return self._cache.pending_prefetches()

    def slot_address(self, slot: int) -> int:
        """Device address of a slot; slots lie `slot_bytes` apart in one allocation."""
        return self._cache.slot_address(slot)

    @property
    def num_slots(self) -> int:
        return self._cache.num_slots

    @property
    def max_acquire(self) -> int:
        """The most experts one acquire may ask for (the slots less a static set)."""
        return self._cache.max_acquire

    @property
    def slot_bytes(self) -> int:
        return self._cache.slot_bytes

    @property
    def policy(self) -> str:
        return self._cache.policy

    @property
    def closed(self) -> bool:
        return self._cache.closed

    def close(self) -> None:
        """Waits for copies and released reads, then frees the slots. Idempotent."""
        self._cache.close()

    def __enter__(self) -> ExpertCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.num_slots} slots of {self.slot_bytes} bytes"
        return f"ExpertCache({state}, policy={self.policy!r}, device={self.pool.device!r})"
