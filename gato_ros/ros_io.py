"""Conversions between ROS 2 messages and the runtime's numpy observations, numpy + OpenCV only.

Every input function takes plain fields (or any object with the message's attributes), so it is unit
testable without rclpy. Anything a robot could send wrong raises `InputError` with the reason; the
node turns that into the safe action and an ERROR diagnostic.

The output functions build the messages of each output mode (gato_ros.commands) from a vector: the
policy node, the watchdog and scripted test sources send commands through them. They import the
message packages when called (rosidl messages only, never rclpy).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from gato_ros.commands import JOINT_STATE_FIELD, OUTPUT_MODES, SAFE_ACTION_FRAME_ID

# encoding -> (channels, OpenCV conversion to RGB or None when already RGB)
ENCODINGS: dict[str, tuple[int, int | None]] = {
    "rgb8": (3, None),
    "bgr8": (3, cv2.COLOR_BGR2RGB),
    "rgba8": (4, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, cv2.COLOR_BGRA2RGB),
    "mono8": (1, cv2.COLOR_GRAY2RGB),
}
# A 4000×4000 RGBA frame is 64 MB; anything larger is not a camera we support and would only cost
# memory and time in the subscription callback.
MAX_IMAGE_BYTES = 64 * 1024 * 1024


class InputError(ValueError):
    """A message that cannot become a valid observation (the reason is in the text)."""


def joint_arrays(
    names: Sequence[str],
    position: Sequence[float],
    velocity: Sequence[float],
    joint_names: Sequence[str],
    need_velocity: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """JointState fields → positions (and velocities) in `joint_names` order.

    Names may come in any order and extra joints are ignored; a missing or duplicated joint, a
    length mismatch or a non-finite value of a used joint raises InputError.
    """
    names = list(names)
    position = np.asarray(position, dtype=np.float64).reshape(-1)
    velocity = np.asarray(velocity, dtype=np.float64).reshape(-1)
    if len(position) != len(names):
        raise InputError(f"JointState has {len(names)} names but {len(position)} positions")
    if need_velocity and len(velocity) != len(names):
        raise InputError(f"JointState has {len(names)} names but {len(velocity)} velocities")
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in index:
            raise InputError(f"JointState names joint {n!r} twice")
        index[n] = i
    missing = [n for n in joint_names if n not in index]
    if missing:
        raise InputError(f"JointState lacks joints {missing}")
    order = np.array([index[n] for n in joint_names], dtype=np.int64)
    pos = position[order]
    if not np.all(np.isfinite(pos)):
        raise InputError("JointState positions hold NaN or inf")
    if not need_velocity:
        return pos, None
    vel = velocity[order]
    if not np.all(np.isfinite(vel)):
        raise InputError("JointState velocities hold NaN or inf")
    return pos, vel


def joint_state_arrays(msg: Any, joint_names: Sequence[str], need_velocity: bool = True):
    """`joint_arrays` on a sensor_msgs/JointState (or anything with name/position/velocity)."""
    return joint_arrays(msg.name, msg.position, msg.velocity, joint_names, need_velocity)


def decode_image(
    encoding: str, height: int, width: int, step: int, data: Any, max_bytes: int = MAX_IMAGE_BYTES
) -> np.ndarray:
    """sensor_msgs/Image fields → (height, width, 3) uint8 RGB.

    Honours `step` (row stride, may include padding). The data must be exactly step × height bytes,
    as the message definition says; anything else raises InputError.
    """
    if encoding not in ENCODINGS:
        raise InputError(f"unsupported image encoding {encoding!r} (supported: {sorted(ENCODINGS)})")
    channels, conversion = ENCODINGS[encoding]
    if height <= 0 or width <= 0:
        raise InputError(f"empty image ({width}×{height})")
    if step < width * channels:
        raise InputError(f"image step {step} is less than width × channels = {width * channels}")
    if step * height > max_bytes:
        raise InputError(f"image of {step * height} bytes exceeds the {max_bytes}-byte limit")
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != step * height:
        raise InputError(f"image data has {buf.size} bytes, step × height = {step * height}")
    pixels = buf.reshape(height, step)[:, : width * channels].reshape(height, width, channels)
    if conversion is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to the model's input; area averaging when shrinking avoids aliasing."""
    if image.shape[:2] == (height, width):
        return image
    shrink = image.shape[0] > height or image.shape[1] > width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def image_to_observation(msg: Any, shape: Sequence[int], max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """sensor_msgs/Image → the model's (H, W, 3) uint8 RGB input."""
    image = decode_image(msg.encoding, int(msg.height), int(msg.width), int(msg.step), msg.data, max_bytes)
    return resize_image(image, int(shape[0]), int(shape[1]))


def vector_observation(data: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Float64MultiArray.data → an array of the spec's shape (row-major), finite."""
    x = np.asarray(data, dtype=np.float64).reshape(-1)
    size = int(np.prod(shape)) if len(shape) else 1
    if x.size != size:
        raise InputError(f"observation has {x.size} values, expected {size} for shape {tuple(shape)}")
    if not np.all(np.isfinite(x)):
        raise InputError("observation holds NaN or inf")
    return x.reshape(tuple(shape))


def clamp_command(command: Any, limits: np.ndarray) -> tuple[np.ndarray, bool]:
    """The last line of defence before the wire: (command clamped to ±limits, True) when the
    command has the right size and is finite, else (zeros, False)."""
    limits = np.asarray(limits, dtype=np.float64)
    try:
        x = np.asarray(command, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return np.zeros_like(limits), False
    if x.shape != limits.shape or not np.all(np.isfinite(x)):
        return np.zeros_like(limits), False
    return np.clip(x, -limits, limits), True


def header_stamp_ns(msg: Any) -> int | None:
    """The message's header stamp in nanoseconds, or None when it has no header or the stamp is unset (0)."""
    header = getattr(msg, "header", None)
    if header is None:
        return None
    ns = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
    return ns or None


def stamp_error(stamp_ns: int | None, now_ns: int, max_offset_s: float) -> str | None:
    """Why a header stamp is not believable against the node clock `now_ns`, or None (unset stamps pass)."""
    if stamp_ns is None:
        return None
    offset = (stamp_ns - now_ns) * 1e-9
    if abs(offset) <= max_offset_s:
        return None
    side = "ahead of" if offset > 0 else "behind"
    return f"header stamp {abs(offset):.3f} s {side} the node clock (limit {max_offset_s:g} s)"


def _stamp_msg(stamp_ns: int) -> Any:
    from builtin_interfaces.msg import Time

    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def arm_command_type(mode: str) -> Any:
    """The message class of the arm controller's topic in `mode`."""
    if mode == "trajectory":
        from trajectory_msgs.msg import JointTrajectory

        return JointTrajectory
    from std_msgs.msg import Float64MultiArray

    return Float64MultiArray


def arm_command_message(mode: str, joint_names: Sequence[str], values: Sequence[float], period_s: float) -> Any:
    """The arm controller's message for `mode`: Float64MultiArray (effort, position, velocity) in the
    controller's joint order, or a one-point JointTrajectory reached after one period (trajectory)."""
    if mode not in OUTPUT_MODES:
        raise ValueError(f"output mode must be one of {OUTPUT_MODES}, got {mode!r}")
    data = [float(v) for v in values]
    if mode != "trajectory":
        from std_msgs.msg import Float64MultiArray

        return Float64MultiArray(data=data)
    from builtin_interfaces.msg import Duration
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    ns = int(round(period_s * 1e9))
    # A zero stamp means "start now" to joint_trajectory_controller; the point holds zero velocity.
    point = JointTrajectoryPoint(positions=data, velocities=[0.0] * len(data),
                                 time_from_start=Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000))
    return JointTrajectory(joint_names=list(joint_names), points=[point])


def arm_command_values(mode: str, msg: Any) -> np.ndarray:
    """The vector an arm controller message carries (the inverse of arm_command_message)."""
    if mode == "trajectory":
        return np.asarray(msg.points[-1].positions if msg.points else [], dtype=np.float64)
    return np.asarray(msg.data, dtype=np.float64)


def gripper_command_message(force: float) -> Any:
    """The gripper's command: std_msgs/Float64MultiArray [finger force N] (positive opens, negative grasps)."""
    from std_msgs.msg import Float64MultiArray

    return Float64MultiArray(data=[float(force)])


def joint_command_message(mode: str, joint_names: Sequence[str], values: Sequence[float], stamp_ns: int,
                          safe: bool = False) -> Any:
    """The stamped internal command (commands.JOINT_COMMAND_TOPIC): a JointState with `mode`'s field filled, its
    frame_id SAFE_ACTION_FRAME_ID when it is the node's safe action."""
    from sensor_msgs.msg import JointState

    msg = JointState(name=list(joint_names))
    setattr(msg, JOINT_STATE_FIELD[mode], [float(v) for v in values])
    msg.header.stamp = _stamp_msg(stamp_ns)
    msg.header.frame_id = SAFE_ACTION_FRAME_ID if safe else ""
    return msg


def joint_command_values(mode: str, msg: Any) -> tuple[list[str], np.ndarray, int]:
    """(joint names, values of `mode`'s field, stamp ns) of a stamped internal command."""
    values = np.asarray(getattr(msg, JOINT_STATE_FIELD[mode]), dtype=np.float64)
    stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
    return list(msg.name), values, stamp


# ----------------------------------------------------------------------------- console entry points


def add_ros_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """`--ros-args ...` for a `gato-ros` subcommand that runs a ROS node, passed on to rclpy unchanged."""
    parser.epilog = f"Parameters as ROS arguments, e.g. {example}"
    parser.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=None,
                        help="ROS arguments (-p name:=value, --params-file FILE, -r remaps), passed to rclpy")


def ros_argv(program: str, args: argparse.Namespace) -> list[str]:
    """The argv a node's `main` takes: the program name, then `--ros-args ...` when given."""
    return [program] + (["--ros-args", *args.ros_args] if args.ros_args is not None else [])
