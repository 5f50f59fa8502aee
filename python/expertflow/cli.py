"""The `expertflow` command: info, replay and convert.

expertflow info
expertflow convert --from mixtral|deepseek SOURCE TRACE [--members N]
expertflow replay TRACE --policy lru --capacity 4 --scope layer [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from expertflow import build_info, profiles, traces
from expertflow.core import parse_bytes, parse_device

DTYPES = ("auto", "float32", "bfloat16", "float16")  # expertflow.models.DTYPES, without torch

POLICIES = ("lru", "lfu", "static", "expertflow", "belady")

# The embedded model's experts are small (192 KiB): at 4 GB/s their copies would cost
# nothing against its compute. At this rate one copy takes 2-3x one layer's decode on one
# CPU core (0.74-0.87 ms in bench/results/prefetch_cpu_copy_ratio_*.json), about the ratio
# of Qwen3-30B-A3B's experts over PCIe 4.0 against a layer's decode on a GPU (see
# bench/prefetch_bench.py), so that caching matters as it would there.
EMBEDDED_LINK_GBPS = 0.1

# The default model writes Python (it was trained on the standard library's sources).
DEFAULT_PROMPT = "def read_config(path):"


def _info(_args) -> int:
    print(json.dumps(build_info(), indent=2))
    return 0


def _convert(args) -> int:
    if args.source_format == "mixtral":
        trace = traces.from_mixtral_jsonl(args.source)
    else:
        trace = traces.from_deepseek_tar(args.source, members=args.members)
    trace.write(args.trace)
    print(
        f"wrote {args.trace}: {len(trace)} steps, {len(trace.request_ids())} requests, "
        f"{trace.layers} layers x {trace.experts_per_layer} experts, top-{trace.top_k}"
    )
    return 0


def _replay(args) -> int:
    trace = traces.read(args.trace)
    if args.expert_bytes is not None:
        trace.expert_bytes = parse_bytes(args.expert_bytes)
    sizes = {
        "hidden": args.hidden,
        "dense_bytes": args.dense_bytes,
        "expert_flops": args.expert_flops,
    }
    overrides = {rate: getattr(args, rate) for rate in profiles.RATES}
    profile = profiles.load(args.profile, **overrides)
    if args.strategies is not None:
        return _replay_strategies(args, trace, profile, sizes)
    static = []
    if args.policy == "static":
        if args.static_from is None:
            raise ValueError("--policy static needs --static-from TRACE to calibrate its set on")
        static = traces.calibrate_static(traces.read(args.static_from), args.capacity, args.scope)
    result = traces.replay(
        trace,
        args.policy,
        args.capacity,
        scope=args.scope,
        predictor=args.predictor,
        reset_per_request=args.reset_per_request,
        warmup_tokens=args.warmup_tokens,
        profile=profile,
        layer_compute_us=args.layer_compute_us,
        static_experts=static,
        **sizes,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    per = "per layer" if args.scope == "layer" else "in all"
    print(f"{args.trace}: {args.policy}, {args.capacity} experts {per}, predictor {args.predictor}")
    print(
        f"  hit rate        {result['hit_rate']:.4f}  ({result['hits']} of {result['accesses']} accesses, "
        f"{result['prefetch_hits']} brought by prefetch)"
    )
    print(f"  demand misses   {result['misses']}")
    print(
        f"  prefetches      {result['prefetch_issued']} issued, {result['prefetch_used']} used, "
        f"{result['prefetch_wasted']} wasted"
    )
    print(
        f"  bytes moved     {result['bytes_demand']:.4g} on demand, "
        f"{result['bytes_prefetch']:.4g} prefetched"
    )
    if result["tokens"]:
        print(
            f"  time per token  {result['modelled_seconds_per_token'] * 1e3:.3f} ms modelled on "
            f"{profile['name']}, {result['link_floor_seconds_per_token'] * 1e3:.3f} ms of link work"
        )
    return 0


def _replay_strategies(args, trace, profile, sizes) -> int:
    names = None if args.strategies == "all" else args.strategies.split(",")
    calibration = traces.read(args.static_from) if args.static_from else trace
    rows = traces.compare(
        trace,
        args.capacity,
        names or "all",
        profile=profile,
        scope=args.scope,
        reset_per_request=args.reset_per_request,
        warmup_tokens=args.warmup_tokens,
        static_ranking=traces.calibrate_ranking(calibration),
        speculative_recall=args.speculative_recall,
        layer_compute_us=args.layer_compute_us,
        **sizes,
    )
    if args.json:
        print(json.dumps({"profile": profile, "strategies": rows}, indent=2))
        return 0
    per = "per layer" if args.scope == "layer" else "in all"
    where = args.static_from or "this trace (in-sample)"
    print(f"{args.trace}: {args.capacity} experts {per}, profile {profile['name']}")
    print(f"  static sets calibrated on {where}; lru_spec recall {args.speculative_recall}")
    print(traces.strategy_table(rows))
    return 0


def _slots(value: str) -> int:
    """--slots N: a count of slots, at least one (0 is not "the default")."""
    try:
        slots = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of slots") from None
    if slots < 1:
        raise argparse.ArgumentTypeError(
            f"{slots} slots cannot hold an expert; give 1 or more, or leave --slots out for "
            "the default (a quarter of the experts)"
        )
    return slots


def _model_arguments(command) -> None:
    command.add_argument(
        "--model", default=None, help="a local checkpoint directory (default: the embedded model)"
    )
    command.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="default: the checkpoint's own"
    )
    command.add_argument("--device", default="cpu")
    command.add_argument(
        "--budget", default=None, help="bytes or e.g. 12GiB (default: a quarter of the experts)"
    )
    command.add_argument(
        "--slots",
        type=_slots,
        default=None,
        help="device slots (default: a quarter of the experts)",
    )
    command.add_argument("--max-new-tokens", type=int, default=32)
    command.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        help="the emulated link on the CPU (default 4 GB/s, 0.1 for the embedded model); CUDA "
        "uses the real one",
    )
    command.add_argument("--json", action="store_true")


def _sizing(args, model) -> dict:
    from expertflow import benchmark

    if args.budget is not None and args.slots is not None:
        raise ValueError("give --budget or --slots, not both")
    if args.budget is not None:
        return {"budget": args.budget}
    return {"slots": args.slots if args.slots is not None else benchmark.default_slots(model)}


def _link(args) -> float | None:
    """The emulated link on the CPU (CUDA uses its own): --link-gbps, else a default."""
    if args.link_gbps or not args.device.startswith("cpu"):
        return args.link_gbps
    return 4.0 if args.model else EMBEDDED_LINK_GBPS


def _check_device(device: str) -> None:
    """A clear error for a device this machine cannot use, before a model moves there."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return
    import torch

    cuda = build_info()["backends"]["cuda"]
    if not cuda["usable"]:
        raise ValueError(f"--device {device}: CUDA is not usable here ({cuda['reason']})")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch {torch.__version__} has no CUDA")
    if index >= cuda["device_count"]:
        raise ValueError(f"--device {device}: this machine has {cuda['device_count']} GPU(s)")


