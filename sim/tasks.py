"""The tasks of the stacking scene, written once: the env asks a task whether it is achieved, the
scripted expert asks it where to carry the cube, the CLI and the model file list its name.

Every task runs in the same scene (a red and a blue cube on the table) with the same observations, so
what tells two tasks apart is the prompt or the instruction, not the scene: `stack_red_on_blue` and
`stack_blue_on_red` (and `lift_red` and `lift_blue`) start from the same scenes, seed for seed; so do
`place_red_at_marker` and `place_blue_at_marker`. Tasks with a marker add a flat,
visual-only disc on the table at a fixed spot (`MARKER_XY`): it has no collision shape, so physics is
unchanged, and the cubes are sampled away from it. It is fixed so that a policy that observes the
privileged `task_state` (which has no marker slot) can learn it too; a seeing policy sees it.

Each task names the cube it picks up (`pick`); the env puts that cube's yaw into `task_state`
(the cube is grasped across its faces). The cube's yaw is uniform in every task, so that slot does not
tell the tasks apart either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

GoalKind = Literal["stack", "lift", "marker"]
MARKER_XY = (0.525, 0.0)  # centre of the cube workspace (sim/env.py StackingConfig.workspace)
MARKER_RADIUS = 0.04
MARKER_COLOUR = "green"
LIFT_HEIGHT = 0.10  # a lifted cube's centre is at least this high above the table top (m)
LIFT_HAND_HEIGHT = 0.15  # the expert carries the cube to this hand height (m)
LEGACY_TASK_NAMES = {"stack": "stack_red_on_blue"}  # what StackingConfig.task said before the registry


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str  # the text a user gives for this task (Gato's text tokens, issue 13)
    goal: GoalKind
    pick: int  # index into StackingConfig.colours of the cube the task moves
    base: int | None = None  # stack: the cube it goes on

    @property
    def has_marker(self) -> bool:
        return self.goal == "marker"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("stack_red_on_blue", "stack the red cube on the blue cube", "stack", pick=0, base=1),
        Task("stack_blue_on_red", "stack the blue cube on the red cube", "stack", pick=1, base=0),
        Task("lift_red", "lift the red cube", "lift", pick=0),
        Task("lift_blue", "lift the blue cube", "lift", pick=1),
        Task("place_red_at_marker", "put the red cube on the green marker", "marker", pick=0),
        Task("place_blue_at_marker", "put the blue cube on the green marker", "marker", pick=1),
    )
}
DEFAULT_TASK = "stack_red_on_blue"


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called `name` (or its legacy alias); a ValueError naming the valid choices otherwise."""
    name = LEGACY_TASK_NAMES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]


# ------------------------------------------------------------------------------------------ success


class Scene(Protocol):
    """What a success predicate reads from the env (privileged simulator state)."""

    def cube_position(self, i: int) -> np.ndarray: ...
    def cube_speed(self, i: int) -> float: ...
    def fingers_touch(self, i: int) -> bool: ...


def achieved(task: Task, scene: Scene, cube_size: float, place_tolerance: float) -> bool:
    """Whether the scene shows the task done at this instant (the env requires it for `hold_steps` in a row)."""
    moved = scene.cube_position(task.pick)
    if task.goal == "lift":
        return bool(moved[2] - cube_size / 2 >= LIFT_HEIGHT and scene.fingers_touch(task.pick))
    if task.goal == "stack":
        under = scene.cube_position(task.base)
        in_place = (np.linalg.norm(moved[:2] - under[:2]) < place_tolerance
                    and abs(moved[2] - under[2] - cube_size) < 0.008)
    else:
        in_place = (np.linalg.norm(moved[:2] - np.asarray(MARKER_XY)) < place_tolerance
                    and abs(moved[2] - cube_size / 2) < 0.008)
    resting = scene.cube_speed(task.pick) < 0.05
    return bool(in_place and resting and not scene.fingers_touch(task.pick))


# ------------------------------------------------------------------------------------------ expert


@dataclass(frozen=True)
class ExpertGoal:
    """Where the expert's plan stands, read off the observation alone."""

    pick: np.ndarray  # the moved cube's centre (from task_state)
    carry_to: np.ndarray  # the hand target while carrying (grasp point when the cube is in place)
    in_place: bool  # the cube is where the task wants it (release, then retreat); never for lift


def expert_goal(task: Task, task_state: np.ndarray, cube_size: float, grasp_height: float,
                place_clearance: float, xy_tolerance: float, z_tolerance: float) -> ExpertGoal:
    """The moved cube, the carry target and whether it is placed, from `task_state` (hand, red, blue, ...)."""
    cubes = (task_state[3:6], task_state[6:9])
    pick = cubes[task.pick]
    if task.goal == "stack":
        under = cubes[task.base]
        carry_to = under + np.array([0.0, 0.0, cube_size + place_clearance + grasp_height])
        in_place = bool(
            np.linalg.norm((pick - under)[:2]) < xy_tolerance + 0.002
            and abs(pick[2] - under[2] - cube_size) < z_tolerance
        )
    elif task.goal == "marker":
        spot = np.array([MARKER_XY[0], MARKER_XY[1], cube_size / 2])
        carry_to = spot + np.array([0.0, 0.0, place_clearance + grasp_height])
        in_place = bool(
            np.linalg.norm((pick - spot)[:2]) < xy_tolerance + 0.002 and abs(pick[2] - spot[2]) < z_tolerance
        )
    else:
        carry_to = np.array([pick[0], pick[1], LIFT_HAND_HEIGHT])
        in_place = False
    return ExpertGoal(pick=pick, carry_to=carry_to, in_place=in_place)
