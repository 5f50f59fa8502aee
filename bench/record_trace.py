"""Records the example routing trace: the embedded default model generating greedily from
`expertflow bench`'s code prompts, offloaded with the default slots, through
`handle.trace()`. Each prompt is one request; its prefill steps come first (tokens 0..n-1),
then one step per decode token and layer.

The trace is small (tens of KB) and lives in tests/data/ because the replay test reads it
and the README's replay example runs on it, so neither needs the shared trace files.

    python bench/record_trace.py [--tokens 16] [--out tests/data/default_model.trace]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from expertflow import benchmark, models, offload
from expertflow.traces import Trace

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "default_model.trace"
TOKENS = 16  # new tokens per prompt
SOURCE = "embedded default model (bench/train_default.py), expertflow bench's prompts"


def record(tokens: int, path: Path | None = None) -> Trace:
    """The default model's routing over the bench prompts; written to `path` if given."""
    loaded = models.default_model()
    slots = benchmark.default_slots(loaded.model)
    handle = offload(loaded.model, "cpu", slots=slots)
    with handle, handle.trace(path, source=SOURCE) as trace:
        for prompt in benchmark.DEFAULT_PROMPTS:
            benchmark.generate(loaded, prompt, tokens, "cpu")
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=TOKENS, help="new tokens per prompt")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    trace = record(args.tokens, Path(args.out))
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(trace)} steps, {len(trace.request_ids())} requests, {size:,} B")


if __name__ == "__main__":
    main()
