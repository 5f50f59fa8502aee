"""offload() on experts kept as a ModuleList of MLPs, as older and remote-code models do."""

from __future__ import annotations

import expertflow as ef
import pytest
import torch
from torch import nn

HIDDEN, LAYERS, EXPERTS, TOP_K = 48, 3, 6, 2


class ExpertMLP(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, 80, bias=bias)
        self.up_proj = nn.Linear(HIDDEN, 80, bias=bias)
        self.down_proj = nn.Linear(80, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """The loop of pre-v5 Mixtral and of many remote-code models."""

    def __init__(self, bias: bool):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(bias) for _ in range(EXPERTS))

    def forward(self, x):
        weights, chosen = torch.topk(self.gate(x).softmax(-1), TOP_K, dim=-1)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            rows, k = torch.where(chosen == e)
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, k, None])
        return out


class ToyMoeModel(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.embed = nn.Embedding(64, HIDDEN)
        self.layers = nn.ModuleList(SparseMoeBlock(bias) for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, 64)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


@pytest.mark.parametrize("policy", ["lru", "lfu", "expertflow"])
def test_module_list_experts_are_exact_and_restorable(policy):
    torch.manual_seed(0)
    model = ToyMoeModel().eval()
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids)
    params_before = {n: p.clone() for n, p in model.named_parameters()}
    handle = ef.offload(model, "cpu", slots=EXPERTS + 1, policy=policy)
    with torch.no_grad():
        assert torch.equal(model(ids), reference)
        assert torch.equal(model(ids.flip(0)), model(ids.flip(0)))
    stats = handle.stats()
    assert stats["misses"] > EXPERTS and stats["evictions"] > 0
    assert stats["layers"][0]["name"] == "layers.0.experts"
    pool = handle.cache.pool
    for name, param in model.named_parameters():
        assert torch.equal(param, params_before[name]), name
        if ".experts." in name:
            assert pool.address <= param.data_ptr() < pool.address + pool.nbytes, name
    handle.restore()
    assert all("forward" not in e.__dict__ for layer in model.layers for e in layer.experts)
    with torch.no_grad():
        assert torch.equal(model(ids), reference)


def test_experts_that_differ_are_refused_and_the_model_left_alone():
    model = ToyMoeModel()
    model.layers[1].experts[2] = ExpertMLP(bias=False)  # one expert without biases
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match="layers.1.experts is a ModuleList of experts whose members differ"
    ):
        ef.offload(model, "cpu", slots=EXPERTS)
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}
