"""The sim bridge simulating the xArm6 (issue 13: the bridge simulates either arm, chosen by `arm`), over real rclpy
+ Fast DDS on loopback and real PyBullet: the xArm's joint_states, six joint velocities on its velocity controller
closing a loop to a target, wrong commands refused and never applied, its gripper's finger target, and the whole
loop over ROS (bridge, node serving the xArm6 from a two-arm file, watchdog) as `gato-ros eval --over-ros --arm
xarm6` runs it. The Panda's bridge keeps its own tests (tests/test_bridge.py, unchanged)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

pytest.importorskip("pybullet")
from test_bridge import Harness  # noqa: E402

from gato_ros.runtime import ModelLoadError  # noqa: E402
from sim.bridge import SimBridge  # noqa: E402
from sim.xarm import ARM_VELOCITY_LIMIT, FINGER_OPEN, HOME_Q, JOINT_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "stack_int8.onnx"  # serves the Panda only
# A reach every joint makes from the home pose, within the xArm6's limits, the hand staying over the table.
REACH_TARGET = HOME_Q + np.array([0.3, -0.2, 0.2, 0.3, -0.2, 0.4])
DRIFT = [0.3, 0.0, 0.0, 0.0, 0.0, 0.0]  # joint 1 turns at 0.3 rad/s, the others stand


def xarm(**params) -> Harness:
    """The xArm6's bridge at real time (a loop over ROS answers each joint state within the period), no camera."""
    return Harness(arm="xarm6", command_mode="velocity", image_size=0, real_time_factor=1.0, **params)


def arm_q(sim: Harness) -> np.ndarray:
    return np.array(sim.got["joints"][-1].position[:6])


def arm_qd(sim: Harness) -> np.ndarray:
    return np.array(sim.got["joints"][-1].velocity[:6])


def after_steps(sim: Harness, steps: int) -> None:
    n = len(sim.got["joints"])
    assert sim.wait_for(lambda: len(sim.got["joints"]) > n + steps, 10.0), "still stepping"


def test_the_xarm6_bridge_publishes_its_joints_and_reaches_a_target_on_six_velocities():
    """joint_states carry the xArm's seven joints by its names; a scripted velocity source reading them and sending
    six velocities on velocity_controller/commands drives every joint to its target (a wrong joint order or sign
    in the bridge would never settle)."""
    sim = xarm()
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
        js = sim.got["joints"][-1]
        assert list(js.name) == list(JOINT_NAMES) and len(js.position) == len(js.velocity) == 7
        status = sim.status()
        assert (status["arm"], status["command_mode"]) == ("xarm6", "velocity")
        assert sim.cmd_pub.topic_name == f"{sim.ns}/velocity_controller/commands"
        start = arm_q(sim)
        np.testing.assert_allclose(start, HOME_Q, atol=0.01)

        def on_joints(msg: JointState) -> None:
            q = np.array(msg.position[:6])
            sim.cmd_pub.publish(Float64MultiArray(data=np.clip(3.0 * (REACH_TARGET - q), -0.5, 0.5).tolist()))

        sim.peer.create_subscription(JointState, f"{sim.ns}/joint_states", on_joints, qos_profile_sensor_data)
        errors: list[float] = []

        def settled() -> bool:
            errors.append(float(np.max(np.abs(arm_q(sim) - REACH_TARGET))))
            return len(errors) > 20 and max(errors[-20:]) < 0.01

        sim.wait_for(settled, 30.0)
        np.testing.assert_allclose(arm_q(sim), REACH_TARGET, atol=0.01, err_msg="the arm reaches the target")
        assert sim.status()["rejected_commands"] == 0
    finally:
        sim.close()


@pytest.mark.parametrize("data", [[-1.0] * 7, [-1.0] * 5, [float("nan")] + [-1.0] * 5, []],
                         ids=["arm+gripper", "five", "nan", "empty"])
def test_a_wrong_xarm6_command_is_refused_and_never_applied(data):
    """Seven values (six velocities and the gripper, or the Panda's arm) are refused like every other wrong command:
    counted, logged, and the previous command keeps acting."""
    sim = xarm()
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
        sim.cmd_pub.publish(Float64MultiArray(data=DRIFT))
        assert sim.wait_for(lambda: sim.status()["commands"] >= 1, 5.0)
        after_steps(sim, 5)
        rejected = sim.status()["rejected_commands"]
        sim.cmd_pub.publish(Float64MultiArray(data=data))
        assert sim.wait_for(lambda: sim.status()["rejected_commands"] == rejected + 1, 5.0)
        for _ in range(10):  # half a second of steps after the refusal: joint 1 still turns, the others stand
            after_steps(sim, 1)
            np.testing.assert_allclose(arm_qd(sim), DRIFT, atol=0.02)
    finally:
        sim.close()


