"""offload() on a tiny Mixtral: the handle, restore(), memory, and bad input.

The per-architecture exactness sweep is in test_offload_exact.py.
"""

from __future__ import annotations

import expertflow as ef
import pytest
import torch
from expertflow.experts import align, find_experts
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

LAYERS, EXPERTS = 3, 8


def tiny_mixtral(implementation: str = "grouped_mm", seed: int = 0) -> MixtralForCausalLM:
    config = MixtralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        vocab_size=128,
    )
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


def snapshot(model) -> dict:
    """Everything offload() may change: tensors (values, devices, storage) and the implementation."""
    return {
        "tensors": {n: (t.detach().clone(), t.device) for n, t in model.state_dict().items()},
        "implementation": model.get_experts_implementation(),
        "runners": [m for m in model.modules() if "_expertflow" in m.__dict__],
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["implementation"] == before["implementation"]
    assert after["runners"] == []
    for name, (value, device) in before["tensors"].items():
        now, now_device = after["tensors"][name]
        assert now_device == device and torch.equal(now, value), name


def test_handle_reports_slots_and_stats_and_state_dict_views_the_pool():
    model = tiny_mixtral()
    expected = {n: t.clone() for n, t in model.state_dict().items()}
    with ef.offload(model, "cpu", slots=EXPERTS + 2, policy="lru") as handle:
        assert handle.num_slots == EXPERTS + 2
        with torch.no_grad():
            model(inputs())
        stats = handle.stats()
        assert stats["misses"] > 0 and stats["hits"] + stats["misses"] > 0
        assert [layer["name"] for layer in stats["layers"]] == [
            f"model.layers.{i}.mlp.experts" for i in range(LAYERS)
        ]
        assert stats["policy"] == "lru" and stats["slot_bytes"] == handle.slot_bytes
        pool_start = handle.cache.pool.address
        pool_end = pool_start + handle.cache.pool.nbytes
        state = model.state_dict()
        for name, value in expected.items():
            assert torch.equal(state[name], value), name
            if ".experts." in name:  # a view of the pool, not a copy
                assert pool_start <= state[name].data_ptr() < pool_end, name
        handle.reset_stats()
        assert handle.stats()["misses"] == 0


def test_budget_sizes_slots_and_restore_gives_back_the_stock_model():
    model = tiny_mixtral()
    ids = inputs()
    with torch.no_grad():
        reference = model(ids).logits
    before = snapshot(model)
    handle = ef.offload(model, "cpu", budget=10**7, policy="expertflow")
    assert handle.num_slots == 10**7 // handle.slot_bytes
    handle.restore()
    handle.restore()  # idempotent
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)
    with pytest.raises(RuntimeError, match="closed"):
        handle.cache.acquire(0, [0])


def test_fewer_slots_than_a_layer_needs_run_in_passes():
    """A prefill that routes to all 8 experts of a layer through 3 slots: 3 passes per layer."""
    model = tiny_mixtral()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(ids).logits
    with ef.offload(model, "cpu", slots=3, policy="lru", prefetch=False) as handle:
        with torch.no_grad():
            logits = model(ids).logits
        stats = handle.stats()
    assert stats["acquires"] == 3 * LAYERS and stats["misses"] == EXPERTS * LAYERS
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)


def test_offloading_twice_is_refused():
    model = tiny_mixtral()
    with (
        ef.offload(model, "cpu", slots=EXPERTS),
        pytest.raises(ValueError, match="already offloaded"),
    ):
        ef.offload(model, "cpu", slots=EXPERTS)


def test_model_without_moe_layers():
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
    )
    model = LlamaForCausalLM(config).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no experts module"):
        ef.offload(model, "cpu", slots=4)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs", [{"slots": 1}, {"budget": 1000}, {"budget": "0B"}])
def test_budget_below_the_minimum_names_it_in_bytes_and_slots(kwargs):
    model = tiny_mixtral()
    before = snapshot(model)
    slot_bytes = align(max(p.blob_bytes for p in _plans(model)))
    with pytest.raises(ValueError, match=rf"minimum of 2 slots = {2 * slot_bytes} bytes"):
        ef.offload(model, "cpu", **kwargs)
    assert_unchanged(model, before)


