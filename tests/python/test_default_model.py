"""The shipped default model: a transformers checkpoint like any other, trained, exact offloaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bench_scripts
import pytest
import torch
from expertflow import benchmark, models, offload
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "class Stack:\n    def __init__(self):\n"


@pytest.fixture(scope="module")
def default():
    return models.default_model()


def test_loads_by_path_as_a_mixtral_moe_with_most_bytes_in_the_experts():
    model = AutoModelForCausalLM.from_pretrained(models.DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(models.DEFAULT_MODEL)
    config = model.config
    assert config.model_type == "mixtral" and config.num_experts_per_tok == 2
    assert config.num_local_experts >= 8 and config.num_hidden_layers >= 4
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.decode(tokenizer(PROMPT).input_ids) == PROMPT  # byte-level: lossless
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    experts = sum(n for name, n in sizes.items() if ".experts." in name)
    assert experts > 0.7 * sum(sizes.values())
    assert (models.DEFAULT_MODEL / "model.safetensors").stat().st_size <= 12.5 * 2**20


def test_is_trained_far_below_its_own_random_init(default):
    """On the held-out files of bench/train_default.py's split (Python it never trained on),
    the model costs far fewer nats per token than the same shape freshly initialised."""
    corpus = bench_scripts.load("train_default")
    tokens = corpus.encode(default.tokenizer.tokenizer, corpus.corpus_files()[1])
    fresh = type(default.model)(default.model.config)
    trained = corpus.validation_loss(default.model, tokens, length=128, count=8)
    untrained = corpus.validation_loss(fresh, tokens, length=128, count=8)
    default.model.eval()  # validation_loss leaves a model in training mode
    assert trained < 0.6 * untrained


def test_offloaded_greedy_tokens_equal_the_unpatched_ones(default):
    """The default slots (a quarter of the experts), prediction and prefetch on."""
    ids = default.tokenizer.encode(PROMPT)
    options = {"max_new_tokens": 24, "do_sample": False}
    with torch.no_grad():
        expected = default.model.generate(ids, **options)
        slots = benchmark.default_slots(default.model)
        with offload(default.model, "cpu", slots=slots, policy="expertflow") as handle:
            got = default.model.generate(ids, **options)
            stats = handle.stats()
    assert torch.equal(got, expected)
    assert stats["misses"] > 0 and stats["hits"] > 0


def test_the_package_carries_the_model(tmp_path):
    """What `pip install .` copies: setup.py's package data holds every checkpoint file."""
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    shipped = {p.name for p in (tmp_path / "expertflow" / "default_model").iterdir()}
    assert shipped == {p.name for p in models.DEFAULT_MODEL.iterdir()}


def test_gate_lookahead_predicts_its_learned_routing_far_above_chance(default):
    """One layer early, a layer's router names most of the experts it will choose on Python
    it never trained on: chance is top-k / experts."""
    prefetch_bench = bench_scripts.load("prefetch_bench")
    corpus = bench_scripts.load("train_default")
    ids = default.tokenizer.encode(corpus.read_text(corpus.corpus_files()[1][0]))[:, :48]
    recall = prefetch_bench.lookahead_recall(default.model, ids[:, :16], ids[:, 16:], [1])
    config = default.model.config
    assert recall[1] > 2 * config.num_experts_per_tok / config.num_local_experts
