"""Success of the seeing policies against the data and compute that trained them (README, "Seeing policy").

Each `--point` names a policy's evaluation (`gato-ros eval --json`), the episodes it was trained on and the
windows its optimizer saw (steps × batch, summed over the stages that led to it):

    python scripts/seeing_progress.py --out docs/see-progress.png \
        --point "first GPU run (recipe of 99e6140)" runs/see-h200/eval-see-int8.json 645 242816 \
        --point "BC, 1-timestep window" runs/see3/eval-ablation-w1-int8.json 834 528384 \
        --point "BC, 4-timestep window" runs/see3/eval-bc-int8.json 834 534528 \
        --point "BC + 1 DAgger round" runs/see4/eval-see4-int8.json 984 745728 \
        --point "+ CPU aux pilot (weight 5, 1 600 steps of 32)" runs/auxpilot/eval-aux5-long-int8.json 984 796928 \
        --point "+ 2 600 CPU steps, scene camera" runs/see6/eval-scene-int8.json 1550 880128 \
        --point "+ 2 600 CPU steps, scene + wrist cameras" runs/see6/eval-both-int8.json 1550 880128 \
        --point "scene + wrist, + 1 DAgger round (700 steps of 32)" runs/see6/eval-both-d1-int8.json 1610 902528 \
        --point "scene + wrist, + 2 DAgger rounds on an H200 (1 169 steps of 256)" runs/see8/eval-see-int8.json \
            2008 1179392 \
        --point "+ 1 CPU DAgger round (900 steps of 32)" runs/see9/eval-ft-int8.json 2128 1208192 \
        --point "+ 2 CPU DAgger rounds (900 steps of 32 each)" runs/see10/eval-ft-int8.json 2248 1236992 \
        --point "+ 3 CPU DAgger rounds (+800 steps of 32)" runs/see11/eval-ft-int8.json 2348 1262592

(the README's runs: windows = steps × batch of every training stage behind the file). A dashed line marks the
90 % bar.

Prints one line per point (success with its 95 % Wilson interval) and plots success against windows seen
and against training episodes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", nargs=4, action="append", required=True,
                        metavar=("LABEL", "EVAL_JSON", "EPISODES", "WINDOWS"))
    parser.add_argument("--out", type=Path, default=Path("runs/see-progress.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for label, path, episodes, windows in args.point:
        result = json.loads(Path(path).read_text())
        low, high = result["success_ci95"]
        rows.append((label, int(episodes), int(windows), result["successes"], result["episodes"], low, high))
        print(f"{label}: {result['successes']}/{result['episodes']} ({100 * low:.1f}-{100 * high:.1f} %), "
              f"{episodes} training episodes, {int(windows):,} windows seen")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, column, name in ((axes[0], 2, "windows seen by the optimizer (steps × batch)"),
                             (axes[1], 1, "training episodes")):
        for label, *values in rows:
            x = values[column - 1]
            k, n, low, high = values[2:]
            rate = k / n
            ax.errorbar([x], [100 * rate], yerr=[[100 * (rate - low)], [100 * (high - rate)]], fmt="o", capsize=3,
                        label=label)
        ax.set_xlabel(name)
        ax.axhline(90, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success, seeds 100000-100099 (%)")
    axes[0].set_ylim(-2, 100)  # the bar is 90 %: the scale keeps it in view
    axes[0].legend(fontsize=8)
    fig.suptitle("Seeing policy (cameras at 64 px + joints): success against data and compute")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
