"""Bad input raises the documented exception naming the value, and changes nothing.

After every error the cache still works: an acquire/release round trip returns the right
bytes.
"""

from __future__ import annotations

import re

import expertflow as ef
import numpy as np
import pytest

CUDA = ef.build_info()["backends"]["cuda"]


@pytest.fixture
def patterns(make_pool):
    return make_pool(2, 4, 1000)


@pytest.fixture
def cache(patterns):
    with ef.ExpertCache(patterns.pool, slots=3) as cache:
        yield cache


def unchanged(cache: ef.ExpertCache, before: dict) -> None:
    after = cache.stats()
    for stats in (before, after):
        stats.pop("stall_seconds")
    assert after == before


@pytest.mark.parametrize("layer", [2, -1, 100])
def test_unknown_layer(cache, patterns, round_trip, layer):
    before = cache.stats()
    message = rf"layer {layer} out of range \[0, 2\)"
    with pytest.raises(ValueError, match=message):
        cache.acquire(layer, [0])
    with pytest.raises(ValueError, match=message):
        cache.prefetch(layer, [0])
    with pytest.raises(ValueError, match=message):
        cache.release(layer, [0])
    with pytest.raises(ValueError, match=message):
        cache.resident(layer, 0)
    unchanged(cache, before)
    round_trip(cache, patterns)


@pytest.mark.parametrize("expert", [4, -1, 99])
def test_unknown_expert(cache, patterns, round_trip, expert):
    before = cache.stats()
    message = rf"expert id {expert} out of range \[0, 4\) at layer 1"
    with pytest.raises(ValueError, match=message):
        cache.acquire(1, [0, expert])  # the valid expert is not pinned either
    with pytest.raises(ValueError, match=message):
        cache.prefetch(1, [expert])
    with pytest.raises(ValueError, match=message):
        cache.resident(1, expert)
    unchanged(cache, before)
    assert not cache.resident(1, 0)
    round_trip(cache, patterns, 1, [0, 1, 2])  # every slot is free


def test_duplicate_expert_in_one_acquire(cache, patterns, round_trip):
    before = cache.stats()
    with pytest.raises(ValueError, match="expert id 2 appears twice at layer 0"):
        cache.acquire(0, [1, 2, 2])
    with pytest.raises(ValueError, match="expert id 3 appears twice at layer 1"):
        cache.prefetch(1, [3, 3])
    unchanged(cache, before)
    round_trip(cache, patterns, 0, [0, 1, 2])  # nothing was left pinned


