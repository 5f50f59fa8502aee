"""POPE (object hallucination) scoring, exactly as POPE and LLaVA's evaluation do it.

Question files come in two formats:
- upstream POPE: one JSON object per line per split file, `coco_pope_{split}.json`, with
  `question_id`, `image`, `text` and `label` ("yes" / "no");
- LLaVA's single test file: the same questions with a `category` (the split) and the
  answer-format suffix, but no labels; the labels come from the per-split files, matched
  by position within each split, as LLaVA's eval_pope.py matches them.

An answer is "no" when the text before its first '.' (commas dropped, split on spaces)
has a word "No", "no" or "not"; otherwise "yes". Positive class: yes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUFFIX = "Answer the question using a single word or phrase."
SPLITS = ("adversarial", "popular", "random")


@dataclass
class Question:
    question_id: int
    image: str
    text: str  # without the answer-format suffix
    label: str | None  # "yes" / "no", None when unknown
    split: str


def _json_lines(path: Path) -> list[dict]:
    rows = []
    with open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
    return rows


def _strip_suffix(text: str) -> str:
    return text.replace("\n" + SUFFIX, "").replace(SUFFIX, "").strip()


def load_questions(path: str | Path, labels: str | Path | None = None) -> list[Question]:
    """Questions from an upstream split file, a folder of them, or LLaVA's single file
    (then `labels`: the folder of upstream split files its labels come from)."""
    path = Path(path)
    if path.is_dir():
        return [
            q
            for split in SPLITS
            if (path / f"coco_pope_{split}.json").exists()
            for q in load_questions(path / f"coco_pope_{split}.json")
        ]
    rows = _json_lines(path)
    if rows and "category" in rows[0]:  # LLaVA's file
        questions = [
            Question(r["question_id"], r["image"], _strip_suffix(r["text"]), None, r["category"])
            for r in rows
        ]
        if labels is not None:
            by_split = {s: [q for q in questions if q.split == s] for s in SPLITS}
            for split, members in by_split.items():
                if members:
                    annotated = load_questions(Path(labels) / f"coco_pope_{split}.json")
                    if len(annotated) != len(members):
                        raise ValueError(
                            f"{split}: {len(members)} questions but {len(annotated)} labels"
                        )
                    for question, truth in zip(members, annotated):
                        question.label = truth.label
        return questions
    split = path.stem.rsplit("_", 1)[-1]
    for number, r in enumerate(rows, start=1):
        if r.get("label") not in ("yes", "no"):
            raise ValueError(
                f"{path}:{number}: label must be 'yes' or 'no', got {r.get('label')!r}"
            )
    return [
        Question(r["question_id"], r["image"], _strip_suffix(r["text"]), r["label"], split)
        for r in rows
    ]


def parse_answer(text: str) -> str:
    """'yes' or 'no', as POPE and LLaVA read a free-form answer."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio, positive class yes."""
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(pairs),
        "accuracy": (tp + tn) / len(pairs) if pairs else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(p == "yes" for p, _ in pairs) / len(pairs) if pairs else 0.0,
    }


def score(questions: list[Question], answers: dict[int, str]) -> dict[str, dict]:
    """Metrics per split of the answered questions (answers: question_id -> text)."""
    result = {}
    for split in dict.fromkeys(q.split for q in questions):
        asked = [q for q in questions if q.split == split and q.question_id in answers]
        result[split] = metrics(
            [parse_answer(answers[q.question_id]) for q in asked], [q.label for q in asked]
        )
    return result


def score_answers_file(questions: list[Question], answers_file: str | Path) -> dict[str, dict]:
    """Scores a LLaVA-format answers file (`question_id`, `text` per line)."""
    answers = {r["question_id"]: r["text"] for r in _json_lines(Path(answers_file))}
    return score(questions, answers)


# The harness: the same questions through a MoE-VLM under each policy.

POLICIES = {
    "resident": None,
    "static": {"policy": "static", "prefetch": False},
    "lru": {"policy": "lru", "prefetch": False},
    "expertflow": {"policy": "expertflow", "prefetch": True},
    # LOSSY: cache-aware routing swaps a missing expert for a resident one within 0.1 of
    # its router probability; shown beside the exact policies, never instead of them.
    "expertflow+car (lossy)": {
        "policy": "expertflow",
        "prefetch": True,
        "cache_aware_routing": 0.1,
    },
}
EXACT = ("resident", "static", "lru", "expertflow")


@dataclass
class VLM:
    """A vision-language model and how to ask it: prepare(image_path, prompt) gives the
    model's inputs, decode(new token ids) the answer text."""

    model: object
    prepare: object
    decode: object
    name: str = "vlm"


