"""Robustness options: the cameras moved, turned and relit per episode, seeded; the same scenes otherwise."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

pytest.importorskip("pybullet")
from sim.env import StackingEnv  # noqa: E402

CAMERAS = ("scene", "wrist")
KEYS = ("camera_scene", "camera_wrist")
PERTURBED = {"camera_shift_m": 0.01, "camera_tilt_deg": 1.0, "light_change": 0.2}


def first_observation(seed: int, **options) -> dict[str, np.ndarray]:
    env = StackingEnv(image_size=64, cameras=CAMERAS, **options)
    obs, _ = env.reset(seed=seed)
    env.close()
    return obs


@pytest.mark.parametrize("option", [{"camera_shift_m": 0.01}, {"camera_tilt_deg": 1.0}, {"light_change": 0.2},
                                    PERTURBED])
def test_each_option_changes_the_frames_deterministically_and_keeps_the_scene(option):
    plain = first_observation(4)
    once, again = first_observation(4, **option), first_observation(4, **option)
    for key in KEYS:
        np.testing.assert_array_equal(once[key], again[key])  # deterministic for a seed
        changed = np.abs(once[key].astype(int) - plain[key]).mean()
        assert changed > 0.5, f"{option} moves the pixels of {key} (mean abs change {changed:.2f})"
    # The same cube layout and arm: the perturbation never draws from the scene's random stream.
    np.testing.assert_array_equal(once["task_state"], plain["task_state"])
    np.testing.assert_array_equal(once["joint_positions"], plain["joint_positions"])


def test_the_perturbation_is_drawn_per_episode_from_its_seed():
    env = StackingEnv(image_size=64, cameras=CAMERAS, **PERTURBED)
    drawn = {}
    for seed in (4, 5, 4):
        env.reset(seed=seed)
        drawn.setdefault(seed, []).append(env.perturbation)
    env.close()
    assert drawn[4][0] == drawn[4][1] and drawn[4][0] != drawn[5][0]
    shift = np.linalg.norm(drawn[4][0].shift)
    turn = np.degrees(np.arccos((np.trace(np.asarray(drawn[4][0].rotation)) - 1) / 2))
    assert shift == pytest.approx(0.01) and turn == pytest.approx(1.0) and drawn[4][0].light_scale in (0.8, 1.2)
    scales = {_light(s) for s in range(12)}
    assert scales == {0.8, 1.2}, "the light goes both ways over the seeds"


def _light(seed: int) -> float:
    env = StackingEnv(**PERTURBED)
    env.reset(seed=seed)
    scale = env.perturbation.light_scale
    env.close()
    return round(scale, 6)


def test_no_option_renders_the_unperturbed_frames_bit_exact():
    env = StackingEnv(image_size=64, cameras=CAMERAS)
    obs, _ = env.reset(seed=4)
    assert env.perturbation is None
    from sim import cameras as cams

    for key, name in zip(KEYS, CAMERAS, strict=True):
        np.testing.assert_array_equal(obs[key], cams.render_camera(env.camera(name), 64, env.robot, env.client))
    env.close()


def test_eval_applies_the_options(tmp_path):
    """`gato-ros eval --camera-shift-cm 1 --camera-tilt-deg 1 --light 0.2` builds its env with them and says so."""
    from sim import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    out = tmp_path / "eval.json"
    args = parser.parse_args(["--episodes", "1", "--max-steps", "2", "--json", str(out), "--camera-shift-cm", "1",
                              "--camera-tilt-deg", "1", "--light", "0.2"])
    assert evaluate.run(args) == 0
    assert json.loads(out.read_text())["perturbation"] == PERTURBED
    config = evaluate._worker["env"].config
    assert (config.camera_shift_m, config.camera_tilt_deg, config.light_change) == (0.01, 1.0, 0.2)
    evaluate._worker.clear()


def test_randomized_magnitudes_spread_within_the_bounds():
    """Training data's randomization (`perturb_up_to`): every magnitude between 0 and its bound, not just the bound;
    the same draw for a seed, and the exact mode's directions."""
    from sim import cameras as cams

    bounds = (0.01, 1.0, 0.2)
    shifts, turns, lights = [], [], []
    for seed in range(40):
        drawn = cams.sample_perturbation(seed, *bounds, up_to=True)
        assert drawn == cams.sample_perturbation(seed, *bounds, up_to=True)
        exact = cams.sample_perturbation(seed, *bounds)
        shifts.append(np.linalg.norm(drawn.shift))
        turns.append(np.degrees(np.arccos(np.clip((np.trace(np.asarray(drawn.rotation)) - 1) / 2, -1, 1))))
        lights.append(drawn.light_scale)
        np.testing.assert_allclose(np.asarray(drawn.shift) / shifts[-1], np.asarray(exact.shift) / 0.01)
        assert np.sign(drawn.light_scale - 1) == np.sign(exact.light_scale - 1)
    for values, bound in ((shifts, 0.01), (turns, 1.0), (np.abs(np.array(lights) - 1), 0.2)):
        assert 0 <= min(values) < 0.25 * bound and 0.75 * bound < max(values) <= bound + 1e-9


def test_collect_randomizes_the_cameras_and_only_them(tmp_path):
    """`gato-ros collect --camera-shift-cm --camera-tilt-deg --light`: the same expert episode for a seed (it acts
    on the state), other frames, and the bounds in each episode's metadata."""
    from gato_ros.data import read_dataset
    from sim import collect
    from sim.spec import stacking_spec

    parser = argparse.ArgumentParser()
    collect.add_arguments(parser)
    common = ["--episodes", "1", "--workers", "1", "--seed", "3", "--image-size", "32", "--cameras", "scene", "wrist"]
    datasets = {}
    for name, extra in (("plain", []), ("randomized", ["--camera-shift-cm", "1", "--camera-tilt-deg", "1",
                                                        "--light", "0.2"])):
        assert collect.run(parser.parse_args([*common, "--out", str(tmp_path / name), *extra])) == 0
        datasets[name] = read_dataset(tmp_path / name, stacking_spec(32, cameras=CAMERAS))
    plain_obs, plain_actions = datasets["plain"].episode(0)
    rand_obs, rand_actions = datasets["randomized"].episode(0)
    np.testing.assert_array_equal(plain_actions, rand_actions)
    np.testing.assert_array_equal(plain_obs["joint_positions"], rand_obs["joint_positions"])
    for key in KEYS:
        assert np.abs(plain_obs[key].astype(int) - rand_obs[key]).mean() > 0.5, f"{key} was randomized"
    assert datasets["randomized"].episodes[0]["camera_randomization"] == PERTURBED
    env = StackingEnv(image_size=32, cameras=CAMERAS, **PERTURBED, perturb_up_to=True)  # magnitudes up to the bounds
    first, _ = env.reset(seed=datasets["randomized"].episodes[0]["seed"])
    env.close()
    for key in KEYS:
        np.testing.assert_array_equal(rand_obs[key][0], first[key])
    assert datasets["plain"].episodes[0]["camera_randomization"] == dict.fromkeys(PERTURBED, 0.0)
