"""Tiny random-weight MoE models for tests (no network / HF hub access needed).

``build(arch, seed)`` returns ``(model, inputs)``: a float32 CPU model in ``eval()`` mode whose
MoE experts use transformers' ``grouped_mm`` experts implementation, and the keyword arguments
for ``model(**inputs)`` / ``model.generate(**inputs, ...)``.  Everything is derived from ``seed``
(model weights, prompt tokens and, for the vision-language models, a synthetic image with a drawn
shape), so two calls with the same arguments give bit-identical models and inputs.

Vision-language inputs are what the model's HF processor would return for a prompt of the form
``<text> <image-start> <image-token * N> <image-end> <text>`` (Aria: no start/end tokens).
Tokenizers cannot be fetched offline and the image processors need PIL or torchvision, so the
processor output is reproduced here with numpy, following the processor code in transformers:
the image is drawn directly at a size the image processor keeps as is (given the ``size`` in
``IMAGE_PROCESSORS``), then rescaled by 1/255, normalized with the checkpoint's mean/std and
patchified (or, for Aria, padded) exactly as the image processor does; where PIL is installed,
test_tiny_models.py checks that the real image processor gives bit-identical tensors.  The
placeholder tokens, their count and ``mm_token_type_ids`` (and ERNIE's ``moe_mm_token_type_ids``)
follow the processor.

``tiny_config(config_class)`` shrinks any transformers config class to a toy one whose every
MLP layer is an MoE layer, and ``model_candidates(experts_cls)`` lists the model classes that
may hold an experts class: the generic half of the factory, which
bench/supported_architectures.py uses for every family transformers has.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import transformers
from transformers import PreTrainedConfig, PreTrainedModel

__all__ = [
    "ARCHITECTURES",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "IMAGE_PROCESSORS",
    "LLMS",
    "PAD_TOKEN_ID",
    "VLMS",
    "VOCAB_SIZE",
    "build",
    "build_config",
    "draw_image",
    "experts_modules",
    "model_candidates",
    "tiny_config",
    "vocab_of",
]

LLMS = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "olmoe",
    "phimoe",
    "gpt_oss",
    "granitemoe",
]
VLMS = ["qwen3_vl_moe", "glm4v_moe", "aria", "ernie4_5_vl_moe"]
ARCHITECTURES = LLMS + VLMS

VOCAB_SIZE = 256
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
# Multimodal special tokens live at the top of the vocabulary; ordinary prompt tokens are drawn
# from [_TEXT_LO, _TEXT_HI) so they never collide with a special token.
IMAGE_TOKEN_ID = VOCAB_SIZE - 1
IMAGE_START_TOKEN_ID = VOCAB_SIZE - 2
IMAGE_END_TOKEN_ID = VOCAB_SIZE - 3
VIDEO_TOKEN_ID = VOCAB_SIZE - 4
VIDEO_START_TOKEN_ID = VOCAB_SIZE - 5
VIDEO_END_TOKEN_ID = VOCAB_SIZE - 6
# The special-token arguments of the configs that mark images and videos apart (GLM-4.5V,
# ERNIE-VL).
MEDIA_TOKEN_IDS = {
    "image_token_id": IMAGE_TOKEN_ID,
    "video_token_id": VIDEO_TOKEN_ID,
    "image_start_token_id": IMAGE_START_TOKEN_ID,
    "image_end_token_id": IMAGE_END_TOKEN_ID,
    "video_start_token_id": VIDEO_START_TOKEN_ID,
    "video_end_token_id": VIDEO_END_TOKEN_ID,
}
_TEXT_LO, _TEXT_HI = 8, VOCAB_SIZE - 8

PROMPT_LEN = 12  # LLM prompt length
NUM_EXPERTS = 8
TOP_K = 2
EXPERTS_IMPLEMENTATION = "grouped_mm"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# What each VLM's inputs correspond to: processor class and the settings it must be called with
# to reproduce them (image drawn at ``image_hw``, so no resize happens).
IMAGE_PROCESSORS: dict[str, dict] = {
    "qwen3_vl_moe": {
        # what Qwen3VLProcessor uses, with the Qwen3-VL checkpoint's patch size and mean/std
        "cls": "Qwen2VLImageProcessor",
        "image_hw": (64, 96),
        "kwargs": {
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": HALF,
            "image_std": HALF,
            "size": {"shortest_edge": 32 * 32, "longest_edge": 1024 * 1024},
        },
    },
    "glm4v_moe": {
        "cls": "Glm4vImageProcessor",
        "image_hw": (56, 84),
        "kwargs": {
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD,
            "size": {"shortest_edge": 28 * 28, "longest_edge": 1024 * 1024},
        },
    },
    "aria": {
        "cls": "AriaImageProcessor",
        "image_hw": (350, 490),  # landscape -> padded at the bottom to 490x490, pixel_mask marks it
        "kwargs": {
            "max_image_size": 490,
            "min_image_size": 336,
            "split_image": False,
            "image_mean": HALF,
            "image_std": HALF,
        },
    },
    "ernie4_5_vl_moe": {
        "cls": "Ernie4_5_VLMoeImageProcessor",
        "image_hw": (56, 84),
        "kwargs": {
            "patch_size": 14,
            "temporal_patch_size": 1,
            "merge_size": 2,
            "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD,
            "size": {"shortest_edge": 28 * 28, "longest_edge": 1024 * 1024},
        },
    },
}
# Aria's processor maps the image size to a number of placeholder tokens (``size_conversion``,
# {490: 128, 980: 256} for the real checkpoint); the projector maps the number of vision patches to
# the same number of queries.  Tiny: 490px image, 70px patches -> 7x7 = 49 patches -> 8 tokens.
ARIA_TOKENS_PER_IMAGE = 8
ARIA_PATCH_SIZE = 70


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Experts modules decorated with transformers.integrations.moe.use_experts_implementation."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if hasattr(mod, "has_gate") and hasattr(mod, "is_transposed")
    ]


def draw_image(seed: int, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) uint8 RGB image: random background plus a random-coloured rectangle
    or ellipse (never a constant image)."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 256, size=3)
    fg = (bg + rng.integers(64, 192, size=3)) % 256  # clearly different from the background
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = bg
    y0 = int(rng.integers(0, height // 2))
    x0 = int(rng.integers(0, width // 2))
    # exclusive upper bounds: the last row and column always stay background
    y1 = int(rng.integers(y0 + max(2, height // 4), height))
    x1 = int(rng.integers(x0 + max(2, width // 4), width))
    if rng.integers(0, 2) == 0:
        img[y0:y1, x0:x1] = fg
    else:
        yy, xx = np.mgrid[0:height, 0:width]
        cy, cx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2
        ry, rx = max((y1 - y0) / 2, 1.0), max((x1 - x0) / 2, 1.0)
        img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = fg
    return img


def _rescale_normalize(img_chw: np.ndarray, mean, std) -> np.ndarray:
    """transformers' numpy ``rescale`` (float64 multiply, then float32) + ``normalize``."""
    x = (img_chw.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(mean, dtype=np.float32)
    std = np.array(std, dtype=np.float32)
    return ((x.T - mean) / std).T


def _patchify(image_chw: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
    """Same flattening as Qwen2VL / Glm4v / Ernie4.5-VL image processors' ``patchify``."""
    channel, height, width = image_chw.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    assert grid_h * patch_size == height and grid_w * patch_size == width
    assert grid_h % merge_size == 0 and grid_w % merge_size == 0
    patches = image_chw.reshape(
        channel,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))
    patches = np.broadcast_to(
        patches[:, :, :, :, :, None, :, :],
        (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]),
    )
    flat = patches.reshape(grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(flat), grid_h, grid_w


def _grid_image_inputs(arch: str, seed: int) -> tuple[dict, int]:
    """pixel_values / image_grid_thw as returned by a Qwen2-VL-style image processor."""
    spec = IMAGE_PROCESSORS[arch]
    kw = spec["kwargs"]
    img = draw_image(seed, *spec["image_hw"])
    chw = _rescale_normalize(np.moveaxis(img, -1, 0), kw["image_mean"], kw["image_std"])
    flat, gh, gw = _patchify(chw, kw["patch_size"], kw["merge_size"], kw["temporal_patch_size"])
    num_tokens = gh * gw // kw["merge_size"] ** 2
    return {
        "pixel_values": torch.from_numpy(flat),
        "image_grid_thw": torch.tensor([[1, gh, gw]], dtype=torch.long),
    }, num_tokens


def _aria_image_inputs(seed: int) -> tuple[dict, int]:
    """pixel_values / pixel_mask as returned by AriaImageProcessor (split_image=False)."""
    kw = IMAGE_PROCESSORS["aria"]["kwargs"]
    max_size, min_size = kw["max_image_size"], kw["min_image_size"]
    h, w = IMAGE_PROCESSORS["aria"]["image_hw"]
    # AriaImageProcessor resizes the longer side to max_image_size (the shorter one to at least
    # min_image_size); the image is drawn at that size already, so the resize is the identity.
    scale = max_size / max(h, w)
    new_h, new_w = (
        (max(int(h * scale), min_size), max_size)
        if w >= h
        else (max_size, max(int(w * scale), min_size))
    )
    assert (new_h, new_w) == (h, w), "draw the aria image at its post-resize size"
    img = np.moveaxis(draw_image(seed, h, w), -1, 0)
    img = np.pad(
        img, ((0, 0), (0, max_size - h), (0, max_size - w)), mode="constant", constant_values=0
    )
    mask = np.zeros((max_size, max_size), dtype=bool)
    mask[:h, :w] = True
    pixel_values = _rescale_normalize(img, kw["image_mean"], kw["image_std"])
    return {
        "pixel_values": torch.from_numpy(np.ascontiguousarray(pixel_values))[None],
        "pixel_mask": torch.from_numpy(mask)[None],
    }, ARIA_TOKENS_PER_IMAGE


def _text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(_TEXT_LO, _TEXT_HI, (n,), generator=gen).tolist()


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

_LLM_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "tie_word_embeddings": False,
}


