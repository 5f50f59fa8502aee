"""Trains the embedded default model: a small Mixtral-shaped MoE on Python's own sources.

Corpus: every `.py` file under `sysconfig.get_paths()["stdlib"]` of the Python running
this script, sorted by path, leaving out any file inside a folder named `test`, `tests`,
`idle_test` or `site-packages` (tests are repetitive; site-packages is not the stdlib).
Every 20th file of that sorted list is held out for validation. The tokenizer is a
byte-level BPE (`tokenizers`) trained on the training files only; files are joined by an
end-of-text token. Initialisation and windows come from fixed seeds and torch runs one
thread, so a rerun on the same Python, torch and CPU gives the same model: two 20-step
runs wrote byte-identical weights and tokenizer (the full run was not repeated).

The shape puts most bytes in the experts (8 per layer, top-2), so that caching them is
what matters, and fits the shipped weights in about 12 MB of float32 safetensors. Writes
the checkpoint (config, safetensors, tokenizer) to `python/expertflow/default_model/`,
which `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load,
and the loss curve to `bench/results/train_default.{json,png}`.

    nice -n 10 python bench/train_default.py     # 17 minutes on one core of a Xeon
    python bench/train_default.py --steps 20 --out /tmp/m --results /tmp/m   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import sysconfig
import time
from pathlib import Path

import torch
from expertflow.cli import DEFAULT_PROMPT
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

ROOT = Path(__file__).resolve().parent.parent
EXCLUDED_FOLDERS = {"test", "tests", "idle_test", "site-packages"}
HOLD_OUT_EVERY = 20
EOS = "<|endoftext|>"

SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    # The Switch-style coefficient: without balancing, a small MoE routes most tokens to
    # one or two experts per layer and there is nothing left to cache.
    "router_aux_loss_coef": 0.01,
}


def corpus_files() -> tuple[list[Path], list[Path]]:
    """The stdlib's .py files (see the module note), split into training and validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not EXCLUDED_FOLDERS & set(p.relative_to(root).parts[:-1])
    )
    validation = files[::HOLD_OUT_EVERY]
    held = set(validation)
    return [p for p in files if p not in held], validation


def read_text(path: Path) -> str:
    # A few stdlib files declare latin-1; replacing their odd bytes costs nothing here.
    return path.read_bytes().decode("utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((read_text(p) for p in files), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS)


def encode(tokenizer: PreTrainedTokenizerFast, files: list[Path]) -> torch.Tensor:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for path in files:
        ids.extend(tokenizer(read_text(path)).input_ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model, tokens: torch.Tensor, length: int, count: int) -> float:
    """Mean loss over `count` evenly spaced windows: the same windows at every evaluation."""
    model.eval()
    starts = torch.linspace(0, len(tokens) - length - 1, count).long()
    losses = [
        model(input_ids=batch, labels=batch).loss.item()
        for batch in windows(tokens, starts, length).split(8)
    ]
    model.train()
    return sum(losses) / len(losses)


def build_model(vocab_size: int, eos_id: int, seed: int) -> MixtralForCausalLM:
    config = MixtralConfig(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, **SHAPE)
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def train(model, train_tokens, val_tokens, args) -> dict:
    """AdamW with warmup and cosine decay; returns the loss curve."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, args.steps // 20, args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    curve = {"step": [], "train_loss": [], "val_loss": [], "seconds": []}
    recent: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train_tokens) - args.seq, (args.batch,), generator=generator)
        batch = windows(train_tokens, starts, args.seq)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(out.loss.item() - (out.aux_loss.item() * SHAPE["router_aux_loss_coef"]))
        if step % args.eval_every == 0 or step == args.steps:
            val = validation_loss(model, val_tokens, args.seq, args.val_windows)
            elapsed = time.perf_counter() - start
            for key, value in zip(curve, (step, sum(recent) / len(recent), val, elapsed)):
                curve[key].append(value)
            recent.clear()
            print(
                f"step {step:5d}  train {curve['train_loss'][-1]:.3f}  val {val:.3f}  "
                f"{elapsed / 60:.1f} min",
                flush=True,
            )
    return curve


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(curve["step"], curve["train_loss"], label="train (mean since last point)")
    axes.plot(curve["step"], curve["val_loss"], label="validation (held-out files)")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy, nats per token")
    axes.set_title("Default model: Mixtral-shaped MoE on the Python stdlib")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def sample(model, tokenizer, prompt: str, tokens: int) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "python/expertflow/default_model"))
    parser.add_argument("--results", default=str(ROOT / "bench/results"))
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--val-windows", type=int, default=32)
    # One intra-op thread: on a shared 2-core machine two threads that wait on each other
    # ran 5-10x slower whenever another process took a core.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_files, val_files = corpus_files()
    tokenizer = train_tokenizer(train_files, args.vocab)
    train_tokens, val_tokens = encode(tokenizer, train_files), encode(tokenizer, val_files)
    print(
        f"corpus: {len(train_files)} training files ({len(train_tokens):,} tokens), "
        f"{len(val_files)} validation files ({len(val_tokens):,} tokens), "
        f"stdlib of Python {platform.python_version()}",
        flush=True,
    )
    model = build_model(len(tokenizer), tokenizer.eos_token_id, args.seed)
    curve = train(model, train_tokens, val_tokens, args)

    out = Path(args.out)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plot(curve, results / "train_default.png")
    prompt = DEFAULT_PROMPT
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "corpus": {
            "root": 'sysconfig.get_paths()["stdlib"]',
            "excluded_folders": sorted(EXCLUDED_FOLDERS),
            "validation": f"every {HOLD_OUT_EVERY}th file of the sorted list",
            "train_files": len(train_files),
            "val_files": len(val_files),
            "train_tokens": len(train_tokens),
            "val_tokens": len(val_tokens),
        },
        "shape": SHAPE,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "results")},
        "minutes": curve["seconds"][-1] / 60,
        "curve": curve,
        "sample": {"prompt": prompt, "greedy_64": sample(model, tokenizer, prompt, 64)},
    }
    (results / "train_default.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"final: train {curve['train_loss'][-1]:.3f}, val {curve['val_loss'][-1]:.3f}")
    print(prompt + report["sample"]["greedy_64"])
    print(f"wrote {out} and {results / 'train_default.png'}")


if __name__ == "__main__":
    main()
