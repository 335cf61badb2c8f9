"""The one place that knows every simulated arm: env, scripted expert and spec by arm name.

collect, eval and anything else that takes `--arm` build through these, so a new arm is added here once.
"""

from __future__ import annotations

from gato_ros.spec import EmbodimentSpec
from sim.env import ARM_NAMES, DEFAULT_ARM, StackingEnv, check_arm
from sim.expert import ScriptedExpert
from sim.spec import stacking_spec
from sim.tasks import DEFAULT_TASK
from sim.xarm import GRIPPER_OPEN as XARM_GRIPPER_OPEN
from sim.xarm import XArmExpert, XArmStackingEnv, xarm_spec

__all__ = ["ARM_NAMES", "DEFAULT_ARM", "GRIPPER_REST", "embodiment_spec", "make_env", "make_expert"]

ENVS: dict[str, type[StackingEnv]] = {"panda": StackingEnv, "xarm6": XArmStackingEnv}
# What each arm's gripper controller holds before its first command (the sim bridge's start, and its optional
# command timeout): the Panda's takes a finger force (0 N: none), the xArm6's a finger target (open).
GRIPPER_REST: dict[str, float] = {"panda": 0.0, "xarm6": XARM_GRIPPER_OPEN}


def make_env(arm: str = DEFAULT_ARM, **options: object) -> StackingEnv:
    """The stacking env of `arm` (ValueError naming the choices for an unknown one); `options` as StackingConfig's."""
    return ENVS[check_arm(arm)](**options)


def make_expert(arm: str = DEFAULT_ARM, task: str = DEFAULT_TASK) -> ScriptedExpert:
    """The scripted expert of `arm` for `task` (sim/tasks.py)."""
    return XArmExpert(task=task) if check_arm(arm) == "xarm6" else ScriptedExpert(task=task)


def embodiment_spec(arm: str = DEFAULT_ARM, image_size: int | None = None, privileged: bool = True,
                    cameras: tuple[str, ...] | None = None) -> EmbodimentSpec:
    """The spec of `arm` in the stacking scene: the torque-commanded Panda's or the velocity-commanded xArm6's."""
    spec = xarm_spec if check_arm(arm) == "xarm6" else stacking_spec
    return spec(image_size, privileged, cameras)
