"""bench/supported_architectures.py: discovery of transformers' experts classes, and its
offload check on three representative families (the full sweep is the script itself)."""

from __future__ import annotations

import sys

import bench_scripts
import pytest


@pytest.fixture(scope="module")
def bench():
    module = bench_scripts.load("supported_architectures")
    try:
        yield module
    finally:
        sys.modules.pop(module.__name__, None)


@pytest.fixture(scope="module")
def discovered(bench):
    return bench.discover()


def test_discovers_the_decorated_experts_classes(bench, discovered):
    classes = [f.cls for f in discovered if f.cls is not None]
    assert len(classes) >= 40, [f.experts_class for f in discovered]
    assert len(set(classes)) == len(classes)
    names = {c.__name__ for c in classes}
    assert {"MixtralExperts", "Qwen3MoeExperts", "GptOssExperts"} <= names
    for cls in classes:
        assert bench.is_decorated_experts_class(cls), cls
    # a plain module, and a subclass that does not redecorate, are not experts classes
    mixtral = next(c for c in classes if c.__name__ == "MixtralExperts")
    assert not bench.is_decorated_experts_class(type("NotDecorated", (mixtral,), {}))
    assert not bench.is_decorated_experts_class(type(None))


@pytest.mark.parametrize("experts_class", ["MixtralExperts", "Qwen3MoeExperts", "GptOssExperts"])
def test_offloaded_forward_matches_the_stock_model(bench, discovered, experts_class):
    cls = next(f.cls for f in discovered if f.cls is not None and f.cls.__name__ == experts_class)
    row = bench.check_class(cls, timeout_s=30)
    assert row["status"] in ("exact", "within rounding"), (row["detail"], row.get("traceback"))
    assert row["misses"] > 0 and row["sensitive"]
    assert row["experts_per_layer"] == 8 and row["experts_modules"] == 2


def test_table_and_summary(bench):
    rows = [
        {
            "model_type": "b",
            "experts_class": "B",
            "model_class": "BForCausalLM",
            "status": "exact",
            "detail": "",
        },
        {
            "model_type": "a",
            "experts_class": "A",
            "model_class": None,
            "status": "failed",
            "detail": "x | y",
        },
        {
            "model_type": "c",
            "experts_class": "C",
            "model_class": "C",
            "status": "within rounding",
            "detail": "max |diff| = 1e-06",
        },
    ]
    table = bench.markdown_table(rows).splitlines()
    assert table[0] == "| model type | experts class | model class | result |"
    assert table[3] == "| a | A | - | failed: x \\| y |"
    assert bench.summary_line(rows) == "1 exact / 1 within rounding / 1 failed of 3"
