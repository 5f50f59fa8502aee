"""The replay's timeline on tiny traces worked out by hand, its bounds, the strategies
side by side, profiles, and bad input (Python and CLI)."""

from __future__ import annotations

import json
import random

import pytest
from expertflow import cli, profiles, traces

MIB = 2**20

# The link moves 1 MiB per ms (a 4 MiB prefetch chunk: 4 ms), the device reads 4 MiB per
# ms, the CPU streams 1 MiB per ms; FLOPs are free.
HAND = {
    "name": "hand",
    "link_gbps": MIB * 1e3 / 1e9,
    "device_gbps": 4 * MIB * 1e3 / 1e9,
    "device_tflops": 1e18,
    "cpu_gbps": MIB * 1e3 / 1e9,
    "cpu_tflops": 1e18,
}


def two_layers(layer0, layer1, experts=4, top_k=1, expert_bytes=4 * MIB) -> traces.Trace:
    """Three tokens through two layers; dense work 12 MiB per layer (3 ms)."""
    trace = traces.Trace(2, experts, top_k, expert_bytes)
    trace.dense_bytes = 12 * MIB
    for token, (a, b) in enumerate(zip(layer0, layer1)):
        trace.add(0, token, 0, a)
        trace.add(0, token, 1, b)
    return trace


def run(trace, strategies, capacity=1, **options) -> dict:
    rows = traces.compare(
        trace, capacity, strategies, profile=HAND, scope="layer", expert_flops=0, **options
    )
    return {r["strategy"]: r for r in rows}


def ms(row) -> float:
    return row["modelled_seconds"] * 1e3


def test_a_prefetch_hides_behind_compute():
    # Layer 0 alternates 0 1 0 (a miss each token), layer 1 alternates 2 3 2. A 4 MiB
    # expert: copy 4 ms, device 1 ms. Per token, lru_spec with a perfect guess:
    #   L0: dense [0,3], demand copy [3,7], expert [7,8]; layer 1's expert prefetched [7,11]
    #   L1: dense [8,11], the prefetch has arrived at 11: expert [11,12]   -> 12 ms
    # lru copies layer 1's expert on demand: [11,15], expert [15,16]       -> 16 ms
    trace = two_layers([[0], [1], [0]], [[2], [3], [2]])
    rows = run(trace, ["lru_spec", "lru"], speculative_recall=1.0)
    assert ms(rows["lru_spec"]) == pytest.approx(36)
    assert ms(rows["lru"]) == pytest.approx(48)
    assert rows["lru_spec"]["link_bytes"] == 6 * 4 * MIB


def test_a_demand_copy_waits_behind_a_prefetch_chunk():
    # 8 MiB experts: copy 8 ms in two 4 ms chunks, device 2 ms. Layer 1 always needs
    # expert 2; lru_spec with recall 0 prefetches a wrong one, which evicts it. Per token:
    #   L0: dense [0,3], demand [3,11], expert [11,13]; wrong prefetch chunks [11,15] [15,19]
    #   L1: dense [13,16]; the demand copy waits for the chunk in flight: [19,27], expert
    #       [27,29]                                                          -> 29 ms
    trace = two_layers([[0], [1], [0]], [[2], [2], [2]], expert_bytes=8 * MIB)
    rows = run(trace, ["lru_spec"], speculative_recall=0.0)
    assert ms(rows["lru_spec"]) == pytest.approx(87)
    assert rows["lru_spec"]["bytes_prefetch"] == 3 * 8 * MIB
    assert rows["lru_spec"]["hits"] == 0


def test_a_cpu_expert_runs_beside_a_device_expert():
    # Each step uses experts 0 (the calibrated hot set, one per layer) and 1 (CPU: 4 ms).
    # Token 0 copies the hot experts in; from token 1 on, per layer: dense [0,3], device
    # [3,4] beside the CPU [3,7] -> 7 ms, 14 ms per token.
    trace = two_layers([[0, 1]] * 3, [[0, 1]] * 3, top_k=2)
    rows = run(trace, ["static_cpu", "cpu"], static_ranking=[(0, 0), (1, 0)], warmup_tokens=1)
    assert rows["static_cpu"]["tokens"] == 2
    assert ms(rows["static_cpu"]) == pytest.approx(28)
    assert rows["static_cpu"]["hits"] == 4 and rows["static_cpu"]["cpu_experts"] == 4
    # Everything on the CPU: dense 3 ms, then two experts in turn, 8 ms -> 22 ms per token.
    assert ms(rows["cpu"]) == pytest.approx(44)
    assert rows["cpu"]["link_bytes"] == 0


