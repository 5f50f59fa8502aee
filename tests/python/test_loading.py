"""Loading a checkpoint and offloading it without the whole model anywhere twice.

The host-memory figures come from bench/host_memory.py, which measures in a fresh process
with the kernel's high-water mark; the device side is in test_offload_exact.py (CUDA) and
bench/big_model_check.py.
"""

from __future__ import annotations

import sys

import bench_scripts
import expertflow as ef
import pytest
import torch
from expertflow import models
from expertflow.offloading import _plan, require_device_memory
from test_offload_api import EXPERTS, assert_unchanged, snapshot, tiny_mixtral


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_offload_adds_about_one_layer_to_host_memory(tmp_path):
    """Experts go into the pool layer by layer, each original freed as its copy lands: the
    peak grows by about one layer's experts (4% of this checkpoint), not by the pool (one
    whole copy of the experts, 95% of it), and the checkpoint keeps its bf16."""
    host_memory = bench_scripts.load("host_memory")
    checkpoint = host_memory.make_checkpoint(tmp_path, layers=24, hidden=256, intermediate=512)
    result = host_memory.measure(tmp_path, "cpu")
    assert result["dtype"] == "bfloat16"
    assert result["pool_bytes"] > 0.9 * checkpoint
    assert result["offload_peak_bytes"] < 0.1 * checkpoint, result


def test_load_model_keeps_the_checkpoint_dtype(tmp_path):
    tiny_mixtral().to(torch.bfloat16).save_pretrained(tmp_path)
    assert next(models.load_model(str(tmp_path)).parameters()).dtype == torch.bfloat16
    upcast = models.load_model(str(tmp_path), "float32")
    assert next(upcast.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="'float64'"):
        models.load_model(str(tmp_path), "float64")


def test_a_device_too_small_is_refused_with_the_numbers():
    """The non-expert weights and the slots must fit in the device's free memory; the check
    runs before anything moves (here with the free bytes given, as on a GPU it reads them)."""
    model = tiny_mixtral()
    before = snapshot(model)
    plan = _plan(model, "cpu", None, EXPERTS, None, 0.0)
    weights = sum(t.numel() * t.element_size() for t in plan.non_experts())
    arena = plan.num_slots * plan.slot_bytes
    require_device_memory(plan, weights + arena)  # fits exactly
    with pytest.raises(ValueError, match=rf"{weights + arena - 1} bytes free.*at most {arena - 1}"):
        require_device_memory(plan, weights + arena - 1)
    with pytest.raises(ValueError, match=rf"too few even for the non-expert weights \({weights}"):
        require_device_memory(plan, weights - 1)
    assert_unchanged(model, before)


def test_bad_options_are_refused_before_any_weight_moves(monkeypatch):
    """Policy options are checked on a stand-in cache first: a mistake costs no migration."""
    from expertflow import offloading

    model = tiny_mixtral()
    moved = []
    monkeypatch.setattr(offloading, "_pool_experts", lambda *a: moved.append(a))
    for options, message in [
        ({"policy": "mru"}, '"mru"'),
        ({"policy": "static", "static_experts": [(0, 99)]}, "99"),
        ({"prefetch_streams": 0}, "prefetch_streams"),
        ({"predictor": "oracle"}, "'oracle'"),
        ({"lookahead": 0}, "lookahead"),
        ({"cache_aware_routing": -1.0}, "margin"),
    ]:
        with pytest.raises(ValueError, match=message):
            ef.offload(model, "cpu", slots=EXPERTS, **options)
    assert moved == []
