"""The EmbodimentSpec of the simulated Panda stacking task.

Offsets/scales z-score the continuous observations before mu-law. They are fixed constants (a spec
travels inside every dataset and model file, so it must not depend on the data), taken from the
mean/std of 30 expert episodes (`StackingEnv()` + `ScriptedExpert`, seeds 0-29, half of them noisy)
and rounded; near-constant entries get a floor so they do not blow up.
"""

from __future__ import annotations

from gato_ros.spec import ActionSpec, EmbodimentSpec, ObservationSpec
from sim.cameras import camera_from_key, observation_key
from sim.env import ARM_TORQUE_LIMITS, GRIPPER_CLOSE, GRIPPER_OPEN, JOINT_NAMES

JOINT_POSITION_OFFSET = (0.0, 0.2, 0.0, -2.27, 0.0, 2.46, 0.63, 0.03)
JOINT_POSITION_SCALE = (0.26, 0.41, 0.23, 0.24, 0.17, 0.32, 0.59, 0.01)
JOINT_VELOCITY_OFFSET = (0.0,) * 8
JOINT_VELOCITY_SCALE = (0.5, 0.35, 0.5, 0.25, 0.5, 0.5, 1.0, 0.02)
# hand xyz, red xyz, blue xyz, red - hand, blue - red, sin/cos(4 yaw)
TASK_STATE_OFFSET = (0.5, 0.0, 0.15, 0.53, 0.0, 0.03, 0.53, 0.0, 0.02, 0.03, 0.0, -0.12, 0.0, 0.0, 0.0, 0.0, 0.0)
TASK_STATE_SCALE = (0.09, 0.1, 0.12, 0.07, 0.11, 0.03, 0.07, 0.11, 0.02, 0.07, 0.04, 0.13, 0.1, 0.15, 0.03, 0.7, 0.7)


def stacking_spec(image_size: int | None = None, privileged: bool = True,
                  cameras: tuple[str, ...] | None = None) -> EmbodimentSpec:
    """Panda stacking: proprioception (+ privileged `task_state`) (+ RGB images when sized: one
    `camera_<name>` per camera in `cameras`, or the legacy scene `image` without `cameras`).

    Actions in controller order: 7 arm torques (N·m, Panda limits) and the gripper as a discrete
    choice between finger forces (+15 N open, -15 N close).
    """
    observations = [
        ObservationSpec("joint_positions", (8,), "continuous", JOINT_POSITION_OFFSET, JOINT_POSITION_SCALE),
        ObservationSpec("joint_velocities", (8,), "continuous", JOINT_VELOCITY_OFFSET, JOINT_VELOCITY_SCALE),
    ]
    if privileged:
        observations.append(ObservationSpec("task_state", (17,), "continuous", TASK_STATE_OFFSET, TASK_STATE_SCALE))
    if image_size:
        keys = ["image"] if cameras is None else [observation_key(c) for c in cameras]
        observations += [ObservationSpec(key, (image_size, image_size, 3), "image") for key in keys]
    arm = zip(JOINT_NAMES[:7], ARM_TORQUE_LIMITS, strict=True)
    actions = [ActionSpec(name, "continuous", float(limit)) for name, limit in arm]
    actions.append(ActionSpec(JOINT_NAMES[7], "discrete", 20.0, (GRIPPER_OPEN, GRIPPER_CLOSE)))
    return EmbodimentSpec(
        name="panda_stack" + _name_suffix(image_size, privileged, cameras),
        observations=tuple(observations),
        actions=tuple(actions),
        control_rate_hz=20.0,
        joint_names=JOINT_NAMES,
    )


def _name_suffix(image_size: int | None, privileged: bool, cameras: tuple[str, ...] | None) -> str:
    suffix = "" if privileged else "_blind" if not image_size else "_seeing"
    if image_size:
        suffix += f"_img{image_size}" + ("" if cameras is None else "_" + "_".join(cameras))
    return suffix


def policy_observation(spec: EmbodimentSpec, observation: dict) -> dict:
    """The env's observation cut to the keys of `spec`: the env always gives `task_state` (the expert acts
    on it), a seeing policy's spec leaves it out and the runtime refuses keys it does not know."""
    return {o.name: observation[o.name] for o in spec.observations}


def env_overrides(spec: EmbodimentSpec) -> dict:
    """The `StackingEnv` options that produce `spec`'s images: collection, evaluation and the bridge
    build their env from the model's spec through this, so they all render the same cameras."""
    images = [o for o in spec.observations if o.kind == "image"]
    if not images:
        return {}
    cameras = tuple(c for c in (camera_from_key(o.name) for o in images) if c is not None)
    return {"image_size": int(images[0].shape[0]), "cameras": cameras or None}


def model_spec(policy_path: str, arm: str | None = None) -> EmbodimentSpec:
    """The spec an exported ONNX policy carries in its metadata for `arm` (None: the file's default arm), through
    the runtime's public API: an arm the file does not serve is its ModelLoadError naming the arms it does."""
    from gato_ros.runtime import open_session, read_model_info

    session, _ = open_session(policy_path, "cpu", threads=1)
    return read_model_info(session, policy_path, arm).spec
