"""Runs the paper's ablation on the default job and prints the README's table.

Four variants of the tiny EMMA on easy-VQA (Cobra: no multi-scale fusion and no pixel loss;
+MFF; +pixel loss; EMMA: both), each with the given seeds, every run with the same flags
otherwise. Each run's test report is the `eval.json` that `train` writes in its run folder; this
script only reads those files, averages them per variant and prints mean and spread (half the
range over the seeds) per question type, with the wall time of each run.

    python3 scripts/ablation.py --seeds 0 1 [--split test] [-- extra train flags]

The train binary must be built first (`cargo build --release -p train`). Runs go under
`runs/ablation/VARIANT-seedS`; an existing run folder is replaced (`--overwrite`).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "Cobra": ["--no-mff", "--no-pixel-loss"],
    "+MFF": ["--no-pixel-loss"],
    "+pixel loss": ["--no-mff"],
    "EMMA": [],
}
TYPES = ["colour", "shape", "yes/no"]


def run(binary, variant, seed, split, extra):
    out = Path("runs/ablation") / f"{variant.replace(' ', '-').replace('+', 'plus-')}-seed{seed}"
    cmd = [binary, "--seed", str(seed), "--out", str(out), "--overwrite", "--eval-split", split]
    cmd += VARIANTS[variant] + extra
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    seconds = time.time() - start
    report = json.loads((out / "eval.json").read_text())
    return report, seconds


def cell(values):
    mean = statistics.mean(values)
    spread = (max(values) - min(values)) / 2
    return f"{100 * mean:.1f} ± {100 * spread:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--binary", default="target/release/train")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to every run")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    rows = []
    for variant in VARIANTS:
        reports, times = [], []
        for seed in args.seeds:
            report, seconds = run(args.binary, variant, seed, args.split, extra)
            reports.append(report)
            times.append(seconds)
        cells = [cell([r["accuracy"] for r in reports])]
        cells += [cell([r["by_type"][t]["accuracy"] for r in reports]) for t in TYPES]
        minutes = f"{statistics.mean(times) / 60:.1f}"
        rows.append(f"| {variant} | " + " | ".join(cells) + f" | {minutes} |")
    seeds = ", ".join(map(str, args.seeds))
    print(f"\neasy-VQA {args.split} accuracy (%), mean ± half-range over seeds {seeds}:\n")
    print("| variant | all | " + " | ".join(TYPES) + " | min per run |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
