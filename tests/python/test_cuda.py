"""The CUDA backend. Every test here is marked `cuda` and is skipped, with build_info()'s
reason, where the build says CUDA is not usable.

Slot contents are read back with the CUDA runtime (libcudart through ctypes) or, for the
stream tests, with torch; tests that need one and find none are skipped, as are those that
need two devices on a machine with one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import time

import expertflow as ef
import pytest
from test_threads import race_close

pytestmark = pytest.mark.cuda

CUDA_MEMCPY_DEVICE_TO_HOST = 2


def load_cudart() -> ctypes.CDLL | None:
    names = [
        ctypes.util.find_library("cudart"),
        "libcudart.so",
        "libcudart.so.13",
        "libcudart.so.12",
    ]
    for root in [os.environ.get("CUDA_HOME", "/usr/local/cuda"), *sys.path]:
        names += sorted(glob.glob(os.path.join(root, "lib64", "libcudart.so*")))
        names += sorted(
            glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*"))
        )
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemcpy.restype = ctypes.c_int
        return lib
    return None


@pytest.fixture(scope="module")
def cudart() -> ctypes.CDLL:
    lib = load_cudart()
    if lib is None:
        pytest.skip("no libcudart to read device memory back with")
    return lib


def read_device(cudart: ctypes.CDLL, address: int, nbytes: int) -> bytes:
    """Synchronous copy on the legacy default stream, which acquire(stream=0) ordered."""
    host = ctypes.create_string_buffer(nbytes)
    status = cudart.cudaMemcpy(host, ctypes.c_void_p(address), nbytes, CUDA_MEMCPY_DEVICE_TO_HOST)
    assert status == 0, f"cudaMemcpy failed with error {status}"
    return host.raw


def test_build_info_reports_cuda_usable():
    info = ef.build_info()
    cuda = info["backends"]["cuda"]
    assert cuda["built"] and cuda["usable"]
    assert cuda["reason"] == ""
    assert cuda["device_count"] >= 1
    assert info["cuda_runtime"]


def test_cuda_cache_stats_and_residency(make_pool):
    patterns = make_pool(2, 4, 4000, device="cuda")
    assert patterns.pool.device == "cuda:0"
    with ef.ExpertCache(patterns.pool, slots=2, policy="lru") as cache:
        assert cache.slot_bytes == 4096
        for expert, hit in zip([0, 1, 0, 2, 1, 2, 0], [0, 0, 1, 0, 0, 1, 0]):
            assert cache.resident(0, expert) == bool(hit)
            addresses = cache.acquire(0, [expert])
            assert addresses[0] != 0 and addresses[0] % 256 == 0
            cache.release(0, [expert])
        stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["evictions"]) == (2, 5, 3)
        assert stats["bytes_demand"] == 5 * 4000
        layer = stats["layers"][0]
        assert (layer["hits"], layer["prefetch_hits"], layer["misses"]) == (2, 0, 5)
        assert stats["layers"][1]["misses"] == 0

        cache.prefetch(1, [3])
        deadline = time.monotonic() + 5
        while cache.stats()["bytes_prefetch"] != 4000:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        cache.acquire(1, [3])
        cache.release(1, [3])
        stats = cache.stats()
        assert stats["prefetch_hits"] == stats["prefetch_used"] == 1
    assert cache.closed


def test_cuda_slots_hold_expert_bytes(make_pool, cudart):
    patterns = make_pool(2, 6, [3000 + 100 * i for i in range(12)], device="cuda")
    with ef.ExpertCache(patterns.pool, slots=3, policy="expertflow") as cache:
        for layer, experts in [(0, [0, 1]), (1, [5]), (0, [2, 3, 4]), (1, [0, 5]), (0, [1])]:
            cache.prefetch((layer + 1) % 2, [2])
            addresses = cache.acquire(layer, experts)
            for address, expert in zip(addresses, experts):
                expected = patterns.blobs[(layer, expert)]
                assert read_device(cudart, address, len(expected)) == expected
            cache.release(layer, experts)


def test_cuda_pool_on_caller_buffer(make_pool, cudart):
    patterns = make_pool(1, 4, 2048, device="cuda", buffer=True)
    assert patterns.pool.address == patterns.buffer.ctypes.data
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        for experts in ([0, 1], [2, 3], [1]):
            addresses = cache.acquire(0, experts)
            for address, expert in zip(addresses, experts):
                assert read_device(cudart, address, 2048) == patterns.blobs[(0, expert)]
            cache.release(0, experts)


class DeviceBytes:
    """Exposes device memory to torch.as_tensor through __cuda_array_interface__."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


