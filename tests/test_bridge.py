"""The sim bridge over real rclpy + Fast DDS on loopback: topics, the four command modes closed loop, the
last command held forever (and the optional timeout), refused commands, the gripper, resets."""

from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Duration
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from gato_ros.commands import ARM_COMMAND_TOPICS, GRIPPER_COMMAND_TOPIC

pytest.importorskip("pybullet")
from sim.bridge import SimBridge  # noqa: E402
from sim.env import HOME_Q, JOINT_NAMES  # noqa: E402

# A reach every joint makes, within the Panda's limits, from the home pose.
REACH_TARGET = HOME_Q + np.array([0.3, 0.25, -0.2, 0.3, 0.3, -0.3, 0.4])


class Harness:
    """The bridge in a namespace of its own with its default (relative) topic names: the namespace moves them."""

    def __init__(self, **params) -> None:
        self.ns = "/b" + uuid.uuid4().hex[:8]
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        params = {"image_size": 32, "real_time_factor": 0.0, **params}
        self.mode = params.get("command_mode", "effort")
        self.bridge = SimBridge(context=self.context, namespace=self.ns,
                                parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
                                cli_args=["--ros-args", "-r", f"/clock:={self.ns}/clock"])
        self.peer = rclpy.create_node("policy", context=self.context, namespace=self.ns)
        self.got: dict[str, list] = {"joints": [], "image": [], "info": [], "task": [], "clock": []}
        sub = self.peer.create_subscription
        sub(JointState, f"{self.ns}/joint_states", self.got["joints"].append, qos_profile_sensor_data)
        sub(Image, f"{self.ns}/camera/image_raw", self.got["image"].append, qos_profile_sensor_data)
        sub(CameraInfo, f"{self.ns}/camera/camera_info", self.got["info"].append, qos_profile_sensor_data)
        sub(Float64MultiArray, f"{self.ns}/gato/observations/task_state", self.got["task"].append,
            qos_profile_sensor_data)
        sub(Clock, f"{self.ns}/clock", self.got["clock"].append, 10)
        message = JointTrajectory if self.mode == "trajectory" else Float64MultiArray
        self.cmd_pub = self.peer.create_publisher(message, f"{self.ns}/{ARM_COMMAND_TOPICS[self.mode]}", 10)
        self.gripper_pub = self.peer.create_publisher(Float64MultiArray, f"{self.ns}/{GRIPPER_COMMAND_TOPIC}", 10)
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

    def arm_positions(self) -> np.ndarray:
        return np.array(self.got["joints"][-1].position[:7])

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


PUSH = Float64MultiArray(data=[0.3, 0, 0, 0, 0, 0, 0])  # turns joint 1 ~0.5 rad/s faster each second


@pytest.fixture
def real_time():
    """Real-time stepping: the effort tests judge what a command does over seconds of sim time."""
    h = Harness(real_time_factor=1.0, image_size=0)
    yield h
    h.close()


def _joint1_speed_after(sim: Harness, steps: int) -> tuple[float, float]:
    """Joint 1's speed now and `steps` control steps later."""
    before, n = sim.got["joints"][-1].velocity[0], len(sim.got["joints"])
    assert sim.wait_for(lambda: len(sim.got["joints"]) > n + steps, 10.0), "still stepping"
    return before, sim.got["joints"][-1].velocity[0]


def test_wall_clock_stamps_like_a_real_arm_driver():
    sim = Harness(real_time_factor=1.0, image_size=0, wall_clock_stamps=True)
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 3, 20.0)
        stamp = sim.got["joints"][-1].header.stamp
        assert abs(stamp.sec + stamp.nanosec * 1e-9 - time.time()) < 1.0, "stamped with the system clock"
        assert not sim.got["clock"], "no /clock: nodes stay on the wall clock"
    finally:
        sim.close()


def test_the_last_effort_command_applies_until_a_new_one_arrives_forever(real_time):
    """As forward_command_controller: one command, sent once, still acts a second later (no timeout)."""
    sim = real_time
    assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
    sim.cmd_pub.publish(PUSH)
    assert sim.wait_for(lambda: sim.status()["commands"] >= 1, 5.0)
    before, after = _joint1_speed_after(sim, 20)
    assert after > before + 0.2, "joint 1 still speeds up under the one command"
    assert sim.status()["command_timeouts"] == 0


