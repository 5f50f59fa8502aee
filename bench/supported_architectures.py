"""Which transformers MoE architectures expertflow.offload() runs, and whether outputs match.

Discovers every experts class decorated with transformers' `use_experts_implementation` in
the installed transformers, builds a tiny random model of its family from the config class
(no hub access), and for each one checks on the CPU that:

1. the stock model (experts implementation "grouped_mm") gives reference logits, twice the
   same, and different ones when every expert takes its neighbour's weights (otherwise a
   wrong expert-to-slot mapping could not show);
2. after `expertflow.offload(model, "cpu", slots=<experts per layer>, policy="lru")` the
   same input gives the same logits (exact, or within rounding) and the cache missed;
3. after `handle.restore()` the stock model gives the reference logits again.

Tiny configs come from generic shrinking of each config class's fields (hidden 64, 2 layers,
every layer MoE, 8 experts, top-2, vocab 256, ...), plus a few per-family OVERRIDES. Expert
weights are seeded N(0, 0.02) whatever the family's init.

    python bench/supported_architectures.py [--out PATH] [--markdown PATH] [--only NAME ...]

Prints a markdown table and a summary; writes JSON to --out (default
bench/results/supported_architectures.json). The exit status is 0 whatever the results (it
is a report, not a test), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import expertflow
import torch
import transformers
from expertflow.experts import is_experts_class
from transformers import PreTrainedConfig

# The tiny-model factory the tests use (tests/python/tiny_models.py): one for both.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from tiny_models import model_candidates, tiny_config, vocab_of

INPUT_SHAPE = (1, 8)
RTOL, ATOL = 1e-4, 1e-5
SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "supported_architectures.json"


# --------------------------------------------------------------------------- discovery


def is_decorated_experts_class(obj: Any) -> bool:
    """Whether `obj` is a class that use_experts_implementation decorated itself (not one
    that inherits a decorated forward): the library's own detector, per defining class."""
    return is_experts_class(obj) and "forward" in obj.__dict__


def modeling_modules() -> list[str]:
    """Every transformers.models.<family>.modeling_*.py whose source uses the decorator.

    A class can only be decorated in a module whose source names the decorator, so the
    others are not imported (importing all of them takes minutes).
    """
    root = Path(transformers.__file__).resolve().parent / "models"
    names = []
    for path in sorted(root.glob("*/modeling_*.py")):
        try:
            if "use_experts_implementation" not in path.read_text(encoding="utf-8"):
                continue
        except OSError:
            continue
        names.append(f"transformers.models.{path.parent.name}.{path.stem}")
    return names


class Found(NamedTuple):
    experts_class: str  # qualified: module.Class
    module: str
    cls: type | None = None
    import_error: str | None = None


def discover() -> list[Found]:
    """Every decorated experts class, plus one entry per modeling module that failed to import."""
    found = []
    for name in modeling_modules():
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # optional dependencies, broken modules
            found.append(
                Found(name, name, import_error=f"import failed: {type(exc).__name__}: {exc}")
            )
            continue
        for obj in vars(module).values():
            if is_decorated_experts_class(obj) and obj.__module__ == name:
                found.append(Found(f"{name}.{obj.__name__}", name, obj))
    found.sort(key=lambda f: f.experts_class)
    return found


def find_decorated_classes() -> list[type]:
    """The decorated experts classes that imported."""
    return [f.cls for f in discover() if f.cls is not None]


# --------------------------------------------------------------------------- the check


class Timeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raises Timeout after `seconds` (main thread with SIGALRM only; else no limit)."""
    usable = seconds and hasattr(signal, "SIGALRM") and _in_main_thread()
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise Timeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _talker_inputs(model, input_ids: torch.Tensor) -> dict[str, Any]:
    """The Qwen3-Omni talker reads the thinker's hidden states, not token ids."""
    gen = torch.Generator().manual_seed(SEED + 3)
    embeds = torch.randn(*input_ids.shape, model.config.text_config.hidden_size, generator=gen)
    return {"inputs_embeds": embeds, "talker_input_ids": input_ids}


