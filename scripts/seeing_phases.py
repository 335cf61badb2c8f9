"""Where a policy stalls in the expert's task: the teacher's phase of every state the policy drives into.

    .venv/bin/python scripts/seeing_phases.py models/see_int8.onnx --seeds 100000 --episodes 50 --json J

The scripted expert reads a phase off each observation (approach, grasp, carry, release, retreat) and closes the
fingers only with the hand within its tolerances of the cube (xy, height, yaw: `sim.expert.ExpertConfig`). Per
episode this logs, while the policy (not the expert) drives in-process:
  - the steps spent in each phase, and whether the policy's finger command matched the teacher's;
  - how far the hand was turned from the cube's yaw (modulo 90°) at the start, against at its nearest to the
    grasp window: whether the policy turns the hand to the cube;
  - for an episode that came within 3 cm of the red cube but never reached the grasp phase, which tolerance kept
    it out: at the step closest to the grasp window (largest of error / tolerance over xy, height and yaw), the
    term that was furthest outside;
  - for an episode that carried the cube: how close the red cube came to above the blue one (xy) and how high it
    was above its stacked height there.
`--expert-on 6` gives the expert's command on those action dimensions (here the wrist's torque) while the policy
drives the others, and feeds the policy's context the tokens the arm executed: which of its outputs keep it from
the task. `--json` writes the summary with every episode's row. Seeds from 100000 are held out from training.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from sim.expert import ExpertConfig, ScriptedExpert
from sim.results import REACH_M

PHASES = ("approach", "grasp", "carry", "release", "retreat")


class PhaseWatch:
    """A policy wrapper that asks the expert, each step, what phase the env's full observation is in. It has no
    spec, so the evaluation loop hands it the full observation (task_state included); the policy gets only its
    own keys."""

    spec = None

    def __init__(self, policy, expert: ScriptedExpert, expert_on: tuple[int, ...] = ()) -> None:  # noqa: ANN001
        self.policy, self.expert, self.expert_on = policy, expert, list(expert_on)
        self.log: list[dict] = []

    def reset(self, **kwargs) -> None:  # noqa: ANN003
        self.log = []
        self.policy.reset(**kwargs)

    def step(self, full: dict[str, np.ndarray]) -> np.ndarray:
        from gato_ros.tokenizer import detokenize_action, tokenize_action
        from sim.spec import policy_observation

        spec = self.policy.spec
        teacher = np.full(spec.action_size, -1, np.int64)
        if self.expert_on:  # the expert's command on these action dimensions: which of them the policy lacks
            teacher[self.expert_on] = tokenize_action(spec, self.expert.act(full))[self.expert_on]
        # The policy's context holds the tokens the arm executed: the expert's on those dimensions, its own elsewhere.
        chosen = self.policy.step_tokens(policy_observation(spec, full), teacher=teacher)
        action = detokenize_action(spec, np.where(teacher >= 0, teacher, chosen))
        own_gripper = detokenize_action(spec, chosen)[-1]  # what the policy chose, executed or not
        phase, yaw_error = self.expert.phase(full)
        state = full["task_state"]
        hand, red, blue = state[0:3], state[3:6], state[6:9]
        self.log.append({
            "phase": phase, "yaw_error": yaw_error, "policy_closes": bool(own_gripper < 0),
            "expert_closes": phase in ("grasp", "carry"),
            "xy": float(np.linalg.norm((hand - red)[:2])), "z": float(hand[2] - red[2]),
            "over_blue_xy": float(np.linalg.norm((red - blue)[:2])), "over_blue_z": float(red[2] - blue[2]),
        })
        return action


def grasp_block(log: list[dict], config: ExpertConfig) -> str:
    """Which tolerance kept a hand near the cube out of the grasp window, at its closest to the window."""
    ratios = np.array([[e["xy"] / config.xy_tolerance, abs(e["z"]) / config.z_tolerance,
                        e["yaw_error"] / config.yaw_tolerance] for e in log])
    closest = int(np.argmin(ratios.max(axis=1)))
    return ("xy", "height", "yaw")[int(np.argmax(ratios[closest]))]


def episode_row(seed: int, success: bool, log: list[dict], config: ExpertConfig, cube_size: float) -> dict:
    phases = [e["phase"] for e in log]
    row = {"seed": seed, "success": success, "steps": {p: phases.count(p) for p in PHASES},
           "start_yaw_deg": math.degrees(log[0]["yaw_error"]),
           "gripper_agreement": float(np.mean([e["policy_closes"] == e["expert_closes"] for e in log]))}
    near = [e for e in log if math.hypot(e["xy"], e["z"]) < REACH_M]
    row["reached"] = bool(near)
    if near:
        best = min(near, key=lambda e: max(e["xy"] / config.xy_tolerance, abs(e["z"]) / config.z_tolerance,
                                           e["yaw_error"] / config.yaw_tolerance))
        row["nearest_window"] = {"xy_cm": 100 * best["xy"], "height_cm": 100 * best["z"],
                                 "yaw_deg": math.degrees(best["yaw_error"])}
        if not row["steps"]["grasp"] and not row["steps"]["carry"]:
            row["kept_out_by"] = grasp_block(near, config)
    carry = [e for e in log if e["phase"] == "carry"]
    if carry:
        best = min(carry, key=lambda e: e["over_blue_xy"])
        row["carry"] = {"over_blue_xy_cm": 100 * best["over_blue_xy"],
                        "above_stacked_cm": 100 * (best["over_blue_z"] - cube_size)}
    return row


def summarize(rows: list[dict]) -> dict:
    reached = [r for r in rows if r["reached"]]
    kept_out = [r["kept_out_by"] for r in rows if "kept_out_by" in r]
    carried = [r["carry"] for r in rows if "carry" in r]

    def median(values: list[float]) -> float | None:
        return float(np.median(values)) if values else None

    return {
        "episodes": len(rows), "successes": sum(r["success"] for r in rows), "reached": len(reached),
        "entered": {p: sum(r["steps"][p] > 0 for r in rows) for p in PHASES},
        "kept_out_of_the_grasp_by": {k: kept_out.count(k) for k in ("xy", "height", "yaw")},
        "start_yaw_deg_median": median([r["start_yaw_deg"] for r in reached]),
        "nearest_window_median": {k: median([r["nearest_window"][k] for r in reached])
                                  for k in ("xy_cm", "height_cm", "yaw_deg")},
        "carry_over_blue_xy_cm_median": median([c["over_blue_xy_cm"] for c in carried]),
        "carry_above_stacked_cm_median": median([c["above_stacked_cm"] for c in carried]),
        "gripper_agreement_median": median([r["gripper_agreement"] for r in rows]),
    }


def phases(policy_path: str, seeds: list[int], expert_on: tuple[int, ...] = ()) -> dict:
    from sim import evaluate

    evaluate._init_worker(policy_path, "cpu", None)
    env, expert = evaluate._worker["env"], ScriptedExpert()
    watch = evaluate._worker["policy"] = PhaseWatch(evaluate._worker["policy"], expert, expert_on)
    rows = []
    try:
        for seed in seeds:
            result = evaluate.run_episode(seed)
            rows.append(episode_row(seed, result.success, watch.log, expert.config, env.config.cube_size))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        evaluate.release_worker()
        expert.close()
    summary = {"policy": policy_path, "expert_on": list(expert_on), **summarize(rows), "tolerances": {
        "xy_cm": 100 * expert.config.xy_tolerance, "height_cm": 100 * expert.config.z_tolerance,
        "yaw_deg": math.degrees(expert.config.yaw_tolerance)}, "per_episode": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "per_episode"}))
    return summary


def merge(paths: list[Path]) -> dict:
    """One summary over several `--json` files (e.g. the two halves of a 100-seed run on two cores)."""
    parts = [json.loads(p.read_text()) for p in paths]
    rows = [r for part in parts for r in part["per_episode"]]
    return {"policy": parts[0]["policy"], "expert_on": parts[0]["expert_on"], **summarize(rows),
            "tolerances": parts[0]["tolerances"], "per_episode": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", nargs="?", help="PATH.onnx (or --merge)")
    parser.add_argument("--seeds", type=int, default=100_000, help="first seed (held out from training)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="summarize these --json files together")
    parser.add_argument("--expert-on", type=int, nargs="+", default=(),
                        help="action dimensions (0-6 arm torques, 7 gripper) the expert commands instead of the policy")
    args = parser.parse_args()
    if args.merge:
        summary = merge(args.merge)
        print(json.dumps({k: v for k, v in summary.items() if k != "per_episode"}))
    else:
        summary = phases(args.policy, [args.seeds + i for i in range(args.episodes)], tuple(args.expert_on))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
