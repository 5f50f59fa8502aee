"""The `here` hardware profile: this machine's rates, measured.

On this machine the CPU backend stands in for the device, so the "device" is the CPU too
and the "link" is memcpy (what the CPU backend's copies are):
- link_gbps: numpy copy of a 256 MiB buffer, best of 5.
- cpu_gbps and device_gbps: a batch-1 SwiGLU expert forward in bf16 with DeepSeek-V2-Lite's
  shapes (2048 x 1408, 16.5 MiB), as the CPU computes an expert straight from its weights:
  expert bytes / best time of 20.
- cpu_tflops and device_tflops: a bf16 matmul of 256 tokens through the same expert.
torch uses its default threads. Writes bench/results/profile_here.json and the `here`
entry of python/expertflow/profiles.json.

    python bench/profile_here.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import machine, save

PROFILES = Path(__file__).resolve().parents[1] / "python/expertflow/profiles.json"


def best(fn, reps: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memcpy_gbps(nbytes: int = 256 << 20) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return nbytes / best(lambda: np.copyto(dst, src), 5) / 1e9


def expert_rates(hidden: int = 2048, inter: int = 1408) -> tuple[float, float]:
    """(bytes/s at batch 1, FLOPs/s at batch 256) of a bf16 SwiGLU expert."""
    gen = torch.Generator().manual_seed(0)
    w = [
        torch.randn(a, b, generator=gen, dtype=torch.bfloat16) * 0.02
        for a, b in ((inter, hidden), (inter, hidden), (hidden, inter))
    ]
    nbytes = sum(t.numel() * t.element_size() for t in w)

    def forward(x):
        return F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])

    one = torch.randn(1, hidden, generator=gen, dtype=torch.bfloat16)
    many = torch.randn(256, hidden, generator=gen, dtype=torch.bfloat16)
    with torch.no_grad():
        batch1 = best(lambda: forward(one), 20)
        batch256 = best(lambda: forward(many), 5)
    flops = 2 * 3 * hidden * inter * 256
    return nbytes / batch1, flops / batch256


def main() -> None:
    link = memcpy_gbps()
    stream, flops = expert_rates()
    where = f"bench/profile_here.py on {machine()['cpu']}, {time.strftime('%Y-%m-%d')}"
    rates = {
        "link_gbps": (link, f"memcpy of 256 MiB (the CPU backend's copies); {where}"),
        "device_gbps": (stream / 1e9, f"the CPU stands in for the device; {where}"),
        "device_tflops": (flops / 1e12, f"the CPU stands in for the device; {where}"),
        "cpu_gbps": (stream / 1e9, f"batch-1 bf16 SwiGLU expert 2048 x 1408; {where}"),
        "cpu_tflops": (flops / 1e12, f"bf16 SwiGLU expert, 256 tokens; {where}"),
    }
    entry = {"description": "this machine, measured (CPU backend: the CPU is the device)"}
    entry |= {k: {"value": round(v, 4), "source": s} for k, (v, s) in rates.items()}
    for k, (v, _) in rates.items():
        print(f"{k:14} {v:10.4f}")
    save("profile_here", {"protocol": __doc__, "threads": torch.get_num_threads(), "here": entry})
    table = json.loads(PROFILES.read_text())
    table["here"] = entry
    PROFILES.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote the 'here' entry of {PROFILES}")


if __name__ == "__main__":
    main()
