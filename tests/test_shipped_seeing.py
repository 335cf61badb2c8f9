"""The shipped seeing policy (models/see_int8.onnx): it reads only what a real arm publishes (camera frames and
joints, no privileged task_state), its window spans several timesteps so the runtime's ring evicts, and on the
model card's seeds it does in-process what it did on the machine that measured the card.

The card (models/see_int8.json) records seeds, how many of them the file stacked, and the median of the hand's
closest approach to the red cube over them on the machine that measured the card; CI allows a margin on the approach (a
last-bit float difference on another CPU moves a closed-loop episode). A file that does not bring the arm to the
cube fails it, and so does this file acting on black frames (the card's `ci_note` gives both medians). Its over-ROS
episode is in tests/test_ros_eval.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("pybullet")

ROOT = Path(__file__).resolve().parent.parent
SEEING = ROOT / "models" / "see_int8.onnx"
CARD = ROOT / "models" / "see_int8.json"

pytestmark = pytest.mark.skipif(not (SEEING.exists() and CARD.exists()),
                                reason="models/see_int8.onnx and its card are not shipped yet")


def test_reads_cameras_and_joints_only_over_several_timesteps(capsys) -> None:
    from gato_ros.cli import main

    assert main(["info", str(SEEING), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    observations = {o["name"]: o for o in info["specs"]["panda"]["observations"]}
    assert set(observations) == {"camera_scene", "camera_wrist", "joint_positions", "joint_velocities"}
    assert [observations[k]["kind"] for k in ("camera_scene", "camera_wrist")] == ["image", "image"]
    assert info["variant"] == "int8"
    assert info["window"] >= 4 * info["tokens_per_timestep"]["panda"]


def reach(seeds: list[int], black_frames: bool = False) -> dict:
    """scripts/seeing_pilot.py's closed-loop check of the shipped file: successes and median closest approach."""
    spec = importlib.util.spec_from_file_location("seeing_pilot", ROOT / "scripts" / "seeing_pilot.py")
    seeing_pilot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeing_pilot)
    return seeing_pilot.reach(str(SEEING), [int(seed) for seed in seeds], black_frames=black_frames)


def test_brings_the_hand_to_the_red_cube_as_recorded() -> None:
    card = json.loads(CARD.read_text())
    result = reach(card["ci_seeds"])
    assert result["closest_cm_median"] <= card["ci_closest_cm_median"] + card["ci_margin_cm"], (result, card)
    assert result["successes"] >= card["ci_successes"], (result, card)


def test_finds_the_cube_through_its_cameras() -> None:
    """Without its camera frames the same file does not bring the hand near the cube: the cameras, not the
    joints alone, steer the approach the test above checks."""
    card = json.loads(CARD.read_text())
    result = reach(card["ci_seeds"][:3], black_frames=True)
    assert result["closest_cm_median"] > card["ci_closest_cm_median"] + card["ci_margin_cm"], (result, card)


def test_stacks_when_the_expert_commands_joints_1_to_6() -> None:
    """What keeps the file from stacking is where joints 1-6 put the hand (README, "Where it stalls"): with the
    expert's torques on them and its own on the wrist and the gripper (its context holding what the arm executed,
    scripts/seeing_phases.py --expert-on), it stacks seeds it alone does not (card: 0 of its seeds)."""
    spec = importlib.util.spec_from_file_location("seeing_phases", ROOT / "scripts" / "seeing_phases.py")
    seeing_phases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeing_phases)
    seeds = json.loads(CARD.read_text())["ci_seeds"][:3]
    result = seeing_phases.phases(str(SEEING), seeds, expert_on=(0, 1, 2, 3, 4, 5))
    assert result["successes"] >= 2, result["per_episode"]
    assert all(r["gripper_agreement"] > 0.9 for r in result["per_episode"]), "its gripper follows the teacher's"