def _llm_config(arch: str):
    T = transformers
    c = dict(_LLM_COMMON)
    if arch == "mixtral":
        return T.MixtralConfig(**c, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(
            **c,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(
            **c,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            head_dim=16,
        )
    if arch == "deepseek_v3":
        # 3 layers, first one dense (like the real model), 2 MoE layers; grouped top-k routing
        c.update(num_hidden_layers=3, num_key_value_heads=4)
        return T.DeepseekV3Config(
            **c,
            first_k_dense_replace=1,
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            moe_intermediate_size=32,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        )
    if arch == "olmoe":
        c["intermediate_size"] = 32  # olmoe's experts use intermediate_size
        return T.OlmoeConfig(**c, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K)
    if arch == "phimoe":
        return T.PhimoeConfig(**c, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K)
    if arch == "gpt_oss":
        c["intermediate_size"] = 32
        return T.GptOssConfig(
            **c,
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            head_dim=16,
            sliding_window=8,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
            },
        )
    if arch == "granitemoe":
        c["intermediate_size"] = 32
        return T.GraniteMoeConfig(**c, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K)
    raise KeyError(arch)


def _vlm_config(arch: str):
    T = transformers
    text_common = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": PAD_TOKEN_ID,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
    }
    if arch == "qwen3_vl_moe":
        kw = IMAGE_PROCESSORS[arch]["kwargs"]
        text = dict(
            **text_common,
            intermediate_size=64,
            num_hidden_layers=2,
            head_dim=16,
            moe_intermediate_size=32,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            # head_dim 16 -> 8 rotary frequencies, interleaved T/H/W sections
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        )
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": kw["patch_size"],
            "spatial_merge_size": kw["merge_size"],
            "temporal_patch_size": kw["temporal_patch_size"],
            "out_hidden_size": 64,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        }
        return T.Qwen3VLMoeConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_TOKEN_ID,
            video_token_id=VIDEO_TOKEN_ID,
            vision_start_token_id=IMAGE_START_TOKEN_ID,
            vision_end_token_id=IMAGE_END_TOKEN_ID,
            tie_word_embeddings=False,
        )
    if arch == "glm4v_moe":
        kw = IMAGE_PROCESSORS[arch]["kwargs"]
        text = dict(
            **text_common,
            intermediate_size=128,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            # head_dim 16, partial_rotary_factor 0.5 -> 4 rotary frequencies
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
            },
        )
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": kw["patch_size"],
            # 4x4 learned position grid (interpolated to the image grid)
            "image_size": 4 * kw["patch_size"],
            "spatial_merge_size": kw["merge_size"],
            "temporal_patch_size": kw["temporal_patch_size"],
            "out_hidden_size": 64,
        }
        return T.Glm4vMoeConfig(
            text_config=text,
            vision_config=vision,
            **MEDIA_TOKEN_IDS,
        )
    if arch == "aria":
        max_size = IMAGE_PROCESSORS[arch]["kwargs"]["max_image_size"]
        text = dict(
            **text_common,
            intermediate_size=32,
            num_hidden_layers=2,
            moe_num_experts=NUM_EXPERTS,
            moe_topk=TOP_K,
            moe_num_shared_experts=2,
        )
        vision = {
            "model_type": "idefics3_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": max_size,
            "patch_size": ARIA_PATCH_SIZE,
        }
        num_patches = (max_size // ARIA_PATCH_SIZE) ** 2
        return T.AriaConfig(
            text_config=text,
            vision_config=vision,
            image_token_index=IMAGE_TOKEN_ID,
            projector_patch_to_query_dict={num_patches: ARIA_TOKENS_PER_IMAGE},
        )
    if arch == "ernie4_5_vl_moe":
        kw = IMAGE_PROCESSORS[arch]["kwargs"]
        text = dict(
            **text_common,
            intermediate_size=128,
            num_hidden_layers=3,
            mlp_layer_types=["dense", "sparse", "sparse"],  # like the real model: first layer dense
            moe_intermediate_size=[32, 16],
            moe_num_experts=NUM_EXPERTS,
            moe_k=TOP_K,
            moe_num_shared_experts=1,
            # head_dim 16 -> 8 rotary frequencies: [h, w, t] (h == w required)
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 500000.0,
                "mrope_section": [3, 3, 2],
            },
        )
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": kw["patch_size"],
            "spatial_merge_size": kw["merge_size"],
            "temporal_merge_size": 2,
        }
        return T.Ernie4_5_VLMoeConfig(
            text_config=text,
            vision_config=vision,
            **MEDIA_TOKEN_IDS,
            # untied (the checkpoint ties them): with tied embeddings this tiny random model just
            # repeats the last prompt token
            tie_word_embeddings=False,
        )
    raise KeyError(arch)


