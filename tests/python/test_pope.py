"""POPE: the scorer (as POPE and LLaVA score), the question loaders, and the harness on
tiny MoE-VLMs, where every exact policy must give the all-resident answers."""

from __future__ import annotations

import json
import zlib

import pytest
import tiny_models as tm
import torch
from expertflow.eval import pope
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("Yes, there is not a cat.", "no"),
        ("There is a dog. No cat.", "yes"),  # only the first sentence counts
        ("Not sure", "yes"),  # "Not" with a capital is not one of POPE's words
        ("No,", "no"),
        ("nothing", "yes"),
    ],
)
def test_parse_answer(text, answer):
    assert pope.parse_answer(text) == answer


def test_metrics_on_known_counts():
    # TP 3, FP 1, TN 4, FN 2: accuracy 7/10, precision 3/4, recall 3/5, F1 2/3, yes 4/10.
    predictions = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    m = pope.metrics(predictions, labels)
    assert m["accuracy"] == pytest.approx(0.7) and m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.4) and m["n"] == 10


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_both_question_formats(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    for split in ("adversarial", "random"):
        write_lines(
            labels / f"coco_pope_{split}.json",
            [
                {
                    "question_id": 1,
                    "image": "a.jpg",
                    "text": "Is there a cat in the image?",
                    "label": "yes",
                },
                {
                    "question_id": 2,
                    "image": "a.jpg",
                    "text": "Is there a dog in the image?",
                    "label": "no",
                },
            ],
        )
    upstream = pope.load_questions(labels)
    assert [(q.split, q.label) for q in upstream] == [
        ("adversarial", "yes"),
        ("adversarial", "no"),
        ("random", "yes"),
        ("random", "no"),
    ]
    llava = tmp_path / "llava.jsonl"
    write_lines(
        llava,
        [
            {
                "question_id": i + 1,
                "image": "a.jpg",
                "category": split,
                "text": f"Is there a cat in the image?\n{pope.SUFFIX}",
            }
            for i, split in enumerate(["adversarial", "adversarial", "random", "random"])
        ],
    )
    questions = pope.load_questions(llava, labels=labels)
    assert [q.label for q in questions] == ["yes", "no", "yes", "no"]
    assert questions[0].text == "Is there a cat in the image?"
    answers = tmp_path / "answers.jsonl"
    write_lines(
        answers,
        [
            {"question_id": 1, "text": "Yes"},
            {"question_id": 2, "text": "Yes"},
            {"question_id": 3, "text": "No"},
            {"question_id": 4, "text": "No"},
        ],
    )
    scores = pope.score_answers_file(questions, answers)
    assert scores["adversarial"]["precision"] == 0.5 and scores["random"]["recall"] == 0.0


def test_a_bad_label_names_its_line(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    write_lines(
        path,
        [
            {"question_id": 1, "image": "a.jpg", "text": "Is there?", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "Is there?", "label": "maybe"},
        ],
    )
    with pytest.raises(ValueError, match="coco_pope_random.json:2: label must be"):
        pope.load_questions(path)


def tiny_vlm(arch: str) -> pope.VLM:
    """A tiny random MoE-VLM asked like a real one: the image (drawn shapes, chosen by the
    file's name) and the question decide its inputs; its first new token decides yes or no."""
    model, _ = tm.build(arch, seed=0)

    def prepare(image_path, prompt):
        seed = zlib.crc32(image_path.name.encode()) % 1000
        return tm._vlm_inputs(
            arch, seed, torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
        )

    def decode(ids):
        return "Yes" if int(ids[0]) % 2 == 0 else "No, there is not."

    return pope.VLM(model, prepare, decode, f"tiny {arch}")


@pytest.mark.parametrize("arch", tm.VLMS)
def test_harness_exact_policies_agree_with_resident(arch, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    questions = []
    for i, shape in enumerate(["red square", "blue circle", "green bar"]):
        name = f"img{i}.png"
        Image.fromarray(tm.draw_image(i, 32, 32)).save(images / name)
        for j, thing in enumerate(["cat", shape]):
            questions.append(
                pope.Question(
                    2 * i + j + 1,
                    name,
                    f"Is there a {thing} in the image?",
                    "yes" if j else "no",
                    "random" if i < 2 else "popular",
                )
            )
    vlm = tiny_vlm(arch)
    report = pope.run(
        vlm,
        questions,
        images,
        tmp_path / "out",
        slots=4,
        max_new_tokens=4,
        calibration=2,
        progress=False,
    )
    assert set(report["policies"]) == {*pope.EXACT, "expertflow+car (lossy)"}
    for policy, entry in report["policies"].items():
        if policy in pope.EXACT:
            assert entry["agreement_with_resident"] == 1.0, policy
            assert all(change == 0.0 for change in entry["f1_change"].values()), policy
        assert sum(m["n"] for m in entry["splits"].values()) == len(questions)
    lossy = report["policies"]["expertflow+car (lossy)"]
    assert 0.0 <= lossy["agreement_with_resident"] <= 1.0 and "speed_over_resident" in lossy
    assert 0.0 <= report["policies"]["lru"]["hit_rate"] < 1.0
    assert "| expertflow | random |" in (tmp_path / "out" / "pope.md").read_text()
    # Resumable: a rerun asks nothing again.
    lines = (tmp_path / "out" / "answers_lru.jsonl").read_text().count("\n")
    pope.run(
        vlm,
        questions,
        images,
        tmp_path / "out",
        slots=4,
        max_new_tokens=4,
        policies=("lru",),
        progress=False,
    )
    assert (tmp_path / "out" / "answers_lru.jsonl").read_text().count("\n") == lines
