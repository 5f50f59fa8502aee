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
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import transformers

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
