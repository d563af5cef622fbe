"""Splits an easy-VQA answers file by what each question asks about.

`train` writes every test (or validation) answer to `RUN/answers.jsonl`, and `train eval
--answers FILE` writes the same for any checkpoint. This prints the accuracy of the open colour
and shape questions and of the yes/no questions split by whether they name a colour or a shape
and whether they are negated ("is there not a red shape?"):

    python3 scripts/answer_breakdown.py runs/tiny-easy-vqa/answers.jsonl
"""

import json
import re
import sys
from collections import Counter

COLOURS = "red green blue black gray teal brown yellow".split()
SHAPES = "circle rectangle triangle".split()


def names(question, words):
    return any(re.search(rf"\b{w}\b", question) for w in words)


def group(answer):
    if answer["kind"] != "yes/no":
        return [answer["kind"]]
    q = answer["question"].lower()
    about = "shape" if names(q, SHAPES) else "colour" if names(q, COLOURS) else "other"
    negated = "negated" if re.search(r"\b(not|no)\b", q) else "plain"
    return [f"yes/no on {about}", f"yes/no on {about}, {negated}"]


def main(path):
    right, total = Counter(), Counter()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                answer = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{number}: not a JSON line: {e}")
            for g in group(answer):
                total[g] += 1
                right[g] += bool(answer["right"])
    for g in sorted(total):
        print(f"{g:32s} {right[g]:5d}/{total[g]:5d}  {100 * right[g] / total[g]:5.1f}%")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
