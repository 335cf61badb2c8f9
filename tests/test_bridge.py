"""The sim bridge over real rclpy + Fast DDS on loopback: topics, commands, timeouts, bad commands, resets."""

from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

pytest.importorskip("pybullet")
from sim.bridge import SimBridge  # noqa: E402
from sim.env import JOINT_NAMES  # noqa: E402


class Harness:
    def __init__(self, **params) -> None:
        self.ns = "/b" + uuid.uuid4().hex[:8]
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        topics = {"joint_states_topic": f"{self.ns}/joint_states", "image_topic": f"{self.ns}/image",
                  "camera_info_topic": f"{self.ns}/camera_info", "command_topic": f"{self.ns}/commands",
                  "observation_prefix": f"{self.ns}/obs/"}
        params = {"image_size": 32, "real_time_factor": 0.0, **topics, **params}
        self.bridge = SimBridge(context=self.context, namespace=self.ns,
                                parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
                                cli_args=["--ros-args", "-r", f"/clock:={self.ns}/clock"])
        self.peer = rclpy.create_node("policy", context=self.context, namespace=self.ns)
        self.got: dict[str, list] = {"joints": [], "image": [], "info": [], "task": [], "clock": []}
        sub = self.peer.create_subscription
        sub(JointState, topics["joint_states_topic"], self.got["joints"].append, qos_profile_sensor_data)
        sub(Image, topics["image_topic"], self.got["image"].append, qos_profile_sensor_data)
        sub(CameraInfo, topics["camera_info_topic"], self.got["info"].append, qos_profile_sensor_data)
        sub(Float64MultiArray, f"{self.ns}/obs/task_state", self.got["task"].append, qos_profile_sensor_data)
        sub(Clock, f"{self.ns}/clock", self.got["clock"].append, 10)
        self.cmd_pub = self.peer.create_publisher(Float64MultiArray, topics["command_topic"], 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.bridge)
        self.executor.add_node(self.peer)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.bridge.start()

    def call(self, name: str) -> Trigger.Response:
        client = self.peer.create_client(Trigger, f"{self.ns}/sim_bridge/{name}")
        assert client.wait_for_service(timeout_sec=5.0)
        future = client.call_async(Trigger.Request())
        end = time.monotonic() + 10
        while not future.done() and time.monotonic() < end:
            time.sleep(0.01)
        return future.result()

    def status(self) -> dict:
        return json.loads(self.call("status").message)

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self.bridge.stop()
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.bridge.destroy_node()
        self.peer.destroy_node()
        rclpy.shutdown(context=self.context)


@pytest.fixture
def sim():
    h = Harness()
    yield h
    h.close()


def test_bridge_publishes_the_arm_contract(sim):
    counts = sim.got.items()
    assert sim.wait_for(lambda: all(len(v) >= 3 for v in sim.got.values()), 20.0), {k: len(v) for k, v in counts}
    js = sim.got["joints"][-1]
    assert list(js.name) == list(JOINT_NAMES) and len(js.position) == 8 and len(js.velocity) == 8
    img = sim.got["image"][-1]
    assert (img.height, img.width, img.encoding, img.step, len(img.data)) == (32, 32, "rgb8", 96, 32 * 32 * 3)
    info = sim.got["info"][-1]
    assert info.width == 32 and info.k[0] > 0 and info.k[2] == 16.0
    assert len(sim.got["task"][-1].data) == 17
    clocks = [c.clock.sec + c.clock.nanosec * 1e-9 for c in sim.got["clock"]]
    assert np.all(np.diff(clocks) > 0), "/clock advances"
    stamp = js.header.stamp.sec + js.header.stamp.nanosec * 1e-9
    assert sim.wait_for(lambda: any(abs(c.clock.sec + c.clock.nanosec * 1e-9 - stamp) < 1e-6
                                    for c in list(sim.got["clock"])), 5.0), "joint states are stamped in sim time"