# Per-family forward inputs, by model class name (default: input_ids only).
FORWARD_INPUTS = {"Qwen3OmniMoeTalkerForConditionalGeneration": _talker_inputs}


def _forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    make_inputs = FORWARD_INPUTS.get(type(model).__name__, lambda m, ids: {"input_ids": ids})
    inputs = make_inputs(model, input_ids)
    torch.manual_seed(SEED + 2)  # for models that draw noise in their forward (diffusion)
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = getattr(out, "last_hidden_state", None)
    if logits is None:
        logits = out[0]
    return logits.detach().clone()


def _depends_on_expert_identity(model, experts, num_experts, input_ids, reference) -> bool:
    """Whether the output changes when every expert takes its neighbour's weights (if not,
    random weights leave a wrong expert-to-slot mapping invisible)."""
    saved = [
        (p, p.data)
        for m in experts
        for p in m.parameters(recurse=False)
        if p.dim() > 0 and p.shape[0] == num_experts
    ]
    try:
        for p, data in saved:
            p.data = data.roll(1, dims=0)
        return not torch.equal(_forward(model, input_ids), reference)
    finally:
        for p, data in saved:
            p.data = data


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[str, str]:
    if got.shape != want.shape:
        return "MISMATCH", f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if torch.equal(got, want):
        return "exact", ""
    diff = (got.float() - want.float()).abs().max().item()
    if torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        return "within rounding", f"max |diff| = {diff:.3g}"
    return "MISMATCH", f"max |diff| = {diff:.3g}"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _randomize_experts(model: torch.nn.Module, experts_cls: type, num_experts: int) -> list[str]:
    """Gives every experts parameter (biases too) seeded N(0, 0.02) weights, and routers left
    at zero the same; returns the names of those routers.

    Some families' `_init_weights` skip their experts (left as `torch.empty`, arbitrary
    memory) or zero their biases or routers; the check would then be nondeterministic or
    blind (every expert alike, every routing a tie)."""
    routers = []
    gen = torch.Generator().manual_seed(SEED + 4)

    def fill(p: torch.Tensor) -> None:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.02)

    for name, module in model.named_modules():
        if isinstance(module, experts_cls):
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    fill(p)
            continue
        children = dict(module.named_children())
        if not any(isinstance(c, experts_cls) for c in children.values()):
            continue
        # the MoE block: its router is one of its parameters or in a child (mlp.gate, mlp.router)
        candidates = [(pname, p) for pname, p in module.named_parameters(recurse=False)]
        candidates += [
            (f"{cname}.{pname}", p)
            for cname, c in children.items()
            if not isinstance(c, experts_cls)
            for pname, p in c.named_parameters(recurse=False)
        ]
        for pname, p in candidates:
            if (
                p.is_floating_point()
                and p.dim() == 2
                and p.shape[0] == num_experts
                and not p.detach().abs().max().item() > 1e-30
            ):
                fill(p)
                routers.append(f"{name}.{pname}")
    return routers


def build_model(experts_cls: type) -> tuple[torch.nn.Module, PreTrainedConfig, set[int]]:
    """A tiny random model that contains `experts_cls`; tries the candidates in order."""
    errors = []
    for model_cls in model_candidates(experts_cls):
        try:
            config, special = tiny_config(model_cls.config_class)
            torch.manual_seed(SEED)
            model = model_cls(config).eval()
        except Timeout:
            raise
        except Exception as exc:
            errors.append(f"{model_cls.__name__}: {_short(exc)}")
            continue
        if any(isinstance(m, experts_cls) for m in model.modules()):
            model._expertflow_bench_skipped = errors  # candidates tried first, and why not them
            return model, config, special
        errors.append(f"{model_cls.__name__}: has no {experts_cls.__name__} module")
        del model
    raise LookupError("no model class to instantiate: " + ("; ".join(errors) or "no candidates"))