def test_duplicate_expert_in_release(cache, patterns, round_trip):
    cache.acquire(0, [1])
    with pytest.raises(ValueError, match="expert id 1 appears twice at layer 0"):
        cache.release(0, [1, 1])
    cache.release(0, [1])  # still pinned once
    round_trip(cache, patterns, 0, [0, 1, 2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget of 0 bytes holds no slot"),
        ({"budget": "0GiB"}, "budget of 0 bytes holds no slot"),
        ({"slots": 0}, "number of slots must be positive, got 0"),
        ({"slots": -2}, "number of slots must be positive, got -2"),
    ],
)
def test_zero_budget_or_slots(patterns, round_trip, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ef.ExpertCache(patterns.pool, **kwargs)
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        round_trip(cache, patterns)


def test_more_experts_than_slots(cache, patterns, round_trip):
    before = cache.stats()
    message = "acquiring 4 experts at layer 1 needs 4 slots; the cache has 3"
    with pytest.raises(ValueError, match=message):
        cache.acquire(1, [0, 1, 2, 3])
    unchanged(cache, before)
    round_trip(cache, patterns, 1, [1, 2, 3])


def test_misaligned_buffer(patterns, aligned_array, round_trip):
    layout = patterns.layout
    array = aligned_array(layout.total_bytes + 64, offset=64)
    address = array.ctypes.data
    with pytest.raises(ValueError, match=f"0x{address:x} is not 256-byte aligned"):
        ef.HostPool(layout, buffer=array)
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        round_trip(cache, patterns)


def test_read_only_buffer(patterns, aligned_array, round_trip):
    layout = patterns.layout
    array = aligned_array(layout.total_bytes)
    array.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        ef.HostPool(layout, buffer=array)
    with pytest.raises(ValueError, match="writable"):
        ef.HostPool(layout, buffer=bytes(layout.total_bytes))
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        round_trip(cache, patterns)


def test_buffer_too_small(patterns, aligned_array, round_trip):
    layout = patterns.layout
    array = aligned_array(layout.total_bytes - 1)
    with pytest.raises(
        ValueError,
        match=f"{array.nbytes} bytes is smaller than the layout's {layout.total_bytes} bytes",
    ):
        ef.HostPool(layout, buffer=array)
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        round_trip(cache, patterns)


def test_release_not_acquired(cache, patterns, round_trip):
    with pytest.raises(ValueError, match="expert 2 at layer 0 is not acquired"):
        cache.release(0, [2])
    # Resident but no longer acquired.
    round_trip(cache, patterns, 0, [3])
    with pytest.raises(ValueError, match="expert 3 at layer 0 is not acquired"):
        cache.release(0, [3])
    # One good and one bad: neither is released.
    cache.acquire(1, [0])
    with pytest.raises(ValueError, match="expert 1 at layer 1 is not acquired"):
        cache.release(1, [0, 1])
    cache.release(1, [0])
    round_trip(cache, patterns, 0, [0, 1, 2])


def test_double_release(cache, patterns, round_trip):
    cache.acquire(0, [1, 2])
    cache.release(0, [1, 2])
    with pytest.raises(ValueError, match="expert 1 at layer 0 is not acquired"):
        cache.release(0, [1, 2])
    round_trip(cache, patterns, 0, [0, 1, 2])


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([0.5], "got 1 scores for 2 experts"),
        ([0.5, 0.5, 0.5], "got 3 scores for 2 experts"),
        ([0.5, -0.25], "score -0.25 for expert 3 at layer 1 must be a finite number >= 0"),
        ([float("nan"), 1.0], "score -?nan for expert 2 at layer 1 must be a finite number"),
        ([1.0, float("inf")], "score inf for expert 3 at layer 1 must be a finite number"),
    ],
)
def test_bad_prefetch_scores(cache, patterns, round_trip, scores, message):
    before = cache.stats()
    with pytest.raises(ValueError, match=message):
        cache.prefetch(1, [2, 3], scores)
    unchanged(cache, before)
    assert not cache.resident(1, 2) and not cache.resident(1, 3)
    round_trip(cache, patterns, 1, [2, 3])


def test_unknown_policy(patterns, round_trip):
    with pytest.raises(ValueError, match='unknown eviction policy "fifo"'):
        ef.ExpertCache(patterns.pool, slots=2, policy="fifo")
    with ef.ExpertCache(patterns.pool, slots=2, policy="lru") as cache:
        round_trip(cache, patterns)


def test_bad_lfu_decay(patterns, round_trip):
    with pytest.raises(ValueError, match="lfu decay must be in .*got 1.5"):
        ef.ExpertCache(patterns.pool, slots=2, policy="lfu", lfu_decay=1.5)
    with ef.ExpertCache(patterns.pool, slots=2, policy="lfu") as cache:
        round_trip(cache, patterns)


def test_static_set_too_large(patterns, round_trip):
    static = [(0, 0), (0, 1), (1, 0)]
    with pytest.raises(ValueError, match="static set of 3 experts needs at least 4 slots.*has 3"):
        ef.ExpertCache(patterns.pool, slots=3, policy="static", static_experts=static)
    with pytest.raises(ValueError, match="expert id 7 out of range"):
        ef.ExpertCache(patterns.pool, slots=4, policy="static", static_experts=[(0, 7)])
    with ef.ExpertCache(patterns.pool, slots=4, policy="static", static_experts=static) as cache:
        round_trip(cache, patterns)


