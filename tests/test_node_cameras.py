"""The policy node with a two-camera model over real rclpy + Fast DDS: each image key reads its own topic (by
parameter), a missing, stale, wrongly encoded or wrongly sized camera gives the safe action within one control
period with diagnostics naming the key and its topic, good frames bring the policy back, and the node measures
its image decode + resize time per tick."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sensor_msgs.msg import Image

from gato_ros.node import ERROR, OK, WARN, autostart
from gato_ros.spec import ActionSpec, EmbodimentSpec, ObservationSpec

torch = pytest.importorskip("torch", reason="exporting the test model needs torch")
from test_node import JOINTS, LIMITS, PERIOD, Robot  # noqa: E402

SIZE = 32  # the model's input; the cameras send 64 px frames, which the node resizes
SPEC = EmbodimentSpec(
    "node-cameras-test",
    (
        ObservationSpec("joint_positions", (8,)),
        ObservationSpec("joint_velocities", (8,)),
        ObservationSpec("camera_scene", (SIZE, SIZE, 3), kind="image"),
        ObservationSpec("camera_wrist", (SIZE, SIZE, 3), kind="image"),
    ),
    tuple(ActionSpec(n, limit=lim) for n, lim in zip(JOINTS[:7], LIMITS[:7], strict=True))
    + (ActionSpec(JOINTS[7], kind="discrete", limit=15.0, values=(15.0, -15.0)),),
    20.0,
    JOINTS,
)
RED, BLUE = (200, 30, 30), (30, 30, 200)
WRIST_TOPIC = "hand_eye/image_raw"  # by parameter; the scene camera keeps its default, scene/image_raw


def frame(colour: tuple[int, int, int], h: int = 64, w: int = 64, encoding: str = "rgb8") -> Image:
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[...] = colour
    return Image(height=h, width=w, encoding=encoding, step=w * 3, data=pixels.tobytes())


@pytest.fixture(scope="module")
def camera_model(tmp_path_factory) -> str:
    from gato_ros.export import export
    from gato_ros.model import GatoConfig, GatoModel

    torch.manual_seed(0)
    config = GatoConfig.from_preset("tiny", n_layer=1, n_embd=32, n_head=2, n_ff=64, patch_channels=8,
                                    context_window=128)
    out = tmp_path_factory.mktemp("model") / "cameras.onnx"
    return str(export(GatoModel(config).eval(), SPEC, out, check=False)["fp32"])


def camera_robot(model: str, wrist: bool = True) -> Robot:
    """The node, activated, with image_topics naming the wrist camera's topic; a peer streaming joints and both
    cameras (the wrist camera only with `wrist`)."""
    robot = Robot(model, start=False, image_topics=[f"camera_wrist={WRIST_TOPIC}"])
    robot.enabled.update(image=False, task=False)  # camera/image_raw (the single-topic default) stays silent
    for feed, topic, colour in (("scene", "scene/image_raw", RED), ("wrist", WRIST_TOPIC, BLUE)):
        robot.pubs[feed] = robot.peer.create_publisher(Image, topic, 10)
        robot.feed[feed], robot.enabled[feed] = frame(colour), True
    robot.enabled["wrist"] = wrist
    autostart(robot.node)
    return robot


@pytest.fixture(scope="module")
def cameras_robot(camera_model):
    robot = camera_robot(camera_model)
    yield robot
    robot.close()


@pytest.fixture
def robot(cameras_robot):
    yield cameras_robot
    cameras_robot.feed.update(scene=frame(RED), wrist=frame(BLUE))
    cameras_robot.enabled.update(scene=True, wrist=True)


def _latest_colour(robot: Robot, key: str) -> tuple[int, ...] | None:
    buf = robot.node.loop.latest(key)
    return None if buf is None or buf.value is None else tuple(int(v) for v in buf.value.reshape(-1, 3).mean(0))


def _diagnostic_values(robot: Robot) -> dict[str, str]:
    return {kv.key: kv.value for kv in robot.diagnostics[-1].status[0].values}


def test_a_missing_camera_gives_the_safe_action_naming_its_key_and_topic(camera_model):
    """Activated with the wrist camera silent: every tick is the safe action and says which camera is missing,
    on which topic; once the wrist camera streams, the policy runs."""
    robot = camera_robot(camera_model, wrist=False)
    try:
        # Once the joints and the scene camera arrive (discovery of the new subscriptions takes a moment), the
        # reason is the wrist camera alone, with its topic.
        only_wrist = f"safe action: missing ['camera_wrist ({WRIST_TOPIC})']"
        assert robot.wait_for(lambda: robot.ticks and robot.ticks[-1][1]["reason"] == only_wrist, 10.0), \
            [r["reason"] for _, r in robot.ticks[-3:]]
        assert all(r["safe"] for _, r in robot.ticks), "no policy tick without the wrist camera"
        assert robot.node.level == WARN
        robot.enabled["wrist"] = True
        robot.wait_running(timeout=5.0)
    finally:
        robot.close()


def test_each_image_key_reads_its_own_topic(robot):
    robot.wait_running()
    assert robot.wait_for(lambda: _latest_colour(robot, "camera_scene") == RED, 2.0), "scene/image_raw → camera_scene"
    assert _latest_colour(robot, "camera_wrist") == BLUE, f"{WRIST_TOPIC} → camera_wrist"
    assert robot.node.loop.latest("camera_scene").value.shape == (SIZE, SIZE, 3), "resized to the model's input"
    assert robot.wait_for(lambda: robot.diagnostics and "input_topic.camera_wrist" in _diagnostic_values(robot), 3.0)
    values = _diagnostic_values(robot)
    assert values["input_topic.camera_wrist"] == f"{robot.ns}/{WRIST_TOPIC}"
    assert values["input_topic.camera_scene"] == f"{robot.ns}/scene/image_raw"


def test_the_node_measures_image_decode_and_resize_per_tick(robot):
    robot.wait_running()
    assert robot.wait_for(lambda: robot.diagnostics and _diagnostic_values(robot)["image_decode_p50_ms"], 3.0)
    values = _diagnostic_values(robot)
    p50, p99 = float(values["image_decode_p50_ms"]), float(values["image_decode_p99_ms"])
    print(f"image decode + resize per tick (two 64 px rgb8 frames → {SIZE} px): p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    assert 0 < p50 <= p99 < 1000


BAD_FRAMES = {
    "wrong_encoding": frame(RED, encoding="yuv422"),
    "unsupported_depth": Image(height=64, width=64, encoding="16UC1", step=128, data=bytes(128 * 64)),
    "wrong_size": frame(RED, h=48, w=64),  # another aspect ratio: another field of view
    "wrong_size_tall": frame(RED, h=64, w=32),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_a_bad_frame_gives_the_safe_action_within_one_period_and_recovers(robot, name):
    robot.wait_running()
    robot.enabled["scene"] = False  # only the bad frame is the latest of the scene camera
    time.sleep(PERIOD)
    t = time.monotonic()
    robot.pubs["scene"].publish(BAD_FRAMES[name])
    delay = robot.first_safe_after(t)
    assert delay is not None, f"no safe command after {name}"
    print(f"{name}: safe action {delay * 1e3:.1f} ms after the bad frame")
    assert delay <= PERIOD + 0.05, f"safe action {delay:.3f} s after {name}"
    safe = [r for r in robot.ticks_since(t) if r["safe"]][0]
    assert "invalid input" in safe["reason"] and "camera_scene (scene/image_raw)" in safe["reason"], safe["reason"]
    assert robot.wait_for(lambda: robot.node.level == ERROR and "camera_scene" in robot.node.message, 1.0)
    robot.enabled["scene"] = True
    robot.wait_running(timeout=3.0)
    assert robot.wait_for(lambda: robot.node.level == OK, 1.0)


def test_a_stale_camera_gives_the_safe_action_naming_it_and_recovers(robot):
    robot.wait_running()
    robot.enabled["wrist"] = False  # the wrist camera stops; joints and the scene camera go on
    t = time.monotonic()
    delay = robot.first_safe_after(t)
    stale = robot.node.loop.stale_timeout_s
    assert delay is not None and delay <= stale + PERIOD + 0.1, delay
    safe = [r for r in robot.ticks_since(t) if r["safe"]][0]
    assert "stale" in safe["reason"] and f"camera_wrist ({WRIST_TOPIC})" in safe["reason"], safe["reason"]
    assert robot.wait_for(lambda: robot.node.level == WARN and "camera_wrist" in robot.node.message, 1.0)
    robot.enabled["wrist"] = True
    robot.wait_running(timeout=3.0)