def check_class(experts_cls: type, timeout_s: float = 60.0) -> dict[str, Any]:
    """Runs the reference / offloaded / restored comparison for one experts class."""
    row = {
        "experts_class": experts_cls.__name__,
        "module": experts_cls.__module__,
        "model_type": experts_cls.__module__.split(".")[-2],
        "model_class": None,
        "status": "failed",
        "detail": "",
    }
    stage = "build"
    start = time.perf_counter()
    try:
        with time_limit(timeout_s):
            model, config, special = build_model(experts_cls)
            row["model_class"] = type(model).__name__
            if model.__dict__.get("_expertflow_bench_skipped"):
                row["skipped_model_classes"] = model.__dict__.pop("_expertflow_bench_skipped")
            row["model_type"] = config.model_type or row["model_type"]
            experts = [m for m in model.modules() if isinstance(m, experts_cls)]
            implementations = {m.config._experts_implementation for m in experts}
            if implementations != {"grouped_mm"}:
                raise RuntimeError(
                    f"the reference would run experts implementation {implementations}, not grouped_mm"
                )
            per_layer = max(int(m.down_proj.shape[0]) for m in experts)
            row["experts_modules"], row["experts_per_layer"] = len(experts), per_layer
            zero_routers = _randomize_experts(model, experts_cls, per_layer)
            if zero_routers:
                row["zero_routers_randomized"] = zero_routers
            row["layout"] = {
                f: bool(getattr(experts[0], f))
                for f in (
                    "has_gate",
                    "has_bias",
                    "is_transposed",
                    "is_concatenated",
                    "has_post_expert_norm",
                )
            }
            allowed = torch.tensor([t for t in range(vocab_of(config)) if t not in special])
            gen = torch.Generator().manual_seed(SEED + 1)
            input_ids = allowed[torch.randint(0, len(allowed), INPUT_SHAPE, generator=gen)]

            stage = "reference forward"
            reference = _forward(model, input_ids)
            if not torch.equal(_forward(model, input_ids), reference):
                raise RuntimeError(
                    "the stock model's forward is not deterministic; nothing to compare"
                )
            stage = "sensitivity"
            # Would a wrong slot mapping show? Give each expert its neighbour's weights.
            sensitive = _depends_on_expert_identity(model, experts, per_layer, input_ids, reference)
            stage = "offload"
            handle = expertflow.offload(model, "cpu", slots=per_layer, policy="lru")
            try:
                stage = "offloaded forward"
                offloaded = _forward(model, input_ids)
                stats = handle.stats()
            finally:
                stage = "restore"
                handle.restore()
            stage = "restored forward"
            restored = _forward(model, input_ids)
    except Exception as exc:
        row["detail"] = f"{stage}: {_short(exc)}"
        row["traceback"] = traceback.format_exc(limit=-6)
        row["seconds"] = round(time.perf_counter() - start, 2)
        return row

    status, detail = _compare(offloaded, reference)
    row["misses"], row["hits"] = stats["misses"], stats["hits"]
    row["sensitive"] = sensitive
    notes = [detail] if detail else []
    if row.get("zero_routers_randomized"):
        notes.append(
            f"its init leaves the routers at zero; {len(row['zero_routers_randomized'])} randomized"
        )
    if not sensitive:
        status = "failed"
        notes.append("blind check: the output does not change when experts swap weights")
    if status != "MISMATCH":
        if stats["misses"] <= 0:
            status, notes = (
                "failed",
                notes + [f"offloaded forward made no cache miss (stats: {stats['misses']} misses)"],
            )
        restored_status, restored_detail = _compare(restored, reference)
        if restored_status != "exact":
            status = "failed"
            notes.append(f"after restore(): {restored_status} {restored_detail}".strip())
    row["status"] = status
    row["detail"] = "; ".join(notes)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run_all(
    only: list[str] | None = None,
    timeout_s: float = 60.0,
    budget_s: float = 170.0,
    verbose: bool = False,
) -> list[dict]:
    """One row per discovered class (or failed import); `only` filters by class name or
    family; each class gets at most `timeout_s`, the whole run about `budget_s`."""
    rows = []
    deadline = time.monotonic() + budget_s
    for found in discover():
        name = found.experts_class.rsplit(".", 1)[-1]
        family = found.module.split(".")[-2]
        if only and not any(o in (name, family) for o in only):
            continue
        left = deadline - time.monotonic()
        if found.cls is None:
            rows.append(
                {
                    "experts_class": found.module,
                    "module": found.module,
                    "model_type": family,
                    "model_class": None,
                    "status": "failed",
                    "detail": found.import_error,
                }
            )
        elif left < 1:
            rows.append(
                {
                    "experts_class": name,
                    "module": found.module,
                    "model_type": family,
                    "model_class": None,
                    "status": "failed",
                    "detail": f"not run: the run's time budget of {budget_s:.0f} s was spent",
                }
            )
        else:
            rows.append(check_class(found.cls, min(timeout_s, left)))
        if verbose:
            r = rows[-1]
            print(
                f"  {r['model_type']:<28} {r['experts_class']:<34} {r['status']:<16} "
                f"{r.get('seconds', 0):5.1f}s {r['detail'][:150]}",
                file=sys.stderr,
                flush=True,
            )
    rows.sort(key=lambda r: (r["model_type"], r["experts_class"]))
    return rows