def test_the_xarm6_command_timeout_stops_the_arm_and_the_gripper_rests_open():
    sim = xarm(command_timeout_s=0.2)
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
        sim.gripper_pub.publish(Float64MultiArray(data=[0.0]))  # close
        sim.cmd_pub.publish(Float64MultiArray(data=DRIFT))
        assert sim.wait_for(lambda: sim.status()["command_timeouts"] > 2, 10.0), "stale command → zero velocity"
        after_steps(sim, 10)
        np.testing.assert_allclose(arm_qd(sim), np.zeros(6), atol=0.02)
        assert sim.got["joints"][-1].position[6] > FINGER_OPEN - 0.005, "the gripper's rest command is open"
    finally:
        sim.close()


def test_the_xarm6_gripper_takes_a_finger_target():
    sim = xarm()
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
        assert sim.got["joints"][-1].position[6] > FINGER_OPEN - 0.005, "it starts open"
        sim.gripper_pub.publish(Float64MultiArray(data=[0.0]))  # the closed target
        assert sim.wait_for(lambda: sim.got["joints"][-1].position[6] < 0.005, 10.0), "the fingers close"
        rejected = sim.status()["rejected_commands"]
        sim.gripper_pub.publish(Float64MultiArray(data=[FINGER_OPEN, 0.0]))  # two values: refused, the grip stays
        assert sim.wait_for(lambda: sim.status()["rejected_commands"] == rejected + 1, 5.0)
        after_steps(sim, 10)
        assert sim.got["joints"][-1].position[6] < 0.005
        np.testing.assert_allclose(arm_qd(sim), np.zeros(6), atol=0.02)  # no arm command: the arm stands
    finally:
        sim.close()


def test_the_watchdog_stops_the_xarm6_when_its_policy_falls_silent():
    """The watchdog between a policy and the xArm6's velocity controller: it relays the policy's stamped six
    velocities and finger target, and when they stop its safe action (a velocity hold: zero for each of the six
    joints) stops the arm, which a forward velocity controller would otherwise keep turning forever."""
    from gato_ros.watchdog import PolicyWatchdog

    sim = xarm(wall_clock_stamps=True)  # the watchdog and this stand-in policy judge stamps on the wall clock
    watchdog = PolicyWatchdog(context=sim.context, namespace=sim.ns, parameter_overrides=[
        Parameter("output_mode", value="velocity"), Parameter("gripper_joint", value=JOINT_NAMES[6]),
        Parameter("control_rate_hz", value=20.0)])
    sim.executor.add_node(watchdog)
    policy = sim.peer.create_publisher(JointState, f"{sim.ns}/gato_policy/joint_command", 10)
    try:
        assert sim.wait_for(lambda: len(sim.got["joints"]) >= 2, 20.0)
        for _ in range(30):  # 1.5 s of the policy at 20 Hz: joint 1 turns at 0.3 rad/s, the gripper stays open
            msg = JointState(name=list(JOINT_NAMES), velocity=[*DRIFT, FINGER_OPEN])
            msg.header.stamp = sim.peer.get_clock().now().to_msg()
            policy.publish(msg)
            time.sleep(0.05)
        np.testing.assert_allclose(arm_qd(sim), DRIFT, atol=0.02, err_msg="the watchdog relays the six velocities")
        assert sim.wait_for(lambda: watchdog.core.in_fault, 2.0), "silence is a fault"
        after_steps(sim, 10)
        np.testing.assert_allclose(arm_qd(sim), np.zeros(6), atol=0.02, err_msg="the safe action stops the arm")
        stopped = arm_q(sim)
        after_steps(sim, 10)
        np.testing.assert_allclose(arm_q(sim), stopped, atol=0.005)
        assert sim.got["joints"][-1].position[6] > FINGER_OPEN - 0.005, "the gripper keeps its last command"
        status = sim.status()
        assert status["rejected_commands"] == 0 and watchdog.core.safe_commands > 0
    finally:
        sim.executor.remove_node(watchdog)
        watchdog.destroy_node()
        sim.close()


@pytest.mark.parametrize(("params", "message"), [
    ({"command_mode": "effort"}, "command_mode must be one of \\('velocity',\\) for the xarm6"),
    ({"arm": "ur5"}, "unknown arm 'ur5': choose one of panda, xarm6"),
    ({"model_path": str(SHIPPED)}, "serves arm\\(s\\) panda, not arm 'xarm6'"),
])
def test_the_bridge_refuses_what_the_arm_cannot_take(params, message):
    """An effort command on the velocity-commanded xArm6, an unknown arm, or a model that does not serve the arm:
    the bridge does not start."""
    if "model_path" in params and not SHIPPED.exists():
        pytest.skip("no shipped model")
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        overrides = [Parameter(k, value=v) for k, v in {"arm": "xarm6", "image_size": 0, **params}.items()]
        with pytest.raises((ValueError, ModelLoadError), match=message):
            SimBridge(context=context, parameter_overrides=overrides)
    finally:
        rclpy.shutdown(context=context)


