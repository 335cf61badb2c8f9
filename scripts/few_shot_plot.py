"""The few-shot study's table and plot (issue 13, the analogue of Gato's figure 10): success on the held-out task
against the number of demonstrations, for the generalist fine-tuned on them and for the same architecture trained
on them from scratch. Reads the evaluations `scripts/few_shot.sh` writes (WORKDIR/{generalist,scratch}-N.eval.json).

    python scripts/few_shot_plot.py runs/few-shot-six --out docs/few-shot.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sim.evaluate import wilson_interval

STARTS = {"generalist": "fine-tuned from the generalist", "scratch": "from scratch"}


def results(workdir: Path) -> dict[str, list[tuple[int, int, int]]]:
    """Start -> [(demonstrations, successes, episodes)] for every evaluation found, fewest demonstrations first."""
    found: dict[str, list[tuple[int, int, int]]] = {start: [] for start in STARTS}
    for start in STARTS:
        for path in workdir.glob(f"{start}-*.eval.json"):
            r = json.loads(path.read_text())
            found[start].append((int(path.name.split("-")[1].split(".")[0]), r["successes"], r["episodes"]))
        found[start].sort()
    return found


def table(found: dict[str, list[tuple[int, int, int]]]) -> str:
    rows = ["| demonstrations | " + " | ".join(STARTS.values()) + " |", "|---" * (len(STARTS) + 1) + "|"]
    by_start = {start: {n: (k, m) for n, k, m in cells} for start, cells in found.items()}
    for n in sorted({n for cells in found.values() for n, _, _ in cells}):
        cells = []
        for start in STARTS:
            if n not in by_start[start]:
                cells.append("–")
                continue
            k, m = by_start[start][n]
            lo, hi = wilson_interval(k, m)
            cells.append(f"{k}/{m} ({100 * lo:.0f}–{100 * hi:.0f} %)")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(found: dict[str, list[tuple[int, int, int]]], task: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for start, label in STARTS.items():
        if not found[start]:
            continue
        n = [c[0] for c in found[start]]
        rate = [100 * k / m for _, k, m in found[start]]
        bounds = [wilson_interval(k, m) for _, k, m in found[start]]
        err = [[r - 100 * lo for r, (lo, _) in zip(rate, bounds, strict=True)],
               [100 * hi - r for r, (_, hi) in zip(rate, bounds, strict=True)]]
        ax.errorbar(n, rate, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("expert demonstrations of the held-out task")
    ax.set_ylabel("success, % (95 % Wilson)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"few-shot: {task}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--task", default="place_blue_at_marker")
    parser.add_argument("--out", type=Path, default=None, help="PNG (default: WORKDIR/few-shot.png)")
    args = parser.parse_args()
    found = results(args.workdir)
    print(table(found))
    out = args.out or args.workdir / "few-shot.png"
    plot(found, args.task, out)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
