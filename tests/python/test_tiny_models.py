"""The tiny random-weight MoE models of tiny_models.py build, run and generate deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as tm
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

NEW_TOKENS = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def generate(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_tiny_model(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = tm.build(arch, seed=0)

    assert not model.training
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    config = model.config.get_text_config()
    assert 32 <= config.hidden_size <= 128 and 2 <= config.num_hidden_layers <= 4
    assert config.vocab_size <= 512 and int(inputs["input_ids"].max()) < config.vocab_size

    experts = tm.experts_modules(model)
    assert len(experts) >= 2, [name for name, _ in experts]
    for name, module in experts:
        assert module.config._experts_implementation == "grouped_mm", name
        assert 4 <= module.num_experts <= 16, name
    if arch in tm.VLMS:
        assert {"pixel_values"} <= inputs.keys()
        assert model.config.text_config._experts_implementation == "grouped_mm"

    # every experts module really dispatches to transformers' grouped_mm experts forward
    grouped_mm = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    called: set[int] = set()

    def counting_grouped_mm(self, *args, **kwargs):
        called.add(id(self))
        return grouped_mm(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setitem(ALL_EXPERTS_FUNCTIONS._local_mapping, "grouped_mm", counting_grouped_mm)
        with torch.no_grad():
            out = model(**inputs)
    assert called == {id(module) for _, module in experts}
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out.logits).all()

    tokens = generate(model, inputs)
    assert tokens.shape == (inputs["input_ids"].shape[0], NEW_TOKENS)

    # same seed: same weights, same inputs, same tokens
    model2, inputs2 = tm.build(arch, seed=0)
    assert inputs.keys() == inputs2.keys()
    for key in inputs:
        assert torch.equal(inputs[key], inputs2[key]), key
    state, state2 = model.state_dict(), model2.state_dict()
    assert state.keys() == state2.keys()
    for key in state:
        assert torch.equal(state[key], state2[key]), key
    assert torch.equal(generate(model2, inputs2), tokens)

    # another seed: other weights and inputs
    model3, inputs3 = tm.build(arch, seed=1)
    name, module = experts[0]
    assert not torch.equal(module.down_proj, model3.get_submodule(name).down_proj)
    assert not torch.equal(inputs["input_ids"], inputs3["input_ids"])
    if "pixel_values" in inputs:
        assert not torch.equal(inputs["pixel_values"], inputs3["pixel_values"])


@pytest.mark.parametrize("arch", tm.VLMS)
def test_vlm_image_is_a_shape(arch: str) -> None:
    """The synthetic image is a drawn shape on a background, and it reaches the logits."""
    image = tm.draw_image(0, *tm.IMAGE_PROCESSORS[arch]["image_hw"])
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) == 2

    model, inputs = tm.build(arch, seed=0)
    _, other = tm.build(arch, seed=1)
    swapped = {k: (other[k] if k.startswith("pixel") else v) for k, v in inputs.items()}
    with torch.no_grad():
        a = model(**inputs).logits
        b = model(**swapped).logits
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("arch", tm.VLMS)
def test_vlm_pixels_match_image_processor(arch: str) -> None:
    """Where PIL is installed, the hand-made pixel inputs equal the image processor's output."""
    pytest.importorskip("PIL")
    import transformers

    spec = tm.IMAGE_PROCESSORS[arch]
    processor = getattr(transformers, spec["cls"] + "Pil")(**spec["kwargs"])
    _, inputs = tm.build(arch, seed=3)
    expected = processor(images=[tm.draw_image(3, *spec["image_hw"])], return_tensors="pt")
    for key, value in expected.items():
        if key == "num_crops":
            continue
        assert torch.equal(inputs[key], value.to(inputs[key].dtype)), key