def test_static_acquire_larger_than_the_streaming_slots(patterns, round_trip):
    static = [(0, 0), (1, 0)]
    with ef.ExpertCache(patterns.pool, slots=3, policy="static", static_experts=static) as cache:
        before = cache.stats()
        message = (
            "policy static keeps 2 experts resident, leaving 1 slots for the others; "
            "acquiring 2 of those at layer 0 needs 2"
        )
        with pytest.raises(ValueError, match=message):
            cache.acquire(0, [1, 2])
        unchanged(cache, before)
        round_trip(cache, patterns, 0, [0, 1], check_resident=False)  # set members don't count
        assert cache.resident(0, 0) and not cache.resident(0, 1)


def test_belady_future_diverges(patterns, round_trip):
    future = [(0, [0, 1]), (1, [2]), (0, [1])]
    with ef.ExpertCache(patterns.pool, slots=2, policy="belady", future=future) as cache:
        round_trip(cache, patterns, 0, [1, 0])  # order within a step does not matter
        before = cache.stats()
        with pytest.raises(ValueError, match="acquire 1 differs from the future"):
            cache.acquire(1, [3])
        with pytest.raises(ValueError, match="acquire 1 differs from the future"):
            cache.acquire(1, [2, 3])
        unchanged(cache, before)
        round_trip(cache, patterns, 1, [2])
        round_trip(cache, patterns, 0, [1])
        with pytest.raises(ValueError, match="belady knows 3 acquires but was asked for acquire 4"):
            cache.acquire(0, [1])
        assert cache.stats()["acquires"] == 3


def test_closed_cache(patterns):
    cache = ef.ExpertCache(patterns.pool, slots=2)
    cache.acquire(0, [0])
    cache.release(0, [0])
    cache.close()
    for call in (
        lambda: cache.acquire(0, [0]),
        lambda: cache.release(0, [0]),
        lambda: cache.prefetch(0, [1]),
        lambda: cache.resident(0, 0),
        lambda: cache.reset_stats(),
    ):
        with pytest.raises(RuntimeError, match="ExpertCache is closed"):
            call()
    assert cache.closed
    assert cache.stats()["acquires"] == 1


@pytest.mark.skipif(CUDA["usable"], reason="CUDA is usable here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda(patterns, round_trip, device):
    with pytest.raises(ValueError, match="CUDA") as error:
        ef.HostPool(patterns.layout, device)
    assert 'device "cpu"' in str(error.value)  # says what to do instead
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        round_trip(cache, patterns)


def test_link_model_on_cuda_is_rejected(patterns):
    # Checked before the device is looked at, so this holds with or without CUDA.
    with pytest.raises(ValueError, match="link model"):
        ef.HostPool(patterns.layout, "cuda", link_gbps=16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"link_gbps": -1.0}, "link bandwidth must be >= 0 GB/s, got -1"),
        ({"link_latency_us": -5.0}, "link latency must be >= 0 us, got -5"),
    ],
)
def test_bad_link_model(patterns, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ef.HostPool(patterns.layout, **kwargs)


class FakeStream:
    def __init__(self, handle: int, device: object = None) -> None:
        self.cuda_stream = handle
        if device is not None:
            self.device = device  # as torch.cuda.Stream has


class Device:
    """Duck-types torch.device: .type and .index."""

    def __init__(self, kind: str, index: int | None) -> None:
        self.type = kind
        self.index = index


def wrong_device(named: str) -> str:
    return f"stream 0x5000 belongs to {named}, but the cache is on cpu"


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (7, "pass stream 0, got 7"),
        (FakeStream(0xDEAD), f"pass stream 0, got {0xDEAD}"),
        # A stream object naming a CUDA device is refused by the facade, naming both
        # devices, before its handle reaches the core.
        (FakeStream(0x5000, Device("cuda", 1)), wrong_device("cuda:1")),
        (FakeStream(0x5000, "cuda:0"), wrong_device("cuda:0")),
        (FakeStream(0x5000, Device("cuda", None)), wrong_device("cuda")),
    ],
    ids=["int", "object", "cuda-device", "cuda-string", "cuda-no-index"],
)
def test_stream_on_cpu_backend(cache, patterns, round_trip, stream, message):
    message = re.escape(message)
    before = cache.stats()
    with pytest.raises(ValueError, match=message):
        cache.acquire(0, [1], stream=stream)
    unchanged(cache, before)
    cache.acquire(0, [1])
    with pytest.raises(ValueError, match=message):
        cache.release(0, [1], stream=stream)
    cache.release(0, [1])  # still pinned after the failed release
    round_trip(cache, patterns, 0, [0, 1, 2])


