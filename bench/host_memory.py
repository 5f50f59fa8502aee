"""Host memory of loading a checkpoint and offloading it, against the checkpoint's bytes.

Saves a random bf16 Mixtral-shaped checkpoint (safetensors) to a temporary folder, then, in
a fresh process, loads it as `expertflow run --model` does (from_pretrained in the
checkpoint's own dtype, on the host: expertflow.models.load_model) and offloads it to --device with a quarter of the
experts in slots. The kernel's high-water mark of resident memory (VmHWM, reset through
/proc/self/clear_refs before each phase) gives each phase's peak exactly, with no sampling:

- load: what transformers' loader adds. The checkpoint file is memory-mapped and the
  non-expert weights stay views of it, so its pages count as resident (file-backed, clean:
  the kernel can drop them) beside the experts' own copies (anonymous);
- offload: what offload() adds on top (experts into the pool, layer by layer, each original
  freed as its copy lands; on CUDA the pool is then page-locked in place).

    python bench/host_memory.py [--gib 1] [--device cpu] [--out PATH]

Linux only (it reads /proc/self). JSON to --out (default bench/results/host_memory_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def make_checkpoint(folder: Path, layers: int, hidden: int = 1024, intermediate: int = 2048) -> int:
    """A random bf16 Mixtral checkpoint in `folder`; returns its bytes on disk."""
    from common import large_mixtral

    large_mixtral(layers, hidden, intermediate).save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(checkpoint: Path, device: str) -> dict:
    """Each phase's peak, from a fresh process (so nothing else is resident)."""
    child = [sys.executable, __file__, "--child", str(checkpoint), "--device", device]
    out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _status() -> dict[str, int]:
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    with open("/proc/self/status") as f:
        return {
            k: int(v.split()[0]) * 1024 for k, v in (line.split(":") for line in f) if k in keys
        }


def _reset_peak() -> dict[str, int]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _status()


def _child(checkpoint: str, device: str) -> None:
    import expertflow as ef
    import torch
    from expertflow.benchmark import default_slots
    from expertflow.models import load_model

    start = _reset_peak()
    model = load_model(checkpoint)  # as `expertflow run --model` does
    loaded = _reset_peak()
    handle = ef.offload(model, device, slots=default_slots(model), prefetch=False)
    offloaded = _status()
    result = {
        "dtype": str(next(iter(model.parameters())).dtype).removeprefix("torch."),
        "load_peak_bytes": loaded["VmHWM"] - start["VmRSS"],
        "load_anonymous_bytes": loaded["RssAnon"] - start["RssAnon"],
        "load_file_bytes": loaded["RssFile"] - start["RssFile"],
        "offload_peak_bytes": offloaded["VmHWM"] - loaded["VmRSS"],
        "offload_end_bytes": offloaded["VmRSS"] - loaded["VmRSS"],
        "pool_bytes": handle.cache.pool.nbytes,
        "slots": handle.num_slots,
    }
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    handle.restore()
    print(json.dumps(result))


def run(gib: float, device: str, **shape) -> dict:
    layers = max(2, round(gib * 2**30 / 105_000_000))  # about 105 MB a layer at this shape
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_bytes = make_checkpoint(Path(folder), layers, **shape)
        result = measure(Path(folder), device)
    result.update(checkpoint_bytes=checkpoint_bytes, layers=layers, device=device)
    for key in ("load_peak_bytes", "load_anonymous_bytes", "offload_peak_bytes"):
        result[key.replace("_bytes", "_over_checkpoint")] = result[key] / checkpoint_bytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size (about)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.device)
        return
    result = run(args.gib, args.device)
    print(json.dumps(result, indent=2))
    out = Path(args.out or RESULTS / f"host_memory_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
