"""Shared fixtures: host pools whose every blob holds its own random bytes, and slot checks.

CUDA tests carry the `cuda` marker and are skipped, with build_info()'s reason, when the
build says CUDA is not usable here. Nothing is skipped by matching error text.
"""

from __future__ import annotations

import ctypes
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import expertflow as ef
import numpy as np
import pytest

ALIGNMENT = 256


def hit_counters(counters: dict) -> dict:
    """The counters of stats() that hand-worked sequences check."""
    keys = ("hits", "prefetch_hits", "misses", "predicted", "predicted_used")
    return {key: counters[key] for key in keys}


@pytest.fixture(scope="module")
def one_thread():
    """For tiny models one intra-op thread is as fast, and far faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = ef.build_info()["backends"]["cuda"]
    if cuda["usable"]:
        return
    skip = pytest.mark.skip(reason=cuda["reason"])
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@dataclass
class PatternPool:
    """A HostPool and the bytes each of its blobs was filled with."""

    pool: ef.HostPool
    blobs: dict[tuple[int, int], bytes]
    buffer: np.ndarray | None = None  # the caller's memory, for pools made with buffer=

    @property
    def layout(self) -> ef.ExpertLayout:
        return self.pool.layout

    def rewrite(self, layer: int, expert: int, rng: np.random.Generator) -> bytes:
        """Gives one blob fresh random bytes, in place; returns them."""
        new = random_blob(rng, self.layout.bytes(layer, expert), avoid=self.blobs[(layer, expert)])
        self.pool.view(layer, expert)[:] = new
        self.blobs[(layer, expert)] = new
        return new


def random_blob(rng: np.random.Generator, nbytes: int, avoid: bytes | None = None) -> bytes:
    """Random bytes, never all zeros and never equal to `avoid`."""
    while True:
        blob = rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()
        if blob != avoid and any(blob):
            return blob


def make_aligned_array(nbytes: int, alignment: int = ALIGNMENT, offset: int = 0) -> np.ndarray:
    """A writable uint8 array of nbytes whose data starts `offset` bytes past an aligned
    address (offset 0: aligned)."""
    raw = np.empty(nbytes + 2 * alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment + offset
    array = raw[start : start + nbytes]
    assert (array.ctypes.data - offset) % alignment == 0
    return array


@pytest.fixture
def aligned_array() -> Callable[..., np.ndarray]:
    """aligned_array(nbytes, offset=0): a uint8 array starting `offset` bytes past a
    256-byte boundary."""
    return make_aligned_array


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random bytes per test, reproducible from the test's name."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def make_pool(rng: np.random.Generator) -> Callable[..., PatternPool]:
    """make_pool(num_layers, experts_per_layer, expert_bytes, device=, buffer=, **kw).

    expert_bytes is one size or a layer-major list of sizes. With buffer=True the pool
    wraps a 256-byte aligned numpy array that was filled first (HostPool(buffer=...)).
    Every blob gets its own random bytes.
    """

    def make(
        num_layers: int = 2,
        experts_per_layer: int = 4,
        expert_bytes: int | Sequence[int] = 1000,
        *,
        device: str = "cpu",
        buffer: bool = False,
        **pool_kwargs: Any,
    ) -> PatternPool:
        sizes = expert_bytes if isinstance(expert_bytes, int) else list(expert_bytes)
        layout = ef.ExpertLayout(num_layers, experts_per_layer, sizes)
        blobs = {
            (layer, expert): random_blob(rng, layout.bytes(layer, expert))
            for layer in range(num_layers)
            for expert in range(experts_per_layer)
        }
        if not buffer:
            pool = ef.HostPool(layout, device, **pool_kwargs)
            for (layer, expert), blob in blobs.items():
                pool.view(layer, expert)[:] = blob
            return PatternPool(pool, blobs)
        array = make_aligned_array(layout.total_bytes)
        array[:] = rng.integers(0, 256, array.size, dtype=np.uint8)  # padding too: no zeros
        for (layer, expert), blob in blobs.items():
            offset = layout.offset(layer, expert)
            array[offset : offset + len(blob)] = np.frombuffer(blob, np.uint8)
        pool = ef.HostPool(layout, device, buffer=array, **pool_kwargs)
        return PatternPool(pool, blobs, array)

    return make


def read_slot(address: int, nbytes: int) -> bytes:
    """The bytes at a CPU-backend slot address."""
    assert address != 0
    return ctypes.string_at(address, nbytes)


def assert_slots(
    addresses: Sequence[int], layer: int, experts: Sequence[int], patterns: PatternPool
) -> None:
    """Each address holds the blob of the expert at the same position."""
    assert len(addresses) == len(experts)
    assert len(set(addresses)) == len(addresses), "two experts share a slot"
    for address, expert in zip(addresses, experts):
        expected = patterns.blobs[(layer, expert)]
        got = read_slot(address, len(expected))
        assert got == expected, f"slot {address:#x} does not hold expert {expert} of layer {layer}"


@pytest.fixture
def check_slots() -> Callable[[Sequence[int], int, Sequence[int], PatternPool], None]:
    """check_slots(addresses, layer, experts, patterns): the slots hold those experts' blobs."""
    return assert_slots


@pytest.fixture
def round_trip(check_slots: Callable[..., None]) -> Callable[..., None]:
    """round_trip(cache, patterns, layer=0, experts=(0, 1)): acquire, check bytes, release.

    Used after every error to show that the cache still works.
    """

    def run(
        cache: ef.ExpertCache,
        patterns: PatternPool,
        layer: int = 0,
        experts: Sequence[int] = (0, 1),
        *,
        check_resident: bool = True,
    ) -> None:
        addresses = cache.acquire(layer, experts)
        check_slots(addresses, layer, experts, patterns)
        cache.release(layer, experts)
        if check_resident:
            for expert in experts:
                assert cache.resident(layer, expert)

    return run
