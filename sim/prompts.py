"""Demonstration prompts for evaluation: successful scripted-expert episodes, as Gato prompts at evaluation.

`gato-ros eval --condition prompt` starts every episode (seed s) with `runtime.reset(prompt=...)`, the prompt a
successful expert episode of the evaluated task on the evaluated arm. The demonstration is rolled on seed
s + PROMPT_SEED_OFFSET, the next seed after it when the expert fails there, so a prompt never shows the scene that
is being evaluated (the eval seeds start at 100 000 and stay far below the offset). `--condition wrong-prompt`
prompts with the paired task's demonstration (`PAIRED_TASK`: the same scene, the other cube or the other order)
while success is still judged on the evaluated task: a policy that reads its prompt does worse there.

The expert acts on the env's full observation (`task_state` included); the prompt keeps the keys of the policy's
spec, as rolled in an env that renders that spec's cameras. Demonstrations are deterministic per (arm, task, seed);
they are kept on disk under a cache folder when one is given, so the conditions of a table (the prompt of one
task is the wrong prompt of its pair) roll each one once.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gato_ros.spec import EmbodimentSpec

PROMPT_SEED_OFFSET = 10**6  # demonstration seeds: the eval seed plus this (far from the eval seeds 100 000 ...)
MAX_DEMONSTRATION_TRIES = 20  # seeds tried after the first before giving up (the experts succeed >= 95 %)
CONDITIONS = ("none", "prompt", "wrong-prompt", "instruction")
# Tasks the scene alone cannot tell apart, in pairs: the wrong prompt of one is the other's demonstration.
_PAIRS = (("stack_red_on_blue", "stack_blue_on_red"), ("lift_red", "lift_blue"),
          ("place_red_at_marker", "place_blue_at_marker"))
PAIRED_TASK: dict[str, str] = {a: b for pair in _PAIRS for a, b in (pair, pair[::-1])}


class DemonstrationError(RuntimeError):
    """The expert failed on every seed tried: no successful demonstration to prompt with."""


@dataclass(frozen=True)
class Demonstration:
    """One successful expert episode: what the policy is prompted with, and where it came from."""

    arm: str
    task: str
    seed: int  # the env seed the expert succeeded on
    observations: dict[str, np.ndarray]  # key -> (T, ...), the env's full observation
    actions: np.ndarray  # (T, A), the expert's commands

    def prompt(self, spec: EmbodimentSpec | None = None) -> dict[str, Any]:
        """The `runtime.reset(prompt=...)` argument: the observations cut to `spec`'s keys (all without one)."""
        keys = [o.name for o in spec.observations] if spec is not None else list(self.observations)
        return {"observations": {k: self.observations[k] for k in keys}, "actions": self.actions}


def prompt_task(condition: str, task: str) -> str | None:
    """The task whose demonstration prompts an episode of `task` under `condition`; None: no prompt."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}: choose one of {', '.join(CONDITIONS)}")
    if condition == "prompt":
        return task
    if condition == "wrong-prompt":
        if task not in PAIRED_TASK:
            raise ValueError(f"task {task!r} has no paired task for a wrong prompt (pairs: {_PAIRS})")
        return PAIRED_TASK[task]
    return None


class DemonstrationSource:
    """Successful expert demonstrations by (task, eval seed) for one arm and one set of rendered cameras,
    rolled on first use and kept (in memory; on disk under `cache_dir` when given)."""

    def __init__(self, arm: str, env_options: dict[str, Any] | None = None, cache_dir: Path | None = None,
                 max_tries: int = MAX_DEMONSTRATION_TRIES) -> None:
        self.arm, self.max_tries = arm, max_tries
        self.env_options = {k: v for k, v in (env_options or {}).items() if k not in ("task", "arm", "max_steps")}
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._latest: tuple[tuple[str, int], Demonstration] | None = None  # an episode asks more than once
        self._envs: dict[str, Any] = {}

    def for_episode(self, task: str, eval_seed: int) -> Demonstration:
        """The demonstration of `task` that prompts the episode of seed `eval_seed`."""
        key = (task, eval_seed)
        if self._latest is None or self._latest[0] != key:  # only the latest in memory: a seeing run's frames add up
            self._latest = key, self._load(task, eval_seed) or self._roll(task, eval_seed)
        return self._latest[1]

    def _cache_path(self, task: str, eval_seed: int) -> Path | None:
        if self.cache_dir is None:
            return None
        size, cameras = self.env_options.get("image_size"), self.env_options.get("cameras")
        view = "no_camera" if not size else f"img{size}" + ("" if cameras is None else "_" + "_".join(cameras))
        return self.cache_dir / self.arm / task / view / f"{eval_seed + PROMPT_SEED_OFFSET}.npz"

    def _load(self, task: str, eval_seed: int) -> Demonstration | None:
        path = self._cache_path(task, eval_seed)
        if path is None or not path.is_file():
            return None
        with np.load(path) as f:
            observations = {k.removeprefix("obs."): f[k] for k in f.files if k.startswith("obs.")}
            return Demonstration(self.arm, task, int(f["seed"]), observations, f["actions"])

    def _save(self, demo: Demonstration, eval_seed: int) -> None:
        path = self._cache_path(demo.task, eval_seed)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole, then renamed: workers rolling the same demonstration never read half a file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, seed=demo.seed, actions=demo.actions, **{f"obs.{k}": v for k, v in demo.observations.items()})
        os.replace(tmp, path)

    def _roll(self, task: str, eval_seed: int) -> Demonstration:
        from sim.arms import make_env, make_expert
        from sim.expert import run_episode

        if task not in self._envs:  # the env's default episode length: an eval's --max-steps does not cut it
            self._envs[task] = (make_env(self.arm, task=task, **self.env_options), make_expert(self.arm, task))
        env, expert = self._envs[task]
        first = eval_seed + PROMPT_SEED_OFFSET
        for seed in range(first, first + self.max_tries + 1):
            episode = run_episode(env, expert, seed)
            if episode.success:
                demo = Demonstration(self.arm, task, seed, episode.observations, episode.actions)
                self._save(demo, eval_seed)
                return demo
        raise DemonstrationError(f"the {self.arm} expert failed {task} on seeds {first}..{seed}: no demonstration")

    def close(self) -> None:
        for env, expert in self._envs.values():
            env.close()
            expert.close()
        self._envs.clear()