def test_the_command_timeout_is_an_option():
    sim = Harness(real_time_factor=1.0, image_size=0, command_timeout_s=0.2)
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
        sim.cmd_pub.publish(PUSH)
        assert sim.wait_for(lambda: sim.status()["commands"] >= 1, 5.0)
        timeouts = sim.status()["command_timeouts"]
        assert sim.wait_for(lambda: sim.status()["command_timeouts"] > timeouts + 2, 10.0), "stale command → zero"
        before, after = _joint1_speed_after(sim, 20)
        assert abs(after - before) < 0.05, "zero effort after the timeout: joint 1 coasts, no longer speeds up"
    finally:
        sim.close()


@pytest.mark.parametrize("data", [[1.0] * 8, [1.0] * 6, [float("nan")] + [0.0] * 6, [0.0] * 6 + [float("inf")], []])
def test_bad_commands_are_refused_and_the_previous_command_stays(real_time, data):
    """8 values (arm + gripper, as the old node sent) are refused like every other wrong command."""
    sim = real_time
    assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
    sim.cmd_pub.publish(PUSH)
    assert sim.wait_for(lambda: sim.status()["commands"] >= 1, 5.0)
    rejected = sim.status()["rejected_commands"]
    sim.cmd_pub.publish(Float64MultiArray(data=data))
    assert sim.wait_for(lambda: sim.status()["rejected_commands"] == rejected + 1, 5.0)
    before, after = _joint1_speed_after(sim, 20)
    assert after > before + 0.2, "the previous command still acts"
    assert all(np.all(np.isfinite(js.position)) for js in list(sim.got["joints"]))


def _reach(sim: Harness, command) -> np.ndarray:
    """Close the loop over ROS: each joint state in, `command(q)` out, until the arm settles; the final q."""
    def on_joints(msg: JointState) -> None:
        sim.cmd_pub.publish(command(np.array(msg.position[:7])))

    sim.peer.create_subscription(JointState, f"{sim.ns}/joint_states", on_joints, qos_profile_sensor_data)
    errors: list[float] = []

    def settled() -> bool:
        if sim.got["joints"]:
            errors.append(float(np.max(np.abs(sim.arm_positions() - REACH_TARGET))))
        return len(errors) > 20 and max(errors[-20:]) < 0.01

    sim.wait_for(settled, 30.0)
    return sim.arm_positions()


def _trajectory(point: np.ndarray, seconds: float) -> JointTrajectory:
    order = [6, 5, 4, 3, 2, 1, 0]  # any joint order: the controller maps by name
    msg = JointTrajectory(joint_names=[JOINT_NAMES[i] for i in order])
    duration = Duration(sec=int(seconds), nanosec=int((seconds % 1) * 1e9))
    msg.points = [JointTrajectoryPoint(positions=[float(point[i]) for i in order], time_from_start=duration)]
    return msg


REACH_LAWS = {  # a scripted source in each mode, driven by the joint states it reads
    # The target itself: a position controller closes the loop at 1 kHz (stepping the command 0.05 rad ahead of
    # the measured q stalled short of the target once: the controller's own lag ate the step).
    "position": lambda q: Float64MultiArray(data=REACH_TARGET.tolist()),
    "velocity": lambda q: Float64MultiArray(data=np.clip(3.0 * (REACH_TARGET - q), -0.5, 0.5).tolist()),
    "trajectory": lambda q: _trajectory(REACH_TARGET, 0.5),
}


def mode_harness(mode: str, **params) -> Harness:
    """The bridge in `mode` at real time, as a robot runs: a scripted source closing the loop over ROS answers
    each joint state within the period. As fast as it can (real_time_factor 0), the bridge runs as many steps
    per ROS round trip as the machine's load allows: the velocity loop, stable up to ~6 periods of delay, ran
    away, and the step thread held the env's lock almost always, against the status service (both seen in
    loaded full-suite runs)."""
    return Harness(command_mode=mode, image_size=0, real_time_factor=1.0, **params)


@pytest.mark.parametrize("mode", list(REACH_LAWS))
def test_each_command_mode_reaches_a_target_closed_loop(mode):
    sim = mode_harness(mode)
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
        start = sim.arm_positions()
        final = _reach(sim, REACH_LAWS[mode])
        assert np.max(np.abs(start - REACH_TARGET)) > 0.3
        np.testing.assert_allclose(final, REACH_TARGET, atol=0.01, err_msg=f"{mode}: the arm reaches the target")
        assert sim.status()["rejected_commands"] == 0
    finally:
        sim.close()