_MODEL_CLASSES: dict[str, Callable[[], type]] = {
    "mixtral": lambda: transformers.MixtralForCausalLM,
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM,
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM,
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM,
    "olmoe": lambda: transformers.OlmoeForCausalLM,
    "phimoe": lambda: transformers.PhimoeForCausalLM,
    "gpt_oss": lambda: transformers.GptOssForCausalLM,
    "granitemoe": lambda: transformers.GraniteMoeForCausalLM,
    "qwen3_vl_moe": lambda: transformers.Qwen3VLMoeForConditionalGeneration,
    "glm4v_moe": lambda: transformers.Glm4vMoeForConditionalGeneration,
    "aria": lambda: transformers.AriaForConditionalGeneration,
    "ernie4_5_vl_moe": lambda: transformers.Ernie4_5_VLMoeForConditionalGeneration,
}


def build_config(arch: str):
    """The tiny config for ``arch`` (experts implementation set to grouped_mm, recursively)."""
    if arch in LLMS:
        config = _llm_config(arch)
        config._experts_implementation = EXPERTS_IMPLEMENTATION
    else:
        config = _vlm_config(arch)
        # The setter propagates to the sub-configs.  Only the text model has experts; Aria's vision
        # tower (Idefics3VisionTransformer) refuses any experts implementation: name the text one.
        config._experts_implementation = {
            "": EXPERTS_IMPLEMENTATION,
            "text_config": EXPERTS_IMPLEMENTATION,
        }
        assert config.text_config._experts_implementation == EXPERTS_IMPLEMENTATION
    return config


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _llm_inputs(gen: torch.Generator) -> dict:
    ids = torch.tensor([[BOS_TOKEN_ID] + _text(gen, PROMPT_LEN - 1)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _vlm_inputs(arch: str, seed: int, gen: torch.Generator) -> dict:
    if arch == "aria":
        pixel_inputs, n_img = _aria_image_inputs(seed)
        # Aria chat format: the image placeholder is not wrapped in start/end tokens
        ids = [BOS_TOKEN_ID] + _text(gen, 3) + [IMAGE_TOKEN_ID] * n_img + _text(gen, 5)
    else:
        pixel_inputs, n_img = _grid_image_inputs(arch, seed)
        ids = (
            [BOS_TOKEN_ID]
            + _text(gen, 3)
            + [IMAGE_START_TOKEN_ID]
            + [IMAGE_TOKEN_ID] * n_img
            + [IMAGE_END_TOKEN_ID]
            + _text(gen, 5)
        )
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixel_inputs}
    if arch in ("qwen3_vl_moe", "glm4v_moe", "ernie4_5_vl_moe"):
        # processor.create_mm_token_type_ids: 1 on image placeholder tokens, 0 elsewhere
        inputs["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN_ID).long()
    if arch == "ernie4_5_vl_moe":
        # processor.create_moe_mm_token_type_ids: image placeholders *and* image start/end tokens
        is_vis = (
            (input_ids == IMAGE_TOKEN_ID)
            | (input_ids == IMAGE_START_TOKEN_ID)
            | (input_ids == IMAGE_END_TOKEN_ID)
        )
        inputs["moe_mm_token_type_ids"] = is_vis.long()
    return inputs


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------


def build(arch: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Tiny random-weight ``arch`` model (eval, float32, CPU) and generation inputs for it."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    config = build_config(arch)
    model_cls = _MODEL_CLASSES[arch]()
    with torch.random.fork_rng(devices=[]):  # don't disturb the caller's global RNG
        torch.manual_seed(seed)
        prev_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            model = model_cls(config)
        finally:
            torch.set_default_dtype(prev_dtype)
    model = model.to(device="cpu", dtype=torch.float32).eval()

    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID
    gc.do_sample = False

    experts = experts_modules(model)
    assert len(experts) >= 2, f"{arch}: expected >= 2 decorated experts modules, got {len(experts)}"
    for name, mod in experts:
        impl = mod.config._experts_implementation
        assert impl == EXPERTS_IMPLEMENTATION, (
            f"{arch}: {name} uses experts implementation {impl!r}"
        )

    gen = torch.Generator().manual_seed(seed)
    inputs = _llm_inputs(gen) if arch in LLMS else _vlm_inputs(arch, seed, gen)
    return model, inputs


# --------------------------------------------------------------------------------------------
# any family: a generic tiny config (bench/supported_architectures.py)
# --------------------------------------------------------------------------------------------

# Exact field names -> tiny value; applied to a field only when its default is a non-zero int
# (None, 0 or "auto" usually mean "derived in __post_init__" or "feature off").
_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "unpadded_vocab_size": 256,
    "vocab_size_per_layer_input": 256,
    "intermediate_size": 128,
    # (experts per layer, top-k and the experts' width: _ALWAYS below)
    # grouped routing: 8 experts in 2 groups, pick 1 group
    "n_group": 2,
    "topk_group": 1,
    # shared experts
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    # multi-head latent attention
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "o_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    # sparse attention indexers
    "index_n_heads": 4,
    "index_head_dim": 32,
    "indexer_n_heads": 4,
    "indexer_head_dim": 32,
    # sliding-window / local attention heads
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    # linear attention
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_heads": 4,
    "linear_head_dim": 16,
    # state-space layers
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "mamba_n_groups": 1,
    "mamba_head_dim": 16,
    "mamba_d_head": 16,
    "mamba_chunk_size": 16,
    "mamba_dt_rank": 8,
    "mamba_n_heads": 8,  # x mamba_head_dim 16 = mamba_expand 2 x hidden_size 64
    "mamba_num_heads": 8,
    # vision / audio towers (never run: the forward is text-only)
    "depth": 2,
    "num_heads": 4,
    "out_hidden_size": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "d_model": 64,
    "text_hidden_size": 64,
    "projector_hidden_size": 64,
    "thinker_hidden_size": 64,
    # dense layers off: every layer an MoE layer
    "first_k_dense_replace": 0,
    "num_dense_layers": 0,
    "decoder_sparse_step": 1,
    "moe_layer_freq": 1,
    "moe_layer_interval": 1,
    "moe_layer_start_index": 0,
    "expert_layer_period": 1,
    "expert_layer_offset": 0,
    # extra heads that would only add layers
    "num_nextn_predict_layers": 0,
    "num_mtp_layers": 0,
}
_EXPERT_COUNTS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
    "n_experts",
)
# Fields set whatever their default (None often means "no MoE" for these).
_ALWAYS: dict[str, Any] = {
    "mlp_only_layers": [],
    "enable_moe_block": True,
    "moe_intermediate_size": 64,
    "n_shared_experts": 1,  # some families multiply by it even when their default is None
    **{k: 8 for k in _EXPERT_COUNTS},
    **{
        k: 2
        for k in (
            "num_experts_per_tok",
            "num_experts_per_token",
            "moe_topk",
            "moe_k",
            "top_k",
            "top_k_experts",
        )
    },
}
# Any other int field whose name contains one of these is an intermediate (FFN) size.
_INTERMEDIATE = ("intermediate_size", "intermediate_dim")
_MOE_INTERMEDIATE = 64  # the experts' own FFN width

# Per-family overrides, by the (sub)config's model_type or class name, applied after the
# generic ones.
OVERRIDES: dict[str, dict[str, Any]] = {
    "hunyuan_v1_moe": {"head_dim": 16},  # default None, read as is by the attention
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # no default
    # attributes the modeling code reads that are not config fields (hub configs carry them)
    "qwen3_omni_moe_talker_text": {"shared_expert_intermediate_size": 64},
    "Qwen3OmniMoeTalkerConfig": {"spatial_merge_size": 2},
    "zaya": {"num_experts_per_tok": 1},  # "ZAYA currently supports num_experts_per_tok=1 only"
}


def _field_defaults(config: PreTrainedConfig) -> dict[str, Any]:
    """The dataclass fields of a config, each with its declared default (else its value)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = getattr(config, f.name, None)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tiny_kwargs(config: PreTrainedConfig, extra: dict[str, dict] | None = None) -> dict[str, Any]:
    """Constructor kwargs that shrink `config`'s class (and its sub-configs) to a toy model;
    `extra` maps a (sub)config's model_type to more overrides."""
    defaults = _field_defaults(config)
    kwargs: dict[str, Any] = {}
    for name, default in defaults.items():
        if name in _ALWAYS:
            value, current = _ALWAYS[name], getattr(config, name, default)
            if (
                isinstance(current, list)
                and current
                and all(_is_int(d) for d in current)
                and _is_int(value)
            ):
                value = [value] * len(current)  # one per modality (text, vision, ...)
            kwargs[name] = value
        elif name in _SIZES:
            # only where the default is a size: None, 0 and "auto" mean derived or off
            if _is_int(default) and (default != 0 or _SIZES[name] == 0):
                kwargs[name] = _SIZES[name]
        elif _is_int(default) and any(k in name for k in _INTERMEDIATE):
            kwargs[name] = _MOE_INTERMEDIATE
    # per-layer lists given as defaults (a pyramid's patch_sizes, hidden_sizes, depths): the
    # first entries, one per remaining layer
    layers, tiny_layers = defaults.get("num_hidden_layers"), kwargs.get("num_hidden_layers")
    if _is_int(layers) and _is_int(tiny_layers) and tiny_layers < layers:
        for name, default in defaults.items():
            if name not in kwargs and isinstance(default, (list, tuple)) and len(default) == layers:
                kwargs[name] = type(default)(default[:tiny_layers])
    # sub-configs (text_config, vision_config, audio_config, ...): shrink too
    specs = getattr(type(config), "sub_configs_defaults", {}) or {}
    for key in specs:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            sub_kwargs = tiny_kwargs(sub, extra)
            if not issubclass(
                specs[key].config_class, PreTrainedConfig
            ):  # AutoConfig: by model_type
                sub_kwargs["model_type"] = sub.model_type
            kwargs[key] = sub_kwargs
    if "kv_lora_rank" in defaults and "num_key_value_heads" in kwargs:  # MLA: k/v have every head
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
    if "mrope_section" in getattr(type(config), "ignore_keys_at_rope_validation", ()):
        kwargs["rope_parameters"] = _tiny_mrope(config, kwargs)
    kwargs.update(OVERRIDES.get(config.model_type, {}))
    kwargs.update(OVERRIDES.get(type(config).__name__, {}))
    kwargs.update((extra or {}).get(config.model_type, {}))
    return kwargs


def _tiny_mrope(config: PreTrainedConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Multimodal RoPE parameters whose `mrope_section` (given, or hard-coded in the modeling
    file when absent) fits the tiny rotary dimension."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    head = kwargs.get("qk_rope_head_dim") or kwargs.get("head_dim")
    if not head:
        hidden = kwargs.get("hidden_size", config.hidden_size)
        head = hidden // kwargs.get("num_attention_heads", config.num_attention_heads)
    factor = (
        rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    )
    half = int(head * factor) // 2
    rope["mrope_section"] = _scaled_section(rope.get("mrope_section") or [1, 1, 1], half)
    return rope


def _all_configs(config: PreTrainedConfig) -> list[PreTrainedConfig]:
    out, stack, seen = [], [config], set()
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        for value in vars(c).values():
            if isinstance(value, PreTrainedConfig):
                stack.append(value)
    return out


def _token_ids(config: PreTrainedConfig) -> list[tuple[PreTrainedConfig, str, Any]]:
    """Every (config, field, value) that holds special token ids."""
    return [
        (c, name, value)
        for c in _all_configs(config)
        for name, value in list(vars(c).items())
        if name.endswith(("token_id", "token_index", "token_ids"))
    ]


def _fix_token_ids(config: PreTrainedConfig, vocab: int) -> set[int]:
    """Moves special token ids that fall outside the tiny vocabulary into its top (one new
    id per old one); returns every special id, so that the random input avoids them."""
    entries = _token_ids(config)
    as_list = lambda value: value if isinstance(value, list) else [value]
    special = {v for _, _, value in entries for v in as_list(value) if _is_int(v) and v < vocab}
    moved: dict[int, int] = {}
    free = (t for t in range(vocab - 1, -1, -1) if t not in special)
    for c, name, value in entries:
        if not any(_is_int(v) and v >= vocab for v in as_list(value)):
            continue
        fixed = [
            moved.setdefault(v, next(free)) if _is_int(v) and v >= vocab else v
            for v in as_list(value)
        ]
        setattr(c, name, fixed if isinstance(value, list) else fixed[0])
    return special | set(moved.values())


def _scaled_section(section: list[int], total: int) -> list[int]:
    """`section` rescaled to sum to `total` (largest remainders), every entry at least 1."""
    raw = [x * total / sum(section) for x in section]
    out = [max(1, int(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(out) < total:
        out[order[i % len(out)]] += 1
        i += 1
    while sum(out) > total:
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


def _second_pass(config: PreTrainedConfig) -> dict[str, dict[str, Any]]:
    """Fixes that need the built config, by (sub)config model_type:

    `mlp_layer_types` listing dense layers: every dense layer an MoE one (the list's own
    MoE label, else "sparse"); left unset (None): all "sparse".
    """
    fixes: dict[str, dict[str, Any]] = {}
    for c in _all_configs(config):
        fix = {}
        names = {f.name for f in dataclasses.fields(c)}
        types = getattr(c, "mlp_layer_types", None)
        layers = getattr(c, "num_hidden_layers", None)
        if isinstance(types, list) and "dense" in types:
            moe = [t for t in types if t != "dense"]
            label = max(set(moe), key=moe.count) if moe else "sparse"
            fix["mlp_layer_types"] = [label if t == "dense" else t for t in types]
        elif types is None and "mlp_layer_types" in names and _is_int(layers):
            fix["mlp_layer_types"] = ["sparse"] * layers
        if fix:
            fixes[c.model_type] = fix
    return fixes


def tiny_config(config_class: type[PreTrainedConfig]) -> tuple[PreTrainedConfig, set[int]]:
    """A toy config of `config_class` whose every MLP layer is an MoE layer, with special
    token ids inside its vocabulary; and the set of those special ids."""
    default = config_class()
    kwargs = tiny_kwargs(default)
    config = config_class(**kwargs)
    fixes = _second_pass(config)
    if fixes:
        config = config_class(**tiny_kwargs(default, fixes))
    special = _fix_token_ids(config, vocab_of(config))
    # The reference runs transformers' grouped_mm. Only the (sub)configs of MoE parts get it:
    # some towers (Pixtral's) refuse any experts implementation, and the others need none.
    for c in _all_configs(config):
        if any(_is_int(getattr(c, k, None)) for k in _EXPERT_COUNTS):
            c._experts_implementation = "grouped_mm"
    return config, special


def vocab_of(config: PreTrainedConfig) -> int:
    sizes = [c.vocab_size for c in _all_configs(config) if _is_int(getattr(c, "vocab_size", None))]
    return min(sizes) if sizes else 256


_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "Model")


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def model_candidates(experts_cls: type) -> list[type]:
    """Model classes of the experts class's modeling module, most likely first:
    *ForCausalLM, then *ForConditionalGeneration, then *Model; within each, the name closest
    to the experts class's (Qwen3OmniMoeTalkerTextExperts -> Qwen3OmniMoeTalker...)."""
    module = sys.modules[experts_cls.__module__]
    public = set(getattr(module, "__all__", []) or [])
    stem = experts_cls.__name__.removesuffix("Experts")
    ranked = []
    for name, obj in vars(module).items():
        if (
            not (isinstance(obj, type) and issubclass(obj, PreTrainedModel))
            or obj.__module__ != module.__name__
        ):
            continue
        if name.endswith("PreTrainedModel") or (public and name not in public):
            continue
        rank = next((i for i, s in enumerate(_SUFFIXES) if name.endswith(s)), None)
        if rank is None or getattr(obj, "config_class", None) is None:
            continue
        ranked.append(((rank, -_common_prefix(name, stem), len(name), name), obj))
    return [obj for _, obj in sorted(ranked, key=lambda r: r[0])]
