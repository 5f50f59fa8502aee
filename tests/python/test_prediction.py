"""Prediction and prefetch in offload(): right routers, honest telemetry, fewer misses,
and never a different output."""

from __future__ import annotations

import expertflow as ef
import expertflow.offloading
import pytest
import tiny_models as tm
import torch
from expertflow.experts import find_experts
from expertflow.prediction import Prefetcher, find_router, router_choice

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_TOKENS = 16


def generate(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )


def quarter(model) -> int:
    return max(tm.TOP_K, sum(p.num_experts for p in find_experts(model)) // 4)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss", "qwen3_vl_moe"])
def test_the_lookahead_router_is_the_models_own(arch):
    """Applied to a layer's own input, the found router chooses what the layer chose."""
    model, inputs = tm.build(arch)
    plans = find_experts(model)
    seen = []

    def record(module, args, _out):
        seen.append((module, args[0], args[1]))

    hooks = [p.module.register_forward_hook(record) for p in plans]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    for plan in plans:
        router = find_router(model, plan.name, plan.num_experts)
        assert router is not None, plan.name
        _, hidden, chosen = next(s for s in seen if s[0] is plan.module)
        index, _ = router_choice(router, hidden)
        assert torch.equal(index.sort(-1).values, chosen.sort(-1).values), plan.name


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss", "qwen3_vl_moe"])
def test_prediction_lowers_demand_misses_and_changes_no_output(arch):
    model, inputs = tm.build(arch)
    reference = generate(model, inputs)
    misses = {}
    for prefetch in (False, True):
        with ef.offload(
            model, "cpu", slots=quarter(model), policy="lru", prefetch=prefetch
        ) as handle:
            assert torch.equal(generate(model, inputs), reference)
            misses[prefetch] = handle.stats()["misses"]
            stats = handle.stats()
    assert misses[True] < misses[False], misses
    assert stats["predicted"] > 0 and stats["prefetch_issued"] > 0
    assert 0.0 < stats["precision"] <= 1.0 and 0.0 < stats["recall"] <= 1.0


@pytest.mark.parametrize("predictor", ["gate", "history", "combined"])
@pytest.mark.parametrize("lookahead", [1, 2])
def test_every_predictor_and_depth_is_exact(predictor, lookahead):
    model, inputs = tm.build("qwen3_moe", seed=2)
    reference = generate(model, inputs)
    with ef.offload(
        model,
        "cpu",
        slots=quarter(model),
        policy="expertflow",
        predictor=predictor,
        lookahead=lookahead,
    ) as handle:
        assert torch.equal(generate(model, inputs), reference)
        stats = handle.stats()
    assert stats["predicted"] > 0
    assert len(stats["layers"]) == len(handle.layer_names)
    assert all(0.0 <= layer["precision"] <= 1.0 for layer in stats["layers"])


def test_precision_and_recall_follow_the_counters():
    model, inputs = tm.build("mixtral")
    with ef.offload(model, "cpu", slots=quarter(model), predictor="gate") as handle:
        generate(model, inputs)
        stats = handle.stats()
    assert stats["precision"] == pytest.approx(stats["predicted_used"] / stats["predicted"])
    assert stats["recall"] == pytest.approx(
        stats["predicted_used"] / (stats["hits"] + stats["misses"])
    )
    # Layer 0 has no layer before it to predict it from the router.
    assert stats["layers"][0]["predicted"] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"predictor": "psychic"}, "unknown predictor 'psychic'"),
        ({"lookahead": 0}, "lookahead must be at least 1 layer, got 0"),
    ],
)
def test_bad_prediction_options_leave_the_model_alone(kwargs, message):
    model, inputs = tm.build("mixtral")
    with torch.no_grad():
        reference = model(**inputs).logits
    with pytest.raises(ValueError, match=message):
        ef.offload(model, "cpu", slots=4, **kwargs)
    assert model.get_experts_implementation() == {"": tm.EXPERTS_IMPLEMENTATION}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_every_counter_is_kept_per_layer_and_in_total():
    model, inputs = tm.build("qwen3_moe", seed=3)
    with ef.offload(model, "cpu", slots=quarter(model), link_gbps=50.0) as handle:
        generate(model, inputs)
        stats = handle.stats()
    for key, total in stats["layers"][0].items():
        if isinstance(total, int):
            assert sum(layer[key] for layer in stats["layers"]) == stats[key], key
    assert sum(layer["stall_seconds"] for layer in stats["layers"]) == pytest.approx(
        stats["stall_seconds"]
    )
    assert stats["prefetch_issued"] > 0 and stats["bytes_demand"] > 0


