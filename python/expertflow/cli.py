"""The `expertflow` command: info, replay and convert.

expertflow info
expertflow convert --from mixtral|deepseek SOURCE TRACE [--members N]
expertflow replay TRACE --policy lru --capacity 4 --scope layer [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from expertflow import build_info, traces
from expertflow.core import parse_bytes

POLICIES = ("lru", "lfu", "static", "expertflow", "belady")


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
        link_gbps=args.link_gbps,
        layer_compute_us=args.layer_compute_us,
        static_experts=static,
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
    prefetched = result["prefetch_issued"] * trace.expert_bytes
    print(f"  bytes moved     {result['bytes_demand']:.4g} on demand, {prefetched:.4g} prefetched")
    if result["tokens"]:
        print(
            f"  time per token  {result['modelled_seconds_per_token'] * 1e3:.3f} ms modelled, "
            f"{result['link_floor_seconds_per_token'] * 1e3:.3f} ms link floor"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expertflow", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="build info, backends and devices").set_defaults(run=_info)

    convert = commands.add_parser("convert", help="convert a published routing trace")
    convert.add_argument(
        "--from", dest="source_format", choices=("mixtral", "deepseek"), required=True
    )
    convert.add_argument("source")
    convert.add_argument("trace")
    convert.add_argument("--members", type=int, default=None, help="deepseek: the first N CSVs")
    convert.set_defaults(run=_convert)

    replay = commands.add_parser("replay", help="replay a trace through a policy")
    replay.add_argument("trace")
    replay.add_argument("--policy", choices=POLICIES, default="lru")
    replay.add_argument("--capacity", type=int, required=True, help="experts cached (see --scope)")
    replay.add_argument("--scope", choices=("layer", "global"), default="global")
    replay.add_argument("--predictor", choices=("none", "history"), default="none")
    replay.add_argument("--link-gbps", type=float, default=16.0)
    replay.add_argument("--layer-compute-us", type=float, default=0.0)
    replay.add_argument("--expert-bytes", default=None, help="override the trace's, e.g. 336MiB")
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
