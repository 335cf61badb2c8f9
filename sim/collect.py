"""`gato-ros collect`: scripted-expert episodes into a gato_ros dataset.

Workers each own an env and an expert and return whole episodes; the main process writes them in
episode order with `gato_ros.data.EpisodeWriter`, so the dataset is the same for a seed whatever
the worker count. Clean and noise-injected demonstrations are mixed (DESIGN.md: clean only or noisy
only did not clone; mixed did). The label is always the expert's clean command. `--camera-shift-cm`,
`--camera-tilt-deg` and `--light` randomize the cameras per episode (each magnitude drawn between 0 and the
bound from the episode's seed, directions random), so a seeing policy sees more than one mount and light.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

_worker: dict = {}


@dataclass(frozen=True)
class Job:
    index: int
    seed: int
    noisy: bool


def episode_jobs(episodes: int, seed: int, noise_fraction: float) -> list[Job]:
    """Per-episode seeds and clean/noisy choice, derived from the run's seed alone."""
    jobs = []
    for i in range(episodes):
        rng = np.random.default_rng([seed, i])
        jobs.append(Job(i, int(rng.integers(0, 2**31 - 1)), bool(rng.random() < noise_fraction)))
    return jobs


def _init_worker(env_options: dict, policy: str | None = None, beta: float = 0.0) -> None:
    from sim.arms import make_env, make_expert

    _worker["env"] = make_env(**env_options)
    _worker["expert"] = make_expert(_worker["env"].arm, _worker["env"].config.task)
    _worker["beta"] = beta
    if policy is not None:
        from gato_ros.runtime import PolicyRuntime

        # The collected arm's spec, for a file of several arms (its default arm's otherwise: refused if another).
        _worker["policy"] = PolicyRuntime(policy, provider="cpu", threads=1, arm=_worker["env"].arm)


def _run_job(job: Job):
    from sim.expert import run_episode

    t0 = time.perf_counter()
    if "policy" in _worker:
        episode = run_dagger_episode(job.seed, _worker["beta"])
    else:
        episode = run_episode(_worker["env"], _worker["expert"], job.seed, noisy=job.noisy)
    return job, episode, time.perf_counter() - t0


def run_dagger_episode(seed: int, beta: float):
    """DAgger (Ross et al. 2011): the learned policy drives (the expert instead with probability
    `beta` per step) and every visited state is labelled with the expert's command. Behaviour
    cloning alone only sees the expert's own states; these teach recovery from the policy's mistakes."""
    from sim.expert import run_episode
    from sim.spec import policy_observation

    policy = _worker["policy"]
    rng = np.random.default_rng([seed, 2])
    # A policy trained with instructions drives as it is asked to: told the task being labelled.
    texts = policy.info.conditioning.instructions if policy.info.conditioning is not None else {}
    policy.reset(instruction=texts.get(_worker["env"].config.task))

    def driver(obs: dict[str, np.ndarray], label: np.ndarray) -> np.ndarray:
        command = policy.step(policy_observation(policy.spec, obs))  # every step: its context holds the episode
        return label if rng.random() < beta else command

    return run_episode(_worker["env"], _worker["expert"], seed, driver=driver)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sim.env import ARM_NAMES, DEFAULT_ARM
    from sim.tasks import DEFAULT_TASK, task_names

    parser.add_argument("--episodes", type=int, required=True, help="episodes to run")
    parser.add_argument("--task", default=DEFAULT_TASK, choices=task_names(), help="what the expert demonstrates")
    parser.add_argument("--arm", default=DEFAULT_ARM, choices=ARM_NAMES, help="which arm (its own spec)")
    parser.add_argument("--workers", type=int, default=max(1, (mp.cpu_count() or 1)), help="parallel processes")
    parser.add_argument("--out", required=True, help="dataset directory (must not hold a finished dataset)")
    parser.add_argument("--noise-fraction", type=float, default=0.5, help="share of noise-injected demos")
    parser.add_argument("--image-size", type=int, default=None, help="add camera images of this size (px)")
    parser.add_argument("--cameras", nargs="+", default=None, choices=("scene", "wrist"),
                        help="named cameras (observation keys camera_<name>); default: the scene camera as `image`")
    parser.add_argument("--no-task-state", action="store_true",
                        help="leave the privileged task_state out of the spec (camera + joints only)")
    parser.add_argument("--aux-keys", nargs="+", default=(), choices=("task_state",),
                        help="privileged env values kept beside the observations as training targets only "
                        "(gato-ros train --aux-key), never policy inputs")
    parser.add_argument("--camera-shift-cm", type=float, default=0.0,
                        help="randomize: move every camera up to this far per episode, in a seeded random direction")
    parser.add_argument("--camera-tilt-deg", type=float, default=0.0,
                        help="randomize: turn every camera up to this much per episode, about a seeded random axis")
    parser.add_argument("--light", type=float, default=0.0,
                        help="randomize: scale the light by a seeded factor between 1 - this and 1 + this per episode")
    parser.add_argument("--seed", type=int, default=0, help="run seed; per-episode seeds derive from it")
    parser.add_argument("--keep-failures", action="store_true", help="also write unsuccessful episodes")
    parser.add_argument("--policy", default=None, help="DAgger: PATH.onnx drives, the expert labels every state "
                        "(failed episodes are kept: their states are the point)")
    parser.add_argument("--beta", type=float, default=0.3, help="DAgger: per-step chance the expert drives instead")


