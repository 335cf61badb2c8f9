"""How precisely must a policy know where the cubes are? The shipped state policy, with the cube positions it
reads in `task_state` moved off their true values, on held-out seeds.

    .venv/bin/python scripts/cube_precision.py --sigma-mm 0 2 4 8 --episodes 100 --workers 2 \
        --json runs/cube_precision.json

Each cell moves both cubes' positions (and the vectors built from them: red − hand, blue − red) by a normal
error of σ per axis, drawn one of two ways:
- `episode`: once per episode, a fixed offset (a camera calibration error, a systematic misestimate);
- `step`: afresh every control step (an estimate that jitters from frame to frame).
The hand position, the joints and the cube yaw stay true. The errors come from their own generator, seeded by the
episode seed, so every cell runs the same scenes. A seeing policy that acts through an estimate of the cubes
needs that estimate about as precise as the σ at which this policy still stacks.
"""

from __future__ import annotations

import argparse
import json
from multiprocessing import Pool
from pathlib import Path

import numpy as np

RED, BLUE, RED_MINUS_HAND, BLUE_MINUS_RED = slice(3, 6), slice(6, 9), slice(9, 12), slice(12, 15)
ERROR_STREAM = 5  # the error generator is seeded [ERROR_STREAM, episode seed]: apart from the env's own


def misplace_cubes(task_state: np.ndarray, red_error: np.ndarray, blue_error: np.ndarray) -> np.ndarray:
    """task_state with the cubes moved by the given errors (m) and the relative vectors kept consistent."""
    moved = task_state.copy()
    hand = task_state[0:3]
    moved[RED] = task_state[RED] + red_error
    moved[BLUE] = task_state[BLUE] + blue_error
    moved[RED_MINUS_HAND] = moved[RED] - hand
    moved[BLUE_MINUS_RED] = moved[BLUE] - moved[RED]
    return moved


def run_episode(job: tuple[float, str, int]) -> bool:
    """One episode in this process's eval worker (`sim.evaluate`: the env and the runtime `gato-ros eval` uses,
    built once per worker)."""
    from sim.evaluate import _worker
    from sim.spec import policy_observation

    sigma_m, mode, seed = job
    env, policy = _worker["env"], _worker["policy"]
    rng = np.random.default_rng([ERROR_STREAM, seed])
    obs, info = env.reset(seed=seed)
    policy.reset()
    fixed = rng.normal(0.0, sigma_m, (2, 3))
    done = False
    while not done:
        red_error, blue_error = fixed if mode == "episode" else rng.normal(0.0, sigma_m, (2, 3))
        seen = {**obs, "task_state": misplace_cubes(obs["task_state"], red_error, blue_error)}
        obs, _, terminated, truncated, info = env.step(policy.step(policy_observation(policy.spec, seen)))
        done = terminated or truncated
    return bool(info["success"])


def main() -> None:
    from sim.evaluate import _init_worker, wilson_interval

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="models/stack_int8.onnx", help="a state policy (it reads task_state)")
    parser.add_argument("--sigma-mm", type=float, nargs="+", default=[0.0, 2.0, 4.0, 8.0])
    parser.add_argument("--modes", nargs="+", choices=("episode", "step"), default=["episode", "step"])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=100_000, help="first held-out seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    seeds = range(args.seed, args.seed + args.episodes)
    rows = []
    with Pool(args.workers, _init_worker, (args.policy, "cpu", None)) as pool:
        for mode in args.modes:
            for sigma_mm in args.sigma_mm:
                if sigma_mm == 0 and mode != args.modes[0]:
                    continue  # σ 0 is the same run whichever way the error is drawn
                outcomes = pool.map(run_episode, [(sigma_mm / 1000, mode, s) for s in seeds])
                k, n = sum(outcomes), len(outcomes)
                lo, hi = wilson_interval(k, n)
                rows.append({"mode": mode, "sigma_mm": sigma_mm, "successes": k, "episodes": n,
                             "wilson95": [lo, hi]})
                print(f"{mode:7s} σ {sigma_mm:4.1f} mm per axis: {k}/{n} stacked ({100 * lo:.0f}–{100 * hi:.0f} %)",
                      flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"policy": args.policy, "first_seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
