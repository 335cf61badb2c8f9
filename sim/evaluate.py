"""`gato-ros eval`: closed-loop success rate of a policy on the stacking task.

In-process by default: each worker owns a `StackingEnv` and a policy (the scripted expert, or an
ONNX file through `gato_ros.runtime.PolicyRuntime`, the same code the ROS node runs). With
`--over-ros` the sim bridge and the policy node run as separate processes talking over ROS 2
topics, exactly as a real arm would (`sim.ros_eval`).

Writes JSON (success_rate, episodes, successes, 95 % Wilson interval, lengths, step latency) and a
PNG summary; optionally an MP4 of the first episode.

Conditioning (issue 13), `--condition`: `none` (a bare reset), `prompt` (a successful scripted-expert demonstration
of the task on the arm, `sim.prompts`, passed to `runtime.reset(prompt=...)` at each episode start), `wrong-prompt`
(the paired task's demonstration, success still judged on `--task`) or `instruction` (`runtime.reset(instruction=
the task's text)`); default `prompt` for a file that declares conditioning metadata, else `none`. `--policy random`
is the baseline of the normalized score (`normalized_score`: 0 = random policy, 100 = scripted expert).

Robustness runs: `--camera-shift-cm`, `--camera-tilt-deg` and `--light` perturb every camera per episode
(moved that far in a random direction, turned that much about a random axis, the light scaled by 1 ± that
fraction), drawn from the episode's seed; the cube layouts stay those of the same seeds unperturbed. Both
modes apply them (in-process to the worker's env, over ROS to the bridge's).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sim.prompts import CONDITIONS, PROMPT_SEED_OFFSET, DemonstrationSource, prompt_task
from sim.replay import beside, write_video
from sim.results import EpisodeResult, red_distance_cm

_worker: dict = {}
BASELINES = ("expert", "random")  # --policy names that are not files: they take no conditioning
RANDOM_STREAM = 3  # the random policy's generator is seeded [RANDOM_STREAM, episode seed]: apart from the env's


@dataclass
class ConditionedResult(EpisodeResult):
    prompt_seed: int | None = None  # the env seed of the demonstration that prompted the episode


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval: well behaved at 0 % and 100 %, unlike the normal approximation."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # It always holds p; rounding can put an end a hair inside it (6/6: an upper end of 0.9999999999999999).
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def difference_interval(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """95 % interval of the difference of two success rates, k1/n1 − k2/n2 (Newcombe 1998, method 10: from the two
    Wilson intervals). Independent samples: on the same seeds it is conservative, never too narrow."""
    p1, p2 = k1 / max(n1, 1), k2 / max(n2, 1)
    (lo1, hi1), (lo2, hi2) = wilson_interval(k1, n1), wilson_interval(k2, n2)
    return (p1 - p2 - math.hypot(p1 - lo1, hi2 - p2), p1 - p2 + math.hypot(hi1 - p1, p2 - lo2))


def normalized_score(success_rate: float, random_rate: float, expert_rate: float) -> float | None:
    """JAT-style normalized score of a success rate: 0 = the random policy's, 100 = the scripted expert's, all three
    measured on the same seeds. None where the expert does no better than random (the scale is undefined)."""
    span = expert_rate - random_rate
    if span <= 0:
        return None
    return 100.0 * (success_rate - random_rate) / span


class RandomPolicy:
    """The normalized score's zero: each continuous action uniform within its limit, each discrete one a uniform
    choice of its values; seeded per episode (`reset(seed)`), so a run is the same on every machine."""

    spec = None  # acts on nothing: the env's observation passes through untouched

    def __init__(self, action_spec) -> None:  # noqa: ANN001 - an EmbodimentSpec (its actions)
        self.actions = action_spec.actions
        self.rng = np.random.default_rng(RANDOM_STREAM)

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng([RANDOM_STREAM, seed or 0])

    def step(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.array([self.rng.choice(a.values) if a.kind == "discrete" else self.rng.uniform(-a.limit, a.limit)
                         for a in self.actions], dtype=np.float64)


def make_policy(policy: str, provider: str, task: str | None = None, arm: str | None = None):  # noqa: ANN201
    """'expert', 'random' or a path to an ONNX file. All expose reset() and step(obs) -> command. A file is refused
    (ValueError naming what it serves) when it does not serve `arm` or `task`."""
    from sim.env import DEFAULT_ARM
    from sim.tasks import DEFAULT_TASK

    task, arm = task or DEFAULT_TASK, arm or DEFAULT_ARM
    if policy == "expert":
        from sim.arms import make_expert

        expert = make_expert(arm, task)

        class ExpertPolicy:
            spec = None

            def reset(self) -> None:
                pass

            def step(self, obs: dict[str, np.ndarray]) -> np.ndarray:
                return expert.act(obs)

            def close(self) -> None:
                expert.close()

        return ExpertPolicy()
    if policy == "random":
        from sim.arms import embodiment_spec

        return RandomPolicy(embodiment_spec(arm))
    from gato_ros.runtime import PolicyRuntime

    check_policy_serves(policy, task, arm)
    return PolicyRuntime(policy, provider=provider, threads=1, arm=arm)  # that arm's spec: its observations, actions


def perturbation_options(args: argparse.Namespace) -> dict[str, float]:
    """The camera perturbation the arguments ask for, as StackingEnv / sim_bridge options; {} for none."""
    options = {"camera_shift_m": args.camera_shift_cm / 100.0, "camera_tilt_deg": args.camera_tilt_deg,
               "light_change": args.light}
    return {name: float(value) for name, value in options.items() if value}


def check_policy_serves(policy: str, task: str, arm: str) -> None:
    """A ValueError naming what the file serves when it does not serve `arm` and `task`: never a command
    computed for another body or task."""
    from gato_ros.info import describe

    served = describe(policy)
    if arm not in served["arms"] or task not in served["tasks"]:
        raise ValueError(f"{policy} serves arm(s) {', '.join(served['arms'])} and task(s) "
                         f"{', '.join(served['tasks'])}, not --arm {arm} --task {task}")
    trained = served["trained_tasks"][arm]
    if task not in trained:
        raise ValueError(f"{policy} was trained on arm {arm} for task(s) {', '.join(trained)} only, not --task {task}")


def read_conditioning(policy: str):  # noqa: ANN201 - gato_ros.contract.Conditioning | None
    """How the file selects its task (`gato_ros.conditioning`: prompt steps, instruction model); None for a file
    trained without prompts or instructions."""
    import onnxruntime as ort

    from gato_ros import contract

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(policy, options, providers=["CPUExecutionProvider"])
    return contract.read_served(session.get_modelmeta().custom_metadata_map).conditioning


def resolve_condition(policy: str, requested: str | None, task: str) -> str:
    """The condition a run uses (`requested`, or its default for `policy`); a ValueError saying why for one the
    policy cannot take (an instruction the file cannot read included), raised before any episode runs."""
    if policy in BASELINES:
        if requested not in (None, "none"):
            raise ValueError(f"--policy {policy} takes no conditioning; --condition {requested} is for a model file")
        return "none"
    conditioning = read_conditioning(policy)
    condition = requested or ("prompt" if conditioning is not None else "none")
    if condition == "instruction":
        from gato_ros.instructions import InstructionError, instruction_tokenizer
        from sim.tasks import TASKS

        try:
            instruction_tokenizer(conditioning).encode(TASKS[task].instruction)
        except InstructionError as e:
            raise ValueError(f"{policy} cannot be told {task!r} in text: {e}; use --condition prompt, wrong-prompt "
                             "or none") from e
    prompt_task(condition, task)  # an unknown condition, or a task without a pair for the wrong prompt
    return condition


def over_ros_condition(policy: str, requested: str | None, task: str) -> str:
    """The condition of an over-ROS run: the node's own (a file with an instruction for `task` starts every episode
    with it, docs/interfaces.md; others start unconditioned); a ValueError for any other `requested`."""
    conditioning = read_conditioning(policy)
    node = "instruction" if conditioning is not None and task in conditioning.instructions else "none"
    if requested not in (None, node):
        raise ValueError(f"over ROS the policy node conditions {policy} on {node!r} for {task!r}; evaluate "
                         f"--condition {requested} in-process (without --over-ros)")
    return node


class EpisodeConditioning:
    """What starts each episode of a run: `reset_arguments(seed)` are the policy's reset() arguments for the
    episode of `seed` under `condition` (demonstrations of `sim.prompts`, rolled in an env rendering `spec`'s
    cameras and kept in `cache_dir` when given)."""

    def __init__(self, condition: str, task: str, arm: str, spec=None, cache_dir: Path | None = None) -> None:  # noqa: ANN001
        from sim.spec import env_overrides

        self.condition, self.task, self.spec = condition, task, spec
        self.demo_task = prompt_task(condition, task)
        self.demonstrations = (DemonstrationSource(arm, env_overrides(spec) if spec else {}, cache_dir)
                               if self.demo_task else None)

    def demonstration(self, seed: int):  # noqa: ANN201 - a sim.prompts.Demonstration, or None
        return None if self.demonstrations is None else self.demonstrations.for_episode(self.demo_task, seed)

    def reset_arguments(self, seed: int) -> dict:
        if self.condition == "instruction":
            from sim.tasks import TASKS

            return {"instruction": TASKS[self.task].instruction}
        demo = self.demonstration(seed)
        return {} if demo is None else {"prompt": demo.prompt(self.spec)}


def _init_worker(policy: str, provider: str, max_steps: int | None, task: str | None = None,
                 arm: str | None = None, perturbation: dict[str, float] | None = None, condition: str = "none",
                 prompt_cache: Path | None = None) -> None:
    from sim.arms import make_env
    from sim.env import DEFAULT_ARM
    from sim.tasks import DEFAULT_TASK

    _worker["policy"] = make_policy(policy, provider, task, arm)
    from sim.spec import env_overrides

    spec = getattr(_worker["policy"], "spec", None)
    _worker["conditioning"] = EpisodeConditioning(condition, task or DEFAULT_TASK, arm or DEFAULT_ARM, spec,
                                                  prompt_cache)
    overrides = {**(env_overrides(spec) if spec else {}), **(perturbation or {})}
    if max_steps:
        overrides["max_steps"] = max_steps
    overrides.update({k: v for k, v in (("task", task), ("arm", arm)) if v is not None})
    _worker["env"] = make_env(**overrides)


def release_worker() -> None:
    """Close this process's worker env and demonstration envs (their PyBullet clients) and forget them: a caller
    that runs many in-process evals one after another (scripts/conditioning_table.py) leaks none."""
    if "env" in _worker:
        _worker["env"].close()
    if hasattr(_worker.get("policy"), "close"):
        _worker["policy"].close()
    conditioning = _worker.get("conditioning")
    if conditioning is not None and conditioning.demonstrations is not None:
        conditioning.demonstrations.close()
    _worker.clear()


def run_episode(seed: int, frames: list[np.ndarray] | None = None) -> ConditionedResult:
    from sim.spec import policy_observation

    env, policy, conditioning = _worker["env"], _worker["policy"], _worker["conditioning"]
    obs, info = env.reset(seed=seed)
    if isinstance(policy, RandomPolicy):
        policy.reset(seed)
    else:
        policy.reset(**conditioning.reset_arguments(seed))
    demo = conditioning.demonstration(seed)
    result = ConditionedResult(seed=seed, success=False, steps=0, nan=False,
                               prompt_seed=None if demo is None else demo.seed)
    done = False
    image_keys = [o.name for o in policy.spec.observations if o.kind == "image"] if policy.spec else []
    while not done:
        if frames is not None:  # a seeing policy's film shows its cameras' frames beside the scene
            frames.extend(beside([env.render(256)], [obs[key][None] for key in image_keys]))
        result.closest_to_red_cm = min(result.closest_to_red_cm, red_distance_cm(obs["task_state"]))
        t0 = time.perf_counter()
        action = policy.step(obs if policy.spec is None else policy_observation(policy.spec, obs))
        result.step_ms.append(1e3 * (time.perf_counter() - t0))
        obs, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    result.success, result.nan, result.steps = bool(info["success"]), bool(info["nan"]), int(info["steps"])
    return result


def summarize(results: list[EpisodeResult], policy: str, mode: str, seed: int, wall_s: float) -> dict:
    successes = sum(r.success for r in results)
    n = len(results)
    lo, hi = wilson_interval(successes, n)
    latency = np.concatenate([r.step_ms for r in results]) if results else np.zeros(0)
    lengths = np.array([r.steps for r in results])
    return {
        "policy": policy,
        "mode": mode,
        "seed": seed,
        "episodes": n,
        "successes": successes,
        "success_rate": successes / max(n, 1),
        "success_ci95": [lo, hi],
        "nan_episodes": sum(r.nan for r in results),
        "episode_length": {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                           "min": int(lengths.min()), "max": int(lengths.max())} if n else {},
        "step_latency_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99)),
                            "mean": float(latency.mean())} if latency.size else {},
        "wall_s": wall_s,
        "per_episode": [{k: v for k, v in asdict(r).items() if k != "step_ms"} for r in results],
    }


def plot_summary(summary: dict, latency_ms: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    per = summary["per_episode"]
    colours = ["tab:green" if e["success"] else "tab:red" for e in per]
    axes[0].bar(range(len(per)), [e["steps"] for e in per], color=colours)
    axes[0].set(xlabel="episode", ylabel="steps", title="episode length (green: stacked)")
    lo, hi = summary["success_ci95"]
    rate = summary["success_rate"]
    axes[1].bar([0], [rate], yerr=[[rate - lo], [hi - rate]], capsize=8, color="tab:blue")
    axes[1].set(xlim=(-1, 1), ylim=(0, 1), xticks=[], ylabel="success rate",
                title=f"{summary['successes']}/{summary['episodes']} stacked (95 % CI)")
    if latency_ms.size:
        axes[2].hist(latency_ms, bins=50, color="tab:gray")
        axes[2].axvline(summary["step_latency_ms"]["p99"], color="k", ls="--", label="p99")
        axes[2].legend()
    # Over ROS the measured latency spans the whole path: observation published -> command received.
    xlabel = "observation → command latency (ms)" if "over-ros" in summary["mode"] else "policy step latency (ms)"
    axes[2].set(xlabel=xlabel, ylabel="steps", title="latency per control step")
    fig.suptitle(f"{Path(summary['policy']).name} · {summary['mode']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sim.env import ARM_NAMES, DEFAULT_ARM
    from sim.tasks import DEFAULT_TASK, task_names

    parser.add_argument("--policy", default="expert", help="'expert', 'random' (the normalized score's 0) or PATH.onnx")
    parser.add_argument("--condition", default=None, choices=CONDITIONS,
                        help="how each episode starts: none, prompt (a successful expert demonstration of --task), "
                        "wrong-prompt (the paired task's), instruction (the task's text); default: prompt for a file "
                        "with conditioning metadata, else none; --over-ros: the node's own (instruction for a file "
                        "with an instruction model, else none)")
    parser.add_argument("--prompt-cache", type=Path, default=None,
                        help="folder keeping the demonstrations rolled for prompts, to reuse across runs")
    parser.add_argument("--task", default=DEFAULT_TASK, choices=task_names(), help="the task whose success counts")
    parser.add_argument("--arm", default=DEFAULT_ARM, choices=ARM_NAMES, help="the simulated arm")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=100_000, help="episodes use seed, seed+1, ... (keep them apart "
                        "from the training seeds)")
    parser.add_argument("--workers", type=int, default=1, help="parallel envs (in-process mode)")
    parser.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto, cpu, cuda, tensorrt")
    parser.add_argument("--max-steps", type=int, default=None, help="episode step limit (default: the env's)")
    parser.add_argument("--over-ros", action="store_true", help="sim bridge and policy node as processes over ROS 2")
    parser.add_argument("--json", type=Path, default=Path("runs/eval.json"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG summary (default: beside --json)")
    parser.add_argument("--video", type=Path, default=None, help="MP4 of the first episode")
    parser.add_argument("--real-time-factor", type=float, default=1.0,
                        help="--over-ros: the sim's speed (1 = real time; below 1 gives a loaded machine's bridge "
                             "time to render and the node time to answer within each control period)")
    parser.add_argument("--serial-cameras", action="store_true",
                        help="--over-ros: the bridge renders every camera in its own process, one after another "
                        "(default: each camera after the first in a process of its own, at the same time)")
    parser.add_argument("--camera-shift-cm", type=float, default=0.0,
                        help="robustness: move every camera this far per episode, in a seeded random direction")
    parser.add_argument("--camera-tilt-deg", type=float, default=0.0,
                        help="robustness: turn every camera this much per episode, about a seeded random axis")
    parser.add_argument("--light", type=float, default=0.0,
                        help="robustness: scale the light by 1 ± this per episode (0.2 = ±20 %%, seeded sign)")


def run(args: argparse.Namespace) -> int:
    from gato_ros.runtime import ModelLoadError

    seeds = [args.seed + i for i in range(args.episodes)]
    try:
        if args.policy not in BASELINES:
            check_policy_serves(args.policy, args.task, args.arm)
        resolve = over_ros_condition if args.over_ros and args.policy not in BASELINES else resolve_condition
        condition = resolve(args.policy, args.condition, args.task)
    except (ValueError, ModelLoadError) as e:
        raise SystemExit(f"gato-ros eval: {e}") from e
    start = time.perf_counter()
    if args.over_ros:
        from sim.ros_eval import evaluate_over_ros

        ros_run = evaluate_over_ros(args.policy, seeds, provider=args.provider, max_steps=args.max_steps,
                                    video=args.video, perturbation=perturbation_options(args),
                                    real_time_factor=args.real_time_factor, arm=args.arm, task=args.task,
                                    parallel_cameras=not args.serial_cameras)
        results, mode = ros_run.results, "over-ros"
    else:
        results = evaluate_in_process(args, seeds, condition)
        mode = "in-process"
    summary = summarize(results, args.policy, mode, args.seed, time.perf_counter() - start)
    summary["perturbation"] = perturbation_options(args)
    summary["task"], summary["arm"] = args.task, args.arm
    summary.update(condition_record(condition, args.task))
    if args.over_ros:
        from sim.ros_eval import ros_summary

        summary["over_ros"] = ros_summary(ros_run)  # loop rate, stale commands, latency observation → command
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    latency = np.concatenate([r.step_ms for r in results]) if results else np.zeros(0)
    plot_summary(summary, latency, args.plot or args.json.with_suffix(".png"))
    lo, hi = summary["success_ci95"]
    lat = summary.get("step_latency_ms", {})
    print(f"eval {args.policy} {args.arm} {args.task} condition {condition} ({mode}): "
          f"{summary['successes']}/{summary['episodes']} = "
          f"{summary['success_rate']:.1%} success (95 % CI {lo:.1%}-{hi:.1%}); "
          f"step latency p50 {lat.get('p50', float('nan')):.2f} ms p99 {lat.get('p99', float('nan')):.2f} ms; "
          f"wrote {args.json}")
    if args.over_ros and summary["over_ros"]:
        from sim.ros_eval import describe

        print(describe(summary["over_ros"]))
    return 0


def condition_record(condition: str, task: str) -> dict:
    """What the eval JSON records of the condition (the same for every worker)."""
    record: dict = {"condition": condition}
    demo_task = prompt_task(condition, task)
    if demo_task:
        record.update(prompt_task=demo_task, prompt_seed_offset=PROMPT_SEED_OFFSET)
    if condition == "instruction":
        from sim.tasks import TASKS

        record["instruction"] = TASKS[task].instruction
    return record


def evaluate_in_process(args: argparse.Namespace, seeds: list[int], condition: str = "none") -> list[EpisodeResult]:
    results: list[EpisodeResult] = []
    init = (args.policy, args.provider, args.max_steps, args.task, args.arm, perturbation_options(args), condition,
            args.prompt_cache)
    if args.video is not None:  # the filmed episode runs here, in this process
        _init_worker(*init)
        frames: list[np.ndarray] = []
        results.append(run_episode(seeds[0], frames))
        args.video.parent.mkdir(parents=True, exist_ok=True)
        write_video(frames, args.video, fps=20.0)
        seeds = seeds[1:]
    if args.workers <= 1:
        if args.video is None:  # else the filmed episode's worker is this run's already
            _init_worker(*init)
        for s in tqdm(seeds, desc="eval"):
            results.append(run_episode(s))
        return results
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, _init_worker, init) as pool:
        results += list(tqdm(pool.imap(run_episode, seeds), total=len(seeds), desc="eval"))
    return results
