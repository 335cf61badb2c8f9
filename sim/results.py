"""One closed-loop episode's outcome, shared by the in-process and the over-ROS evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

RED_MINUS_HAND = slice(9, 12)  # task_state's red cube - hand vector (sim/env.py)


def red_distance_cm(task_state: np.ndarray | list[float]) -> float:
    """How far the hand is from the red cube's centre, from the env's privileged task_state (cm)."""
    return 100 * float(np.linalg.norm(np.asarray(task_state, np.float64)[RED_MINUS_HAND]))


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
