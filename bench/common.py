"""Shared pieces of the Python benchmarks: a Mixtral-shaped model and result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from expertflow.models import EMBEDDING_STD_PER_WIDTH, random_mixtral
from transformers import MixtralConfig, MixtralForCausalLM

RESULTS = Path(__file__).resolve().parent / "results"


def mixtral_like(
    hidden: int = 1024,
    intermediate: int = 2048,
    layers: int = 4,
    experts: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> MixtralForCausalLM:
    """A Mixtral-shaped model with deterministic random weights (top-2 routing)."""
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        num_local_experts=experts,
        num_experts_per_tok=2,
        vocab_size=1024,
        max_position_embeddings=4096,
    )
    return random_mixtral(config, seed).to(dtype)


def large_mixtral(
    layers: int, hidden: int = 4096, intermediate: int = 14336, dtype=torch.bfloat16
) -> MixtralForCausalLM:
    """A Mixtral-shaped model of many GiB with random weights, built without transformers'
    init (float32 first, then normal draws: minutes at this size): made on the meta device,
    materialised in `dtype` and drawn uniformly in place, with the same standard deviations
    as random_mixtral (0.02; the embedding's in proportion to the width; norms at one)."""
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 512),
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=1024,
    )
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model.to_empty(device="cpu").to(dtype)
    embedding = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            std = EMBEDDING_STD_PER_WIDTH * hidden if p is embedding else 0.02
            p.uniform_(-std * 3**0.5, std * 3**0.5, generator=generator)
    return model.eval()


def expert_bytes(model) -> int:
    return sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name
    )


def describe(model) -> dict:
    """The shape of a mixtral_like model, for result files."""
    config = model.config
    experts = config.num_hidden_layers * config.num_local_experts
    return {
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "layers": config.num_hidden_layers,
        "experts_per_layer": config.num_local_experts,
        "top_k": config.num_experts_per_tok,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "bytes_per_expert": expert_bytes(model) // experts,
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