# ----------------------------------------------------------------------------- the loop over ROS


@pytest.fixture(scope="module")
def two_arm_model(tmp_path_factory) -> Path:
    """An untrained micro model serving the Panda (default) and the xArm6 from one file, as `gato-ros export` of a
    two-arm checkpoint writes it (every spec and the tasks in the metadata)."""
    torch = pytest.importorskip("torch", reason="exporting the test model needs torch")
    from gato_ros import contract
    from gato_ros.export import export
    from gato_ros.model import GatoConfig, GatoModel
    from sim.spec import stacking_spec
    from sim.xarm import xarm_spec

    panda, arm = stacking_spec(), xarm_spec()
    served = contract.served_metadata({"panda": panda.to_json(), "xarm6": arm.to_json()}, ["lift_red"])
    torch.manual_seed(0)
    config = GatoConfig(n_layer=1, n_embd=32, n_head=2, n_ff=64, context_window=96)  # two timesteps of either arm
    out = tmp_path_factory.mktemp("two_arms") / "two_arms.onnx"
    return export(GatoModel(config).eval(), panda, out, check=False, served=served)["fp32"]


@pytest.mark.parametrize(("arm", "joints"), [("", "panda_joint1"), ("xarm6", "joint1")])
def test_the_bridge_simulates_the_arm_of_the_model_it_is_given(two_arm_model, arm, joints):
    """With a model: `arm` picks which of its arms, "" its default (the Panda here), as the node reads `arm`."""
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        overrides = [Parameter("model_path", value=str(two_arm_model)), Parameter("arm", value=arm)]
        bridge = SimBridge(context=context, parameter_overrides=overrides)
        assert bridge.joint_names[0] == joints and bridge.arm_name == (arm or "panda")
        bridge.stop()
        bridge.destroy_node()
    finally:
        rclpy.shutdown(context=context)


@pytest.mark.timeout(180)
def test_eval_over_ros_drives_the_xarm6_from_a_two_arm_file(two_arm_model, tmp_path, monkeypatch):
    """`gato-ros eval --over-ros --arm xarm6`: the bridge simulates the xArm6, the node serves the file's xArm6 spec
    in velocity mode, the watchdog relays six velocities and the finger target; commands flow at the control rate,
    none is refused, and until the first stale command (if any) the episode is the in-process one, to the bit."""
    from gato_ros.runtime import PolicyRuntime
    from sim.arms import make_env
    from sim.ros_eval import evaluate_over_ros, ros_summary

    # The next DDS domain: participants the bridge tests above left to the garbage collector stay out of discovery.
    monkeypatch.setenv("ROS_DOMAIN_ID", str(int(os.environ.get("ROS_DOMAIN_ID", "0")) % 100 + 1))
    steps, seed = 60, 11
    ros_run = evaluate_over_ros(str(two_arm_model), [seed], provider="cpu", max_steps=steps, arm="xarm6",
                                task="lift_red", gif=tmp_path / "ep.gif", log_dir=tmp_path / "logs", progress=False)
    assert ros_run.exit_codes == {"bridge": 0, "node": 0, "watchdog": 0}, (tmp_path / "logs" / "node.log").read_text()
    (r,) = ros_run.results
    assert (r.seed, r.steps, r.nan) == (seed, steps, False)
    load = f"{r} (load average {os.getloadavg()}: the loop needs CPU time at the control rate)"
    assert abs(r.control_rate_hz - 20.0) <= 2.0, load
    assert r.rejected_commands == 0, "every command reaching the bridge was six finite velocities"
    assert r.fresh_steps + r.stale_steps == steps and len(r.stale_at) == r.stale_steps
    summary = ros_summary(ros_run)
    assert summary["rejected_commands"] == 0
    if r.stale_steps == 0:
        assert ros_run.watchdog_diagnostics["silence_faults"] == "0", ros_run.watchdog_diagnostics

    rec_seed, joints, _ = ros_run.recording
    assert rec_seed == seed and joints.shape == (steps + 1, 7)
    env = make_env("xarm6", task="lift_red", max_steps=steps)
    runtime = PolicyRuntime(str(two_arm_model), provider="cpu", threads=1, arm="xarm6")
    obs, _ = env.reset(seed=seed)
    expected = [obs["joint_positions"]]
    for _ in range(steps):
        action = runtime.step(obs)
        assert action.shape == (7,) and np.all(np.abs(action[:6]) <= ARM_VELOCITY_LIMIT)
        obs, *_ = env.step(action)
        expected.append(obs["joint_positions"])
    env.close()
    fresh_until = min(r.stale_at, default=steps)
    np.testing.assert_array_equal(joints[: fresh_until + 1], np.array(expected)[: fresh_until + 1])
    assert not np.allclose(joints[0, :6], joints[-1, :6]), "the velocities moved the arm"
    assert (tmp_path / "ep.gif").stat().st_size > 0, "the replay films the xArm6"