def test_position_mode_holds_the_last_position_forever():
    sim = mode_harness("position")
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
        sim.cmd_pub.publish(Float64MultiArray(data=REACH_TARGET.tolist()))
        steps = sim.status()["steps"]
        assert sim.wait_for(lambda: sim.status()["steps"] > steps + 60, 20.0)
        np.testing.assert_allclose(sim.arm_positions(), REACH_TARGET, atol=0.01)
    finally:
        sim.close()


def test_trajectory_cmd_timeout_holds_where_the_arm_is():
    """joint_trajectory_controller's cmd_timeout: a slow trajectory cut off after 0.3 s stops the arm on the way."""
    sim = mode_harness("trajectory", trajectory_cmd_timeout_s=0.3)
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
        start = sim.arm_positions()
        sim.cmd_pub.publish(_trajectory(REACH_TARGET, 3.0))
        assert sim.wait_for(lambda: sim.status()["commands"] >= 1, 5.0)
        steps = sim.status()["steps"]
        assert sim.wait_for(lambda: sim.status()["steps"] > steps + 80, 20.0)  # 4 s of sim time
        final = sim.arm_positions()
        moved = np.max(np.abs(final - start))
        assert moved > 0.02 and np.max(np.abs(final - REACH_TARGET)) > 0.2, "it started, then held on the way"
        held = sim.arm_positions()
        n = len(sim.got["joints"])
        assert sim.wait_for(lambda: len(sim.got["joints"]) > n + 20, 10.0)
        np.testing.assert_allclose(sim.arm_positions(), held, atol=0.01)
    finally:
        sim.close()


def test_the_gripper_has_its_own_controller(sim):
    assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
    width = sim.got["joints"][-1].position[7]
    sim.gripper_pub.publish(Float64MultiArray(data=[-15.0]))  # close
    assert sim.wait_for(lambda: sim.got["joints"][-1].position[7] < width - 0.02, 10.0), "the fingers close"
    rejected = sim.status()["rejected_commands"]
    sim.gripper_pub.publish(Float64MultiArray(data=[15.0, 0.0]))  # two values: refused, the grip stays
    assert sim.wait_for(lambda: sim.status()["rejected_commands"] == rejected + 1, 5.0)
    n = len(sim.got["joints"])
    assert sim.wait_for(lambda: len(sim.got["joints"]) > n + 10, 10.0)
    assert sim.got["joints"][-1].position[7] < width - 0.02
    assert sim.status()["gripper_commands"] == 2


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


def test_pause_holds_the_sim_and_its_clock_until_the_next_reset():
    sim = Harness(real_time_factor=1.0, image_size=0, wait_for_reset=True)
    try:
        sim.call("reset")
        assert sim.wait_for(lambda: sim.status()["steps"] >= 3, 10.0)
        assert sim.call("pause").success
        time.sleep(0.1)  # a /clock message already on the wire lands
        steps, clocks = sim.status()["steps"], len(sim.got["clock"])
        time.sleep(0.5)  # ten control periods
        assert (sim.status()["steps"], len(sim.got["clock"])) == (steps, clocks), "paused: no step, no /clock"
        sim.call("reset")
        assert sim.wait_for(lambda: sim.status()["steps"] >= 3, 10.0), "a reset steps again"
    finally:
        sim.close()


def test_a_step_without_its_gripper_command_is_stale_once_the_gripper_is_commanded():
    """A policy answers each observation with an arm and a gripper command, but once only the arm's: that step ran
    on the previous gripper command, and the bridge counts it stale; until something commands the gripper, steps
    are judged by their arm commands alone."""
    sim = Harness(real_time_factor=0.25, image_size=0, wait_for_reset=True, pause_when_done=True, max_steps=8)
    try:
        answered: list[int] = []

        def answer(gripper_skipped_at: int | None):
            def on_joints(_: JointState) -> None:
                if gripper_skipped_at is not None and len(answered) != gripper_skipped_at:
                    sim.gripper_pub.publish(Float64MultiArray(data=[10.0]))
                sim.cmd_pub.publish(Float64MultiArray(data=[0.0] * 7))
                answered.append(len(answered))
            return on_joints

        for skipped, expected_stale in ((None, []), (3, [3])):  # before the gripper is first commanded, then after
            answered.clear()
            sub = sim.peer.create_subscription(JointState, f"{sim.ns}/joint_states", answer(skipped),
                                               qos_profile_sensor_data)
            time.sleep(0.5)  # the new subscription matches the bridge's publisher
            sim.call("reset")
            assert sim.wait_for(lambda: sim.status()["done"], 20.0)
            status = sim.status()
            assert status["steps"] == 8 and status["stale_at"] == expected_stale, status
            sim.peer.destroy_subscription(sub)
    finally:
        sim.close()
