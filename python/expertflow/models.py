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


# A trained model's residual stream is large against each layer's update, so a router
# applied a layer early still picks mostly the experts that layer will pick (predictors
# across layers reach about 80% on trained MoEs, arXiv:2511.10676). The default init
# (std 0.02 everywhere) makes each update about as large as the stream, and routing a
# fresh draw at every layer. The embedding is drawn larger instead, in proportion to the
# width since each layer's update grows with it, so that random models route the way
# trained ones do for prediction's sake: gate-lookahead recall one layer ahead is 0.80 at
# hidden 1024 (bench/results/prefetch_cpu_copy_ratio_*.json); a one-off check on other
# prompts gave 0.83 / 0.83 / 0.82 at hidden 512 / 1024 / 2048.
EMBEDDING_STD_PER_WIDTH = 0.3 / 512


def random_mixtral(config: MixtralConfig, seed: int = 0) -> MixtralForCausalLM:
    """A Mixtral model with deterministic random weights and a trained-like residual stream."""
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        std = EMBEDDING_STD_PER_WIDTH * config.hidden_size
        model.get_input_embeddings().weight.normal_(0.0, std)
    return model


def default_model(seed: int = 0) -> Loaded:
    model = random_mixtral(MixtralConfig(**DEFAULT), seed)
    return Loaded(model, ByteTokenizer(), "embedded default (Mixtral-shaped, random weights)", True)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(dtype: str) -> str | torch.dtype:
    """ "auto" (the checkpoint's own) or a torch dtype, from its name."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return dtype if dtype == "auto" else getattr(torch, dtype)


def load(path: str | None, dtype: str = "auto") -> Loaded:
    """The embedded default when `path` is None, else a local checkpoint directory with its
    tokenizer (see load_model)."""
    wanted = torch_dtype(dtype)
    if path is None:
        loaded = default_model()
        if wanted != "auto":
            loaded.model.to(wanted)
        return loaded
    from transformers import AutoTokenizer

    model = load_model(path, dtype)
    return Loaded(model, _HubTokenizer(AutoTokenizer.from_pretrained(path)), Path(path).name, False)


def load_model(path: str, dtype: str = "auto") -> torch.nn.Module:
    """A local checkpoint on the host, in `dtype` ("auto": the checkpoint's own, so a bf16
    checkpoint takes its own size in host memory, not twice it in float32). offload() then
    moves the experts into its pool and the rest to the device: the whole model never
    reaches the device."""
    from transformers import AutoModelForCausalLM

    wanted = torch_dtype(dtype)
    if not Path(path).is_dir():
        raise ValueError(f"--model {path!r} is not a directory holding a checkpoint")
    return AutoModelForCausalLM.from_pretrained(path, dtype=wanted).eval()


class _HubTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, return_tensors="pt").input_ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