def _load(args):
    """The model on the host (offload() moves what it must), without transformers' loading
    bar: the embedded model loads in a blink, and the bar is noise before the text."""
    from transformers.utils import logging

    from expertflow import models

    logging.disable_progress_bar()
    return models.load(args.model, args.dtype)


def _run(args) -> int:
    from expertflow import benchmark, offload

    _check_device(args.device)
    loaded = _load(args)
    link = _link(args)
    with offload(
        loaded.model,
        args.device,
        policy=args.policy,
        **_sizing(args, loaded.model),
        **({"link_gbps": link} if link else {}),
    ) as handle:
        out = benchmark.generate(loaded, args.prompt, args.max_new_tokens, args.device)
        stats = handle.stats()
    tokens = out.tokens
    summary = {
        "model": loaded.name,
        "dtype": str(next(iter(loaded.model.parameters())).dtype).removeprefix("torch."),
        "text": loaded.tokenizer.decode(tokens.tolist()),
        "tokens_per_second": len(tokens) / out.seconds,
        "prefill_seconds": out.prefill_seconds,
        "policy": args.policy,
        **{k: stats[k] for k in benchmark.SUMMARY},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{loaded.name}: {args.prompt!r} ->")
    print(summary["text"])
    print(
        f"\n{len(tokens)} tokens at {summary['tokens_per_second']:.2f} tokens/s (prefill "
        f"{out.prefill_seconds:.2f} s), {args.policy}, "
        f"{stats['num_slots']} slots: hit rate {stats['hit_rate']:.3f} "
        f"({stats['prefetch_hits']} brought by {stats['prefetch_issued']} prefetches), "
        f"{stats['misses']} misses, "
        f"{(stats['bytes_demand'] + stats['bytes_prefetch']) / 2**30:.2f} GiB moved, "
        f"stall {stats['stall_seconds']:.2f} s, prediction precision {stats['precision']:.2f} "
        f"recall {stats['recall']:.2f}"
    )
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from expertflow import benchmark

    _check_device(args.device)
    loaded = _load(args)
    sizing = _sizing(args, loaded.model)
    result = benchmark.run(
        loaded,
        args.prompt or benchmark.DEFAULT_PROMPTS,
        device=args.device,
        max_new_tokens=args.max_new_tokens,
        link_gbps=_link(args),
        reps=args.reps,
        progress=not args.json,
        **sizing,
    )
    paths = benchmark.save(result, Path(args.out))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(benchmark.table(result))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r["same_tokens_as_reference"] for r in result["configs"].values()) else 1


