"""Is the conditioning real? One table per arm: success of a policy file on each task it serves under every
condition, beside the scripted expert and the random policy on the same held-out seeds (issue 13, deliverable 5).

    nice -n 10 .venv/bin/python scripts/conditioning_table.py --policy models/generalist_int8.onnx \\
        --episodes 50 --workers 2 --out runs/conditioning

For every (arm, task) the file serves (or those of --arms × --tasks, or --pairs) it runs `gato-ros eval` in-process with
--condition prompt, wrong-prompt, none and instruction (the last only where the file has an instruction model),
and with --policy expert and --policy random, all on seeds --seed, --seed + 1, ... Each finished cell is written
at once (`cells/<arm>/<task>/<cell>.json`, the eval's own JSON plus the command that reruns it), and so are the
tables (`conditioning.json`, `conditioning.md`): a run that is stopped resumes where it was, skipping every
cell already written with the same settings (the same seeds and episode length, and for the policy's own cells the
same file content). The Markdown gives success k/n with its 95 % Wilson interval, the JAT-style normalized score of
each condition (0 = random policy, 100 = scripted expert; `sim.evaluate`) and the right prompt's success minus the
wrong task's prompt's, with its 95 % interval: the conditioning's effect. Demonstrations are rolled once per (arm,
task, seed) and kept under `prompts/` (delete it after changing the expert or the env).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from sim.evaluate import difference_interval, normalized_score, release_worker, resolve_condition, wilson_interval

CONDITION_CELLS = ("prompt", "wrong-prompt", "none", "instruction")
BASELINE_CELLS = ("expert", "random")
CELLS = CONDITION_CELLS + BASELINE_CELLS
HEADINGS = {"prompt": "right prompt", "wrong-prompt": "wrong task's prompt", "none": "no prompt",
            "instruction": "instruction", "expert": "scripted expert", "random": "random policy"}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def eval_argv(args: argparse.Namespace, arm: str, task: str, cell: str, json_path: Path) -> list[str]:
    """The `gato-ros eval` arguments of one cell."""
    policy = ["--policy", cell] if cell in BASELINE_CELLS else ["--policy", str(args.policy), "--condition", cell]
    argv = [*policy, "--arm", arm, "--task", task, "--episodes", str(args.episodes), "--seed", str(args.seed),
            "--workers", str(args.workers), "--provider", args.provider, "--json", str(json_path),
            "--prompt-cache", str(args.out / "prompts")]
    return argv + (["--max-steps", str(args.max_steps)] if args.max_steps else [])


def cell_settings(args: argparse.Namespace, digest: str, cell: str) -> dict:
    """What a written cell must match to be reused: the seeds, the episode length and, for the policy's own
    cells, the file's content."""
    settings = {"episodes": args.episodes, "seed": args.seed, "max_steps": args.max_steps}
    return settings if cell in BASELINE_CELLS else {**settings, "policy_sha256": digest}


def run_cell(args: argparse.Namespace, arm: str, task: str, cell: str, path: Path, settings: dict) -> dict:
    """Run one cell's eval (in this process, its workers in a pool) and write its JSON whole, then return it."""
    from sim import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    partial = path.with_suffix(".partial.json")
    argv = eval_argv(args, arm, task, cell, partial)
    try:
        evaluate.run(parser.parse_args([*argv, "--plot", str(path.with_suffix(".png"))]))
    finally:
        release_worker()
    summary = json.loads(partial.read_text())
    summary["settings"] = settings
    summary["command"] = "gato-ros eval " + " ".join(eval_argv(args, arm, task, cell, path))
    partial.write_text(json.dumps(summary, indent=2))
    os.replace(partial, path)  # a cell file is always a finished cell
    return summary


def load_cell(path: Path, settings: dict) -> dict | None:
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("settings") == settings else None


def cell_entry(summary: dict) -> dict:
    k, n = summary["successes"], summary["episodes"]
    lo, hi = wilson_interval(k, n)
    return {"successes": k, "episodes": n, "success_rate": k / max(n, 1), "success_ci95": [lo, hi]}


def scores(cells: dict[str, dict]) -> dict[str, float | None]:
    """Each condition's normalized score where the task's expert and random cells are done."""
    if not all(b in cells for b in BASELINE_CELLS):
        return {}
    expert, random = cells["expert"]["success_rate"], cells["random"]["success_rate"]
    return {c: normalized_score(cells[c]["success_rate"], random, expert) for c in CONDITION_CELLS if c in cells}


def format_cell(entry: dict | None) -> str:
    if entry is None:
        return "not run"
    lo, hi = entry["success_ci95"]
    return f"{entry['successes']}/{entry['episodes']} ({100 * lo:.0f}–{100 * hi:.0f} %)"


def format_score(score: float | None) -> str:
    return "–" if score is None else f"{score:.0f}"


def prompt_gap(cells: dict[str, dict]) -> str:
    """Right minus wrong task's prompt, in percentage points with its 95 % interval: the conditioning's effect."""
    if not {"prompt", "wrong-prompt"} <= cells.keys():
        return "–"
    right, wrong = cells["prompt"], cells["wrong-prompt"]
    k1, n1, k2, n2 = right["successes"], right["episodes"], wrong["successes"], wrong["episodes"]
    lo, hi = difference_interval(k1, n1, k2, n2)
    return f"{100 * (k1 / n1 - k2 / n2):+.0f} ({100 * lo:+.0f} to {100 * hi:+.0f})"


