"""Models for the command line: the embedded default, and local checkpoints.

The default is a Mixtral-shaped MoE with deterministic random weights (8 layers x 8
experts of 6 MiB, top-2), small enough to run in seconds on two CPU cores and with experts
large enough that an emulated link makes the policies differ. Its text is noise: it shows
the machinery, not language. Its tokenizer is UTF-8 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

DEFAULT = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 384,
    "max_position_embeddings": 2048,
}


class ByteTokenizer:
    """UTF-8 bytes as token ids; the default model's tokenizer."""

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    sample: bool  # random weights: sample with a fixed seed instead of greedy


def default_model(seed: int = 0) -> Loaded:
    config = MixtralConfig(**DEFAULT)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    return Loaded(model, ByteTokenizer(), "embedded default (Mixtral-shaped, random weights)", True)


def load(path: str | None, dtype: str = "float32") -> Loaded:
    """The embedded default when `path` is None, else a local checkpoint directory."""
    if path is None:
        return default_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"--model {path!r} is not a directory holding a checkpoint")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return Loaded(model, _HubTokenizer(AutoTokenizer.from_pretrained(path)), Path(path).name, False)


class _HubTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, return_tensors="pt").input_ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