def _eval_pope(args) -> int:
    from expertflow.eval import pope

    _check_device(args.device)
    vlm = pope.from_pretrained(args.model, args.dtype, args.device)
    questions = pope.load_questions(args.questions, labels=args.labels)
    if args.limit:
        questions = questions[: args.limit]
    sizing = {"budget": args.budget} if args.budget else {"slots": args.slots}
    report = pope.run(
        vlm, questions, args.images, args.out, device=args.device, **sizing, progress=not args.json
    )
    print(json.dumps(report, indent=2) if args.json else pope.markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expertflow", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="build info, backends and devices").set_defaults(run=_info)

    run = commands.add_parser("run", help="generate with offloading")
    run.add_argument("--prompt", default=DEFAULT_PROMPT)
    run.add_argument("--policy", choices=POLICIES[:-1], default="expertflow")
    _model_arguments(run)
    run.set_defaults(run=_run)

    bench = commands.add_parser("bench", help="every policy side by side on the same prompts")
    bench.add_argument("--prompt", action="append", help="repeat for several (default: three)")
    bench.add_argument(
        "--out", default="expertflow-bench", help="folder for bench.json and bench.png"
    )
    bench.add_argument(
        "--reps", type=int, default=3, help="rounds of every config, interleaved (default 3)"
    )
    _model_arguments(bench)
    bench.set_defaults(run=_bench)

    evaluate = commands.add_parser(
        "eval-pope", help="POPE under every policy (a MoE-VLM checkpoint)"
    )
    evaluate.add_argument("--model", required=True, help="a local MoE-VLM checkpoint directory")
    evaluate.add_argument(
        "--questions", required=True, help="a POPE split file, a folder of them, or LLaVA's file"
    )
    evaluate.add_argument(
        "--labels", default=None, help="with LLaVA's file: the folder of split files"
    )
    evaluate.add_argument("--images", required=True, help="the COCO val2014 image folder")
    evaluate.add_argument("--out", default="pope-results")
    evaluate.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="default: the checkpoint's own"
    )
    evaluate.add_argument("--device", default="cuda")
    evaluate.add_argument("--budget", default=None)
    evaluate.add_argument("--slots", type=_slots, default=None)
    evaluate.add_argument("--limit", type=int, default=0, help="only the first N questions")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=_eval_pope)

    convert = commands.add_parser("convert", help="convert a published routing trace")
    convert.add_argument(
        "--from", dest="source_format", choices=("mixtral", "deepseek"), required=True
    )
    convert.add_argument("source")
    convert.add_argument("trace")
    convert.add_argument("--members", type=int, default=None, help="deepseek: the first N CSVs")
    convert.set_defaults(run=_convert)

    replay = commands.add_parser(
        "replay", help="replay a trace: one policy, or strategies side by side (--strategies)"
    )
    replay.add_argument("trace")
    replay.add_argument("--policy", choices=POLICIES, default="lru")
    replay.add_argument(
        "--strategies",
        default=None,
        help="'all' or a comma list of " + ", ".join(traces.STRATEGIES) + ": a table",
    )
    replay.add_argument("--capacity", type=int, required=True, help="experts cached (see --scope)")
    replay.add_argument("--scope", choices=("layer", "global"), default="global")
    replay.add_argument("--predictor", choices=("none", "history"), default="none")
    replay.add_argument(
        "--profile", default="consumer_pcie4", help="one of " + ", ".join(profiles.names())
    )
    for rate in profiles.RATES:
        flag = "--" + rate.replace("_", "-")
        replay.add_argument(flag, type=float, default=None, help="override the profile's")
    replay.add_argument(
        "--layer-compute-us", type=float, default=0.0, help="device time per layer beyond its reads"
    )
    replay.add_argument("--expert-bytes", default=None, help="override the trace's, e.g. 336MiB")
    replay.add_argument("--hidden", type=int, default=None, help="override the trace's width")
    replay.add_argument(
        "--dense-bytes", type=int, default=None, help="non-expert bytes one layer reads"
    )
    replay.add_argument(
        "--expert-flops", type=float, default=None, help="per token (default: the expert bytes)"
    )
    replay.add_argument("--speculative-recall", type=float, default=0.85, help="lru_spec's oracle")
    replay.add_argument("--reset-per-request", action=argparse.BooleanOptionalAction, default=True)
    replay.add_argument("--warmup-tokens", type=int, default=0)
    replay.add_argument("--static-from", help="static: calibrate the set on this trace")
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(run=_replay)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"expertflow {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
