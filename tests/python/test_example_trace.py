"""The example trace in tests/data (the default model's routing, bench/record_trace.py):
the README's replay example, runnable without the shared traces."""

from __future__ import annotations

from pathlib import Path

import bench_scripts
import pytest
from expertflow import models, traces
from transformers import AutoConfig

TRACE = Path(__file__).resolve().parent.parent / "data" / "default_model.trace"
CAPACITY = 4  # of 8 experts per layer


@pytest.fixture(scope="module")
def trace():
    return traces.read(TRACE)


def test_is_small_and_shaped_like_the_default_model(trace):
    config = AutoConfig.from_pretrained(models.DEFAULT_MODEL)
    assert TRACE.stat().st_size < 100_000
    assert (trace.layers, trace.experts_per_layer, trace.top_k) == (
        config.num_hidden_layers,
        config.num_local_experts,
        config.num_experts_per_tok,
    )
    assert len(trace.request_ids()) == 3 and all(len(e) == trace.top_k for e in trace.experts)


@pytest.mark.usefixtures("one_thread")
def test_is_what_the_shipped_model_routes(trace):
    """Recorded again now, the experts are the same: the trace is not stale."""
    record_trace = bench_scripts.load("record_trace")
    again = record_trace.record(record_trace.TOKENS)
    assert (again.requests, again.tokens, again.layer_of_step, again.experts) == (
        trace.requests,
        trace.tokens,
        trace.layer_of_step,
        trace.experts,
    )


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_replays_through_the_core(trace, scope):
    accesses = len(trace) * trace.top_k
    capacity = CAPACITY if scope == "layer" else CAPACITY * trace.layers
    lru = traces.replay(trace, "lru", capacity, scope=scope)
    ours = traces.replay(trace, "expertflow", capacity, scope=scope, predictor="history")
    belady = traces.replay(trace, "belady", capacity, scope=scope)
    for result in (lru, ours, belady):
        assert result["accesses"] == accesses and result["hits"] + result["misses"] == accesses
        assert 0 < result["hits"] < accesses
    assert belady["misses"] <= lru["misses"]  # the demand-only optimum
    assert ours["prefetch_issued"] > 0