def aux_specs(keys: list[str], arm: str = "panda") -> dict:
    """Auxiliary keys with the normalization the privileged policy's spec (of `arm`) gives the same values."""
    from gato_ros.data import AuxSpec
    from sim.arms import embodiment_spec

    privileged = embodiment_spec(arm, privileged=True)
    specs = {}
    for key in keys:
        o = privileged.observation(key)
        offset = np.broadcast_to(np.asarray(o.offset if o.offset is not None else 0.0, np.float64), (o.size,))
        scale = np.broadcast_to(np.asarray(o.scale if o.scale is not None else 1.0, np.float64), (o.size,))
        specs[key] = AuxSpec(o.size, tuple(map(float, offset)), tuple(map(float, scale)))
    return specs


def run(args: argparse.Namespace) -> int:
    from gato_ros.data import EpisodeWriter
    from sim.arms import embodiment_spec, make_env
    from sim.spec import env_overrides
    from sim.tasks import TASKS

    cameras = tuple(args.cameras) if args.cameras else None
    spec = embodiment_spec(args.arm, image_size=args.image_size, privileged=not args.no_task_state, cameras=cameras)
    randomized = {"camera_shift_m": args.camera_shift_cm / 100.0, "camera_tilt_deg": args.camera_tilt_deg,
                  "light_change": args.light}
    env_options = {**env_overrides(spec), "task": args.task, "arm": args.arm, **randomized, "perturb_up_to": True}
    make_env(**env_options).close()  # options the env refuses fail here, once, not in pool workers that respawn
    keys = [o.name for o in spec.observations]  # the env also gives task_state, which the expert acts on
    aux = aux_specs(args.aux_keys, args.arm)
    jobs = episode_jobs(args.episodes, args.seed, args.noise_fraction)
    kept = failed = nans = steps = 0
    lengths: list[int] = []
    wall = 0.0
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")  # fresh interpreters: no pybullet state copied across fork
    with (
        EpisodeWriter(args.out, spec, aux=aux) as writer,
        ctx.Pool(max(1, args.workers), initializer=_init_worker, initargs=(env_options, args.policy, args.beta))
        as pool,
    ):
        progress = tqdm(pool.imap(_run_job, jobs), total=len(jobs), unit="ep", desc="collect")
        for job, episode, seconds in progress:
            wall += seconds
            failed += not episode.success
            nans += episode.nan
            if episode.success or args.keep_failures or args.policy:
                metadata = {
                    "task": args.task,
                    "instruction": TASKS[args.task].instruction,  # the text that asks for this task (Gato's text)
                    "arm": args.arm,
                    "seed": job.seed,
                    "success": episode.success,
                    "noisy": episode.noisy,
                    "dagger": args.policy is not None,
                    "steps": episode.steps,
                    "nan": episode.nan,
                    # the bounds the episode's cameras were randomized within (its perturbation: its seed)
                    "camera_randomization": randomized,
                }
                writer.add_episode({k: episode.observations[k] for k in keys}, episode.actions, metadata,
                                   aux={k: episode.observations[k] for k in aux})
                kept += 1
                steps += episode.steps
            lengths.append(episode.steps)
            progress.set_postfix(kept=kept, failed=failed)
    elapsed = time.perf_counter() - t0
    n = max(1, len(jobs))
    print(
        f"collect: {kept} episodes ({steps} steps) written to {args.out}; "
        f"{len(jobs) - failed}/{len(jobs)} successful ({failed} failed, {nans} NaN physics); "
        f"episode length mean {np.mean(lengths) if lengths else 0:.1f}; "
        f"{wall / n:.2f} s per episode per worker, {elapsed:.0f} s total"
    )
    return 0
