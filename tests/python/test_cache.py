"""ExpertCache on the CPU backend: contents, sizing, statistics, lifetime, buffers, streams."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

import expertflow as ef
import numpy as np
import pytest
from conftest import hit_counters

POLICIES = ["lru", "lfu", "static", "expertflow", "belady"]
COUNTERS = [
    "acquires",
    "hits",
    "prefetch_hits",
    "misses",
    "evictions",
    "prefetch_issued",
    "prefetch_used",
    "prefetch_wasted",
    "prefetch_cancelled",
    "prefetch_dropped",
    "bytes_demand",
    "bytes_prefetch",
]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a prefetch copy"
        time.sleep(0.001)


def routing(rng: np.random.Generator, num_layers: int, experts: int, steps: int):
    """A model-like trace: layers in order, 1 to 3 distinct experts each."""
    trace = []
    for step in range(steps):
        k = int(rng.integers(1, 4))
        chosen = rng.choice(experts, size=k, replace=False)
        trace.append((step % num_layers, [int(e) for e in chosen]))
    return trace


@pytest.mark.parametrize("prefetch", [False, True], ids=["demand", "prefetch"])
@pytest.mark.parametrize("policy", POLICIES)
def test_acquire_returns_expert_bytes(make_pool, check_slots, rng, policy, prefetch):
    # Sizes differ per expert; one is the largest, so slots hold 1024 bytes.
    num_layers, experts = 3, 6
    sizes = [int(s) for s in rng.integers(300, 1000, num_layers * experts)]
    sizes[7] = 1000
    patterns = make_pool(num_layers, experts, sizes)
    trace = routing(rng, num_layers, experts, 60)
    trace[0] = (0, [0, 1])  # the static set is used early and then kept
    trace[1] = (1, [0])
    options = {
        "static": {"static_experts": [(0, 0), (1, 0)]},
        "belady": {"future": trace},
        "lfu": {"lfu_decay": 0.5, "lfu_decay_period": 7},
    }.get(policy, {})
    with ef.ExpertCache(patterns.pool, slots=5, policy=policy, **options) as cache:
        assert cache.policy == policy
        assert cache.num_slots == 5
        assert cache.slot_bytes == 1024
        for step, (layer, chosen) in enumerate(trace):
            if prefetch and step + 1 < len(trace):
                next_layer, next_experts = trace[step + 1]
                scores = [float(s) for s in rng.random(len(next_experts))]
                cache.prefetch(next_layer, next_experts, scores)
            addresses = cache.acquire(layer, chosen)
            check_slots(addresses, layer, chosen, patterns)
            assert all(a % 256 == 0 for a in addresses)
            cache.release(layer, chosen)
        stats = cache.stats()
        assert stats["acquires"] == len(trace)
        assert stats["hits"] + stats["misses"] == sum(len(chosen) for _, chosen in trace)
        if policy != "static":
            assert stats["evictions"] > 0
        elif not prefetch:
            # Static drops streamed experts on release instead of evicting them later.
            assert stats["evictions"] == 0
        for key in ("hits", "misses", "prefetch_hits"):
            assert sum(layer[key] for layer in stats["layers"]) == stats[key]
        if not prefetch:
            assert stats["prefetch_issued"] == stats["bytes_prefetch"] == 0
        if policy == "static":
            assert cache.resident(0, 0) and cache.resident(1, 0)


def test_static_keeps_its_set_and_streams_the_rest(make_pool, round_trip):
    patterns = make_pool(2, 4)
    # Two slots for the set, two that stream everything else.
    with ef.ExpertCache(
        patterns.pool, slots=4, policy="static", static_experts=[(0, 0), (1, 1)]
    ) as cache:
        for layer, experts in [(0, [0, 2]), (1, [1, 3]), (0, [1, 3]), (1, [0, 2])]:
            round_trip(cache, patterns, layer, experts, check_resident=False)
        assert cache.resident(0, 0) and cache.resident(1, 1)
        # Experts outside the set are dropped on release.
        assert not any(cache.resident(l, e) for l, e in [(0, 2), (1, 3), (0, 1), (0, 3), (1, 2)])


def test_lru_hand_worked_sequence(make_pool, check_slots):
    # One layer's experts, two slots, each acquire released before the next. Ticks in ():
    #   acquire 0: miss, empty slot          slots {0(1)}
    #   acquire 1: miss, empty slot          slots {0(1), 1(2)}
    #   acquire 0: hit                        slots {0(3), 1(2)}
    #   acquire 2: miss, evicts 1 (LRU)      slots {0(3), 2(4)}
    #   acquire 1: miss, evicts 0            slots {1(5), 2(4)}
    #   acquire 2: hit                        slots {1(5), 2(6)}
    #   acquire 0: miss, evicts 1            slots {0(7), 2(6)}
    # Totals: 7 acquires, 2 hits, 5 misses, 3 evictions; 0 and 2 stay resident.
    patterns = make_pool(2, 4, 1000)
    cache = ef.ExpertCache(patterns.pool, slots=2, policy="lru")
    expected_hit = [False, False, True, False, False, True, False]
    for expert, hit in zip([0, 1, 0, 2, 1, 2, 0], expected_hit):
        assert cache.resident(0, expert) == hit
        check_slots(cache.acquire(0, [expert]), 0, [expert], patterns)
        cache.release(0, [expert])
    stats = cache.stats()
    assert {k: stats[k] for k in ("acquires", "hits", "misses", "evictions")} == {
        "acquires": 7,
        "hits": 2,
        "misses": 5,
        "evictions": 3,
    }
    assert stats["bytes_demand"] == 5 * 1000
    assert stats["hit_rate"] == pytest.approx(2 / 7)
    assert [hit_counters(layer) for layer in stats["layers"]] == [
        {"hits": 2, "prefetch_hits": 0, "misses": 5, "predicted": 0, "predicted_used": 0},
        {"hits": 0, "prefetch_hits": 0, "misses": 0, "predicted": 0, "predicted_used": 0},
    ]
    assert [cache.resident(0, e) for e in range(4)] == [True, False, True, False]
    cache.close()


def test_budget_sizes_slots(make_pool):
    patterns = make_pool(2, 4, 1000)  # slots are rounded up to 256 bytes: 1024
    for budget, slots in [(3 * 1024, 3), (4 * 1024 - 1, 3), ("3KiB", 3), ("1KiB", 1), ("8192", 8)]:
        with ef.ExpertCache(patterns.pool, budget=budget) as cache:
            assert cache.num_slots == slots, budget
            assert cache.slot_bytes == 1024


@pytest.mark.parametrize("budget", [1023, "1023B", "0.5KiB", 0])
def test_budget_too_small(make_pool, budget):
    patterns = make_pool(2, 4, 1000)
    nbytes = ef.parse_bytes(budget)
    with pytest.raises(ValueError, match=rf"budget of {nbytes} bytes holds no slot.*1024 bytes"):
        ef.ExpertCache(patterns.pool, budget=budget)


def test_slots_or_budget_exactly_one(make_pool):
    patterns = make_pool()
    with pytest.raises(ValueError, match="exactly one of slots= or budget="):
        ef.ExpertCache(patterns.pool, slots=2, budget="1MiB")
    with pytest.raises(ValueError, match="exactly one of slots= or budget="):
        ef.ExpertCache(patterns.pool)


def test_prefetch_then_acquire_counts_prefetch_hits(make_pool, check_slots):
    patterns = make_pool(2, 4, 1000)
    layout = patterns.layout
    with ef.ExpertCache(patterns.pool, slots=4, policy="expertflow") as cache:
        cache.prefetch(1, [2, 3], [0.9, 0.4])
        expected_bytes = layout.bytes(1, 2) + layout.bytes(1, 3)
        # resident() turns true when the copy is queued; bytes_prefetch counts it once
        # issued, which on the CPU backend means done.
        wait_for(lambda: cache.resident(1, 2) and cache.resident(1, 3))
        wait_for(lambda: cache.stats()["bytes_prefetch"] == expected_bytes)
        stats = cache.stats()
        assert stats["prefetch_issued"] == 2
        assert stats["misses"] == stats["hits"] == 0

        check_slots(cache.acquire(1, [3, 2]), 1, [3, 2], patterns)
        cache.release(1, [3, 2])
        stats = cache.stats()
        assert stats["hits"] == 2 and stats["misses"] == 0
        assert stats["prefetch_hits"] == stats["prefetch_used"] == 2
        assert stats["prefetch_wasted"] == stats["prefetch_cancelled"] == 0
        assert hit_counters(stats["layers"][1]) == {
            "hits": 2,
            "prefetch_hits": 2,
            "misses": 0,
            "predicted": 2,
            "predicted_used": 2,
        }
        assert stats["bytes_demand"] == 0
        # A second acquire is an ordinary hit.
        cache.acquire(1, [2])
        cache.release(1, [2])
        assert cache.stats()["prefetch_hits"] == 2
        assert cache.stats()["hits"] == 3


def test_prefetch_of_resident_expert_copies_nothing(make_pool):
    patterns = make_pool(2, 4)
    with ef.ExpertCache(patterns.pool, slots=3) as cache:
        cache.acquire(0, [1])
        cache.release(0, [1])
        cache.prefetch(0, [1])
        assert cache.stats()["prefetch_issued"] == 0


def test_stats_layers_per_layer(make_pool):
    patterns = make_pool(3, 4)
    with ef.ExpertCache(patterns.pool, slots=4) as cache:
        stats = cache.stats()
        assert len(stats["layers"]) == 3
        assert all(sum(layer.values()) == 0 for layer in stats["layers"])
        for layer, experts in [(0, [0, 1]), (2, [3]), (0, [1])]:
            cache.acquire(layer, experts)
            cache.release(layer, experts)
        layers = cache.stats()["layers"]
        assert [hit_counters(layer) for layer in layers] == [
            {"hits": 1, "prefetch_hits": 0, "misses": 2, "predicted": 0, "predicted_used": 0},
            {"hits": 0, "prefetch_hits": 0, "misses": 0, "predicted": 0, "predicted_used": 0},
            {"hits": 0, "prefetch_hits": 0, "misses": 1, "predicted": 0, "predicted_used": 0},
        ]


def test_reset_stats(make_pool):
    patterns = make_pool(2, 4)
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        for expert in [0, 1, 2, 0]:
            cache.acquire(0, [expert])
            cache.release(0, [expert])
        assert cache.stats()["evictions"] > 0
        cache.reset_stats()
        stats = cache.stats()
        assert all(stats[key] == 0 for key in COUNTERS)
        assert stats["stall_seconds"] == 0.0
        assert stats["hit_rate"] == 0.0
        assert len(stats["layers"]) == 2
        assert all(sum(layer.values()) == 0 for layer in stats["layers"])
        # Resetting counters does not empty the slots.
        cache.acquire(0, [0])
        cache.release(0, [0])
        assert cache.stats()["hits"] == 1


def test_hit_rate(make_pool):
    patterns = make_pool(2, 4)
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        assert cache.stats()["hit_rate"] == 0.0  # nothing looked up yet: no division by zero
        cache.acquire(0, [0, 1])  # 2 misses
        cache.release(0, [0, 1])
        assert cache.stats()["hit_rate"] == 0.0
        cache.acquire(0, [0, 1])  # 2 hits
        cache.release(0, [0, 1])
        assert cache.stats()["hit_rate"] == pytest.approx(0.5)
        cache.acquire(0, [1])
        cache.release(0, [1])
        assert cache.stats()["hit_rate"] == pytest.approx(3 / 5)


def test_context_manager_closes(make_pool, check_slots):
    patterns = make_pool(2, 4)
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        assert isinstance(cache, ef.ExpertCache)
        assert not cache.closed
        check_slots(cache.acquire(1, [3]), 1, [3], patterns)
        cache.release(1, [3])
    assert cache.closed
    assert "closed" in repr(cache)
    with pytest.raises(RuntimeError, match="closed"):
        cache.acquire(1, [3])
    cache.close()  # idempotent
    assert cache.stats()["acquires"] == 1  # counters stay readable


def test_context_manager_closes_on_error(make_pool):
    patterns = make_pool(2, 4)
    with pytest.raises(KeyError), ef.ExpertCache(patterns.pool, slots=2) as cache:
        cache.acquire(0, [0])
        raise KeyError("boom")
    assert cache.closed


def test_close_with_experts_still_acquired(make_pool):
    patterns = make_pool(2, 4)
    cache = ef.ExpertCache(patterns.pool, slots=2)
    cache.acquire(0, [0, 1])
    cache.prefetch(1, [2])
    cache.close()
    assert cache.closed


def test_buffer_pool_wraps_numpy_without_copy(make_pool, check_slots, rng):
    patterns = make_pool(2, 4, 1000, buffer=True)
    array, pool, layout = patterns.buffer, patterns.pool, patterns.layout
    assert pool.address == array.ctypes.data
    assert pool.address % 256 == 0
    assert pool.nbytes == array.nbytes == layout.total_bytes
    assert not pool._pool.owns_memory
    for layer in range(2):
        for expert in range(4):
            offset = layout.offset(layer, expert)
            assert pool.blob_address(layer, expert) == array.ctypes.data + offset

    def write(layer: int, expert: int) -> None:
        """Writes new bytes through the numpy array only."""
        new = rng.integers(0, 256, layout.bytes(layer, expert), dtype=np.uint8)
        offset = layout.offset(layer, expert)
        array[offset : offset + new.size] = new
        patterns.blobs[(layer, expert)] = new.tobytes()

    with ef.ExpertCache(pool, slots=2) as cache:
        write(1, 2)  # before its first copy
        check_slots(cache.acquire(1, [2]), 1, [2], patterns)
        cache.release(1, [2])
        for expert in (0, 1):  # evicts (1, 2)
            cache.acquire(0, [expert])
            cache.release(0, [expert])
        assert not cache.resident(1, 2)
        write(1, 2)
        check_slots(cache.acquire(1, [2]), 1, [2], patterns)
        cache.release(1, [2])
        # The pool's own view is the same memory.
        assert bytes(pool.view(1, 2)) == patterns.blobs[(1, 2)]


def test_buffer_larger_than_layout(aligned_array):
    layout = ef.ExpertLayout(1, 3, 512)
    array = aligned_array(layout.total_bytes + 4096)
    array[:] = np.arange(array.size) % 251 + 1
    pool = ef.HostPool(layout, buffer=array)
    assert pool.nbytes == array.nbytes
    with ef.ExpertCache(pool, slots=1) as cache:
        address = cache.acquire(0, [2])[0]
        offset = layout.offset(0, 2)
        assert ctypes.string_at(address, 512) == array[offset : offset + 512].tobytes()
        cache.release(0, [2])


class FakeStream:
    """Duck-types torch.cuda.Stream: the handle is in .cuda_stream."""

    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle


def test_stream_objects_are_accepted(make_pool, check_slots):
    patterns = make_pool(2, 4)
    with ef.ExpertCache(patterns.pool, slots=3) as cache:
        stream = FakeStream(0)
        check_slots(cache.acquire(0, [1, 2], stream=stream), 0, [1, 2], patterns)
        cache.release(0, [1, 2], stream=stream)
        check_slots(cache.acquire(0, [2], stream=0), 0, [2], patterns)
        cache.release(0, [2], stream=FakeStream(0))
        assert cache.stats()["acquires"] == 2


def test_repr_and_properties(make_pool):
    patterns = make_pool(2, 4, 1000)
    assert "2 layers x 4 experts" in repr(patterns.pool)
    assert patterns.pool.device == "cpu"
    with ef.ExpertCache(patterns.pool, slots=2, policy="lfu") as cache:
        assert repr(cache) == "ExpertCache(2 slots of 1024 bytes, policy='lfu', device='cpu')"
        assert cache.pool is patterns.pool


def test_link_model_paces_copies(make_pool, check_slots):
    # 1 MB/s for 2 x 1000 bytes: at least 2 ms of emulated link time, counted as stall.
    patterns = make_pool(1, 2, 1000, link_gbps=0.001, link_latency_us=100)
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        start = time.perf_counter()
        check_slots(cache.acquire(0, [0, 1]), 0, [0, 1], patterns)
        assert time.perf_counter() - start >= 0.002
        assert cache.stats()["stall_seconds"] >= 0.002
        cache.release(0, [0, 1])
