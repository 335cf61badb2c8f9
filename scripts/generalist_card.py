"""Write the shipped generalist's CI card (models/generalist_int8.json) from a conditioning table of that file.

    .venv/bin/python scripts/generalist_card.py runs/conditioning-six --seeds 3 --over-ros xarm6:lift_red:100000

For every (arm, task) of the table it records the first --seeds seeds on which the task's instruction succeeded, and
how many of them the paired task's demonstration (as prompt) succeeded on (`scripts/conditioning_table.py` cells);
`tests/test_shipped_generalist.py` replays those episodes in CI. The over-ROS case is one episode
the test runs through sim_bridge, policy_node and the watchdog.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell_outcomes(table: Path, arm: str, task: str, condition: str) -> dict[int, bool]:
    cell = json.loads((table / "cells" / arm / task / f"{condition}.json").read_text())
    return {int(e["seed"]): bool(e["success"]) for e in cell["per_episode"]}


def card_cases(table: Path, seeds: int) -> list[dict]:
    """One case per (arm, task) of the table: the first `seeds` seeds its instruction succeeded on, and how many of
    them the paired task's demonstration (as prompt) also succeeded on."""
    summary = json.loads((table / "conditioning.json").read_text())
    cases = []
    for arm, tasks in summary["cells"].items():
        for task in tasks:
            instructed = cell_outcomes(table, arm, task, "instruction")
            chosen = sorted(s for s, ok in instructed.items() if ok)[:seeds]
            if len(chosen) < seeds:
                raise SystemExit(f"{arm} {task}: the instruction succeeded on {len(chosen)} seeds, fewer than {seeds}")
            wrong = cell_outcomes(table, arm, task, "wrong-prompt")
            cases.append({"arm": arm, "task": task, "seeds": chosen, "instruction": seeds,
                          "wrong-prompt": sum(wrong[s] for s in chosen)})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="a scripts/conditioning_table.py --out folder of the shipped file")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per case (from the table's first)")
    parser.add_argument("--over-ros", required=True, help="ARM:TASK:SEED, an episode the file succeeds in")
    parser.add_argument("--out", type=Path, default=Path("models/generalist_int8.json"))
    args = parser.parse_args()
    arm, task, seed = args.over_ros.split(":")
    cases = card_cases(args.table, args.seeds)
    card = {"model": "generalist_int8.onnx", "arms": sorted({c["arm"] for c in cases}), "ci_cases": cases,
            "over_ros": {"arm": arm, "task": task, "seed": int(seed)},
            "ci_note": "episodes measured in-process on the machine that trained the file; CI allows one success "
                       "fewer with the instruction and one more with the wrong prompt per case, so a last-bit float "
                       "difference on another CPU cannot fail the build"}
    args.out.write_text(json.dumps(card, indent=2) + "\n")
    print(f"{args.out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
