"""One closed-loop episode's outcome, shared by the in-process and the over-ROS evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int
    nan: bool
    step_ms: list[float] = field(default_factory=list)  # policy latency per control step
