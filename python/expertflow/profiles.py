"""Hardware profiles for the replay's performance model: rates, each with its source.

A profile (profiles.json, shipped with the package) gives five rates:

    link_gbps      host -> device copies, GB/s (pinned)
    device_gbps    device memory, GB/s (a batch-1 expert GEMV reads its weights once)
    device_tflops  device dense BF16, TFLOPS
    cpu_gbps       the CPU streaming an expert's weights from the host pool, GB/s
    cpu_tflops     the CPU's matmul throughput, TFLOPS

`here` is measured on the machine that ran bench/profile_here.py. Any rate can be
overridden; every rate must be positive.
"""

from __future__ import annotations

import json
import math
from importlib import resources

RATES = ("link_gbps", "device_gbps", "device_tflops", "cpu_gbps", "cpu_tflops")


def _table() -> dict:
    return json.loads(resources.files("expertflow").joinpath("profiles.json").read_text())


def names() -> list[str]:
    return list(_table())


def load(name: str, **overrides: float | None) -> dict:
    """The rates of profile `name` (plain numbers), with `overrides` (None: keep) applied.
    Raises ValueError naming an unknown profile or rate, or a rate that is not positive."""
    table = _table()
    if name not in table:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(table)}")
    profile = {"name": name, "description": table[name].get("description", "")}
    for rate in RATES:
        profile[rate] = float(table[name][rate]["value"])
    for rate, value in overrides.items():
        if rate not in RATES:
            raise ValueError(f"unknown rate {rate!r}; known: {', '.join(RATES)}")
        if value is not None:
            profile[rate] = float(value)
    return check(profile)


def check(profile: dict) -> dict:
    """`profile`, once every rate is a positive number; else ValueError naming it."""
    name = profile.get("name", "custom")
    for rate in RATES:
        value = profile.get(rate)
        if not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"profile {name!r}: {rate} must be a positive number, got {value!r}")
    return profile


def sources(name: str) -> dict[str, str]:
    """Where each rate of profile `name` comes from."""
    entry = _table()[name]
    return {rate: entry[rate]["source"] for rate in RATES}


def rates(profile: dict) -> dict[str, float]:
    """The cost model's units (bytes and FLOPs per second)."""
    return {
        "link_bytes_per_s": profile["link_gbps"] * 1e9,
        "device_bytes_per_s": profile["device_gbps"] * 1e9,
        "device_flops_per_s": profile["device_tflops"] * 1e12,
        "cpu_bytes_per_s": profile["cpu_gbps"] * 1e9,
        "cpu_flops_per_s": profile["cpu_tflops"] * 1e12,
    }
