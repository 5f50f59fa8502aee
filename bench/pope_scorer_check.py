"""Checks the POPE scorer against a published run: LLaVA-1.5-13B's answers must score
F1 84.46 / 86.25 / 87.14 (adversarial / popular / random), as LLaVA's eval_pope.py gives.

    python bench/pope_scorer_check.py [--data ../shared/data/pope]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from expertflow.eval import pope

PUBLISHED = {"adversarial": 84.46, "popular": 86.25, "random": 87.14}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/pope")
    )
    data = Path(parser.parse_args().data)
    if not (data / "llava_eval").is_dir():
        print(f"skipped: no {data / 'llava_eval'}")
        return 0
    questions = pope.load_questions(
        data / "llava_eval/llava_pope_test.jsonl", labels=data / "coco_llava_e3e3926"
    )
    scores = pope.score_answers_file(questions, data / "llava_eval/answers_llava-v1.5-13b.jsonl")
    ok = True
    for split, published in PUBLISHED.items():
        f1 = round(100 * scores[split]["f1"], 2)
        ok &= f1 == published
        print(
            f"{split:12} F1 {f1:.2f} (published {published:.2f}) {'ok' if f1 == published else 'MISMATCH'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