def test_cache_aware_routing_is_lossy_opt_in_and_saves_copies():
    model, inputs = tm.build("mixtral", seed=4)
    reference = generate(model, inputs)
    misses = {}
    for margin in (None, 0.0, 1.0):
        with ef.offload(
            model, "cpu", slots=quarter(model), prefetch=False, cache_aware_routing=margin
        ) as h:
            tokens = generate(model, inputs)
            misses[margin] = h.stats()["misses"]
        if margin is None or margin == 0.0:  # off, or a margin no top-k choice can meet
            assert torch.equal(tokens, reference)
    assert misses[1.0] < misses[None]
    with pytest.raises(ValueError, match="cache_aware_routing is a margin >= 0, got -1"):
        ef.offload(model, "cpu", slots=4, cache_aware_routing=-1)
    assert torch.equal(generate(model, inputs), reference)


class _RecordingCache:
    """What Prefetcher needs of a cache, recording the prefetches it asks for."""

    slot_bytes = 1000

    def __init__(self) -> None:
        self.prefetched: list[tuple[int, list[int]]] = []

    def prefetch(self, layer, experts, scores) -> None:
        self.prefetched.append((layer, list(experts)))


def test_a_prefetch_goes_when_it_pays_for_the_link():
    """Rank 0 is always chosen, rank 1 half the time. When compute hides a copy, both are
    worth prefetching; when it hides a tenth, a wrong guess costs nine tenths of a copy,
    and only the rank that is nearly always right is prefetched."""
    cache = _RecordingCache()
    prefetcher = Prefetcher(cache, [None, None], 4, 2, "gate", 1, link_bytes_per_second=1e6)
    scores = [(1, [0.0, 0.0, 0.9, 0.5])]  # layer 1: expert 2 first, then expert 3
    for step in range(40):  # decode steps
        prefetcher.observe(0, [0, 1], tokens=1)
        prefetcher.prefetch(0, scores)
        prefetcher.observe(1, [2, 3] if step % 2 else [2, 1], tokens=1)
    copy_seconds = cache.slot_bytes / prefetcher.link_bytes_per_second

    prefetcher.layer_seconds = copy_seconds  # the copy fits in the compute before layer 1
    assert prefetcher.worth(0, 1) and prefetcher.worth(1, 1)
    prefetcher.layer_seconds = copy_seconds / 10
    assert prefetcher.worth(0, 1) and not prefetcher.worth(1, 1)
    assert prefetcher.worth(1, 10)  # ten layers ahead, the compute hides it again

    cache.prefetched.clear()
    prefetcher.observe(0, [0, 1], tokens=1)
    prefetcher.layer_seconds = copy_seconds / 10
    prefetcher.prefetch(0, scores)
    assert cache.prefetched == [(1, [2])]

    free = Prefetcher(cache, [None, None], 4, 2, "gate", 1)  # no link model: copies are free
    free.layer_seconds = copy_seconds / 10
    assert free.worth(1, 1)


def test_the_layer_time_leaves_out_waits_for_copies():
    """The pay-off rule compares a copy with the compute that can hide it, so the layer
    time it learns must not contain the stalls: over a link so slow that each demand copy
    takes far longer than a layer computes, the learnt time stays a small part of the
    stall per miss."""
    model, inputs = tm.build("mixtral", seed=0)
    with ef.offload(
        model, "cpu", slots=tm.TOP_K + 1, policy="lru", link_gbps=1.0, link_latency_us=20_000
    ) as handle:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        stats = handle.stats()
        layer_seconds = find_prefetcher(model).layer_seconds
    stall_per_miss = stats["stall_seconds"] / stats["misses"]
    assert 0 < layer_seconds < stall_per_miss / 4, (layer_seconds, stall_per_miss)


def find_prefetcher(model) -> Prefetcher:
    return find_experts(model)[0].module.__dict__["_expertflow"].prefetcher


def test_a_router_that_needs_its_blocks_arguments_leaves_prediction_to_history():
    """LFM2-MoE's router adds an expert bias its MoE block passes in: called on a hidden
    state alone it fails, so gate lookahead skips it and offload() still runs exactly."""
    import transformers

    if not hasattr(transformers, "Lfm2MoeForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no LFM2-MoE")
    config, special = tm.tiny_config(transformers.Lfm2MoeConfig)
    torch.manual_seed(0)
    model = transformers.Lfm2MoeForCausalLM(config).eval()
    plans = find_experts(model)
    assert plans and all(find_router(model, p.name, p.num_experts) is None for p in plans)
    ids = torch.tensor([[t for t in range(10, 60) if t not in special][:12]])
    with torch.no_grad():
        reference = model(ids).logits
        with ef.offload(model, "cpu", slots=plans[0].num_experts, predictor="combined"):
            torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-6)
