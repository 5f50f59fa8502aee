"""build_info(), parse_bytes() and parse_device()."""

from __future__ import annotations

import re

import expertflow as ef
import pytest


def test_build_info_structure() -> None:
    info = ef.build_info()
    assert info["version"] == ef.__version__
    assert isinstance(info["cuda_runtime"], str)
    backends = info["backends"]
    assert set(backends) == {"cpu", "cuda"}
    for backend in backends.values():
        assert set(backend) == {"built", "usable", "reason", "device_count"}
        assert isinstance(backend["built"], bool)
        assert isinstance(backend["usable"], bool)
        assert isinstance(backend["reason"], str)
        assert isinstance(backend["device_count"], int)


def test_build_info_cpu_is_usable() -> None:
    cpu = ef.build_info()["backends"]["cpu"]
    assert cpu == {"built": True, "usable": True, "reason": "", "device_count": 1}


def test_build_info_cuda_is_consistent() -> None:
    info = ef.build_info()
    cuda = info["backends"]["cuda"]
    if cuda["usable"]:
        assert cuda["built"]
        assert cuda["reason"] == ""
        assert cuda["device_count"] >= 1
    else:
        assert cuda["reason"].strip(), "an unusable backend must say why"
    # The runtime version is reported exactly when the CUDA backend was compiled in.
    assert (info["cuda_runtime"] != "") == cuda["built"]


def test_build_info_returns_fresh_data() -> None:
    first = ef.build_info()
    first["backends"]["cpu"]["usable"] = False
    assert ef.build_info()["backends"]["cpu"]["usable"] is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GiB", 12 * 2**30),
        ("512MB", 512 * 10**6),
        ("512 MB", 512 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("1.5 GiB", 3 * 2**29),
        (".5KiB", 512),
        ("3kib", 3 * 1024),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        ("10kB", 10_000),
        ("7B", 7),
        ("4096", 4096),
        ("  64 MiB  ", 64 * 2**20),
        ("0", 0),
    ],
)
def test_parse_bytes_strings(text: str, expected: int) -> None:
    assert ef.parse_bytes(text) == expected


@pytest.mark.parametrize("value", [0, 1, 4096, 2**40 + 3])
def test_parse_bytes_ints(value: int) -> None:
    result = ef.parse_bytes(value)
    assert result == value
    assert type(result) is int


@pytest.mark.parametrize(
    "text", ["", "GiB", "12 GiBs", "12XB", "1.2.3GB", "1e3", "twelve", "12 Gi B", "0x10", "-5"]
)
def test_parse_bytes_bad_string(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        ef.parse_bytes(text)


@pytest.mark.parametrize("value", [-1, -(2**40)])
def test_parse_bytes_negative_int(value: int) -> None:
    with pytest.raises(ValueError, match=re.escape(str(value))):
        ef.parse_bytes(value)


def test_parse_bytes_negative_string() -> None:
    with pytest.raises(ValueError, match=re.escape("'-1GiB'")):
        ef.parse_bytes("-1GiB")


@pytest.mark.parametrize("value", [True, False])
def test_parse_bytes_rejects_bools(value: bool) -> None:
    with pytest.raises(ValueError, match=str(value)):
        ef.parse_bytes(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu", ("cpu", 0)),
        ("cpu:0", ("cpu", 0)),
        ("cuda", ("cuda", 0)),
        ("cuda:0", ("cuda", 0)),
        ("cuda:3", ("cuda", 3)),
        ("cuda:12", ("cuda", 12)),
    ],
)
def test_parse_device(text: str, expected: tuple[str, int]) -> None:
    assert ef.parse_device(text) == expected


@pytest.mark.parametrize(
    "text", ["", "gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda:1:2", " cpu", "cpu1", "mps"]
)
def test_parse_device_bad(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        ef.parse_device(text)


def test_host_pool_rejects_bad_device() -> None:
    layout = ef.ExpertLayout(1, 2, 256)
    with pytest.raises(ValueError, match=re.escape("'tpu:0'")):
        ef.HostPool(layout, "tpu:0")
    with pytest.raises(ValueError, match="device 1"):
        ef.HostPool(layout, "cpu:1")