# --------------------------------------------------------------------------- output


def _result_text(row: dict) -> str:
    if row["status"] in ("exact", "within rounding"):
        return f"{row['status']} ({row['detail']})" if row["detail"] else row["status"]
    return f"{row['status']}: {row['detail']}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model type | experts class | model class | result |", "| --- | --- | --- | --- |"]
    for r in rows:
        cells = [r["model_type"], r["experts_class"], r["model_class"] or "-", _result_text(r)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict[str, int]:
    exact = sum(r["status"] == "exact" for r in rows)
    rounding = sum(r["status"] == "within rounding" for r in rows)
    return {
        "exact": exact,
        "within_rounding": rounding,
        "failed": len(rows) - exact - rounding,
        "total": len(rows),
    }


def summary_line(rows: list[dict]) -> str:
    s = summary(rows)
    return f"{s['exact']} exact / {s['within_rounding']} within rounding / {s['failed']} failed of {s['total']}"


def _git_state() -> dict[str, Any] | None:
    """The checkout's commit, and whether python/expertflow has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "python/expertflow"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "python_expertflow_modified": bool(dirty)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--only", nargs="*", help="experts class names or model families to check")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per class (default 60)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=170.0,
        help="seconds for the whole run; classes left then are reported, not run (default 170)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print each row as it finishes"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = run_all(args.only, args.timeout, args.budget, args.verbose)
    elapsed = time.perf_counter() - start
    table = markdown_table(rows)
    print(table)
    print()
    print(summary_line(rows))

    result = {
        "schema": "expertflow.supported_architectures/1",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "expertflow": getattr(expertflow, "__version__", None),
            "expertflow_git": _git_state(),
            "python": platform.python_version(),
        },
        "machine": {"cpu_threads": torch.get_num_threads(), "cores": os.cpu_count()},
        "check": {
            "device": "cpu",
            "policy": "lru",
            "slots": "experts per layer",
            "input_shape": list(INPUT_SHAPE),
            "reference_experts_implementation": "grouped_mm",
            "rtol": RTOL,
            "atol": ATOL,
            "seed": SEED,
            "weights": "the family's own init, then every experts parameter (and any router left at "
            "zero) seeded N(0, 0.02)",
        },
        "elapsed_seconds": round(elapsed, 1),
        "summary": summary(rows),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n\n" + summary_line(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