def random_trace(seed, layers=4, experts=8, top_k=2, tokens=12, requests=2) -> traces.Trace:
    rng = random.Random(seed)
    trace = traces.Trace(layers, experts, top_k, 16 * MIB)
    trace.hidden, trace.dense_bytes = 1024, 8 * MIB
    hot = rng.sample(range(experts), experts // 2)  # skewed, as real routing is
    for request in range(requests):
        for token in range(tokens):
            for layer in range(layers):
                pool = hot if rng.random() < 0.7 else range(experts)
                chosen = rng.sample(list(pool), top_k)
                trace.add(request, token, layer, chosen)
    return trace


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("profile", ["consumer_pcie4", "gh200"])
def test_prefetching_never_beats_the_link(seed, profile):
    # Every byte takes link time, so no replay takes less than its bytes over the link.
    trace = random_trace(seed)
    fast_compute = profiles.load(profile, device_gbps=1e6, cpu_gbps=1e6)
    rows = traces.compare(trace, 3, profile=fast_compute, scope="layer")
    link = fast_compute["link_gbps"] * 1e9
    for row in rows:
        assert row["modelled_seconds"] >= row["link_bytes"] / link * (1 - 1e-12), row["strategy"]
    assert any(r["bytes_prefetch"] > r["bytes_demand"] for r in rows)  # prefetch-heavy rows


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("profile", profiles.names())
@pytest.mark.parametrize("capacity", [2, 4, 6])
def test_hybrid_is_never_slower_than_a_peer(seed, profile, capacity):
    trace = random_trace(seed)
    calibration = random_trace(seed + 100)
    rows = traces.compare(
        trace,
        capacity,
        profile=profile,
        scope="layer",
        static_ranking=traces.calibrate_ranking(calibration),
    )
    assert traces.hybrid_losses(rows) == []


def test_hybrid_keeps_recency_where_misses_are_copied():
    # Layer 1 alternates a cold expert (2, last in the calibration) with the hot ones, two
    # slots for three experts. Copies beat the CPU (2 + 1 ms against 4 ms), and with no
    # dense work a guess's copy (2 ms) is late by 1 ms. LRU keeps expert 2, so only every
    # other token waits for a copy; ranking the calibrated set first would evict expert 2
    # for each hot one and make every token wait.
    trace = two_layers([[0]] * 12, [[2], [0], [2], [1]] * 3, experts=3)
    trace.dense_bytes = 0
    ranking = [(0, 0), (1, 0), (1, 1), (1, 2)]
    link = HAND | {"link_gbps": 2 * MIB * 1e3 / 1e9}
    rows = traces.compare(
        trace,
        2,
        ["lru_spec", "hybrid"],
        profile=link,
        scope="layer",
        expert_flops=0,
        static_ranking=ranking,
        speculative_recall=1.0,
    )
    by = {r["strategy"]: r for r in rows}
    assert by["hybrid"]["cpu_experts"] == 0
    assert by["hybrid"]["modelled_seconds"] == pytest.approx(by["lru_spec"]["modelled_seconds"])
    assert traces.hybrid_losses(rows) == []


def test_hybrid_losses_reports_a_faster_peer():
    rows = [
        {"strategy": "hybrid", "modelled_seconds": 2.0},
        {"strategy": "cpu", "modelled_seconds": 1.0},
        {"strategy": "belady", "modelled_seconds": 0.5},  # an oracle: reported apart
    ]
    assert traces.hybrid_losses(rows) == ["cpu"]


def test_bounds_hold():
    rows = traces.compare(random_trace(7), 4, profile="h200_pcie5", scope="layer")
    for row in rows:
        assert row["modelled_seconds"] >= row["bound_seconds"] * (1 - 1e-12)
        assert row["modelled_seconds"] >= row["compute_floor_seconds"] * (1 - 1e-12)
        assert 0 <= row["link_busy_share"] <= 1 and 0 <= row["cpu_busy_share"] <= 1


def test_profiles_carry_sources_and_overrides():
    assert {"consumer_pcie4", "h200_pcie5", "gh200", "here"} <= set(profiles.names())
    for name in profiles.names():
        assert all(profiles.sources(name).values())
    assert profiles.load("gh200", link_gbps=100)["link_gbps"] == 100


@pytest.mark.parametrize("rate, value", [("cpu_gbps", 0), ("link_gbps", -3)])
def test_bad_rates_name_the_value(rate, value):
    with pytest.raises(ValueError, match=f"{rate} must be a positive number, got {value}"):
        profiles.load("consumer_pcie4", **{rate: value})
    with pytest.raises(ValueError, match=rate):
        traces.compare(random_trace(0), 2, profile=HAND | {rate: value})


def test_missing_expert_bytes_and_unknown_strategy():
    trace = random_trace(0)
    trace.expert_bytes = None
    with pytest.raises(ValueError, match="no expert_bytes"):
        traces.compare(trace, 2)
    assert traces.compare(trace, 2, ["lru"], expert_bytes=MIB)[0]["link_bytes"] > 0
    with pytest.raises(ValueError, match='unknown strategy "fastest"'):
        traces.compare(random_trace(0), 2, ["lru", "fastest"])
    with pytest.raises(ValueError, match="unknown profile 'tpu'"):
        traces.compare(random_trace(0), 2, profile="tpu")


def test_cli_table_and_bad_input(tmp_path, capsys):
    path = tmp_path / "r.trace"
    random_trace(1).write(path)
    args = ["replay", str(path), "--capacity", "3", "--scope", "layer"]
    assert cli.main([*args, "--strategies", "all", "--profile", "gh200"]) == 0
    out = capsys.readouterr().out
    assert "| hybrid |" in out and "| static_cpu |" in out and "hybrid check" in out
    assert cli.main([*args, "--strategies", "lru,cpu", "--link-gbps", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["profile"]["link_gbps"] == 5
    assert [r["strategy"] for r in report["strategies"]] == ["lru", "cpu"]
    for bad, message in [
        (["--strategies", "lru,warp"], 'unknown strategy "warp"'),
        (["--strategies", "all", "--cpu-gbps", "0"], "cpu_gbps must be a positive number, got 0"),
        (["--profile", "tpu"], "unknown profile 'tpu'"),
    ]:
        assert cli.main([*args, *bad]) == 2
        assert message in capsys.readouterr().err
    header = json.loads(path.read_text().splitlines()[0])
    del header["expert_bytes"]
    bare = tmp_path / "bare.trace"
    bare.write_text("\n".join([json.dumps(header), *path.read_text().splitlines()[1:]]) + "\n")
    assert cli.main(["replay", str(bare), "--capacity", "3", "--strategies", "all"]) == 2
    assert "no expert_bytes" in capsys.readouterr().err
    assert cli.main(["replay", str(bare), "--capacity", "3", "--expert-bytes", "16MiB"]) == 0
