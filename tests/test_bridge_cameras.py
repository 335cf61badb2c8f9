"""The sim bridge's cameras over real rclpy + Fast DDS: one Image + CameraInfo per camera, per control step,
stamped like the joint states, holding the env's rendered bytes; intrinsics that project the scene right."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image

pytest.importorskip("pybullet")
from test_bridge import Harness  # noqa: E402

from sim import cameras as cams  # noqa: E402
from sim.env import StackingEnv  # noqa: E402

CAMERAS = ("scene", "wrist")
STEPS, SEED, SIZE = 8, 25, 64  # seed 25: the red cube 18 px off the scene image centre


def _stamp_s(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def _in_process_frames(seed: int, steps: int, **options) -> dict[str, list[np.ndarray]]:
    """The frames of `steps` steps of episode `seed` in-process, under the bridge's idle command (zero torque
    over gravity, gripper 0 N): what the bridge renders when no policy sends anything."""
    env = StackingEnv(image_size=SIZE, cameras=CAMERAS, max_steps=steps, **options)
    obs, _ = env.reset(seed=seed)
    frames = {k: [obs[k]] for k in env.image_keys}
    for _ in range(steps):
        obs, *_ = env.step(np.zeros(8))
        for k in frames:
            frames[k].append(obs[k])
    env.close()
    return frames


@pytest.fixture
def camera_sim():
    sim = Harness(image_size=SIZE, cameras=list(CAMERAS), real_time_factor=1.0, max_steps=STEPS, wait_for_reset=True,
                  pause_when_done=True)
    for camera in CAMERAS:
        sim.got[f"{camera}/image"], sim.got[f"{camera}/info"] = [], []
        sim.peer.create_subscription(Image, f"{sim.ns}/{camera}/image_raw", sim.got[f"{camera}/image"].append,
                                     qos_profile_sensor_data)
        sim.peer.create_subscription(CameraInfo, f"{sim.ns}/{camera}/camera_info", sim.got[f"{camera}/info"].append,
                                     qos_profile_sensor_data)
    yield sim
    sim.close()


def test_each_camera_publishes_the_rendered_frame_every_step_stamped_in_sim_time(camera_sim):
    sim = camera_sim
    sim.bridge.set_parameters([Parameter("seed", value=SEED)])
    for key in sim.got:
        sim.got[key].clear()
    sim.call("reset")
    assert sim.wait_for(lambda: sim.status()["done"], 20.0)
    status = sim.status()
    assert status["steps"] == STEPS
    expected = _in_process_frames(SEED, STEPS)
    # The bridge's record of the episode: every frame it rendered, bit-exact with in-process stepping.
    record = json.loads(sim.call("frames").message)["current"]
    assert record["seed"] == SEED and set(record["frames"]) == {"camera_scene", "camera_wrist"}
    for camera in CAMERAS:
        key = cams.observation_key(camera)
        np.testing.assert_array_equal(cams.frames_from_text(record["frames"][key]), np.stack(expected[key]))
    # What went over DDS: per camera one rgb8 frame per observation, stamped like that observation's joint
    # state, holding the same bytes as the in-process frame of that step.
    joint_stamps = {_stamp_s(js) for js in sim.got["joints"]}
    period = 1.0 / 20.0
    for camera in CAMERAS:
        images = sim.got[f"{camera}/image"]
        stamps = [_stamp_s(m) for m in images]
        assert len(set(stamps)) == len(stamps) >= STEPS - 1, "one frame per step (best effort: a loss allowed)"
        assert set(stamps) <= joint_stamps, "stamped like the joint states of the same step"
        for msg, stamp in zip(images, stamps, strict=True):
            step = round((stamp - status["start_time"]) / period)
            assert (msg.encoding, msg.height, msg.width, msg.step) == ("rgb8", SIZE, SIZE, SIZE * 3)
            assert bytes(msg.data) == expected[cams.observation_key(camera)][step].tobytes(), (camera, step)
        infos = sim.got[f"{camera}/info"]
        assert {_stamp_s(m) for m in infos} == set(stamps) or len(infos) >= STEPS - 1
        assert infos[-1].header.frame_id == images[-1].header.frame_id == f"{camera}_camera"


def _project(point: np.ndarray, camera: cams.FixedCamera, k: list[float]) -> np.ndarray:
    """The pixel (u, v) of a world point through a camera at `camera`'s pose with intrinsics K (optical frame:
    x right, y down, z forward), computed here without PyBullet."""
    eye, target, up = (np.asarray(v, float) for v in (camera.eye, camera.target, camera.up))
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    x, y, z = right @ (point - eye), down @ (point - eye), forward @ (point - eye)
    return np.array([k[0] * x / z + k[2], k[4] * y / z + k[5]])


def test_camera_info_projects_the_cube_onto_its_pixels(camera_sim):
    """The scene camera's K, applied to the red cube's centre, lands on the red pixels of the frame."""
    sim = camera_sim
    sim.bridge.set_parameters([Parameter("seed", value=SEED)])
    sim.call("reset")
    assert sim.wait_for(lambda: sim.got["scene/info"] and sim.got["scene/image"] and sim.got["wrist/info"], 10.0)
    info, image = sim.got["scene/info"][0], sim.got["scene/image"][0]
    assert (info.width, info.height, info.distortion_model) == (SIZE, SIZE, "plumb_bob")
    assert list(info.p) == [info.k[0], 0.0, info.k[2], 0.0, 0.0, info.k[4], info.k[5], 0.0, 0.0, 0.0, 1.0, 0.0]
    env = StackingEnv(image_size=SIZE, cameras=CAMERAS)
    obs, _ = env.reset(seed=SEED)
    red = obs["task_state"][3:6]
    frame = np.frombuffer(bytes(image.data), np.uint8).reshape(SIZE, SIZE, 3).astype(int)
    mask = (frame[..., 0] > 120) & (frame[..., 1] < 80) & (frame[..., 2] < 80)
    assert mask.sum() >= 4, "the red cube is in view"
    centroid = np.array([np.nonzero(mask)[1].mean(), np.nonzero(mask)[0].mean()]) + 0.5  # pixel centres
    projected = _project(red, env.camera("scene"), list(info.k))
    offset = np.linalg.norm(projected - np.array([SIZE / 2, SIZE / 2]))
    print(f"red cube: projected {projected}, red pixels' centroid {centroid}, {offset:.1f} px off the centre")
    assert offset > 5, "a seed with the cube off the image centre, so a wrong focal length shows"
    assert np.linalg.norm(projected - centroid) < 1.5
    # The wrist camera's wider field of view: a shorter focal length.
    wrist_f = sim.got["wrist/info"][0].k[0]
    assert wrist_f == pytest.approx(SIZE / 2 / np.tan(np.radians(cams.CAMERAS["wrist"].fov / 2)), rel=1e-5)
    env.close()


def test_the_bridge_perturbs_its_cameras_as_the_env_does_in_process():
    """Robustness runs over ROS: the bridge's camera_shift_m / camera_tilt_deg / light_change render, per episode,
    the frames StackingEnv renders in-process with the same options and seed (not the unperturbed ones)."""
    perturbation = {"camera_shift_m": 0.01, "camera_tilt_deg": 1.0, "light_change": 0.2}
    sim = Harness(image_size=SIZE, cameras=list(CAMERAS), real_time_factor=0.0, max_steps=3, wait_for_reset=True,
                  pause_when_done=True, **perturbation)
    try:
        sim.bridge.set_parameters([Parameter("seed", value=SEED)])
        sim.call("reset")
        assert sim.wait_for(lambda: sim.status()["done"], 20.0)
        record = json.loads(sim.call("frames").message)["current"]["frames"]
    finally:
        sim.close()
    perturbed, plain = _in_process_frames(SEED, 3, **perturbation), _in_process_frames(SEED, 3)
    for key in ("camera_scene", "camera_wrist"):
        seen = cams.frames_from_text(record[key])
        np.testing.assert_array_equal(seen, np.stack(perturbed[key]))
        assert not np.array_equal(seen, np.stack(plain[key]))
