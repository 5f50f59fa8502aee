"""What a model's experts are, and where their bytes go in the pool.

Two kinds of experts module: a fused one decorated by transformers'
`use_experts_implementation` (one parameter per tensor kind, indexed by expert), or a
ModuleList of expert MLPs (older and remote-code models), whose experts keep their own
forward. Either way each expert becomes one blob: its tensors back to back, each 256-byte
aligned, so that an expert moves in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.moe import use_experts_implementation

ALIGNMENT = 256


def align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _decorated_forward_code():
    """The code object of the forward that use_experts_implementation installs."""

    @use_experts_implementation
    class _Probe(torch.nn.Module):
        def __init__(self, config):
            super().__init__()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    return _Probe.forward.__code__


_DECORATED_FORWARD = _decorated_forward_code()


def is_experts_class(cls: object) -> bool:
    """Whether `cls` is a module class whose forward transformers' use_experts_implementation
    installed (on the class itself or a base), so that it dispatches through
    ALL_EXPERTS_FUNCTIONS."""
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        return False
    return getattr(cls.forward, "__code__", None) is _DECORATED_FORWARD


@dataclass
class TensorSpec:
    name: str  # parameter name, in the experts module or in one expert's module
    shape: tuple[int, ...]  # of one expert's tensor
    dtype: torch.dtype
    offset: int  # bytes from the start of the expert's blob


def _blob_specs(named: list[tuple[str, torch.Tensor]]) -> tuple[list[TensorSpec], int]:
    """Where one expert's tensors go in its blob: back to back, each 256-byte aligned."""
    specs, offset = [], 0
    for name, tensor in named:
        specs.append(TensorSpec(name, tuple(tensor.shape), tensor.dtype, offset))
        offset = align(offset + tensor.numel() * tensor.element_size())
    return specs, offset


@dataclass
class ExpertsPlan:
    """One layer's experts: which tensors are per-expert, and where they sit in a blob."""

    name: str
    module: torch.nn.Module
    num_experts: int
    tensors: list[TensorSpec]
    blob_bytes: int
    # params[spec.name][e]: expert e's tensor as a Parameter (ModuleList), or [the fused
    # Parameter holding all experts].
    params: dict[str, list[torch.nn.Parameter]]
    fused: bool

    @property
    def experts_per_token(self) -> int:
        config = getattr(self.module, "config", None)
        for name in ("num_experts_per_tok", "moe_k", "top_k"):
            if isinstance(getattr(config, name, None), int):
                return getattr(config, name)
        return 1

    @property
    def offloaded(self) -> bool:
        patched = self.module if self.fused else self.module[0]
        return "_expertflow" in patched.__dict__ or "forward" in patched.__dict__

    @classmethod
    def fused_module(cls, name: str, module: torch.nn.Module) -> ExpertsPlan:
        params = dict(module.named_parameters(recurse=False))
        projections = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
        expected = projections + [p + "_bias" for p in projections if module.has_bias]
        num_experts = params["down_proj"].shape[0] if "down_proj" in params else None
        unknown = [
            n
            for n, p in params.items()
            if n not in expected and p.dim() > 0 and p.shape[0] == num_experts
        ]
        if any(n not in params or params[n].shape[0] != num_experts for n in expected) or unknown:
            raise ValueError(
                f"{name} ({type(module).__name__}) has an experts layout expertflow does not "
                f"know: with has_gate={module.has_gate} and has_bias={module.has_bias} it "
                f"expects per-expert parameters {expected}, and found "
                f"{ {n: tuple(p.shape) for n, p in params.items()} }"
            )
        specs, blob_bytes = _blob_specs([(n, params[n][0]) for n in expected])
        return cls(
            name, module, num_experts, specs, blob_bytes, {n: [params[n]] for n in expected}, True
        )

    @classmethod
    def module_list(cls, name: str, experts: torch.nn.ModuleList) -> ExpertsPlan:
        named = [list(expert.named_parameters()) for expert in experts]
        shapes = [[(n, p.shape, p.dtype) for n, p in expert] for expert in named]
        if any(type(e) is not type(experts[0]) for e in experts) or any(
            s != shapes[0] for s in shapes
        ):
            raise ValueError(
                f"{name} is a ModuleList of experts whose members differ in class or in their "
                "parameters; expertflow needs equal experts"
            )
        specs, blob_bytes = _blob_specs(named[0])
        params = {n: [dict(expert)[n] for expert in named] for n, _ in named[0]}
        return cls(name, experts, len(experts), specs, blob_bytes, params, False)


def find_experts(model: torch.nn.Module) -> list[ExpertsPlan]:
    """Every experts module of `model`, in module order (one per MoE layer)."""
    plans = []
    for name, module in model.named_modules():
        if is_experts_class(type(module)):
            plans.append(ExpertsPlan.fused_module(name, module))
        elif (
            isinstance(module, torch.nn.ModuleList)
            and name.rsplit(".", 1)[-1] == "experts"
            and len(module) > 1
            and any(True for _ in module.parameters())
        ):
            plans.append(ExpertsPlan.module_list(name, module))
    return plans


def strided_view(
    memory: torch.Tensor, spec: TensorSpec, count: int, stride_bytes: int, base: int = 0
) -> torch.Tensor:
    """`count` copies of spec's tensor, `stride_bytes` apart from byte `base` of `memory`."""
    itemsize = spec.dtype.itemsize
    typed = memory.view(spec.dtype)
    inner = torch.empty(spec.shape, device="meta").stride()
    return typed.as_strided(
        (count, *spec.shape), (stride_bytes // itemsize, *inner), (base + spec.offset) // itemsize
    )
