"""The scripted expert acting on what a camera probe reads off the frames instead of the simulator's cube poses.

    .venv/bin/python scripts/camera_precision.py --train ... --save runs/precision/probe.pt
    .venv/bin/python scripts/perceived_expert.py runs/precision/probe.pt --seed 100000 --episodes 50 --workers 2 \
        [--estimate red blue yaw] [--average-steps 4] --json runs/precision/perceived.json

A seeing policy that imitates the expert can at best act like the expert does on the cube poses its frames give.
Here the expert's task_state is rebuilt every control step from `scripts/camera_precision.py`'s probe (one
timestep's scene and wrist frames and the joint positions): the red cube at the hand plus the estimated red − hand,
the blue cube at that plus the estimated blue − red, the red cube's yaw estimated; the hand's own position stays the
simulator's (a real arm knows it from its joints). `--estimate` chooses which of the three are estimated, the rest
stay true. Stacked out of N on the held-out seeds says whether the frames hold enough for the expert's controller
to stack: near N, the cameras are not what limits a seeing policy, its imitation of the expert is; far below, they
are. `--average-steps K` gives the expert the mean of the last K timesteps' estimates: what a window of K
timesteps could read from its frames if it only averaged them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np

from sim.evaluate import wilson_interval
from sim.results import BLUE_MINUS_RED, RED_MINUS_HAND, RED_YAW, red_distance_cm

ESTIMATES = ("red", "blue", "yaw")
_WORKER: dict = {}


def perceived_task_state(truth: np.ndarray, estimate: np.ndarray, estimated: tuple[str, ...]) -> np.ndarray:
    """task_state as the expert reads it: the `estimated` parts from the probe's `estimate`, the rest `truth`."""
    s = truth.copy()
    if "red" in estimated:
        s[RED_MINUS_HAND] = estimate[RED_MINUS_HAND]
        s[3:6] = s[0:3] + s[RED_MINUS_HAND]
        s[BLUE_MINUS_RED] = s[6:9] - s[3:6]  # the true blue cube, seen from the estimated red one
    if "blue" in estimated:
        s[BLUE_MINUS_RED] = estimate[BLUE_MINUS_RED]
        s[6:9] = s[3:6] + s[BLUE_MINUS_RED]
    if "yaw" in estimated:
        s[RED_YAW] = estimate[RED_YAW]
    return s


def averaged(estimates: list[np.ndarray], hands: list[np.ndarray]) -> np.ndarray:
    """The mean of the last estimates (oldest first) with the hand where it was at each: red − hand averaged as
    seen from the hand (the hand carries the red cube and slows as it nears it), the blue cube in the world (it
    never moves), the yaw's sine and cosine. Reads the current hand as the last of `hands`."""
    e, h = np.asarray(estimates), np.asarray(hands)
    s = e[-1].copy()
    s[RED_MINUS_HAND] = e[:, RED_MINUS_HAND].mean(0)
    blue_world = (h + e[:, RED_MINUS_HAND] + e[:, BLUE_MINUS_RED]).mean(0)
    s[BLUE_MINUS_RED] = blue_world - (h[-1] + s[RED_MINUS_HAND])
    s[RED_YAW] = e[:, RED_YAW].mean(0)
    return s


def _episode(job: tuple[str, int, tuple[str, ...], int]) -> dict:
    from camera_precision import CAMERAS, Probe

    from sim.env import StackingEnv
    from sim.expert import ScriptedExpert

    probe_path, seed, estimated, average_steps = job
    if "env" not in _WORKER:
        import torch

        torch.set_num_threads(1)
        probe = Probe.load(probe_path)
        _WORKER.update(probe=probe, expert=ScriptedExpert(), env=StackingEnv(
            image_size=probe.size, cameras=tuple(k.removeprefix("camera_") for k in CAMERAS)))
    probe, expert, env = _WORKER["probe"], _WORKER["expert"], _WORKER["env"]
    obs, info = env.reset(seed=seed)
    closest, red_err, done = np.inf, [], False
    estimates: list[np.ndarray] = []
    hands: list[np.ndarray] = []
    while not done:
        truth = obs["task_state"]
        estimates, hands = [*estimates, probe(obs)][-average_steps:], [*hands, truth[0:3]][-average_steps:]
        estimate = averaged(estimates, hands)
        if np.linalg.norm(truth[RED_MINUS_HAND]) < 0.05:
            red_err.append(100 * float(np.linalg.norm(estimate[RED_MINUS_HAND] - truth[RED_MINUS_HAND])))
        closest = min(closest, red_distance_cm(truth))
        obs, _, terminated, truncated, info = env.step(
            expert.act({**obs, "task_state": perceived_task_state(truth, estimate, estimated)}))
        done = terminated or truncated
    return {"seed": seed, "success": bool(info["success"]), "closest_to_red_cm": round(closest, 2),
            "red_error_near_cm": round(float(np.median(red_err)), 2) if red_err else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", help="a probe saved by scripts/camera_precision.py --save")
    parser.add_argument("--seed", type=int, default=100000)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--estimate", nargs="*", choices=ESTIMATES, default=list(ESTIMATES),
                        help="the parts estimated (none: the expert on the true state, the control)")
    parser.add_argument("--average-steps", type=int, default=1,
                        help="the expert reads the mean of this many timesteps' estimates (a window's worth)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    estimated = tuple(args.estimate)
    jobs = [(args.probe, args.seed + i, estimated, args.average_steps) for i in range(args.episodes)]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        episodes = pool.map(_episode, jobs, chunksize=1)
    stacked = sum(e["success"] for e in episodes)
    errors = [e["red_error_near_cm"] for e in episodes if e["red_error_near_cm"] is not None]
    last = args.seed + args.episodes - 1
    low, high = wilson_interval(stacked, len(episodes))
    result = {"probe": args.probe, "estimated": list(estimated), "average_steps": args.average_steps,
              "seeds": [args.seed, last],
              "stacked": stacked, "episodes": len(episodes), "wilson_95": [low, high],
              "red_error_near_cm_median": float(np.median(errors)) if errors else None, "per_episode": episodes}
    print(f"expert on the probe's {'/'.join(estimated) or 'no'} estimates ({args.average_steps} averaged), "
          f"seeds {args.seed}-{last}: "
          f"{stacked}/{len(episodes)} stacked ({100 * low:.0f}–{100 * high:.0f} %); "
          f"red − hand error within 5 cm (median of episode medians) "
          f"{result['red_error_near_cm_median']} cm")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