def test_commands_move_the_arm_and_stale_commands_hold(sim):
    assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
    q0 = sim.got["joints"][-1].position[0]
    n0 = len(sim.got["joints"])
    cmd = Float64MultiArray(data=[20.0, 0, 0, 0, 0, 0, 0, 0])
    for _ in range(400):  # keep the command fresh while the sim runs (as fast as it can)
        sim.cmd_pub.publish(cmd)
        time.sleep(0.005)
        if len(sim.got["joints"]) > n0 + 10:
            break
    assert sim.got["joints"][-1].position[0] > q0 + 0.01, "joint 1 turns under +20 N·m"
    timeouts = sim.status()["command_timeouts"]
    assert sim.wait_for(lambda: sim.status()["command_timeouts"] > timeouts + 5, 10.0), "stale command → hold"


@pytest.mark.parametrize("data", [[1.0] * 7, [1.0] * 9, [float("nan")] + [0.0] * 7, [0.0] * 7 + [float("inf")], []])
def test_bad_commands_are_rejected_and_the_bridge_keeps_running(sim, data):
    assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
    rejected = sim.status()["rejected_commands"]
    sim.cmd_pub.publish(Float64MultiArray(data=data))
    assert sim.wait_for(lambda: sim.status()["rejected_commands"] == rejected + 1, 5.0)
    n = len(sim.got["joints"])
    assert sim.wait_for(lambda: len(sim.got["joints"]) > n + 3, 10.0), "still stepping"
    assert all(np.all(np.isfinite(js.position)) for js in sim.got["joints"])


def test_reset_with_a_seed_and_status():
    sim = Harness(real_time_factor=0.05)  # a step a second: only resets publish in between
    try:
        assert sim.wait_for(lambda: len(sim.got["task"]) >= 1, 20.0)
        first = sim.status()
        assert first["seed"] == 0 and not first["success"] and not first["done"]
        resp = sim.call("reset")
        assert resp.success and json.loads(resp.message)["seed"] == 1, "the next reset takes the next seed"
        poses = []
        for _ in range(2):  # the same seed twice: the same cube poses
            sim.bridge.set_parameters([Parameter("seed", value=7)])
            sim.got["task"].clear()
            assert json.loads(sim.call("reset").message)["seed"] == 7
            assert sim.status()["seed"] == 7
            assert sim.wait_for(lambda: sim.got["task"], 5.0)
            poses.append(np.array(sim.got["task"][0].data)[3:9])  # red and blue cube positions
        np.testing.assert_allclose(poses[0], poses[1], atol=1e-9)
        assert not np.allclose(poses[0], np.array(sim.got["task"][0].data)[3:9] * 0)
    finally:
        sim.close()


def test_trajectory_records_every_observation_of_the_current_and_previous_episode():
    sim = Harness(real_time_factor=0.0, max_steps=12, pause_when_done=True)  # as fast as it can, 12-step episodes
    try:
        assert sim.wait_for(lambda: sim.status()["done"], 20.0)
        sim.bridge.set_parameters([Parameter("seed", value=5)])
        sim.call("reset")
        assert sim.wait_for(lambda: sim.status()["done"], 20.0)
        record = json.loads(sim.call("trajectory").message)
        current, previous = record["current"], record["previous"]
        assert (previous["seed"], current["seed"]) == (0, 5)
        for episode in (previous, current):  # the reset's observation and one per step, none after the end
            obs = episode["observations"]
            assert len(obs["joint_positions"]) == len(obs["task_state"]) == 13
            assert len(obs["joint_positions"][0]) == 8 and len(obs["task_state"][0]) == 17
        from sim.env import StackingEnv  # the same seed in-process, holding still: the same first observation

        env = StackingEnv(max_steps=12)
        first, _ = env.reset(seed=5)
        env.close()
        assert current["observations"]["joint_positions"][0] == first["joint_positions"].tolist()
        assert current["observations"]["task_state"][0] == first["task_state"].tolist()
    finally:
        sim.close()