def test_torch_stream_object(make_pool):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no usable CUDA")
    patterns = make_pool(2, 4, 8192, device="cuda")
    stream = torch.cuda.Stream()
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        for layer, experts in [(0, [0, 1]), (1, [2, 3]), (0, [1, 2])]:
            addresses = cache.acquire(layer, experts, stream=stream)
            with torch.cuda.stream(stream):
                for address, expert in zip(addresses, experts):
                    slot = torch.as_tensor(DeviceBytes(address, 8192), device="cuda")
                    got = slot.to("cpu").numpy().tobytes()
                    assert got == patterns.blobs[(layer, expert)]
            cache.release(layer, experts, stream=stream)
        stats = cache.stats()
        assert stats["misses"] == 6


CHUNK = 4 << 20  # TransferEngine::kPrefetchChunkBytes


@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no usable CUDA")
    return torch


def test_prefetch_of_several_chunks_arrives_whole(make_pool, cudart):
    size = 3 * CHUNK + CHUNK // 2 + 300  # four chunks, the last one short
    patterns = make_pool(1, 3, size, device="cuda")
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        cache.prefetch(0, [1])
        deadline = time.monotonic() + 10
        while cache.pending_prefetches():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert cache.stats()["bytes_prefetch"] == size
        addresses = cache.acquire(0, [1, 2])  # a prefetch hit and a demand copy
        for address, expert in zip(addresses, [1, 2]):
            assert read_device(cudart, address, size) == patterns.blobs[(0, expert)]
        cache.release(0, [1, 2])
        assert cache.stats()["prefetch_hits"] == 1


def test_current_device_is_left_as_it_was(make_pool, torch_cuda):
    torch = torch_cuda
    last = torch.cuda.device_count() - 1
    previous = torch.cuda.current_device()
    stream = torch.cuda.Stream(device=0)
    torch.cuda.set_device(last)
    try:
        patterns = make_pool(2, 4, 8192, device="cuda:0")
        assert torch.cuda.current_device() == last
        cache = ef.ExpertCache(patterns.pool, slots=3, prefetch_streams=2)
        assert torch.cuda.current_device() == last
        cache.prefetch(1, [3])
        for layer, experts in [(0, [0, 1]), (1, [2, 3])]:
            cache.acquire(layer, experts, stream=stream)
            cache.release(layer, experts, stream=stream)
            assert torch.cuda.current_device() == last
        cache.stats()
        cache.close()
        del cache, patterns
        assert torch.cuda.current_device() == last
    finally:
        torch.cuda.set_device(previous)


def test_stream_of_another_device_is_refused(make_pool, torch_cuda):
    """A stream object naming another device is refused by the facade; with two devices, a
    real one and the default stream under another current device are refused too."""
    torch = torch_cuda

    class Elsewhere:
        cuda_stream = 0xDEAD0  # never handed to CUDA: the device settles it
        device = torch.device("cuda", 1)

    patterns = make_pool(1, 4, 4096, device="cuda")
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        with pytest.raises(ValueError, match="belongs to cuda:1, but the cache is on cuda:0"):
            cache.acquire(0, [0], stream=Elsewhere())
        if torch.cuda.device_count() >= 2:
            with pytest.raises(ValueError, match="belongs to cuda:1, but the cache is on cuda:0"):
                cache.acquire(0, [0], stream=torch.cuda.Stream(device=1))
            with torch.cuda.device(1):
                with pytest.raises(ValueError, match="current device cuda:1, not to this cache"):
                    cache.acquire(0, [0])
                assert torch.cuda.current_device() == 1
        stream = torch.cuda.Stream(device=0)
        cache.acquire(0, [0, 1], stream=stream)  # still usable
        cache.release(0, [0, 1], stream=stream)
        assert cache.stats()["misses"] == 2


def test_stall_is_the_time_the_stream_waited(make_pool, torch_cuda):
    torch = torch_cuda
    size = 32 << 20
    patterns = make_pool(2, 2, size, device="cuda")
    stream = torch.cuda.Stream(device=0)
    with ef.ExpertCache(patterns.pool, slots=2) as cache:
        cache.acquire(1, [0, 1], stream=stream)  # the stream waits for 64 MiB of copies
        cache.release(1, [0, 1], stream=stream)
        stats = cache.stats()
        assert stats["layers"][1]["stall_seconds"] > 1e-5
        assert stats["layers"][0]["stall_seconds"] == 0.0
        assert stats["stall_seconds"] == pytest.approx(stats["layers"][1]["stall_seconds"])


def test_close_during_acquires(make_pool):
    patterns = make_pool(2, 8, 65536, device="cuda")
    for round_ in range(5):
        assert race_close(ef.ExpertCache(patterns.pool, slots=6), 0.001 * round_) == []
