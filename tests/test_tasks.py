"""Tasks of the stacking scene and the second arm (issue 13): each expert does its own task, the default
task is unchanged, the two stacking tasks start from the same scenes, the xArm6 takes joint velocities,
and an unknown task or arm names the valid choices."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pybullet as p
import pytest

from gato_ros.data import read_dataset
from gato_ros.tokenizer import tokenize_observation
from sim import collect, tasks
from sim.arms import embodiment_spec, make_env, make_expert
from sim.env import ARM_NAMES, StackingEnv
from sim.expert import ScriptedExpert, run_episode
from sim.spec import stacking_spec
from sim.xarm import HOME_Q as XARM_HOME_Q
from sim.xarm import XArmStackingEnv, xarm_spec

GOLDEN = Path(__file__).parent / "golden" / "expert_stack_red_on_blue_seed0.npz"


def test_default_task_replays_the_expert_recorded_before_the_task_registry():
    """Recorded with the code before sim/tasks.py: the shipped model's tests and datasets depend on it."""
    golden = np.load(GOLDEN)
    for task in ("stack_red_on_blue", "stack"):  # "stack": the name StackingConfig.task had before
        env, expert = StackingEnv(task=task), ScriptedExpert()
        episode = run_episode(env, expert, 0)
        env.close()
        expert.close()
        np.testing.assert_array_equal(episode.actions, golden["actions"])
        np.testing.assert_array_equal(episode.observations["task_state"], golden["task_state"])


@pytest.mark.parametrize(("task", "cube"), [("stack_blue_on_red", 1), ("lift_red", 0), ("lift_blue", 1),
                                           ("place_red_at_marker", 0), ("place_blue_at_marker", 1)])
def test_expert_does_its_task(task, cube):
    """`cube`: the one the task moves (0 red, 1 blue)."""
    env, expert = StackingEnv(task=task), ScriptedExpert(task=task)
    episode = run_episode(env, expert, 1)
    moved, other = env.cube_position(cube), env.cube_position(1 - cube)
    env.close()
    expert.close()
    assert episode.success and not episode.nan
    if task == "stack_blue_on_red":
        assert abs(moved[2] - other[2] - 0.04) < 0.008 and np.linalg.norm(moved[:2] - other[:2]) < 0.015
    elif task.startswith("lift"):
        assert moved[2] > 0.02 + tasks.LIFT_HEIGHT and other[2] < 0.03
    else:
        assert np.linalg.norm(moved[:2] - tasks.MARKER_XY) < 0.015 and moved[2] < 0.03 and other[2] < 0.03


@pytest.mark.parametrize(("task", "top", "bottom"), [("stack_red_on_blue", 0, 1), ("stack_blue_on_red", 1, 0)])
def test_success_is_the_env_task_not_any_stack(task, top, bottom):
    """Red set down on blue succeeds for stack_red_on_blue only, and the other way round."""
    for cube_on_top in (0, 1):
        env = StackingEnv(task=task)
        env.reset(seed=2)
        under = env.cube_position(1 - cube_on_top)
        p.resetBasePositionAndOrientation(env.cubes[cube_on_top], under + [0, 0, 0.0401], [0, 0, 0, 1], env.client)
        p.resetBasePositionAndOrientation(env.cubes[1 - cube_on_top], under, [0, 0, 0, 1], env.client)
        for _ in range(8):  # the arm holds still at home, away from the cubes
            _, _, terminated, _, info = env.step(np.array([0, 0, 0, 0, 0, 0, 0, 15.0]))
            if terminated:
                break
        env.close()
        assert info["success"] == (cube_on_top == top)


def test_the_two_stacking_tasks_start_from_the_same_scenes():
    """Only the prompt or instruction can tell them apart: same cubes, same picture, the yaw slot (the picked
    cube's) drawn from the same distribution."""
    a, b = StackingEnv(task="stack_red_on_blue", image_size=64), StackingEnv(task="stack_blue_on_red", image_size=64)
    for seed in (0, 1):
        oa, _ = a.reset(seed=seed)
        ob, _ = b.reset(seed=seed)
        np.testing.assert_array_equal(oa["task_state"][:15], ob["task_state"][:15])
        np.testing.assert_array_equal(oa["image"], ob["image"])
        np.testing.assert_array_equal(oa["joint_positions"], ob["joint_positions"])
        _, blue_yaw = b._cube_pose(1)
        np.testing.assert_allclose(ob["task_state"][15:], [np.sin(4 * blue_yaw), np.cos(4 * blue_yaw)])
    a.close()
    b.close()


def test_marker_is_visible_off_the_cubes_and_not_physical():
    env = StackingEnv(task="place_red_at_marker", image_size=64)
    plain = StackingEnv(image_size=64)
    def green_pixels(image: np.ndarray) -> int:
        r, g, b = np.moveaxis(image.astype(int), -1, 0)
        return int(((g > r + 40) & (g > b + 40)).sum())

    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        for i in range(2):
            assert np.linalg.norm(env.cube_position(i)[:2] - tasks.MARKER_XY) >= env.config.min_separation
    assert green_pixels(obs["image"]) > 5 and green_pixels(plain.reset(seed=4)[0]["image"]) == 0
    assert p.getCollisionShapeData(env.marker, -1, physicsClientId=env.client) == ()
    env.close()
    plain.close()


