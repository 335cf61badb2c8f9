"""Message conversions (gato_ros.ros_io): joint mapping by name, image decoding, vectors, clamping."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import Image, JointState

from gato_ros import ros_io
from gato_ros.ros_io import InputError

JOINTS = [f"j{i}" for i in range(4)]


def test_joint_state_mapped_by_name_in_any_order_extra_joints_ignored():
    msg = JointState(name=["extra", "j3", "j1", "j0", "j2"], position=[9.0, 3.0, 1.0, 0.0, 2.0],
                     velocity=[-9.0, -3.0, -1.0, -0.0, -2.0])
    pos, vel = ros_io.joint_state_arrays(msg, JOINTS)
    np.testing.assert_array_equal(pos, [0, 1, 2, 3])
    np.testing.assert_array_equal(vel, [0, -1, -2, -3])


@pytest.mark.parametrize(
    "names, position, velocity, reason",
    [
        (["j0", "j1", "j2"], [0, 1, 2], [0, 1, 2], "lacks joints"),
        (["j0", "j1", "j2", "j9"], [0, 1, 2, 3], [0, 1, 2, 3], "lacks joints"),
        (["j0", "j1", "j2", "j3", "j3"], [0, 1, 2, 3, 3], [0, 1, 2, 3, 3], "twice"),
        (JOINTS, [0, 1, 2], [0, 1, 2, 3], "positions"),
        (JOINTS, [0, 1, 2, 3], [], "velocities"),
        (JOINTS, [0, float("nan"), 2, 3], [0, 1, 2, 3], "NaN or inf"),
        (JOINTS, [0, 1, 2, 3], [0, float("inf"), 2, 3], "NaN or inf"),
    ],
)
def test_bad_joint_states_raise_input_error(names, position, velocity, reason):
    with pytest.raises(InputError, match=reason):
        ros_io.joint_arrays(names, position, velocity, JOINTS)


def test_nan_in_an_unused_joint_is_ignored_and_velocity_optional():
    pos, vel = ros_io.joint_arrays(JOINTS + ["spare"], [0, 1, 2, 3, float("nan")], [], JOINTS, need_velocity=False)
    np.testing.assert_array_equal(pos, [0, 1, 2, 3])
    assert vel is None


def _rgb(h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(rgb: np.ndarray, encoding: str, pad: int = 0) -> Image:
    """An Image message in `encoding` with `pad` extra bytes at the end of every row."""
    pixels = {
        "rgb8": rgb,
        "bgr8": cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
        "rgba8": cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA),
        "bgra8": cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA),
        "mono8": cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY),
    }[encoding]
    h, w = rgb.shape[:2]
    rows = pixels.reshape(h, -1)
    rows = np.concatenate([rows, np.full((h, pad), 77, np.uint8)], axis=1)
    return Image(height=h, width=w, encoding=encoding, step=rows.shape[1], data=rows.tobytes())


@pytest.mark.parametrize("encoding", sorted(ros_io.ENCODINGS))
@pytest.mark.parametrize("pad", [0, 3])
def test_every_encoding_decodes_to_rgb_honouring_step(encoding, pad):
    rgb = _rgb()
    msg = _encode(rgb, encoding, pad)
    out = ros_io.decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data)
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    if encoding == "mono8":
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    else:
        np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"encoding": "16UC1"}, "unsupported image encoding"),
        ({"encoding": "bayer_rggb8"}, "unsupported image encoding"),
        ({"step": 14}, "step 14 is less than"),
        ({"step": 16}, "bytes, step × height"),
        ({"data": b"\x00" * 10}, "bytes, step × height"),
        ({"height": 0, "width": 0, "step": 0, "data": b""}, "empty image"),
    ],
)
def test_bad_images_raise_input_error(change, reason):
    msg = _encode(_rgb(), "rgb8")
    fields = {"encoding": msg.encoding, "height": msg.height, "width": msg.width, "step": msg.step, "data": msg.data}
    fields.update(change)
    with pytest.raises(InputError, match=reason):
        ros_io.decode_image(**fields)


def test_image_over_the_byte_limit_is_rejected_before_reading_data():
    with pytest.raises(InputError, match="exceeds"):
        ros_io.decode_image("rgb8", 5000, 5000, 15000, b"", max_bytes=ros_io.MAX_IMAGE_BYTES)


def test_large_image_is_resized_to_the_model_input_preserving_content():
    big = np.zeros((4000, 4000, 3), np.uint8)
    big[:, :2000] = (255, 0, 0)  # left half red, right half blue
    big[:, 2000:] = (0, 0, 255)
    msg = Image(height=4000, width=4000, encoding="rgb8", step=12000, data=big.tobytes())
    out = ros_io.image_to_observation(msg, (32, 64, 3))
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 0], np.tile([255, 0, 0], (32, 1)))
    np.testing.assert_array_equal(out[:, -1], np.tile([0, 0, 255], (32, 1)))


def test_small_image_is_upscaled():
    out = ros_io.resize_image(_rgb(6, 5), 32, 32)
    assert out.shape == (32, 32, 3)


def test_vector_observation():
    np.testing.assert_array_equal(ros_io.vector_observation([1, 2, 3, 4, 5, 6], (2, 3)), [[1, 2, 3], [4, 5, 6]])
    with pytest.raises(InputError, match="expected 3"):
        ros_io.vector_observation([1, 2], (3,))
    with pytest.raises(InputError, match="NaN or inf"):
        ros_io.vector_observation([1, float("nan"), 3], (3,))


def test_clamp_command():
    limits = np.array([1.0, 2.0, 3.0])
    cmd, ok = ros_io.clamp_command([5.0, -5.0, 0.5], limits)
    assert ok and cmd.tolist() == [1.0, -2.0, 0.5]
    for bad in ([np.nan, 0, 0], [0, np.inf, 0], [0, 0], "x", None):
        cmd, ok = ros_io.clamp_command(bad, limits)
        assert not ok and cmd.tolist() == [0.0, 0.0, 0.0]


@settings(max_examples=300, deadline=None)
@given(
    encoding=st.sampled_from(sorted(ros_io.ENCODINGS) + ["16UC1", "yuv422", ""]),
    height=st.integers(-2, 40),
    width=st.integers(-2, 40),
    extra_step=st.integers(-5, 5),
    extra_data=st.sampled_from([0, 0, 0, -1, 1, -7]),
)
def test_decode_image_fuzz_returns_rgb_or_input_error(encoding, height, width, extra_step, extra_data):
    channels = ros_io.ENCODINGS.get(encoding, (3, None))[0]
    step = max(0, width * channels + extra_step)
    data = bytes(max(0, step * max(height, 0) + extra_data))
    try:
        out = ros_io.decode_image(encoding, height, width, step, data)
    except InputError:
        return
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    assert ros_io.resize_image(out, 16, 16).shape == (16, 16, 3)


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("mode", ["effort", "position", "velocity"])
def test_forward_controller_modes_are_float64_multi_arrays_in_controller_order(mode):
    msg = ros_io.arm_command_message(mode, JOINTS, [1.0, -2.0, 3.0, 0.5], 0.05)
    assert isinstance(msg, ros_io.arm_command_type(mode)) and list(msg.data) == [1.0, -2.0, 3.0, 0.5]
    assert ros_io.arm_command_values(mode, msg).tolist() == [1.0, -2.0, 3.0, 0.5]


def test_trajectory_is_one_point_reached_after_one_period():
    from trajectory_msgs.msg import JointTrajectory

    msg = ros_io.arm_command_message("trajectory", JOINTS, [0.1, 0.2, 0.3, 0.4], 0.05)
    assert isinstance(msg, JointTrajectory) and list(msg.joint_names) == JOINTS and len(msg.points) == 1
    point = msg.points[0]
    assert list(point.positions) == [0.1, 0.2, 0.3, 0.4] and list(point.velocities) == [0.0] * 4
    assert (point.time_from_start.sec, point.time_from_start.nanosec) == (0, 50_000_000)
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (0, 0), "zero stamp: start now"
    assert ros_io.arm_command_values("trajectory", msg).tolist() == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="output mode"):
        ros_io.arm_command_message("torque", JOINTS, [0.0] * 4, 0.05)


@pytest.mark.parametrize("mode, field", [("effort", "effort"), ("position", "position"), ("velocity", "velocity"),
                                         ("trajectory", "position")])
def test_the_stamped_internal_command_fills_the_modes_field(mode, field):
    stamp = 1_700_000_000_123_456_789
    msg = ros_io.joint_command_message(mode, JOINTS + ["finger"], [1.0, 2.0, 3.0, 4.0, -15.0], stamp)
    assert isinstance(msg, JointState) and list(getattr(msg, field)) == [1.0, 2.0, 3.0, 4.0, -15.0]
    assert all(len(getattr(msg, f)) == 0 for f in ("position", "velocity", "effort") if f != field)
    names, values, stamp_ns = ros_io.joint_command_values(mode, msg)
    assert names == JOINTS + ["finger"] and values.tolist() == [1.0, 2.0, 3.0, 4.0, -15.0] and stamp_ns == stamp
    assert list(ros_io.gripper_command_message(-15.0).data) == [-15.0]


def test_header_stamps_checked_against_the_node_clock():
    msg = JointState()
    assert ros_io.header_stamp_ns(msg) is None, "an unset stamp is not checked"
    assert ros_io.header_stamp_ns(object()) is None, "no header, no stamp"
    msg.header.stamp.sec, msg.header.stamp.nanosec = 10, 5
    assert ros_io.header_stamp_ns(msg) == 10_000_000_005
    assert ros_io.stamp_error(10 * 10**9, 10 * 10**9 + 400_000_000, 0.5) is None
    assert "behind" in ros_io.stamp_error(10 * 10**9, 12 * 10**9, 0.5)
    assert "ahead of" in ros_io.stamp_error(13 * 10**9, 12 * 10**9, 0.5)
