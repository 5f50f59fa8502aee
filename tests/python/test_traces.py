"""Routing traces: format, converters, live recording, replay through the native core, CLI."""

from __future__ import annotations

import io
import json
import tarfile

import expertflow as ef
import pytest
import tiny_models as tm
import torch
from expertflow import cli, traces

pytestmark = pytest.mark.usefixtures("one_thread")


def sequence_trace(steps, layers=1, experts=4, top_k=1, requests=None) -> traces.Trace:
    trace = traces.Trace(layers, experts, top_k)
    for i, (layer, chosen) in enumerate(steps):
        trace.add(0 if requests is None else requests[i], i, layer, chosen)
    return trace


def test_lru_and_belady_by_hand():
    # Capacity 2, experts 0 1 0 2 1 0.
    # LRU:    m m h m(evicts 1) m(evicts 0, used before 2) m(evicts 2)   -> 1 hit
    # Belady: m m h m(evicts 0, next used at step 6, after 1 at step 5) h m -> 2 hits
    trace = sequence_trace([(0, [e]) for e in [0, 1, 0, 2, 1, 0]])
    lru = traces.replay(trace, "lru", 2)
    assert (lru["hits"], lru["misses"], lru["accesses"]) == (1, 5, 6)
    belady = traces.replay(trace, "belady", 2)
    assert (belady["hits"], belady["misses"]) == (2, 4)


def test_pairs_are_never_victims_of_each_other_and_misses_are_most_recent():
    # Capacity 3, steps {0,1} {2,0} {1,3}:
    # {0,1}: m m.  {2,0}: 0 hit (ticked first), 2 miss -> [1, 0, 2] by recency.
    # {1,3}: 1 hit, 3 evicts the least recent of the others: 0 (2 is newer) -> 2 hits.
    trace = sequence_trace([(0, [0, 1]), (0, [2, 0]), (0, [1, 3])], top_k=2)
    assert traces.replay(trace, "lru", 3)["hits"] == 2
    # Capacity 2: a pair fills the cache, and a step's own experts are never its victims.
    assert traces.replay(trace, "lru", 2)["hits"] == 1


def test_scope_reset_and_warmup():
    steps = [(layer, [e]) for e in [0, 1] for layer in (0, 1)] * 2
    trace = sequence_trace(steps, layers=2, requests=[0] * 4 + [1] * 4)
    # One slot per layer; each layer sees 0 1 in each request: all misses.
    assert traces.replay(trace, "lru", 1, scope="layer")["hits"] == 0
    # Two slots per layer: the second request hits everything unless the cache is reset.
    assert traces.replay(trace, "lru", 2, scope="layer")["hits"] == 0
    kept = traces.replay(trace, "lru", 2, scope="layer", reset_per_request=False)
    assert kept["hits"] == 4
    warm = traces.replay(trace, "lru", 2, scope="layer", reset_per_request=False, warmup_tokens=4)
    assert (warm["accesses"], warm["hits"]) == (4, 4)


def test_static_and_history_replay():
    trace = sequence_trace([(0, [e]) for e in [0, 1, 0, 2, 0, 3, 0]])
    # Static set {0}: expert 0 stays; the others stream through the spare slot.
    static = traces.replay(trace, "static", 2, static_experts=traces.calibrate_static(trace, 2))
    assert traces.calibrate_static(trace, 2) == [(0, 0)]
    assert (static["hits"], static["misses"]) == (3, 4)
    two_layers = sequence_trace([(layer, [e]) for e in [0, 1] * 4 for layer in (0, 1)], layers=2)
    learned = traces.replay(two_layers, "expertflow", 1, scope="layer", predictor="history")
    assert learned["prefetch_issued"] > 0 and learned["prefetch_hits"] > 0