def test_unknown_task_or_arm_names_the_choices():
    with pytest.raises(ValueError, match="stack_red_on_blue, stack_blue_on_red, lift_red, lift_blue, "
                                         "place_red_at_marker, place_blue_at_marker"):
        StackingEnv(task="stack_green")
    with pytest.raises(ValueError, match="panda, xarm6"):
        make_env(arm="ur5")
    with pytest.raises(ValueError, match="panda, xarm6"):
        StackingEnv(arm="ur5")
    with pytest.raises(ValueError, match="make_env"):
        StackingEnv(arm="xarm6")  # never the Panda's env under the xArm's name
    with pytest.raises(ValueError, match="lift_red"):
        make_expert("xarm6", "lift_green")
    with pytest.raises(ValueError, match="panda, xarm6"):
        embodiment_spec("ur5")
    parser = argparse.ArgumentParser()
    collect.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--episodes", "1", "--out", "x", "--task", "stack_green"])


@pytest.mark.timeout(120)  # a refusal inside pool workers would respawn them forever
def test_collect_refuses_what_the_env_refuses_before_starting_workers(tmp_path):
    parser = argparse.ArgumentParser()
    collect.add_arguments(parser)
    wrist = parser.parse_args(["--episodes", "1", "--out", str(tmp_path / "x"), "--arm", "xarm6", "--image-size",
                               "64", "--cameras", "wrist"])
    with pytest.raises(ValueError, match="wrist camera"):
        collect.run(wrist)


# ------------------------------------------------------------------------------------------ xArm6


@pytest.fixture(scope="module")
def xarm():
    env = make_env(arm="xarm6")
    yield env
    env.close()


def test_xarm_is_its_own_body_with_its_own_spec(xarm):
    spec = xarm_spec()
    obs, _ = xarm.reset(seed=0)
    assert isinstance(xarm, XArmStackingEnv) and set(ARM_NAMES) == {"panda", "xarm6"}
    assert tuple(xarm.joint_names) == spec.joint_names and len(spec.joint_names) == 7
    assert {k: v.shape for k, v in obs.items()} == {o.name: o.shape for o in spec.observations}
    assert xarm.action_space.shape == (spec.action_size,) == (7,)
    assert spec.action_mode == "velocity" and stacking_spec().action_mode == "effort"
    tokenize_observation(spec, obs)  # raises on any mismatch
    assert type(spec).from_json(spec.to_json()) == spec
    assert "action_mode" not in stacking_spec().to_json()  # Panda files and datasets read back unchanged


def test_xarm_holds_still_at_zero_velocity_and_follows_a_velocity_command(xarm):
    obs, _ = xarm.reset(seed=0)
    np.testing.assert_allclose(obs["joint_positions"][:6], XARM_HOME_Q, atol=1e-6)
    for _ in range(20):  # 1 s of zero velocity
        obs, *_ = xarm.step(np.array([0, 0, 0, 0, 0, 0, 0.04]))
    np.testing.assert_allclose(obs["joint_positions"][:6], XARM_HOME_Q, atol=2e-3)
    for _ in range(10):  # 0.5 s at 0.4 rad/s on joint1
        obs, *_ = xarm.step(np.array([0.4, 0, 0, 0, 0, 0, 0.04]))
    assert obs["joint_positions"][0] == pytest.approx(XARM_HOME_Q[0] + 0.2, abs=0.02)
    np.testing.assert_allclose(obs["joint_positions"][1:6], XARM_HOME_Q[1:], atol=5e-3)
    with pytest.raises(ValueError, match="7 values"):
        xarm.step(np.zeros(8))


@pytest.mark.parametrize("task", ["stack_red_on_blue", "lift_red"])
def test_xarm_expert_does_its_task_through_the_token_round_trip(xarm, task):
    env = make_env(arm="xarm6", task=task)
    expert = make_expert("xarm6", task)
    episode = run_episode(env, expert, 3, tokenize_spec=xarm_spec())
    env.close()
    expert.close()
    assert episode.success and not episode.nan
    np.testing.assert_allclose(np.unique(episode.actions[:, 6]), [0.0, 0.04], atol=1e-6)  # it opens and closes


def test_collect_records_task_and_arm(tmp_path):
    parser = argparse.ArgumentParser()
    collect.add_arguments(parser)
    out = tmp_path / "demos"
    args = parser.parse_args(["--episodes", "1", "--workers", "1", "--out", str(out), "--seed", "3",
                              "--arm", "xarm6", "--task", "lift_red", "--noise-fraction", "0"])
    assert collect.run(args) == 0
    dataset = read_dataset(out, xarm_spec())
    (meta,) = dataset.episodes
    assert meta["task"] == "lift_red" and meta["arm"] == "xarm6" and meta["success"]
    observations, actions = dataset.episode(0)
    assert actions.shape[1] == 7 and observations["joint_positions"].shape[1] == 7
    assert observations["task_state"][-1, 5] > 0.02 + tasks.LIFT_HEIGHT  # a lift was demonstrated: red is up


def test_the_node_side_sees_the_xarm6_as_a_velocity_arm():
    """What the node builds from the spec: six arm joints for the velocity controller, the gripper apart;
    an effort controller is refused at configure."""
    from gato_ros.commands import check_output_mode, model_action_mode
    from gato_ros.control import build_layout

    spec = xarm_spec()
    layout = build_layout(spec)
    assert layout.arm_names == tuple(f"joint{i}" for i in range(1, 7)) and layout.gripper_name == "gripper_finger_left"
    assert model_action_mode(spec) == "velocity"
    check_output_mode("velocity", "velocity")
    with pytest.raises(ValueError, match="velocity"):
        check_output_mode("effort", model_action_mode(spec))
