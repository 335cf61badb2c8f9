"""One closed-loop episode's outcome, shared by the in-process and the over-ROS evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

RED_MINUS_HAND = slice(9, 12)  # task_state's red cube - hand vector (sim/env.py)
BLUE_MINUS_RED = slice(12, 15)  # task_state's blue cube - red cube vector
RED_YAW = slice(15, 17)  # task_state's sin, cos of 4 × the red cube's yaw (a cube looks the same every 90°)
REACH_M = 0.03  # the hand has reached the red cube within this of its centre (the seeing diagnostics' measure)


def red_distance_cm(task_state: np.ndarray | list[float]) -> float:
    """How far the hand is from the red cube's centre, from the env's privileged task_state (cm)."""
    return 100 * float(np.linalg.norm(np.asarray(task_state, np.float64)[RED_MINUS_HAND]))


def carried(task_states: np.ndarray) -> np.ndarray:
    """[N] bool over task_state rows: the red cube's centre 2 cm above resting with the hand on it (a stacked cube
    the hand has left is not carried)."""
    return (task_states[:, 5] > 0.04) & (np.linalg.norm(task_states[:, RED_MINUS_HAND], axis=1) < REACH_M)


def yaw_error_deg(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[N] the red cube's yaw error (degrees, modulo 90°) between two [N, 2] arrays of task_state's RED_YAW part."""
    quarter_turns = np.arctan2(estimate[:, 0], estimate[:, 1]) - np.arctan2(truth[:, 0], truth[:, 1])
    return np.degrees(np.abs((quarter_turns + np.pi) % (2 * np.pi) - np.pi) / 4)


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int
    nan: bool
    step_ms: list[float] = field(default_factory=list)  # policy latency per control step
    # The hand's closest approach to the red cube over the observations the policy acted on: did a seeing policy
    # find it (inf where the env gives no task_state)
    closest_to_red_cm: float = math.inf
