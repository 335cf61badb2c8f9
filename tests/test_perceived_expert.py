"""scripts/perceived_expert.py: the expert's task_state rebuilt from a camera probe's estimates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_script():  # noqa: ANN201 - the module scripts/perceived_expert.py
    sys.path.insert(0, str(ROOT / "scripts"))  # it imports scripts/camera_precision.py, as when run as a script
    spec = importlib.util.spec_from_file_location("perceived_expert", ROOT / "scripts" / "perceived_expert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_state(hand, red, blue, yaw) -> np.ndarray:  # noqa: ANN001
    return np.concatenate([hand, red, blue, red - hand, blue - red, [np.sin(4 * yaw), np.cos(4 * yaw)]])


def test_each_estimated_part_moves_what_the_expert_reads_and_nothing_else() -> None:
    script = load_script()
    hand, red, blue = np.array([0.5, 0.0, 0.3]), np.array([0.55, 0.05, 0.02]), np.array([0.45, -0.1, 0.02])
    truth = task_state(hand, red, blue, 0.1)
    seen_red, seen_blue = red + [0.01, -0.02, 0.0], blue + [0.0, 0.005, 0.003]
    estimate = task_state(hand, seen_red, seen_blue, 0.3)
    estimate[0:9] = np.nan  # the probe estimates the relative parts only: the absolute ones are never read

    np.testing.assert_array_equal(script.perceived_task_state(truth, estimate, ()), truth)
    all_three = script.perceived_task_state(truth, estimate, ("red", "blue", "yaw"))
    np.testing.assert_allclose(all_three, task_state(hand, seen_red, seen_blue, 0.3), atol=1e-12)
    # The blue cube's estimate is relative to the red one: with the red cube true, blue lands at true red + estimate.
    only_blue = script.perceived_task_state(truth, estimate, ("blue",))
    np.testing.assert_allclose(only_blue, task_state(hand, red, red + (seen_blue - seen_red), 0.1), atol=1e-12)
    # With the red cube estimated and the blue true, blue − red is rebuilt against the estimated red.
    only_red = script.perceived_task_state(truth, estimate, ("red",))
    np.testing.assert_allclose(only_red, task_state(hand, seen_red, blue, 0.1), atol=1e-12)
    np.testing.assert_allclose(script.perceived_task_state(truth, estimate, ("yaw",)), task_state(hand, red, blue, 0.3),
                               atol=1e-12)


def test_averaging_keeps_the_blue_cube_still_in_the_world_while_the_hand_moves() -> None:
    script = load_script()
    red, blue = np.array([0.55, 0.05, 0.02]), np.array([0.45, -0.1, 0.02])
    hands = [np.array([0.5, 0.0, 0.3]), np.array([0.52, 0.02, 0.2]), np.array([0.54, 0.04, 0.1])]
    rng = np.random.default_rng(0)
    noise = [rng.normal(0, 0.01, 3) for _ in hands]  # each timestep's estimate of red − hand, off by its noise
    estimates = [task_state(h, red + n, blue, 0.1 + 0.01 * i)
                 for i, (h, n) in enumerate(zip(hands, noise, strict=True))]
    one = script.averaged(estimates[-1:], hands[-1:])
    np.testing.assert_allclose(one[9:17], estimates[-1][9:17], atol=1e-12)  # one timestep: the estimate itself
    mean = script.averaged(estimates, hands)
    np.testing.assert_allclose(mean[9:12], (red - np.mean(hands, axis=0)) + np.mean(noise, axis=0), atol=1e-12)
    # The blue cube, where each estimate put it in the world, averaged, seen from the current hand's red cube.
    np.testing.assert_allclose(hands[-1] + mean[9:12] + mean[12:15], blue, atol=1e-12)
    np.testing.assert_allclose(mean[15:17], np.mean([e[15:17] for e in estimates], axis=0), atol=1e-12)
