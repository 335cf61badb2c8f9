"""The scripted expert stacks, also through Gato's action tokens, and `gato-ros collect` writes its demos."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pybullet as p
import pytest

from gato_ros.data import read_dataset
from gato_ros.tokenizer import detokenize_action, tokenize_action
from sim import collect
from sim.env import HAND_LINK, StackingEnv
from sim.expert import ExpertConfig, ScriptedExpert, run_episode
from sim.spec import stacking_spec


@pytest.fixture(scope="module")
def rig():
    env, expert = StackingEnv(), ScriptedExpert()
    yield env, expert
    env.close()
    expert.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_stacks(rig, seed):
    episode = run_episode(*rig, seed)
    assert episode.success and not episode.nan
    assert episode.steps < 200


def test_expert_stacks_through_the_token_round_trip(rig):
    spec = stacking_spec()
    episode = run_episode(*rig, 3, tokenize_spec=spec)
    assert episode.success
    # what the arm got is exactly the detokenized label
    roundtrip = np.stack([detokenize_action(spec, tokenize_action(spec, a)) for a in episode.actions])
    np.testing.assert_allclose(episode.executed, roundtrip, rtol=1e-6, atol=1e-6)


def test_noisy_demo_records_the_clean_label(rig):
    episode = run_episode(*rig, 4, noisy=True)
    assert episode.success
    arm_noise = episode.executed[:, :7] - episode.actions[:, :7]
    assert 0.3 < arm_noise[:, :4].std() < 3.0  # shoulder/elbow noise ~1 N·m
    np.testing.assert_array_equal(episode.executed[:, 7], episode.actions[:, 7])  # gripper decision untouched


def test_expert_is_a_function_of_the_observation(rig):
    """No timers or hidden state: a fresh expert gives the same command for the same observation."""
    env, expert = rig
    obs, _ = env.reset(seed=5)
    for _ in range(20):
        obs, *_ = env.step(expert.act(obs))
    fresh = ScriptedExpert()
    np.testing.assert_allclose(expert.act(obs), fresh.act(obs), atol=1e-9)
    np.testing.assert_allclose(expert.act(obs), expert.act(obs), atol=1e-9)
    fresh.close()


def test_gripper_labels_are_the_spec_values(rig):
    episode = run_episode(*rig, 6)
    values = set(stacking_spec().actions[7].values)
    assert set(np.unique(episode.actions[:, 7]).tolist()) == values  # it both opens and closes


def test_episode_seeds_depend_on_the_run_seed_only():
    a = collect.episode_jobs(20, seed=1, noise_fraction=0.5)
    assert a == collect.episode_jobs(20, seed=1, noise_fraction=0.5)
    assert a != collect.episode_jobs(20, seed=2, noise_fraction=0.5)
    assert len({j.seed for j in a}) == 20
    assert 0 < sum(j.noisy for j in a) < 20
    assert not any(j.noisy for j in collect.episode_jobs(20, seed=1, noise_fraction=0.0))


def test_collect_writes_a_readable_dataset(tmp_path):
    parser = argparse.ArgumentParser()
    collect.add_arguments(parser)
    out = tmp_path / "demos"
    args = parser.parse_args(["--episodes", "2", "--workers", "2", "--out", str(out), "--seed", "3"])
    assert collect.run(args) == 0
    dataset = read_dataset(out, stacking_spec())
    assert len(dataset) == 2
    for meta, (observations, actions) in zip(dataset.episodes, dataset, strict=True):
        assert meta["success"] and meta["steps"] == len(actions)
        assert {"seed", "noisy"} <= meta.keys()
        assert actions.dtype == np.float32 and actions.shape[1] == 8
        assert observations["task_state"].shape == (len(actions), 17)


def test_phase_reads_the_task_off_each_observation(rig):
    """What `scripts/seeing_phases.py` asks of a learner's states: the expert's own episode runs through approach,
    grasp, carry, release and retreat in that order, with the hand turned to the cube when the grasp starts."""
    env, expert = rig
    obs, _ = env.reset(seed=0)
    phases, yaw_at_grasp, done = [], None, False
    while not done:
        phase, yaw_error = expert.phase(obs)
        if phase == "grasp" and yaw_at_grasp is None:
            yaw_at_grasp = yaw_error
        phases.append(phase)
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        done = terminated or truncated
    assert info["success"]
    order = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
    assert order == ["approach", "grasp", "carry", "release", "retreat"]
    assert yaw_at_grasp is not None and yaw_at_grasp < expert.config.yaw_tolerance


def grasp_pose(config: ExpertConfig, seed: int) -> tuple[float, float]:
    """The hand's yaw off the cube's (degrees, modulo 90°) and its x offset from the cube (cm) at the first close."""
    env, expert = StackingEnv(), ScriptedExpert(config)
    try:
        obs, _ = env.reset(seed=seed)
        while True:
            phase, _ = expert.phase(obs)
            if phase == "grasp":
                orn = p.getLinkState(env.robot, HAND_LINK, physicsClientId=env.client)[5]
                r = np.asarray(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
                off = (math.degrees(math.atan2(r[1, 0], r[0, 0]) - env._cube_pose(0)[1]) + 45) % 90 - 45
                return off, 100 * float(env.hand_position()[0] - env.cube_position(0)[0])
            obs, *_ = env.step(expert.act(obs))
    finally:
        env.close()
        expert.close()


def test_offsets_make_the_expert_grasp_off_the_cubes_yaw_or_centre():
    """`python -m sim.expert --yaw-offset-deg/--grasp-offset-cm` measure how precise a grasp must be: the expert
    then closes the fingers that far off, not on the cube's yaw and centre."""
    yaw, x = grasp_pose(ExpertConfig(), seed=1)
    assert abs(yaw) < 6 and abs(x) < 0.8
    yaw, _ = grasp_pose(ExpertConfig(yaw_offset=math.radians(15)), seed=1)
    assert abs(abs(yaw) - 15) < 6
    _, x = grasp_pose(ExpertConfig(grasp_offset=0.012), seed=1)
    assert abs(x - 1.2) < 0.8
