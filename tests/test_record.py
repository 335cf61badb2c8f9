"""`gato-ros record` over real rclpy + Fast DDS, and the round trip sim → ROS → bag → dataset → training."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("mcap_ros2")

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "stack_int8.onnx"
GATO_ROS = Path(sys.executable).parent / "gato-ros"


@pytest.fixture(autouse=True)
def own_ros_domain(monkeypatch):
    """A DDS domain of its own: participants other tests left behind take no part in discovery."""
    current = int(os.environ.get("ROS_DOMAIN_ID", "0"))
    monkeypatch.setenv("ROS_DOMAIN_ID", str(random.choice([d for d in range(1, 101) if d != current])))


def _recorder(out: Path, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(GATO_ROS), "record", "--out", str(out), *args], stdout=open(log, "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, env=dict(os.environ))


@pytest.mark.timeout(120)
def test_recorder_writes_the_bytes_as_they_arrived_and_a_killed_one_keeps_its_chunks(tmp_path: Path) -> None:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from gato_ros.rosbag import open_bag

    topics = ["--topics", "/joint_states", "/gato_policy/tick", "--flush-interval", "0.2"]
    finished = _recorder(tmp_path / "bag", tmp_path / "rec.log", *topics)
    killed = _recorder(tmp_path / "killed", tmp_path / "killed.log", *topics)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("test_publisher", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        joints = node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        ticks = node.create_publisher(String, "/gato_policy/tick", 10)
        deadline = time.monotonic() + 60
        while joints.get_subscription_count() < 2 or ticks.get_subscription_count() < 2:
            assert time.monotonic() < deadline, (tmp_path / "rec.log").read_text()
            executor.spin_once(timeout_sec=0.1)
        time.sleep(1.0)  # both recorders' readers matched on the publishers' side too
        time.sleep(1.0)  # both recorders' readers matched on the publishers' side too
        sent_joints, sent_ticks = [], []
        start = time.time_ns()
        for i in range(50):
            msg = JointState(name=["j1", "j2"], position=[0.1 * i, -1.0 / 3], velocity=[1e-9 * i, 2.0])
            msg.header.stamp.sec, msg.header.stamp.nanosec = 1000 + i, 7  # a robot's clock, not ours
            joints.publish(msg)
            sent_joints.append(msg)
            sent_ticks.append(json.dumps({"seq": i}))
            ticks.publish(String(data=sent_ticks[-1]))
            time.sleep(0.01)
        end = time.time_ns()
        time.sleep(1.0)  # the last messages arrive; the killed recorder's flush timer writes them
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    killed.send_signal(signal.SIGKILL)
    finished.send_signal(signal.SIGINT)
    assert finished.wait(timeout=20) == 0, (tmp_path / "rec.log").read_text()
    killed.wait(timeout=20)

    bag = open_bag(tmp_path / "bag")
    by_topic: dict[str, list] = {"/joint_states": [], "/gato_policy/tick": []}
    for m in bag.messages():
        by_topic[m.topic].append(m)
    assert bag.complete and not bag.truncated and not bag.problems
    # The payloads as they came off the wire: the middleware pads each to 4 bytes, which a re-serialization
    # (rclpy.serialization.serialize_message) would not.
    texts = [deserialize_message(m.data, String).data for m in by_topic["/gato_policy/tick"]]
    assert texts == sent_ticks, "reliable: every one, in order"
    assert all(len(m.data) % 4 == 0 for m in by_topic["/gato_policy/tick"] + by_topic["/joint_states"])
    assert len(by_topic["/joint_states"]) >= 40, "best effort on loopback: (nearly) every one"
    recorded = [deserialize_message(m.data, JointState) for m in by_topic["/joint_states"]]
    index = [r.header.stamp.sec - 1000 for r in recorded]  # header stamps untouched
    assert index == sorted(index) and all(r.header.stamp.nanosec == 7 for r in recorded), "in publishing order"
    for r, i in zip(recorded, index, strict=True):
        assert list(r.position) == list(sent_joints[i].position) and list(r.velocity) == list(sent_joints[i].velocity)
    for m in by_topic["/joint_states"] + by_topic["/gato_policy/tick"]:
        assert start <= m.publish_time_ns <= m.log_time_ns <= end + 500_000_000, "source time, then receive time"
    assert bag.topics == {"/joint_states": "sensor_msgs/msg/JointState", "/gato_policy/tick": "std_msgs/msg/String"}

    crashed = open_bag(tmp_path / "killed")
    assert not crashed.complete and any("metadata.yaml" in p for p in crashed.problems)
    assert [deserialize_message(m.data, String).data for m in crashed.messages(["/gato_policy/tick"])] == (
        sent_ticks), "every chunk written before the kill"


@pytest.mark.timeout(240)
@pytest.mark.skipif(not SHIPPED.exists(), reason="models/stack_int8.onnx is not shipped")
def test_a_sim_episode_recorded_over_ros_becomes_the_in_process_dataset(tmp_path: Path) -> None:
    """sim_bridge + policy_node + the recorder as processes: the bag's dataset equals the bridge's exact
    record and an in-process run of the same episode, the policy replays it with zero error, and training
    on it gives the loss curve of training on the in-process data."""
    pytest.importorskip("pybullet")
    pytest.importorskip("torch")
    from rosbags.highlevel import AnyReader

    from gato_ros.bags import bags_to_dataset
    from gato_ros.cli import main as cli_main
    from gato_ros.data import EpisodeWriter, read_dataset
    from gato_ros.runtime import PolicyRuntime
    from sim.env import StackingEnv
    from sim.ros_eval import evaluate_over_ros

    steps, seed = 30, 321
    bag = tmp_path / "bag"
    ros_run = evaluate_over_ros(str(SHIPPED), [seed], provider="cpu", max_steps=steps, real_time_factor=0.5,
                                log_dir=tmp_path / "logs", progress=False, record=bag)
    (result,) = ros_run.results
    assert ros_run.exit_codes == {"bridge": 0, "node": 0, "watchdog": 0, "recorder": 0}, ros_run.exit_codes
    assert result.steps == steps and result.stale_steps == 0, (
        f"{result}: every command must answer its observation for the in-process comparison "
        f"(load average {os.getloadavg()})")

    # An independent rosbag2 implementation (rosbags) opens the bag through its metadata.yaml and decodes
    # every message with the message definitions the bag carries.
    with AnyReader([bag]) as reader:
        decoded = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()]
        assert len(decoded) == reader.message_count > 3 * steps
        assert {"/joint_states", "/gato_policy/tick"} <= set(reader.topics)

    runtime = PolicyRuntime(str(SHIPPED), provider="cpu", threads=1)
    spec = runtime.spec
    summary = bags_to_dataset([bag], tmp_path / "from-bag", spec)
    assert summary["episodes"] == 1 and summary["bags"][0]["complete"]
    from_bag = read_dataset(tmp_path / "from-bag", spec=spec)
    observations, actions = from_bag.episode(0)
    assert from_bag.episodes[0]["seed"] == seed and len(actions) == steps

    # Observations bit-exact against the bridge's own record of the episode (~/trajectory).
    rec_seed, joints, task = ros_run.recording
    assert rec_seed == seed
    np.testing.assert_array_equal(observations["joint_positions"], joints[:steps])
    np.testing.assert_array_equal(observations["task_state"], task[:steps])

    # The same episode in-process (env + runtime, no ROS): the "directly collected" record.
    env = StackingEnv(max_steps=steps)
    obs, _ = env.reset(seed=seed)
    direct_obs, direct_actions = [], []
    for _ in range(steps):
        action = runtime.step(obs)
        direct_obs.append(obs)
        direct_actions.append(action)
        obs, *_ = env.step(action)
    env.close()
    direct = {o.name: np.stack([d[o.name] for d in direct_obs]) for o in spec.observations}
    for key, value in direct.items():
        np.testing.assert_array_equal(observations[key], value, err_msg=key)
    np.testing.assert_array_equal(actions, np.stack(direct_actions).astype(np.float32))
    with EpisodeWriter(tmp_path / "direct", spec) as writer:
        writer.add_episode(direct, np.stack(direct_actions), {"seed": seed})

    # Open-loop replay of the recorded episode through the model that drove it: zero error on every joint.
    assert cli_main(["replay", str(bag), "--policy", str(SHIPPED), "--out", str(tmp_path / "replay")]) == 0
    replay = json.loads((tmp_path / "replay" / "replay.json").read_text())
    assert replay["steps"] == steps and all(e["max_abs"] == 0.0 for e in replay["per_joint"].values())
    assert (tmp_path / "replay" / "replay.png").stat().st_size > 10_000

    # Training from the bag-made dataset follows the loss curve of the directly collected one.
    curves = []
    for name in ("from-bag", "direct"):
        out = tmp_path / f"train-{name}"
        assert cli_main(["train", "--data", str(tmp_path / name), "--out", str(out), "--preset", "tiny",
                         "--context-window", "84", "--steps", "3", "--batch-size", "4", "--eval-every", "1",
                         "--val-fraction", "0", "--threads", "1", "--seed", "7", "--no-progress"]) == 0
        curves.append([json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()])
    assert len(curves[0]) == 3 and curves[0] == curves[1]


def test_by_default_every_camera_is_recorded(tmp_path: Path) -> None:
    """A seeing policy reads <camera>/image_raw per image key: the default recording holds every camera (image and
    camera_info); an explicit --topics list holds exactly its topics."""
    import rclpy

    from gato_ros.record import DEFAULT_PREFIXES, Recorder

    context = rclpy.Context()
    rclpy.init(context=context)
    recorders = []
    try:
        for topics in (None, ["/joint_states"]):
            recorders.append(Recorder(tmp_path / f"bag{len(recorders)}", topics, DEFAULT_PREFIXES, 1 << 20, 1.0,
                                      context=context))
        default, explicit = recorders
        cameras = ["/scene/image_raw", "/scene/camera_info", "/ns/wrist/image_raw", "/camera/image_raw"]
        assert all(default.wanted(t) for t in cameras) and not default.wanted("/scene/image_raw/compressed")
        assert not any(explicit.wanted(t) for t in cameras) and explicit.wanted("/joint_states")
    finally:
        for recorder in recorders:
            recorder.close()
            recorder.node.destroy_node()
        rclpy.shutdown(context=context)