def test_stream_device_reaches_the_core(cache, patterns, round_trip):
    """The core refuses a stream said to be on a CUDA device too, naming it."""
    native = cache._cache
    with pytest.raises(ValueError, match="a stream of cuda:2 cannot be used with the CPU backend"):
        native.acquire(0, [1], 0, 2)
    native.acquire(0, [1], 0, -1)
    with pytest.raises(ValueError, match="a stream of cuda:2 cannot be used with the CPU backend"):
        native.release(0, [1], 0, 2)
    native.release(0, [1], 0, -1)
    round_trip(cache, patterns, 0, [0, 1, 2])


def test_a_cpu_stream_object_is_accepted_by_a_cpu_cache(cache, patterns, check_slots):
    stream = FakeStream(0, Device("cpu", None))
    check_slots(cache.acquire(0, [1, 2], stream=stream), 0, [1, 2], patterns)
    cache.release(0, [1, 2], stream=stream)


def test_bad_layout(patterns):
    with pytest.raises(ValueError, match="num_layers must be positive, got 0"):
        ef.ExpertLayout(0, 4, 100)
    with pytest.raises(ValueError, match="experts_per_layer must be positive, got -1"):
        ef.ExpertLayout(2, -1, 100)
    message = r"expected 4 expert sizes \(2 layers x 2 experts\), got 3"
    with pytest.raises(ValueError, match=message):
        ef.ExpertLayout(2, 2, [10, 20, 30])
    with pytest.raises(ValueError, match=r"expert \(layer 1, expert 0\) has size 0"):
        ef.ExpertLayout(2, 2, [10, 20, 0, 30])


def test_view_is_bounded(patterns):
    view = patterns.pool.view(1, 3)
    assert len(view) == 1000
    assert bytes(view) == patterns.blobs[(1, 3)]
    with pytest.raises(ValueError):
        view[:] = np.zeros(1001, np.uint8)


def test_parse_bytes_rejects_fractions_of_a_byte_and_floats():
    with pytest.raises(ValueError, match="1.5B"):
        ef.parse_bytes("1.5B")
    with pytest.raises(ValueError, match="1.5"):
        ef.parse_bytes(1.5)
    assert ef.parse_bytes("1.5KiB") == 1536


def test_non_contiguous_buffer_is_a_value_error():
    layout = ef.ExpertLayout(1, 2, 256)
    strided = np.zeros(4 * layout.total_bytes, dtype=np.uint8)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        ef.HostPool(layout, buffer=strided)


def test_core_errors_hide_the_source_location(cache, monkeypatch):
    """The message is for users; where the core threw it is in the notes (for bug reports),
    and in the message only with EXPERTFLOW_DEBUG=1. No absolute build path either way."""
    monkeypatch.delenv("EXPERTFLOW_DEBUG", raising=False)
    with pytest.raises(ValueError) as plain:
        cache.acquire(7, [0])
    assert str(plain.value) == "layer 7 out of range [0, 2)"
    (note,) = plain.value.__notes__
    assert re.search(r" csrc/src/\S+\.cpp:\d+ ", note)

    monkeypatch.setenv("EXPERTFLOW_DEBUG", "1")
    with pytest.raises(ValueError) as debug:
        cache.acquire(7, [0])
    assert re.fullmatch(
        r"layer 7 out of range \[0, 2\) \(csrc/src/\S+\.cpp:\d+\)", str(debug.value)
    )
    assert not hasattr(debug.value, "__notes__")
