"""Models for the command line: the embedded default, and local checkpoints.

The default is a small Mixtral-shaped MoE trained on the Python standard library's own
sources (`bench/train_default.py`; 6 layers x 8 experts, top-2, a byte-level BPE
tokenizer), shipped as a transformers checkpoint in `default_model/` and loaded with
`from_pretrained` like any other, so it writes Python-like text and routes as a trained
MoE does. Its experts are most of its 12 MB, so that caching them is what matters.

`random_default()` keeps the earlier random-weight Mixtral shape, for benchmarks that need
a given size (larger experts, a wider model) rather than a trained one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

DEFAULT_MODEL = Path(__file__).with_name("default_model")

# The random model's shape: experts of 6 MiB, large enough that an emulated link makes the
# policies differ.
RANDOM_SHAPE = {
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
    """UTF-8 bytes as token ids; the random model's tokenizer."""

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
# hidden 1024 (bench/results/prefetch_cpu_random_copy_ratio_*.json); a one-off check on
# other prompts gave 0.83 / 0.83 / 0.82 at hidden 512 / 1024 / 2048.
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


def random_default(seed: int = 0, **shape) -> Loaded:
    """A random-weight Mixtral of RANDOM_SHAPE (updated by `shape`), sampled with a seed."""
    model = random_mixtral(MixtralConfig(**{**RANDOM_SHAPE, **shape}), seed)
    return Loaded(model, ByteTokenizer(), "random Mixtral-shaped model", True)


def default_model(dtype: str = "auto") -> Loaded:
    """The shipped trained model, greedy: loaded by path like any checkpoint."""
    loaded = load(str(DEFAULT_MODEL), dtype)
    loaded.name = "embedded default (Mixtral-shaped MoE trained on the Python stdlib)"
    return loaded


DTYPES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(dtype: str) -> str | torch.dtype:
    """ "auto" (the checkpoint's own) or a torch dtype, from its name."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return dtype if dtype == "auto" else getattr(torch, dtype)


def load(path: str | None, dtype: str = "auto") -> Loaded:
    """The embedded default when `path` is None, else a local checkpoint directory with its
    tokenizer (see load_model)."""
    if path is None:
        return default_model(dtype)
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
