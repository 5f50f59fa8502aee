"""Fuzzed inputs: malformed traces and arguments give a clear ValueError, never a crash."""

from __future__ import annotations

import json

import expertflow as ef
import hypothesis.strategies as st
from expertflow import traces
from hypothesis import HealthCheck, given, settings

HEADER = {
    "format": "expertflow-trace",
    "version": 1,
    "layers": 2,
    "experts_per_layer": 4,
    "top_k": 2,
}
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10)
    | st.floats(allow_nan=True)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
step_like = st.fixed_dictionaries(
    {},
    optional={
        "request": values,
        "token": values,
        "layer": values,
        "experts": values,
        "scores": values,
    },
)


def read_text(tmp_path, text: str):
    path = tmp_path / "fuzz.trace"
    path.write_text(text)
    return traces.read(path)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=300))
def test_random_text_is_refused_cleanly(tmp_path, text):
    try:
        read_text(tmp_path, text)
    except ValueError:
        pass


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(step_like, min_size=1, max_size=5), st.integers(0, 400))
def test_mangled_steps_are_refused_with_their_line(tmp_path, steps, cut):
    text = json.dumps(HEADER) + "\n" + "".join(json.dumps(s) + "\n" for s in steps)
    text = text[: len(json.dumps(HEADER)) + 1 + cut]  # sometimes truncated
    try:
        trace = read_text(tmp_path, text)
    except ValueError as error:
        assert "fuzz.trace:" in str(error)
        return
    for layer, experts in zip(trace.layer_of_step, trace.experts):  # what was accepted is valid
        assert 0 <= layer < 2 and all(0 <= e < 4 for e in experts)
        traces.replay(trace, "lru", 2)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(-3, 5),
    st.lists(st.integers(-3, 9), max_size=6),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=6),
)
def test_cache_arguments_are_checked(layer, experts, scores):
    pool = ef.HostPool(ef.ExpertLayout(3, 6, 256))
    with ef.ExpertCache(pool, slots=4, policy="expertflow") as cache:
        for call in (
            lambda: cache.prefetch(layer, experts, scores),
            lambda: cache.acquire(layer, experts),
        ):
            try:
                call()
            except ValueError:
                pass
        try:
            cache.release(layer, experts)
        except ValueError:
            pass
        cache.acquire(0, [0, 1])  # still usable
        cache.release(0, [0, 1])
