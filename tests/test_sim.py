"""The PyBullet stacking env behaves like the arm DESIGN.md describes (real PyBullet, no mocks)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pybullet as p
import pytest

import sim  # noqa: F401  (registers GatoStack-v0)
from gato_ros.tokenizer import tokenize_observation
from sim.env import HOME_Q, JOINT_NAMES, StackingEnv
from sim.expert import ScriptedExpert
from sim.spec import stacking_spec


@pytest.fixture(scope="module")
def env():
    e = StackingEnv()
    yield e
    e.close()


def test_zero_command_holds_the_arm_against_gravity(env):
    obs, _ = env.reset(seed=0)
    for _ in range(40):  # 2 s
        obs, _, terminated, truncated, _ = env.step(np.zeros(8))
    assert not terminated and not truncated
    np.testing.assert_allclose(obs["joint_positions"][:7], HOME_Q, atol=2e-3)
    assert np.abs(obs["joint_velocities"][:7]).max() < 1e-2


def test_without_compensation_the_arm_would_fall(env):
    """The hold above comes from the added gravity compensation: cancelling it drops the arm."""
    obs, _ = env.reset(seed=0)
    for _ in range(10):
        tau = -env.gravity_compensation(list(obs["joint_positions"][:7]) + [0.04, 0.04])
        obs, *_ = env.step(np.concatenate([tau, [15.0]]))
    assert np.abs(obs["joint_positions"][:7] - HOME_Q).max() > 0.05


def test_same_seed_same_run_with_expert():
    runs = []
    for _ in range(2):
        env, expert = StackingEnv(), ScriptedExpert()
        obs, _ = env.reset(seed=7)
        for _ in range(30):
            obs, *_ = env.step(expert.act(obs))
        runs.append(obs)
        env.close()
        expert.close()
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key])


def test_seed_changes_the_blocks(env):
    a, _ = env.reset(seed=1)
    b, _ = env.reset(seed=2)
    assert not np.allclose(a["task_state"][3:9], b["task_state"][3:9])
    c, _ = env.reset(seed=1)
    np.testing.assert_array_equal(a["task_state"], c["task_state"])


def test_observations_match_the_spec_and_tokenize():
    env = StackingEnv(image_size=64)
    spec = stacking_spec(image_size=64)
    obs, _ = env.reset(seed=3)
    assert set(obs) == {o.name for o in spec.observations}
    for o in spec.observations:
        assert obs[o.name].shape == o.shape
    assert obs["image"].dtype == np.uint8 and obs["image"].std() > 5  # a real picture, not a blank frame
    assert env.observation_space.contains(obs)
    tokenize_observation(spec, obs)  # raises on any mismatch
    assert tuple(env.joint_names) == spec.joint_names == JOINT_NAMES
    env.close()


def test_gymnasium_registration():
    env = gym.make("GatoStack-v0", max_steps=3)
    obs, info = env.reset(seed=0)
    assert obs["task_state"].shape == (17,) and info["success"] is False
    for _ in range(3):
        _, _, terminated, truncated, info = env.step(np.zeros(8))
    assert truncated and not terminated and not info["success"]
    env.close()


def test_nan_physics_ends_the_episode_as_failure(env):
    obs, _ = env.reset(seed=0)
    p.resetBaseVelocity(env.cubes[0], [float("nan")] * 3, [0, 0, 0], physicsClientId=env.client)
    out, _, terminated, _, info = env.step(np.zeros(8))
    assert terminated and info["nan"] and not info["success"]
    assert all(np.all(np.isfinite(v)) for v in out.values())  # the observation handed back stays finite


def test_bad_actions_are_rejected(env):
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.step(np.zeros(7))
    with pytest.raises(ValueError):
        env.step(np.full(8, np.nan))


def test_several_envs_coexist():
    a, b = StackingEnv(), StackingEnv()
    oa, _ = a.reset(seed=5)
    ob, _ = b.reset(seed=6)
    a.step(np.zeros(8))
    assert a.client != b.client
    np.testing.assert_array_equal(b._observe()["task_state"], ob["task_state"])
    a.close()
    b.close()
