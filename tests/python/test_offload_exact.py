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
    total = sum(p.num_experts for p in ef.experts.find_experts(model))
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


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["lru", "expertflow"])
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "qwen3_vl_moe"])
def test_offload_is_exact_on_cuda(arch: str, policy: str) -> None:
    """The same check on a GPU, with prefetch (and so the measured link) in play."""
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} has no CUDA")
    model, inputs = tm.build(arch, seed=0)
    model.to("cuda")
    inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    reference_logits, reference_tokens = run(model, inputs)
    slots = quarter_of_the_experts(model)

    with ef.offload(model, "cuda", slots=slots, policy=policy) as handle:
        logits, tokens = run(model, inputs)
        stats = handle.stats()

    assert torch.equal(tokens, reference_tokens)
    # float32 summed in slot order rather than expert order, by GPU kernels
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-5)
    assert stats["misses"] > 0 and stats["prefetch_issued"] > 0, stats
    restored_logits, _ = run(model, inputs)
    assert torch.equal(restored_logits, reference_logits)