def test_budget_and_slots_together_or_neither():
    model = tiny_mixtral()
    for kwargs in ({}, {"slots": 8, "budget": "1GiB"}):
        with pytest.raises(ValueError, match="exactly one of budget= or slots="):
            ef.offload(model, "cpu", **kwargs)


@pytest.mark.skipif(ef.build_info()["backends"]["cuda"]["usable"], reason="CUDA is usable here")
def test_cuda_without_cuda():
    model = tiny_mixtral()
    before = snapshot(model)
    with pytest.raises(ValueError, match="CUDA"):
        ef.offload(model, "cuda", slots=EXPERTS)
    assert_unchanged(model, before)


def test_link_model_on_cuda_is_refused():
    # The emulated link is for the CPU backend; checked before the device is looked at.
    model = tiny_mixtral()
    before = snapshot(model)
    with pytest.raises(ValueError, match="link model emulates a link on the CPU backend only"):
        ef.offload(model, "cuda", slots=EXPERTS, link_gbps=16.0)
    assert_unchanged(model, before)


def test_unknown_device_string():
    with pytest.raises(ValueError, match="'tpu'"):
        ef.offload(tiny_mixtral(), "tpu", slots=EXPERTS)


def test_unknown_layout_is_refused_and_the_model_left_alone():
    model = tiny_mixtral()
    experts = model.model.layers[1].mlp.experts
    experts.scale = torch.nn.Parameter(
        torch.ones(EXPERTS, 4)
    )  # a per-expert tensor of no known role
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts \(MixtralExperts\).*'scale'"):
        ef.offload(model, "cpu", slots=EXPERTS)
    assert_unchanged(model, before)


def test_unknown_policy_leaves_the_model_alone():
    model = tiny_mixtral()
    before = snapshot(model)
    with pytest.raises(ValueError, match='"mru"'):
        ef.offload(model, "cpu", slots=EXPERTS, policy="mru")
    assert_unchanged(model, before)


def test_a_failure_midway_is_rolled_back(monkeypatch):
    model = tiny_mixtral()
    before = snapshot(model)

    def refuse(_implementation):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(model, "set_experts_implementation", refuse)
    with pytest.raises(RuntimeError, match="injected failure"):
        ef.offload(model, "cpu", slots=EXPERTS)
    monkeypatch.undo()
    assert_unchanged(model, before)


def test_experts_implementation_without_offload_is_a_clear_error():
    import expertflow.offloading  # noqa: F401  registers the implementation

    model = tiny_mixtral()
    model.set_experts_implementation("expertflow")
    with pytest.raises(RuntimeError, match="not offloaded by expertflow.offload"), torch.no_grad():
        model(inputs())


# Every way a tensor reaches the host that would synchronise with a CUDA device.
_HOST_READS = [
    (torch.Tensor, "tolist"),
    (torch.Tensor, "item"),
    (torch.Tensor, "cpu"),
    (torch.Tensor, "nonzero"),
    (torch, "nonzero"),
    (torch, "unique"),
    (torch.Tensor, "unique"),
]


def _host_reads_during(monkeypatch, run) -> int:
    calls = []
    for owner, name in _HOST_READS:
        real = getattr(owner, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    try:
        run()
    finally:
        monkeypatch.undo()
    return len(calls)


@pytest.mark.parametrize("prefetch", [False, True])
def test_decode_reads_the_host_once_per_moe_layer(monkeypatch, prefetch):
    """A decode step adds exactly one read per MoE layer (HostReads.read) to the stock
    model's, and no tolist, item, cpu, nonzero or unique (each syncs on CUDA). The same
    rule holds on CUDA under torch's sync debug mode (test_offload_exact.py)."""
    model = tiny_mixtral()
    step = inputs()[:, :1]

    def forward():
        with torch.no_grad():
            model(step)

    stock = _host_reads_during(monkeypatch, forward)
    with ef.offload(model, "cpu", slots=EXPERTS + 4, prefetch=prefetch) as handle:
        reads = handle._slots.reads
        forward()  # a first step learns, as decode does
        before = reads.reads
        offloaded = _host_reads_during(monkeypatch, forward)
        assert reads.reads - before == LAYERS
    assert offloaded == stock


def _plans(model):
    return find_experts(model)