def from_pretrained(path: str | Path, dtype: str = "auto", device: str = "cpu") -> VLM:
    """A local checkpoint with its processor, asked through its chat template. The model
    stays on the host (in the checkpoint's dtype with "auto"); inputs go to `device`."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from expertflow.models import torch_dtype

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype(dtype)).eval()

    def prepare(image_path, prompt):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": Image.open(image_path).convert("RGB")},
                    {"type": "text", "text": prompt},
                ],
            }
        ]
        return processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(device)

    def decode(ids):
        return processor.decode(ids, skip_special_tokens=True).strip()

    return VLM(model, prepare, decode, Path(path).name)


def _answers(path: Path) -> dict[int, str]:
    return {r["question_id"]: r["text"] for r in _json_lines(path)} if path.exists() else {}


def run(
    vlm: VLM,
    questions: list[Question],
    images: str | Path,
    out: str | Path,
    *,
    device: str = "cpu",
    slots: int | None = None,
    budget=None,
    policies=tuple(POLICIES),
    max_new_tokens: int = 8,
    calibration: int = 8,
    progress: bool = True,
) -> dict:
    """Answers every question under each policy and scores them. Answers are appended to
    out/answers_{policy}.jsonl as they come, so a rerun skips what is done."""
    import contextlib
    import time

    import torch
    from tqdm import tqdm

    from expertflow.benchmark import default_slots, resident, resident_room
    from expertflow.offloading import offload
    from expertflow.traces import calibrate_static

    out, images = Path(out), Path(images)
    out.mkdir(parents=True, exist_ok=True)
    sizing = (
        {"budget": budget} if budget is not None else {"slots": slots or default_slots(vlm.model)}
    )

    def ask(question):
        inputs = vlm.prepare(images / question.image, f"{question.text}\n{SUFFIX}")
        with torch.no_grad():
            ids = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1] :]
        return vlm.decode(new), len(new)

    static_set = []
    if "static" in policies:  # calibrated on the routing of the first questions
        with offload(vlm.model, device, **sizing, policy="lru", prefetch=False) as handle:
            with handle.trace(None) as trace:
                for question in questions[:calibration]:
                    ask(question)
            static_set = calibrate_static(trace, handle.num_slots, "global")

    report = {
        "model": vlm.name,
        "device": device,
        **sizing,
        "questions": len(questions),
        "policies": {},
    }
    for policy in policies:
        options = POLICIES[policy]
        if options is None and (reason := resident_room(vlm.model, device)) is not None:
            report.setdefault("skipped", {})[policy] = reason
            continue
        path = out / f"answers_{policy.replace(' ', '_')}.jsonl"
        done = _answers(path)
        todo = [q for q in questions if q.question_id not in done]
        tokens, seconds, stats = 0, 0.0, None
        with contextlib.ExitStack() as stack:
            if options is None:
                stack.enter_context(resident(vlm.model, device))
                handle = None
            else:
                extra = {"static_experts": static_set} if policy == "static" else {}
                handle = stack.enter_context(
                    offload(vlm.model, device, **sizing, **options, **extra)
                )
            with open(path, "a") as sink:
                for question in tqdm(todo, desc=policy, disable=not progress):
                    start = time.perf_counter()
                    text, count = ask(question)
                    seconds += time.perf_counter() - start
                    tokens += count
                    sink.write(
                        json.dumps({"question_id": question.question_id, "text": text}) + "\n"
                    )
                    sink.flush()
                    done[question.question_id] = text
            if handle is not None:
                stats = handle.stats()
        entry = {"splits": score(questions, done), "answers": str(path)}
        if tokens:
            entry["tokens_per_second"] = tokens / seconds
        if stats is not None:
            entry["hit_rate"] = stats["hit_rate"]
        report["policies"][policy] = entry
        report["policies"][policy]["_done"] = done
    if "resident" in report["policies"]:
        baseline = report["policies"]["resident"]
        reference = baseline["_done"]
        for entry in report["policies"].values():
            shared = [k for k in entry["_done"] if k in reference]
            same = sum(entry["_done"][k] == reference[k] for k in shared)
            entry["agreement_with_resident"] = same / len(shared) if shared else None
            entry["f1_change"] = {
                s: m["f1"] - baseline["splits"][s]["f1"]
                for s, m in entry["splits"].items()
                if s in baseline["splits"]
            }
            if entry.get("tokens_per_second") and baseline.get("tokens_per_second"):
                entry["speed_over_resident"] = (
                    entry["tokens_per_second"] / baseline["tokens_per_second"]
                )
    for entry in report["policies"].values():
        del entry["_done"]
    (out / "pope.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "pope.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        (
            f"POPE: {report['model']} on {report['device']}, "
            f"{report.get('slots') or report.get('budget')} slots/budget"
        ),
        "",
        (
            "| policy | split | accuracy | precision | recall | F1 | F1 change | yes-ratio "
            "| agreement | tokens/s | hit rate |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for policy, entry in report["policies"].items():
        for split, m in entry["splits"].items():
            agreement = entry.get("agreement_with_resident")
            lines.append(
                f"| {policy} | {split} | {100 * m['accuracy']:.2f} | {100 * m['precision']:.2f} | "
                f"{100 * m['recall']:.2f} | {100 * m['f1']:.2f} | "
                f"{100 * entry.get('f1_change', {}).get(split, 0.0):+.2f} | {m['yes_ratio']:.3f} | "
                f"{'-' if agreement is None else f'{100 * agreement:.1f}%'} | "
                f"{entry.get('tokens_per_second', 0):.2f} | {entry.get('hit_rate', 1.0):.3f} |"
            )
    return "\n".join(lines) + "\n"
