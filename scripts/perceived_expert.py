"""The scripted expert acting on what a camera probe reads off the frames instead of the simulator's cube poses.

    .venv/bin/python scripts/camera_precision.py --train ... --save runs/precision/probe.pt
    .venv/bin/python scripts/perceived_expert.py runs/precision/probe.pt --seed 100000 --episodes 50 --workers 2 \
        [--estimate red blue yaw] [--average-steps 4] [--policy models/stack_int8.onnx] --json J

A seeing policy that imitates the expert can at best act like the expert does on the cube poses its frames give.
Here the expert's task_state is rebuilt every control step from `scripts/camera_precision.py`'s probe (one
timestep's scene and wrist frames and the joint positions): the red cube at the hand plus the estimated red − hand,
the blue cube at that plus the estimated blue − red, the red cube's yaw estimated; the hand's own position stays the
simulator's (a real arm knows it from its joints). `--estimate` chooses which of the three are estimated, the rest
stay true. Stacked out of N on the held-out seeds says whether the frames hold enough for the expert's controller
to stack: near N, the cameras are not what limits a seeing policy, its imitation of the expert is; far below, they
are. `--average-steps K` gives the expert the mean of the last K timesteps' estimates: what a window of K
timesteps could read from its frames if it only averaged them. `--policy FILE` puts a task_state policy (the shipped
`models/stack_int8.onnx`) in the expert's place: what the privileged-state policy would do behind a perception
stage this good, the two-stage alternative to one transformer that reads the frames itself.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np

from sim.evaluate import wilson_interval
from sim.results import BLUE_MINUS_RED, RED_MINUS_HAND, RED_YAW, red_distance_cm
from sim.spec import policy_observation

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
    s[BLUE_MINUS_RED] = blue_in_world(e, h) - (h[-1] + s[RED_MINUS_HAND])
    s[RED_YAW] = e[:, RED_YAW].mean(0)
    return s


def blue_in_world(e: np.ndarray, h: np.ndarray) -> np.ndarray:
    """[3] the mean of where estimates `e` put the blue cube in the world, each seen from its hand in `h`."""
    return (h + e[:, RED_MINUS_HAND] + e[:, BLUE_MINUS_RED]).mean(0)


def remembered(estimates: list[np.ndarray], hands: list[np.ndarray], parts: tuple[str, ...], red_rests: bool
               ) -> np.ndarray:
    """The last estimate with the `parts` read from every view of the episode so far (oldest first), in the world:
    the blue cube from all of them (it never moves), the red cube's position and yaw from all of them while it
    `red_rests` (the gripper has never closed; once it has, the red cube moves with the hand and only the last view
    counts). What a context as long as the episode could know that one timestep's frames do
    not: the blue cube as seen before the held red one hid it, each cube from many viewpoints."""
    e, h = np.asarray(estimates), np.asarray(hands)
    s = e[-1].copy()
    if "red" in parts and red_rests:
        s[RED_MINUS_HAND] = (h + e[:, RED_MINUS_HAND]).mean(0) - h[-1]
        s[RED_YAW] = e[:, RED_YAW].mean(0)
    if "blue" in parts:
        s[BLUE_MINUS_RED] = blue_in_world(e, h) - (h[-1] + s[RED_MINUS_HAND])
    return s


class StatePolicy:
    """A task_state policy file acting where the expert would: the frames are the probe's to read, not its own."""

    def __init__(self, path: str) -> None:
        from gato_ros.runtime import PolicyRuntime

        self.runtime = PolicyRuntime(path, threads=1)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The file's command for `obs` (the scripted expert's signature; its context is the episode so far)."""
        return self.runtime.step(policy_observation(self.runtime.spec, obs))


def _episode(job: tuple[str, int, tuple[str, ...], int, tuple[str, ...], str | None]) -> dict:
    from camera_precision import CAMERAS, Probe

    from sim.env import StackingEnv
    from sim.expert import ScriptedExpert

    probe_path, seed, estimated, average_steps, remember, policy = job
    if "env" not in _WORKER:
        import torch

        torch.set_num_threads(1)
        probe = Probe.load(probe_path)
        _WORKER.update(probe=probe, actor=StatePolicy(policy) if policy else ScriptedExpert(), env=StackingEnv(
            image_size=probe.size, cameras=tuple(k.removeprefix("camera_") for k in CAMERAS)))
    probe, actor, env = _WORKER["probe"], _WORKER["actor"], _WORKER["env"]
    obs, info = env.reset(seed=seed)
    if isinstance(actor, StatePolicy):
        actor.runtime.reset()  # the scripted expert keeps no memory between steps
    closest, red_err, done = np.inf, [], False
    estimates: list[np.ndarray] = []
    hands: list[np.ndarray] = []
    red_rests = True  # until the gripper is first commanded closed
    while not done:
        truth = obs["task_state"]
        estimates.append(probe(obs))
        hands.append(truth[0:3])
        if remember:
            estimate = remembered(estimates, hands, remember, red_rests)
        else:
            estimate = averaged(estimates[-average_steps:], hands[-average_steps:])
        if np.linalg.norm(truth[RED_MINUS_HAND]) < 0.05:
            red_err.append(100 * float(np.linalg.norm(estimate[RED_MINUS_HAND] - truth[RED_MINUS_HAND])))
        closest = min(closest, red_distance_cm(truth))
        action = actor.act({**obs, "task_state": perceived_task_state(truth, estimate, estimated)})
        red_rests = red_rests and action[-1] >= 0  # a negative finger force closes the gripper
        obs, _, terminated, truncated, info = env.step(action)
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
    parser.add_argument("--remember", nargs="+", choices=("red", "blue"), default=(),
                        help="these cubes are read from every view of the episode in which they rest, in the world "
                             "(red: until the gripper first closes), instead of --average-steps")
    parser.add_argument("--policy", default=None,
                        help="a task_state policy file acting instead of the scripted expert (models/stack_int8.onnx)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    estimated = tuple(args.estimate)
    remember = tuple(args.remember)
    jobs = [(args.probe, args.seed + i, estimated, args.average_steps, remember, args.policy)
            for i in range(args.episodes)]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        episodes = pool.map(_episode, jobs, chunksize=1)
    stacked = sum(e["success"] for e in episodes)
    errors = [e["red_error_near_cm"] for e in episodes if e["red_error_near_cm"] is not None]
    last = args.seed + args.episodes - 1
    low, high = wilson_interval(stacked, len(episodes))
    actor = args.policy or "the expert"
    result = {"probe": args.probe, "actor": actor, "estimated": list(estimated), "average_steps": args.average_steps,
              "remember": list(remember),
              "seeds": [args.seed, last],
              "stacked": stacked, "episodes": len(episodes), "wilson_95": [low, high],
              "red_error_near_cm_median": float(np.median(errors)) if errors else None, "per_episode": episodes}
    print(f"{actor} on the probe's {'/'.join(estimated) or 'no'} estimates ("
          f"{'remembering ' + '/'.join(remember) if remember else f'{args.average_steps} averaged'}), "
          f"seeds {args.seed}-{last}: "
          f"{stacked}/{len(episodes)} stacked ({100 * low:.0f}–{100 * high:.0f} %); "
          f"red − hand error within 5 cm (median of episode medians) "
          f"{result['red_error_near_cm_median']} cm")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
