"""Several Python threads share one cache; the GIL is released inside its calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import expertflow as ef
import numpy as np
import pytest
from conftest import hit_counters

NUM_THREADS = 6
OPS_PER_THREAD = 600
NUM_LAYERS, EXPERTS = 4, 8


def worker(
    cache: ef.ExpertCache,
    patterns: Any,
    check_slots: Callable[..., None],
    seed: int,
    counts: dict,
    errors: list,
    start: threading.Barrier,
) -> None:
    rng = np.random.default_rng(seed)
    acquires = experts_acquired = 0
    try:
        start.wait()
        for _ in range(OPS_PER_THREAD):
            layer = int(rng.integers(NUM_LAYERS))
            k = int(rng.integers(1, 4))
            chosen = [int(e) for e in rng.choice(EXPERTS, size=k, replace=False)]
            if rng.random() < 0.3:
                cache.prefetch(layer, chosen, [float(s) for s in rng.random(k)])
                continue
            addresses = cache.acquire(layer, chosen)
            check_slots(addresses, layer, chosen, patterns)
            acquires += 1
            experts_acquired += k
            if rng.random() < 0.2:
                time.sleep(0)  # hold the pins across a thread switch
            check_slots(addresses, layer, chosen, patterns)
            cache.release(layer, chosen)
    except BaseException as error:  # noqa: BLE001 -- re-raised by the main thread
        errors.append(error)
    finally:
        counts[seed] = (acquires, experts_acquired)


@pytest.mark.parametrize("policy", ["lru", "lfu", "static", "expertflow"])
def test_concurrent_acquire_prefetch_release(make_pool, check_slots, rng, policy):
    sizes = [int(s) for s in rng.integers(200, 2048, NUM_LAYERS * EXPERTS)]
    patterns = make_pool(NUM_LAYERS, EXPERTS, sizes)
    counts: dict = {}
    errors: list = []
    start = threading.Barrier(NUM_THREADS)
    # Fewer slots than the experts in use, so that threads evict each other's experts;
    # enough for every thread to hold its largest acquire at once.
    static = {"static_experts": [(0, 0), (1, 1), (2, 2), (3, 3)]} if policy == "static" else {}
    with ef.ExpertCache(
        patterns.pool, slots=3 * NUM_THREADS, policy=policy, prefetch_streams=2, **static
    ) as cache:
        threads = [
            threading.Thread(
                target=worker,
                args=(cache, patterns, check_slots, seed, counts, errors, start),
            )
            for seed in range(NUM_THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert not any(thread.is_alive() for thread in threads), "a thread hung"
        if errors:
            raise errors[0]
        stats = cache.stats()
        assert stats["acquires"] == sum(a for a, _ in counts.values())
        assert stats["hits"] + stats["misses"] == sum(k for _, k in counts.values())
        assert stats["misses"] > 0
        assert stats["evictions"] > 0 or policy == "static"
        assert stats["prefetch_used"] <= stats["prefetch_issued"]
        assert stats["prefetch_wasted"] <= stats["prefetch_issued"]
        # Nothing is left pinned or loading: whole layers still fit.
        for layer in range(NUM_LAYERS):
            experts = list(range(EXPERTS))
            check_slots(cache.acquire(layer, experts), layer, experts, patterns)
            cache.release(layer, experts)


def test_blocked_acquire_releases_the_gil(make_pool, check_slots):
    """An acquire waiting for a slot must not hold the GIL, or the thread that would
    release the slot could never run."""
    patterns = make_pool(1, 4)
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        cache.acquire(0, [0, 1])  # every slot pinned by this thread
        result: dict = {}

        def blocked() -> None:
            try:
                result["addresses"] = cache.acquire(0, [2])
            except BaseException as error:  # noqa: BLE001 -- checked by the main thread
                result["error"] = error

        thread = threading.Thread(target=blocked)
        thread.start()
        time.sleep(0.1)
        assert thread.is_alive(), "acquire returned while every slot was pinned"
        assert "error" not in result
        cache.release(0, [1])  # needs the GIL while the other thread waits
        thread.join(timeout=5)
        assert not thread.is_alive()
        if "error" in result:
            raise result["error"]
        check_slots(result["addresses"], 0, [2], patterns)
        check_slots(cache.acquire(0, [0]), 0, [0], patterns)  # still pinned once more: hit
        cache.release(0, [0, 2])
        cache.release(0, [0])
        assert cache.stats()["evictions"] == 1


def test_close_wakes_a_blocked_acquire(make_pool):
    patterns = make_pool(1, 4)
    cache = ef.ExpertCache(patterns.pool, slots=1)
    cache.acquire(0, [0])
    result: dict = {}

    def blocked() -> None:
        try:
            cache.acquire(0, [1])
        except BaseException as error:  # noqa: BLE001 -- checked by the main thread
            result["error"] = error

    thread = threading.Thread(target=blocked)
    thread.start()
    time.sleep(0.1)
    assert thread.is_alive()
    cache.close()
    thread.join(timeout=5)
    assert not thread.is_alive(), "close() did not wake the waiting acquire"
    assert isinstance(result.get("error"), RuntimeError)
    assert "closed" in str(result["error"])


def test_waiting_on_another_callers_copy_is_a_hit(make_pool, check_slots):
    """Each demand copy is one miss, whoever issues it; an acquire that finds the copy
    decided or under way for another caller is a hit (it still waits for the bytes)."""
    patterns = make_pool(1, 4, 1000, link_gbps=5e-6)  # each copy takes about 200 ms
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        result: dict = {}
        first = threading.Thread(target=lambda: result.update(a=cache.acquire(0, [0, 1])))
        first.start()
        time.sleep(0.03)  # copying expert 0; expert 1 has its slot but no copy yet
        check_slots(cache.acquire(0, [1]), 0, [1], patterns)
        first.join(timeout=5)
        check_slots(result["a"], 0, [0, 1], patterns)
        cache.release(0, [0, 1])
        cache.release(0, [1])
        stats = cache.stats()
        assert stats["misses"] == 2  # two demand copies
        assert stats["hits"] == 1  # expert 1, the second time
        assert hit_counters(stats["layers"][0]) == {
            "hits": 1,
            "prefetch_hits": 0,
            "misses": 2,
            "predicted": 0,
            "predicted_used": 0,
        }


@pytest.mark.parametrize("busy", ["pinned", "prefetching"])
def test_static_waits_for_a_streaming_slot(make_pool, check_slots, busy):
    """A streaming slot that is pinned by another caller or loading a prefetch is waited
    for, as with any other policy."""
    patterns = make_pool(1, 4, 1000, link_gbps=5e-6)  # each copy takes about 200 ms
    with ef.ExpertCache(patterns.pool, slots=2, policy="static", static_experts=[(0, 0)]) as cache:
        cache.acquire(0, [0])  # the set member takes one slot, one slot streams the rest
        cache.release(0, [0])
        if busy == "pinned":
            cache.acquire(0, [1])
            timer = threading.Timer(0.1, lambda: cache.release(0, [1]))
            timer.start()
        else:
            cache.prefetch(0, [1])  # in flight for about 200 ms
        try:
            check_slots(cache.acquire(0, [2]), 0, [2], patterns)
            cache.release(0, [2])
        finally:
            if busy == "pinned":
                timer.join()


def race_close(cache: ef.ExpertCache, delay: float, threads: int = 4) -> list[BaseException]:
    """Threads acquire and release until close() runs under them; returns what else failed."""
    errors: list[BaseException] = []
    started = threading.Barrier(threads + 1)

    def work(offset: int) -> None:
        started.wait()
        for i in range(100_000):
            experts = [(offset + i) % 8]
            try:
                cache.acquire(i % 2, experts)
                cache.release(i % 2, experts)
            except RuntimeError as error:
                if "closed" not in str(error):
                    errors.append(error)
                return

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    started.wait()
    time.sleep(delay)
    cache.close()
    for worker in workers:
        worker.join()
    return errors


@pytest.mark.parametrize("delay", [0.0, 0.002])
def test_close_during_acquires(make_pool, delay):
    """Every call either completes or says the cache is closed; nothing else fails."""
    patterns = make_pool(2, 8, 4096)
    assert race_close(ef.ExpertCache(patterns.pool, slots=6), delay) == []
