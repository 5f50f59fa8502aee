"""The `expertflow` command's run and bench on the embedded default model."""

from __future__ import annotations

import json

import pytest
import torch
from expertflow import build_info, cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_prints_text_and_stats(capsys):
    from expertflow import benchmark, models

    assert cli.main(["run", "--max-new-tokens", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    default_slots = benchmark.default_slots(models.default_model().model)
    assert summary["num_slots"] == default_slots and summary["misses"] > 0
    assert 0.0 < summary["prefill_seconds"] < 4 / summary["tokens_per_second"]
    assert 0.0 <= summary["hit_rate"] <= 1.0 and summary["tokens_per_second"] > 0


def test_bench_runs_every_config_with_the_resident_tokens(tmp_path, capsys):
    args = [
        "bench",
        "--max-new-tokens",
        "4",
        "--prompt",
        "a short prompt",
        "--out",
        str(tmp_path),
        "--reps",
        "2",
        "--json",
    ]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for row in result["configs"].values():
        assert len(row["tokens_per_second_by_round"]) == 2
        assert 0.0 < row["prefill_seconds"] < row["seconds"] and row["decode_tokens_per_second"] > 0
    assert list(result["configs"]) == [
        "resident",
        "no cache",
        "static",
        "lru",
        "lru+prefetch",
        "expertflow",
    ]
    assert all(row["same_tokens_as_reference"] for row in result["configs"].values())
    assert result["configs"]["no cache"]["hit_rate"] == 0.0
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.png").stat().st_size > 0


def test_run_writes_python_by_default(capsys):
    """The default prompt is code, the text decodes whole (the random model's byte tokens
    printed U+FFFD for every split character), and nothing but the text and stats shows."""
    assert cli.main(["run", "--max-new-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    assert "Loading weights" not in err  # transformers' bar, noise before the text
    assert out.startswith(f"embedded default (Mixtral-shaped MoE trained on the Python stdlib): "
                          f"{cli.DEFAULT_PROMPT!r} ->\n")  # fmt: skip
    text = out.split(" ->\n", 1)[1].split("\n\n24 tokens at ")[0]
    assert text.strip() and "\ufffd" not in text


@pytest.mark.parametrize("command", ["run", "bench", "eval-pope"])
def test_zero_slots_is_a_clear_error(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--slots", "0"])
    assert exit_.value.code == 2
    assert "argument --slots: 0 slots cannot hold an expert" in capsys.readouterr().err


def test_bad_reps_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["bench", "--reps", "0", "--out", str(tmp_path)]) == 2
    assert "reps must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(build_info()["backends"]["cuda"]["usable"], reason="CUDA is usable here")
@pytest.mark.parametrize("command", ["run", "bench", "eval-pope"])
def test_unusable_device_is_a_clear_error(command, tmp_path, capsys):
    args = [command, "--device", "cuda"]
    if command == "eval-pope":
        args += ["--model", str(tmp_path), "--questions", str(tmp_path), "--images", str(tmp_path)]
    assert cli.main(args) == 2
    assert "--device cuda: CUDA is not usable here" in capsys.readouterr().err


def test_bad_model_path_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["run", "--model", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def save_checkpoint(model, folder) -> None:
    """A checkpoint directory as from_pretrained reads it: weights and a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 200)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]").save_pretrained(folder)


def run_args(folder, slots: str = "4") -> list[str]:
    return ["run", "--model", str(folder), "--prompt", "w5 w9 w17 w3", "--slots", slots,
            "--max-new-tokens", "4", "--json"]  # fmt: skip


def test_run_on_a_local_checkpoint(tmp_path, capsys):
    """A bf16 checkpoint runs in bf16 (--dtype auto), not upcast."""
    import tiny_models as tm

    model, _ = tm.build("mixtral")
    save_checkpoint(model.to(torch.bfloat16), tmp_path)
    assert cli.main(run_args(tmp_path)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == tmp_path.name and summary["num_slots"] == 4 and summary["misses"] > 0
    assert summary["dtype"] == "bfloat16"


def test_a_checkpoint_that_is_not_moe_or_a_budget_too_small_is_a_clear_error(tmp_path, capsys):
    import tiny_models as tm
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, vocab_size=256)  # fmt: skip
    save_checkpoint(LlamaForCausalLM(dense), tmp_path / "dense")
    assert cli.main(run_args(tmp_path / "dense")) == 2
    assert "LlamaForCausalLM has no experts module" in capsys.readouterr().err
    save_checkpoint(tm.build("mixtral")[0], tmp_path / "moe")
    assert cli.main(run_args(tmp_path / "moe", slots="1")) == 2
    assert "1 slots is below the minimum of 2 slots" in capsys.readouterr().err


def test_the_bench_leaves_the_cpu_copies_a_core():
    from expertflow.benchmark import core_for_copies

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with core_for_copies("cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with core_for_copies("cuda"):  # a GPU's copies take no host core
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_random_models_draw_the_embedding_in_proportion_to_the_width():
    import tiny_models as tm
    from expertflow.models import EMBEDDING_STD_PER_WIDTH, random_mixtral
    from transformers import MixtralConfig

    base = tm.build_config("mixtral").to_dict()
    for hidden in (2 * base["hidden_size"], 8 * base["hidden_size"]):
        config = MixtralConfig(**{**base, "hidden_size": hidden})
        std = random_mixtral(config).get_input_embeddings().weight.std().item()
        assert std == pytest.approx(EMBEDDING_STD_PER_WIDTH * hidden, rel=0.05)


def test_bench_skips_resident_when_the_model_does_not_fit(monkeypatch):
    """On a device too small for the whole model, the resident row is skipped with the
    reason, and the first offloaded row is the reference the others must match."""
    from expertflow import benchmark, models

    monkeypatch.setattr(benchmark, "resident_room", lambda model, device: "too big here")
    loaded = models.default_model()
    result = benchmark.run(
        loaded,
        benchmark.DEFAULT_PROMPTS[:1],
        configs=("resident", "lru", "expertflow"),
        max_new_tokens=4,
        reps=1,
        progress=False,
    )
    assert result["skipped"] == {"resident": "too big here"}
    assert list(result["configs"]) == ["lru", "expertflow"] and result["reference"] == "lru"
    assert all(row["same_tokens_as_reference"] for row in result["configs"].values())
    assert "resident       skipped: too big here" in benchmark.table(result)