def markdown(table: dict) -> str:
    lines = [f"Policy `{table['policy']}` (sha256 {table['policy_sha256']}), {table['episodes']} episodes per cell on "
             f"seeds {table['seed']}–{table['seed'] + table['episodes'] - 1}"
             + (f", at most {table['max_steps']} steps" if table["max_steps"] else "") + ". Success k/n (95 % Wilson "
             "interval); normalized score 0 = random policy, 100 = scripted expert, on the same seeds."]
    reasons = sorted({why for tasks in table["not_run"].values() for cells in tasks.values() for why in cells.values()})
    lines += [f"Not run: {why}." for why in reasons]
    for arm, tasks in table["cells"].items():
        lines += ["", f"### {arm}", "", "| task | " + " | ".join(HEADINGS[c] for c in CELLS) + " |",
                  "|---|" + "---|" * len(CELLS)]
        lines += [f"| {task} | " + " | ".join(format_cell(cells.get(c)) for c in CELLS) + " |"
                  for task, cells in tasks.items()]
        lines += ["", f"Normalized score ({arm}), and right minus wrong prompt (success, percentage points, 95 % "
                  "Newcombe interval):", "",
                  "| task | " + " | ".join(HEADINGS[c] for c in CONDITION_CELLS) + " | right − wrong prompt |",
                  "|---|" + "---|" * (len(CONDITION_CELLS) + 1)]
        lines += [f"| {task} | " + " | ".join(format_score(table["normalized_score"][arm][task].get(c))
                                               for c in CONDITION_CELLS) + f" | {prompt_gap(cells)} |"
                  for task, cells in tasks.items()]
    return "\n".join(lines) + "\n"


def write_tables(out: Path, table: dict) -> None:
    for name, text in (("conditioning.json", json.dumps(table, indent=2)), ("conditioning.md", markdown(table))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def served(policy: Path) -> tuple[list[str], list[str], dict[str, list[str]]]:
    from gato_ros.info import describe

    d = describe(policy)
    return d["arms"], d["tasks"], d["trained_tasks"]


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (arm, task) pairs to run: --pairs, else every --arms × --tasks (each default: all the file serves) that
    the file was trained on; refusing an arm or a task the file does not serve."""
    arms, tasks, trained = served(args.policy)
    if args.pairs:
        pairs = [tuple(pair.split(":", 1)) for pair in args.pairs.split(",") if pair]
        if any(len(pair) != 2 for pair in pairs):
            raise SystemExit(f"conditioning_table: --pairs is a comma list of ARM:TASK, not {args.pairs!r}")
    else:
        want_arms = [a for a in args.arms.split(",") if a] or arms
        want_tasks = [t for t in args.tasks.split(",") if t] or tasks
        pairs = [(arm, task) for arm in want_arms for task in want_tasks if task in trained.get(arm, [task])]
    unknown = sorted({a for a, _ in pairs if a not in arms} | {t for _, t in pairs if t not in tasks})
    if unknown:
        raise SystemExit(f"conditioning_table: {args.policy} serves arms {arms} and tasks {tasks}, not {unknown}")
    return pairs


def unavailable(policy: Path, task: str) -> dict[str, str]:
    """The conditions the file cannot take for `task` (an instruction without an instruction model), with why."""
    why = {}
    for condition in CONDITION_CELLS:
        try:
            resolve_condition(str(policy), condition, task)
        except ValueError as e:
            why[condition] = str(e)
    return why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, required=True, help="PATH.onnx")
    parser.add_argument("--arms", default="", help="comma list (default: every arm the file serves)")
    parser.add_argument("--tasks", default="", help="comma list (default: every task the file serves)")
    parser.add_argument("--pairs", default="", help="comma list of ARM:TASK, in place of --arms × --tasks (whose "
                        "default runs the pairs the file was trained on)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=100_000, help="held-out seeds: seed, seed + 1, ...")
    parser.add_argument("--max-steps", type=int, default=None, help="episode step limit (default: the env's)")
    parser.add_argument("--workers", type=int, default=1, help="parallel envs per cell")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/conditioning"))
    args = parser.parse_args(argv)
    pairs = plan(args)
    args.out.mkdir(parents=True, exist_ok=True)
    digest = file_digest(args.policy)
    table: dict = {"policy": str(args.policy), "policy_sha256": digest, "episodes": args.episodes, "seed": args.seed,
                   "max_steps": args.max_steps, "cells": {}, "not_run": {}, "normalized_score": {}}
    for arm, task in pairs:
        done: dict[str, dict] = table["cells"].setdefault(arm, {}).setdefault(task, {})
        not_run = unavailable(args.policy, task)
        if not_run:
            table["not_run"].setdefault(arm, {})[task] = not_run
        for cell in (c for c in CELLS if c not in not_run):
            path = args.out / "cells" / arm / task / f"{cell}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            settings = cell_settings(args, digest, cell)
            summary = load_cell(path, settings)
            if summary is None:
                start = time.perf_counter()
                summary = run_cell(args, arm, task, cell, path, settings)
                print(f"conditioning_table: {arm} {task} {cell}: {summary['successes']}/{summary['episodes']} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            done[cell] = cell_entry(summary)
            table["normalized_score"].setdefault(arm, {})[task] = scores(done)
            write_tables(args.out, table)
    print(f"conditioning_table: wrote {args.out / 'conditioning.md'} and {args.out / 'conditioning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
