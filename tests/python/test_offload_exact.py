"""offload() is exact on every architecture of tiny_models.py, under every live policy.

The oracle is the same model unpatched. With a budget of a quarter of the experts:
greedy generation of 16 tokens identical, logits equal within float32 rounding (the
prefill runs in several passes when a layer routes to more experts than there are slots,
and grouped_mm meets the experts in slot order rather than expert order), misses and
evictions really happen, and restore() gives back the stock model bit for bit. With
transformers' batched_mm, whose per-token math does not depend on expert order, the
logits are bit-identical.
"""

from __future__ import annotations

import expertflow as ef
import expertflow.offloading
import pytest
import tiny_models as tm
import torch
from expertflow.experts import find_experts

NEW_TOKENS = 16
POLICIES = ["lru", "lfu", "static", "expertflow"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    return logits, tokens[:, inputs["input_ids"].shape[1] :]


def quarter_of_the_experts(model) -> int:
    total = sum(p.num_experts for p in find_experts(model))
    return max(tm.TOP_K, total // 4)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_offload_is_exact(arch: str, policy: str) -> None:
    model, inputs = tm.build(arch, seed=0)
    reference_logits, reference_tokens = run(model, inputs)
    slots = quarter_of_the_experts(model)
    options = {"static_experts": [(0, 0)]} if policy == "static" else {}

    with ef.offload(model, "cpu", slots=slots, policy=policy, **options) as handle:
        logits, tokens = run(model, inputs)
        stats = handle.stats()

    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-6)
    if policy == "static":  # experts outside the set stream through and are dropped: no evictions
        assert stats["misses"] > tm.NUM_EXPERTS * len(handle.layer_names), stats
    else:
        assert stats["misses"] > 0 and stats["evictions"] > 0, stats
    assert stats["hits"] + stats["misses"] >= NEW_TOKENS * len(handle.layer_names)
    restored_logits, _ = run(model, inputs)
    assert torch.equal(restored_logits, reference_logits)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "qwen3_vl_moe"])
def test_offload_is_bit_identical_with_batched_mm(arch: str) -> None:
    model, inputs = tm.build(arch, seed=1)
    model.set_experts_implementation("batched_mm")
    reference_logits, reference_tokens = run(model, inputs)
    slots = max(quarter_of_the_experts(model), tm.NUM_EXPERTS)  # one pass per layer
    with ef.offload(model, "cpu", slots=slots, policy="lru") as handle:
        logits, tokens = run(model, inputs)
        assert handle.stats()["evictions"] > 0
    assert torch.equal(logits, reference_logits)
    assert torch.equal(tokens, reference_tokens)


def to_cuda(inputs: dict) -> dict:
    return {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["lru", "expertflow"])
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "qwen3_vl_moe"])
def test_offload_is_exact_on_cuda(arch: str, policy: str) -> None:
    """The same check on a GPU, with prefetch (and so the measured link) in play. The
    reference runs resident on the GPU; offload() takes the model from the host, as a
    model larger than the GPU must be."""
    model, inputs = tm.build(arch, seed=0)
    inputs = to_cuda(inputs)
    model.to("cuda")
    reference_logits, reference_tokens = run(model, inputs)
    model.to("cpu")
    slots = quarter_of_the_experts(model)

    with ef.offload(model, "cuda", slots=slots, policy=policy) as handle:
        experts = {id(p) for e in find_experts(model) for ps in e.params.values() for p in ps}
        for name, param in model.named_parameters():  # experts in the host pool, the rest here
            assert param.device.type == ("cpu" if id(param) in experts else "cuda"), name
        logits, tokens = run(model, inputs)
        stats = handle.stats()

    assert torch.equal(tokens, reference_tokens)
    # float32 summed in slot order rather than expert order, by GPU kernels
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-5)
    assert stats["misses"] > 0 and stats["prefetch_issued"] > 0, stats
    assert stats["stall_seconds"] > 0, "the compute stream waited for demand copies"
    model.to("cuda")
    restored_logits, _ = run(model, inputs)
    assert torch.equal(restored_logits, reference_logits)


def _synchronisations(run_step, reads=None) -> int:
    """How many times `run_step` synchronised with the GPU, by torch's sync debug mode
    (item, nonzero, unique, cpu, tolist, ... all report), leaving out the offloaded
    model's own reads (HostReads.read), which are counted apart."""
    import warnings

    if reads is not None:
        real = reads.read

        def allowed(tensors):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return real(tensors)
            finally:
                torch.cuda.set_sync_debug_mode("warn")

        reads.read = allowed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            if reads is not None:
                del reads.read
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.cuda
@pytest.mark.parametrize("prefetch", [False, True])
def test_decode_on_cuda_synchronises_once_per_moe_layer(prefetch: bool) -> None:
    """A decode step of the offloaded model synchronises exactly as often as the stock
    model's, plus one read per MoE layer."""
    model, inputs = tm.build("mixtral", seed=0)
    inputs = to_cuda(inputs)

    def decode_step():
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            step = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
            return lambda: model(
                input_ids=step, attention_mask=mask, past_key_values=out.past_key_values
            )

    model.to("cuda")
    stock = _synchronisations(decode_step())
    model.to("cpu")
    with ef.offload(model, "cuda", slots=quarter_of_the_experts(model), prefetch=prefetch) as h:
        step = decode_step()
        step()  # a first decode step: the prefetch rule learns its rates
        step = decode_step()
        before = h._slots.reads.reads
        offloaded = _synchronisations(step, h._slots.reads)
        assert h._slots.reads.reads - before == len(h.layer_names)
    assert offloaded == stock


@pytest.mark.cuda
def test_cuda_means_the_current_device_and_keeps_it() -> None:
    model, inputs = tm.build("mixtral", seed=0)
    last = torch.cuda.device_count() - 1
    with torch.cuda.device(last):
        with ef.offload(model, "cuda", slots=quarter_of_the_experts(model)) as handle:
            assert torch.cuda.current_device() == last
            assert handle.cache.pool.device == f"cuda:{last}"
            assert model.lm_head.weight.device == torch.device("cuda", last)
            run(
                model,
                {
                    k: v.to(f"cuda:{last}") if isinstance(v, torch.Tensor) else v
                    for k, v in inputs.items()
                },
            )
            assert torch.cuda.current_device() == last
        assert torch.cuda.current_device() == last
