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


def test_remembering_reads_a_resting_cube_from_every_view_and_the_red_one_only_until_it_is_grasped() -> None:
    script = load_script()
    red, blue = np.array([0.55, 0.05, 0.02]), np.array([0.45, -0.1, 0.02])
    hands = [np.array([0.5, 0.0, 0.3]), np.array([0.52, 0.02, 0.2]), np.array([0.54, 0.04, 0.1])]
    rng = np.random.default_rng(1)
    seen_red = [red + rng.normal(0, 0.01, 3) for _ in hands]
    seen_blue = [blue + rng.normal(0, 0.01, 3) for _ in hands]
    estimates = [task_state(h, r, b, 0.1 + 0.01 * i)
                 for i, (h, r, b) in enumerate(zip(hands, seen_red, seen_blue, strict=True))]
    last = estimates[-1]
    np.testing.assert_array_equal(script.remembered(estimates, hands, (), True), last)
    blue_only = script.remembered(estimates, hands, ("blue",), True)
    np.testing.assert_allclose(blue_only[9:12], last[9:12], atol=1e-12)  # red − hand and the yaw: this view
    np.testing.assert_allclose(blue_only[15:17], last[15:17], atol=1e-12)
    np.testing.assert_allclose(hands[-1] + blue_only[9:12] + blue_only[12:15], np.mean(seen_blue, 0), atol=1e-12)
    both = script.remembered(estimates, hands, ("red", "blue"), True)
    np.testing.assert_allclose(hands[-1] + both[9:12], np.mean(seen_red, 0), atol=1e-12)
    np.testing.assert_allclose(hands[-1] + both[9:12] + both[12:15], np.mean(seen_blue, 0), atol=1e-12)
    np.testing.assert_allclose(both[15:17], np.mean([e[15:17] for e in estimates], 0), atol=1e-12)
    grasped = script.remembered(estimates, hands, ("red", "blue"), False)  # the red cube moves with the hand now
    np.testing.assert_allclose(grasped[9:12], last[9:12], atol=1e-12)
    np.testing.assert_allclose(grasped[15:17], last[15:17], atol=1e-12)
    np.testing.assert_allclose(hands[-1] + grasped[9:12] + grasped[12:15], np.mean(seen_blue, 0), atol=1e-12)


def test_the_state_policy_acts_in_the_experts_place_from_a_fresh_context_each_episode(tmp_path: Path) -> None:
    """`--policy`: the shipped task_state file drives; with nothing estimated it stacks as it does in `gato-ros
    eval`, and a second episode in the same worker runs as the first (its context starts empty each episode)."""
    import torch

    script = load_script()
    from camera_precision import FrameRegressor, Probe

    torch.manual_seed(0)
    probe = Probe(FrameRegressor(6, 64, 8, 8, keypoints=2), np.zeros(8), np.ones(8), np.zeros(8), np.ones(8))
    probe.save(tmp_path / "probe.pt")
    job = (str(tmp_path / "probe.pt"), 100000, (), 1, (), str(ROOT / "models" / "stack_int8.onnx"))
    first, second = script._episode(job), script._episode(job)
    assert first["success"] and first == second
    assert isinstance(script._WORKER["actor"], script.StatePolicy)
    assert Probe.load(tmp_path / "probe.pt").model.shape == (6, 64, 8, 8, 2)  # the keypoint branch rebuilds


def test_a_keypoint_lands_where_its_map_peaks_in_the_frame() -> None:
    """camera_precision's soft-argmax: a map that lights up on red pixels puts its keypoint on the red patch,
    y first then x, in [-1, 1] across the frame."""
    import torch

    load_script()
    from camera_precision import SpatialKeypoints

    points = SpatialKeypoints(1)
    red_channel = torch.nn.Conv2d(3, 1, 1, bias=False)
    red_channel.weight.data[:] = torch.tensor([50.0, -50.0, -50.0]).view(1, 3, 1, 1)
    points.maps = torch.nn.Sequential(torch.nn.AvgPool2d(2), red_channel)  # maps at half the side, as trained
    frame = torch.zeros(1, 3, 64, 64)
    frame[0, 0, 40:44, 8:12] = 1.0  # a red square low and to the left
    y, x = points(frame)[0].tolist()
    side = torch.linspace(-1, 1, 32)
    assert abs(y - float(side[20:22].mean())) < 1e-3 and abs(x - float(side[4:6].mean())) < 1e-3
