"""Evidence that conditioning is real (issue 13): `gato-ros eval --condition` prompts each episode with a successful
expert demonstration of the task (or of the paired task for `wrong-prompt`), refuses a condition the file cannot
take before any episode runs, `--policy random` and the normalized score set the scale, and
scripts/conditioning_table.py fills every cell of its table and resumes where it stopped."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.cli import main
from gato_ros.data import EpisodeWriter
from sim.arms import embodiment_spec, make_env
from sim.evaluate import (
    EpisodeConditioning,
    RandomPolicy,
    difference_interval,
    normalized_score,
    over_ros_condition,
    resolve_condition,
    wilson_interval,
)
from sim.prompts import PROMPT_SEED_OFFSET, DemonstrationError, DemonstrationSource
from sim.tasks import LIFT_HEIGHT, TASKS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "stack_int8.onnx"
CUBE_HALF = 0.02
RED_Z, BLUE_Z = 5, 8  # task_state: hand xyz, red xyz, blue xyz, ...
TASK_NAMES = ("lift_red", "lift_blue")
ARMS = ("panda", "xarm6")
WINDOW = 4 * tok.timestep_token_count(embodiment_spec("panda"))  # the cache: a 2-step prompt and 2 episode steps


@pytest.fixture(scope="module")
def conditioned_model(tmp_path_factory) -> Path:
    """A file of both arms and lift_red / lift_blue, trained (2 steps, on random episodes) and exported the way a
    generalist is: prompted and instructed windows, pinned, so it carries gato_ros.conditioning and an instruction
    model."""
    root = tmp_path_factory.mktemp("conditioned")
    rng = np.random.default_rng(5)
    for arm in ARMS:
        spec = embodiment_spec(arm)
        with EpisodeWriter(root / arm, spec) as writer:
            for e in range(6):
                task, steps = TASK_NAMES[e % 2], 8
                obs = {o.name: rng.normal(size=(steps, *o.shape)).astype(np.float32) for o in spec.observations}
                actions = np.stack([rng.choice(a.values, steps) if a.kind == "discrete"
                                    else rng.uniform(-a.limit, a.limit, steps) for a in spec.actions], 1)
                writer.add_episode(obs, actions, {"seed": e, "arm": arm, "task": task,
                                                  "instruction": TASKS[task].instruction})
    assert main(["train", "--data", *(str(root / arm) for arm in ARMS), "--out", str(root / "run"), "--preset", "tiny",
                 "--context-window", "1024", "--seq-len", str(WINDOW), "--steps", "2", "--batch-size", "4",
                 "--eval-every", "2", "--val-fraction", "0.2", "--prompt-prob", "0.25", "--prompt-steps", "2",
                 "--instruction-prob", "0.25", "--no-progress"]) == 0
    out = root / "conditioned.onnx"
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(out), "--attention", "plain",
                 "--context-tokens", str(WINDOW), "--trained-capacities", str(WINDOW)]) == 0
    return out


@pytest.fixture(scope="module")
def prompt_only_model(conditioned_model: Path) -> Path:
    """The same file declaring prompts but no instruction model (as one trained with --prompt-prob alone)."""
    model = onnx.load(str(conditioned_model))
    entry = next(e for e in model.metadata_props if e.key == contract.META_CONDITIONING)
    entry.value = contract.Conditioning(prompt_steps=2).to_json()
    out = conditioned_model.with_name("prompt_only.onnx")
    onnx.save(model, str(out))
    return out


def lifted(task_state: np.ndarray, z_index: int) -> bool:
    return bool(task_state[z_index] - CUBE_HALF >= LIFT_HEIGHT)


def test_prompt_is_a_successful_expert_episode_of_the_task_on_the_arm() -> None:
    spec = embodiment_spec("xarm6")
    conditioning = EpisodeConditioning("prompt", "lift_red", "xarm6", spec)
    prompt = conditioning.reset_arguments(100_000)["prompt"]
    demo = conditioning.demonstration(100_000)
    assert (demo.arm, demo.task, demo.seed) == ("xarm6", "lift_red", 100_000 + PROMPT_SEED_OFFSET)
    # the arm's own observations and actions: the xArm6's 7 joints and 7 commands, not the Panda's 8
    assert set(prompt["observations"]) == {o.name for o in spec.observations}
    steps = len(prompt["actions"])
    assert prompt["actions"].shape == (steps, spec.action_size) == (steps, 7)
    assert prompt["observations"]["joint_positions"].shape == (steps, 7)
    # it starts in the scene of its own seed, on that arm ...
    first, _ = make_env("xarm6", task="lift_red").reset(seed=demo.seed)
    for key, frames in prompt["observations"].items():
        np.testing.assert_array_equal(frames[0], first[key])
    # ... and ends with the red cube held up and the blue one on the table: a successful lift_red
    last = prompt["observations"]["task_state"][-1]
    assert lifted(last, RED_Z) and not lifted(last, BLUE_Z)


def test_wrong_prompt_is_the_paired_tasks_successful_demonstration() -> None:
    conditioning = EpisodeConditioning("wrong-prompt", "lift_red", "xarm6", embodiment_spec("xarm6"))
    prompt = conditioning.reset_arguments(100_001)["prompt"]
    assert conditioning.demonstration(100_001).task == "lift_blue"
    last = prompt["observations"]["task_state"][-1]
    assert lifted(last, BLUE_Z) and not lifted(last, RED_Z)
    assert EpisodeConditioning("none", "lift_red", "xarm6").reset_arguments(100_001) == {}
    assert EpisodeConditioning("instruction", "lift_red", "xarm6").reset_arguments(100_001) == {
        "instruction": "lift the red cube"}


def test_a_failed_expert_episode_never_prompts() -> None:
    """Frictionless cubes slip out of every grasp: the expert fails each seed tried, and no prompt comes of it."""
    source = DemonstrationSource("xarm6", {"friction": 0.0}, max_tries=1)
    first = 7 + PROMPT_SEED_OFFSET
    with pytest.raises(DemonstrationError, match=f"seeds {first}..{first + 1}"):
        source.for_episode("lift_red", 7)


def test_normalized_score_is_zero_at_random_and_hundred_at_the_expert() -> None:
    assert normalized_score(0.1, random_rate=0.1, expert_rate=0.9) == 0.0
    assert normalized_score(0.9, random_rate=0.1, expert_rate=0.9) == 100.0
    assert normalized_score(0.5, random_rate=0.1, expert_rate=0.9) == pytest.approx(50.0)
    assert normalized_score(0.0, random_rate=0.2, expert_rate=1.0) == pytest.approx(-25.0)  # worse than random
    assert normalized_score(0.5, random_rate=0.3, expert_rate=0.3) is None  # no scale: the expert is no better


def test_difference_interval_is_newcombes() -> None:
    """The right-minus-wrong-prompt interval: Newcombe (1998), Stat. Med. 17:873, table II, method 10."""
    assert difference_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert difference_interval(5, 56, 0, 29) == pytest.approx((-0.0381, 0.1926), abs=1e-4)


def test_wilson_interval_holds_the_rate_at_both_ends() -> None:
    """All successes or none: the interval ends at 100 % or 0 % exactly (the eval's plot draws rate - lo and
    hi - rate as error bars, which must not be negative; rounding made 6/6 end at 0.9999999999999999)."""
    for n in range(1, 121):
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0, n
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert lo <= k / n <= hi
    assert wilson_interval(37, 50) == pytest.approx((0.6045, 0.8413), abs=1e-4)


@pytest.mark.parametrize("arm", ["panda", "xarm6"])
def test_random_policy_spans_the_limits_and_repeats_per_seed(arm: str) -> None:
    spec = embodiment_spec(arm)
    policy = RandomPolicy(spec)

    def episode(seed: int) -> np.ndarray:
        policy.reset(seed)
        return np.stack([policy.step({}) for _ in range(400)])

    actions = episode(100_000)
    for i, a in enumerate(spec.actions):
        column = actions[:, i]
        if a.kind == "discrete":
            assert set(column) == set(a.values), a.name
        else:
            assert np.abs(column).max() <= a.limit and column.min() < -0.8 * a.limit and column.max() > 0.8 * a.limit
    np.testing.assert_array_equal(episode(100_000), actions)
    assert not np.array_equal(episode(100_001), actions)


def test_eval_reports_how_close_the_hand_came_to_the_red_cube(tmp_path: Path) -> None:
    """Per episode, the hand's closest approach to the red cube: the expert grasps it (within a centimetre or
    two of its centre), the random policy never gets near it."""
    closest = {}
    for policy in ("expert", "random"):
        out = tmp_path / f"{policy}.json"
        assert main(["eval", "--policy", policy, "--episodes", "1", "--seed", "100000", "--max-steps", "60",
                     "--json", str(out)]) == 0
        closest[policy] = json.loads(out.read_text())["per_episode"][0]["closest_to_red_cm"]
    assert closest["expert"] < 3.0 < 10.0 < closest["random"], closest


def test_default_condition_is_prompt_only_for_a_file_that_declares_conditioning(conditioned_model: Path) -> None:
    assert resolve_condition(str(SHIPPED), None, "stack_red_on_blue") == "none"
    assert resolve_condition(str(conditioned_model), None, "lift_red") == "prompt"
    assert resolve_condition("random", None, "lift_red") == "none"


def test_over_ros_the_condition_is_the_nodes_own(conditioned_model: Path, tmp_path: Path) -> None:
    """The node starts every episode of a file with an instruction model with the task's instruction: an over-ROS
    eval says so, and refuses to call it anything else before any process starts."""
    assert over_ros_condition(str(conditioned_model), None, "lift_red") == "instruction"
    assert over_ros_condition(str(SHIPPED), None, "stack_red_on_blue") == "none"
    with pytest.raises(SystemExit, match="in-process"):
        main(["eval", "--over-ros", "--policy", str(conditioned_model), "--task", "lift_red", "--condition", "prompt",
              "--episodes", "1", "--json", str(tmp_path / "eval.json")])


@pytest.mark.parametrize("which", ["shipped", "prompt-only"])
def test_instruction_without_an_instruction_model_is_refused_before_any_episode(which: str, prompt_only_model: Path,
                                                                                tmp_path: Path) -> None:
    policy, task = (SHIPPED, "stack_red_on_blue") if which == "shipped" else (prompt_only_model, "lift_red")
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit, match="has no instruction model"):
        main(["eval", "--policy", str(policy), "--task", task, "--condition", "instruction", "--episodes", "1",
              "--max-steps", "2", "--provider", "cpu", "--json", str(out)])
    assert not out.exists()


def test_eval_records_the_condition_and_each_episodes_prompt(conditioned_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--policy", str(conditioned_model), "--task", "lift_red", "--condition", "wrong-prompt",
                 "--episodes", "2", "--max-steps", "2", "--provider", "cpu", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert (summary["condition"], summary["prompt_task"]) == ("wrong-prompt", "lift_blue")
    assert [e["prompt_seed"] for e in summary["per_episode"]] == [100_000 + PROMPT_SEED_OFFSET,
                                                                 100_001 + PROMPT_SEED_OFFSET]


def test_conditioning_table_runs_every_arm_and_task_asked_for(conditioned_model: Path) -> None:
    table = load_table_script()
    args = argparse.Namespace(policy=conditioned_model, arms="", tasks="", pairs="")
    assert table.plan(args) == [(arm, task) for arm in ARMS for task in TASK_NAMES]  # all the file serves
    args.arms, args.tasks = "xarm6", "lift_blue"
    assert table.plan(args) == [("xarm6", "lift_blue")]
    args.pairs = "xarm6:lift_red,panda:lift_blue"
    assert table.plan(args) == [("xarm6", "lift_red"), ("panda", "lift_blue")]
    with pytest.raises(SystemExit, match="stack_red_on_blue"):
        table.plan(argparse.Namespace(policy=conditioned_model, arms="", tasks="", pairs="panda:stack_red_on_blue"))


def load_table_script():  # noqa: ANN201 - the module scripts/conditioning_table.py
    spec = importlib.util.spec_from_file_location("conditioning_table", ROOT / "scripts" / "conditioning_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conditioning_table_fills_every_cell_and_resumes(conditioned_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "table"
    command = [sys.executable, str(ROOT / "scripts" / "conditioning_table.py"), "--policy", str(conditioned_model),
               "--pairs", "panda:lift_red,panda:lift_blue,xarm6:lift_blue", "--episodes", "2", "--max-steps", "3",
               "--out", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((out / "conditioning.json").read_text())
    cells = {"prompt", "wrong-prompt", "none", "instruction", "expert", "random"}
    assert {arm: set(tasks) for arm, tasks in table["cells"].items()} == {"panda": {"lift_red", "lift_blue"},
                                                                           "xarm6": {"lift_blue"}}
    for arm in ARMS:
        for task, done in table["cells"][arm].items():
            assert set(done) == cells, (arm, task)
            assert all(entry["episodes"] == 2 for entry in done.values())
            assert set(table["normalized_score"][arm][task]) == {"prompt", "wrong-prompt", "none", "instruction"}
    wrong = json.loads((out / "cells" / "xarm6" / "lift_blue" / "wrong-prompt.json").read_text())
    assert (wrong["condition"], wrong["prompt_task"], wrong["task"], wrong["arm"]) == ("wrong-prompt", "lift_red",
                                                                                      "lift_blue", "xarm6")
    told = json.loads((out / "cells" / "panda" / "lift_red" / "instruction.json").read_text())
    assert (told["condition"], told["instruction"]) == ("instruction", TASKS["lift_red"].instruction)
    markdown = (out / "conditioning.md").read_text()
    assert "| lift_red |" in markdown and "| lift_blue |" in markdown and "not run" not in markdown
    assert markdown.count(" to ") == 3  # the right-minus-wrong prompt interval of each pair
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0
    assert not re.search(r"^conditioning_table: \S+ \S+ \S+: \d+/\d+", again.stdout, re.M), "a finished cell ran again"
    assert json.loads((out / "conditioning.json").read_text()) == table