def write(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "t.trace"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


HEADER = json.dumps(
    {"format": "expertflow-trace", "version": 1, "layers": 2, "experts_per_layer": 4, "top_k": 2}
)


def test_round_trip(tmp_path):
    trace = sequence_trace([(0, [0, 1]), (1, [3, 2])], layers=2, top_k=2)
    trace.scores = [[0.6, 0.4], None]
    path = tmp_path / "x.trace"
    trace.write(path)
    again = traces.read(path)
    assert (again.experts, again.layer_of_step, again.scores) == (
        trace.experts,
        trace.layer_of_step,
        trace.scores,
    )


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "t.trace:1: empty file"),
        (['{"format": "other"}'], "t.trace:1: not an expertflow trace"),
        (["{oops"], "t.trace:1: the header is not JSON"),
        (
            [HEADER, '{"request": 0, "token": 0, "layer": 0, "experts": [1, 9]}'],
            r"t.trace:2: expert id 9 out of range \[0, 4\)",
        ),
        (
            [
                HEADER,
                '{"request": 0, "token": 0, "layer": 0, "experts": [1, 2]}',
                '{"request": 0, "tok',
            ],
            "t.trace:3: not JSON.*truncated",
        ),
        (
            [HEADER, '{"request": 0, "token": 0, "layer": 5, "experts": [1]}'],
            r"t.trace:2: layer 5 out of range",
        ),
        ([HEADER, '{"request": 0, "layer": 0, "experts": [1]}'], "t.trace:2: a step needs"),
    ],
)
def test_bad_traces_name_the_line(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        traces.read(write(tmp_path, lines))


def test_bad_replay_options():
    trace = sequence_trace([(0, [0])])
    with pytest.raises(ValueError, match="scope must be"):
        traces.replay(trace, "lru", 1, scope="row")
    with pytest.raises(ValueError, match="capacity must be positive, got 0"):
        traces.replay(trace, "lru", 0)
    with pytest.raises(ValueError, match='"mru"'):
        traces.replay(trace, "mru", 1)


def test_mixtral_converter_orders_steps_in_time(tmp_path):
    rows = [
        {
            "problem_id": 0,
            "layer": 1,
            "experts": [3, 0],
            "gating_probs": [0.7, 0.3],
            "token_idx": 0,
        },
        {
            "problem_id": 0,
            "layer": 0,
            "experts": [1, 2],
            "gating_probs": [0.6, 0.4],
            "token_idx": 1,
        },
        {
            "problem_id": 0,
            "layer": 0,
            "experts": [7, 0],
            "gating_probs": [0.8, 0.2],
            "token_idx": 0,
        },
        {
            "problem_id": 1,
            "layer": 0,
            "experts": [5, 6],
            "gating_probs": [0.5, 0.5],
            "token_idx": 0,
        },
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trace = traces.from_mixtral_jsonl(path)
    assert [(r, t, l) for r, t, l in zip(trace.requests, trace.tokens, trace.layer_of_step)] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (1, 0, 0),
    ]
    assert trace.experts[0] == [7, 0] and trace.scores[0] == [0.8, 0.2]
    assert (trace.layers, trace.experts_per_layer, trace.top_k) == (2, 8, 2)


def test_deepseek_converter_reads_members_in_path_order_token_major(tmp_path):
    def csv_bytes(rows):
        return (
            "Layer ID,Batch Number,Token,Activated Expert IDs\n"
            + "".join(f'{layer},0,t{i},"{experts}"\n' for layer, i, experts in rows)
        ).encode()

    path = tmp_path / "d.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        for name, rows in [
            ("b/prompt_2.csv", [(1, 0, [1, 2, 3, 4, 5, 6]), (2, 0, [7, 8, 9, 10, 11, 12])]),
            (
                "a/prompt_9.csv",
                [
                    (1, 0, [0, 1, 2, 3, 4, 5]),
                    (1, 1, [6, 7, 8, 9, 10, 11]),
                    (2, 0, [0, 2, 4, 6, 8, 10]),
                    (2, 1, [1, 3, 5, 7, 9, 11]),
                ],
            ),
        ]:
            data = csv_bytes(rows)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    trace = traces.from_deepseek_tar(path, members=1)  # a/prompt_9.csv comes first
    assert [(t, l) for t, l in zip(trace.tokens, trace.layer_of_step)] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert trace.experts[1] == [0, 2, 4, 6, 8, 10]
    assert len(traces.from_deepseek_tar(path).request_ids()) == 2


def test_recording_live_runs_replays(tmp_path):
    model, inputs = tm.build("qwen3_moe")
    path = tmp_path / "live.trace"
    with ef.offload(model, "cpu", slots=4) as handle:
        with handle.trace(path), torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        stats = handle.stats()
    trace = traces.read(path)
    prompt = inputs["input_ids"].shape[1]
    assert sorted(set(trace.tokens)) == list(range(prompt + 3))  # prefill, then 3 decode steps
    assert all(len(e) == tm.TOP_K for e in trace.experts)
    assert len(trace) == (prompt + 3) * trace.layers
    # Every acquired expert of the run is in the trace, once per token that chose it.
    assert sum(len(e) for e in trace.experts) >= stats["hits"] + stats["misses"]


def test_cli_replay_and_errors(tmp_path, capsys):
    path = tmp_path / "c.trace"
    sequence_trace([(0, [e]) for e in [0, 1, 0, 2, 1, 0]]).write(path)
    assert cli.main(["replay", str(path), "--capacity", "2", "--policy", "belady", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"] == 2
    assert cli.main(["replay", str(path), "--capacity", "2"]) == 0
    assert "hit rate" in capsys.readouterr().out
    bad = write(tmp_path, ["{oops"])
    assert cli.main(["replay", bad, "--capacity", "2"]) == 2
    assert "t.trace:1" in capsys.readouterr().err


def test_cli_static_calibrates_on_another_trace(tmp_path, capsys):
    test, calibration = tmp_path / "test.trace", tmp_path / "calibration.trace"
    sequence_trace([(0, [e]) for e in [0, 1, 0, 2, 0, 3, 0]]).write(test)
    sequence_trace([(0, [e]) for e in [0, 0, 0, 1]]).write(calibration)
    assert cli.main(["replay", str(test), "--capacity", "2", "--policy", "static", "--json"]) == 2
    assert "--static-from" in capsys.readouterr().err
    args = [
        "replay",
        str(test),
        "--capacity",
        "2",
        "--policy",
        "static",
        "--static-from",
        str(calibration),
        "--json",
    ]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["hits"] == 3  # the set {0}


def test_per_layer_static_sets_belong_to_their_layer():
    # Each layer sees 0 1 0 2 0; the set {(1, 0)} keeps expert 0 at layer 1 only.
    steps = [(layer, [e]) for e in [0, 1, 0, 2, 0] for layer in (0, 1)]
    trace = sequence_trace(steps, layers=2)
    result = traces.replay(trace, "static", 2, scope="layer", static_experts=[(1, 0)])
    # Layer 0 streams everything (0 hits); layer 1 hits expert 0 twice.
    assert (result["hits"], result["misses"]) == (2, 8)
