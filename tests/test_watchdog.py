"""The policy watchdog over real rclpy + Fast DDS: what it relays, what it drops, the safe action in each
output mode, and (with the sim) the safe action within 2 control periods of a killed, hung or blocked policy."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.time import Time
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory

from gato_ros.commands import ARM_COMMAND_TOPICS, GRIPPER_COMMAND_TOPIC, JOINT_STATE_FIELD, SAFE_ACTION_FRAME_ID
from gato_ros.watchdog import PolicyWatchdog, parse_hold_gains

ARM = [f"panda_joint{i}" for i in range(1, 8)]
NAMES = ARM + ["panda_finger_joint1"]
RATE_HZ = 20.0
PERIOD = 1.0 / RATE_HZ


class Harness:
    """The watchdog in a namespace of its own, a publisher of stamped commands and joint states, and the
    controller topics' subscribers."""

    def __init__(self, mode: str = "effort", **params) -> None:
        self.ns = "/w" + uuid.uuid4().hex[:8]
        self.mode = mode
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        params = {"output_mode": mode, "control_rate_hz": RATE_HZ, **params}
        self.watchdog = PolicyWatchdog(context=self.context, namespace=self.ns,
                                       parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
                                       cli_args=["--ros-args", "-r", f"/clock:={self.ns}/clock"])
        self.peer = rclpy.create_node("peer", context=self.context, namespace=self.ns)
        self.arm: list[tuple[float, object]] = []
        self.gripper: list[float] = []
        self.diagnostics: list[dict[str, str]] = []
        message = JointTrajectory if mode == "trajectory" else Float64MultiArray
        self.peer.create_subscription(message, f"{self.ns}/{ARM_COMMAND_TOPICS[mode]}",
                                      lambda m: self.arm.append((time.monotonic(), m)), 100)
        self.peer.create_subscription(Float64MultiArray, f"{self.ns}/{GRIPPER_COMMAND_TOPIC}",
                                      lambda m: self.gripper.append(m.data[0]), 100)
        self.peer.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.command_pub = self.peer.create_publisher(JointState, f"{self.ns}/gato_policy/joint_command", 10)
        self.joints_pub = self.peer.create_publisher(JointState, f"{self.ns}/joint_states", 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.watchdog)
        self.executor.add_node(self.peer)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        end = time.monotonic() + 10
        while self.peer.count_subscribers(f"{self.ns}/gato_policy/joint_command") < 1 and time.monotonic() < end:
            time.sleep(0.05)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if self.ns in status.name:
                self.diagnostics.append({kv.key: kv.value for kv in status.values})

    def send(self, arm: list[float], gripper: float = -15.0, age_s: float = 0.0) -> None:
        msg = JointState(name=NAMES)
        setattr(msg, JOINT_STATE_FIELD[self.mode], [*arm, gripper])
        stamp_ns = self.peer.get_clock().now().nanoseconds - int(age_s * 1e9)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        self.command_pub.publish(msg)

    def joints(self, q: list[float], qd: list[float] | None = None) -> None:
        self.joints_pub.publish(JointState(name=NAMES, position=[*q, 0.02], velocity=[*(qd or [0.0] * 7), 0.0]))

    def arm_values(self, i: int = -1) -> list[float]:
        msg = self.arm[i][1]
        return list(msg.points[0].positions) if self.mode == "trajectory" else list(msg.data)

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.watchdog.destroy_node()
        self.peer.destroy_node()
        rclpy.shutdown(context=self.context)


@pytest.fixture
def wd():
    h = Harness()
    yield h
    h.close()


def test_fresh_commands_are_relayed_and_stale_future_or_invalid_ones_are_not(wd):
    wd.send([1.0, 2, 3, 4, 5, 6, 7], gripper=-15.0)
    assert wd.wait_for(lambda: wd.arm and wd.gripper)
    assert wd.arm_values() == [1.0, 2, 3, 4, 5, 6, 7] and wd.gripper[-1] == -15.0, "arm and gripper apart"
    n = len(wd.arm)
    wd.send([9.0] * 7, age_s=0.5)  # computed 10 periods ago: stale by its stamp, however fast it came
    wd.send([8.0] * 7, age_s=-1.0)  # stamped in the future: a clock stepped
    wd.send([float("nan")] * 7)
    wd.send([1.0] * 6)  # one joint short
    wd.send([2.0, 2, 2, 2, 2, 2, 2], gripper=15.0)  # fresh again
    assert wd.wait_for(lambda: len(wd.arm) > n)
    time.sleep(0.02)  # nothing else may follow (the safe action only after 1.5 periods of silence)
    relayed = [wd.arm_values(i) for i in range(n, len(wd.arm))]
    assert relayed[0] == [2.0] * 7, "only the fresh command went through"
    core = wd.watchdog.core
    assert (core.dropped_stale, core.clock_jumps, core.dropped_invalid) == (1, 1, 2)


def test_a_gripper_only_tick_is_relayed_and_counts_as_fresh(wd):
    """The node sends only the gripper when it has no arm command (position modes before any joint state)."""
    wd.send([0.5] * 7)
    assert wd.wait_for(lambda: wd.arm)
    msg = JointState(name=NAMES[7:], effort=[15.0])
    msg.header.stamp = wd.peer.get_clock().now().to_msg()
    wd.command_pub.publish(msg)
    assert wd.wait_for(lambda: wd.gripper and wd.gripper[-1] == 15.0), "the gripper command went through"
    assert len(wd.arm) == 1 and wd.watchdog.core.relayed == 2 and wd.watchdog.core.dropped_invalid == 0


@pytest.fixture
def fixed_gains_wd():
    """The watchdog with the fixed hold gains (no pose table): the torques are easy to predict."""
    h = Harness(hold_gain_table="none")
    yield h
    h.close()


def test_silence_brings_the_hold_within_two_periods_and_fresh_commands_end_it(fixed_gains_wd):
    wd = fixed_gains_wd
    q_fault = [0.1, -0.7, 0.0, -2.3, 0.0, 1.6, 0.8]
    wd.joints(q_fault)
    for _ in range(5):
        wd.send([0.5] * 7, gripper=-15.0)
        time.sleep(PERIOD)
    assert wd.wait_for(lambda: len(wd.arm) >= 5)
    last_relayed = wd.arm[-1][0]
    assert wd.wait_for(lambda: wd.arm_values() != [0.5] * 7, 1.0), "a safe action follows the silence"
    first_safe = next(t for t, m in wd.arm if t > last_relayed and list(m.data) != [0.5] * 7)
    assert first_safe - last_relayed <= 2 * PERIOD, "the safe action within 2 periods of the last fresh command"
    np.testing.assert_allclose(wd.arm_values(), 0.0, atol=1e-12, err_msg="at the fault pose and still: no torque")
    moved = [q + 0.1 for q in q_fault]  # the arm sags 0.1 rad: the hold pushes back, per joint
    wd.joints(moved, [0.2] * 7)
    gains = parse_hold_gains(*(wd.watchdog.get_parameter(n).value for n in ("hold_stiffness", "hold_damping")))
    expected = -gains.apply(gains.stiffness, np.full(7, 0.1)) - gains.apply(gains.damping, np.full(7, 0.2))
    assert wd.wait_for(lambda: np.allclose(wd.arm_values(), expected, atol=1e-9), 1.0), wd.arm_values()
    assert wd.gripper[-1] == -15.0, "the gripper keeps its last command: the grasp holds"
    # Joint states stop: a PD on the last one would push forever; zero effort instead (gravity compensation).
    assert wd.wait_for(lambda: np.allclose(wd.arm_values(), 0.0, atol=1e-12), 1.0), wd.arm_values()
    n = len(wd.arm)
    time.sleep(5 * PERIOD)
    assert 3 <= len(wd.arm) - n <= 7, "the safe action repeats at the control rate"
    assert wd.wait_for(lambda: wd.diagnostics and wd.diagnostics[-1]["state"] == "fault", 3.0)
    assert "no fresh command" in wd.diagnostics[-1]["last_fault"]
    wd.send([0.25] * 7)
    assert wd.wait_for(lambda: wd.arm_values() == [0.25] * 7), "fresh commands end the fault"
    diagnostics = len(wd.diagnostics)
    while len(wd.diagnostics) < diagnostics + 2:  # the policy is back at its rate
        wd.send([0.25] * 7)
        time.sleep(PERIOD)
    assert wd.diagnostics[-1]["state"] == "relaying" and wd.watchdog.core.faults == 1


def test_the_nodes_safe_action_hands_the_hold_to_the_watchdog(fixed_gains_wd):
    """A command marked as the node's safe action is not relayed: the watchdog holds the arm itself at once,
    answering each joint state, until the policy's own commands return."""
    wd = fixed_gains_wd
    q_fault = [0.1, -0.7, 0.0, -2.3, 0.0, 1.6, 0.8]
    wd.joints(q_fault)
    wd.send([0.5] * 7)
    assert wd.wait_for(lambda: wd.arm and wd.arm_values() == [0.5] * 7)
    n = len(wd.arm)
    msg = JointState(name=NAMES, effort=[9.0] * 7 + [-15.0])
    msg.header.stamp, msg.header.frame_id = wd.peer.get_clock().now().to_msg(), SAFE_ACTION_FRAME_ID
    wd.command_pub.publish(msg)
    assert wd.wait_for(lambda: len(wd.arm) > n, 1.0)
    np.testing.assert_allclose(wd.arm_values(n), 0.0, atol=1e-12, err_msg="the watchdog's hold, not the node's values")
    assert wd.arm[n][0] - wd.arm[n - 1][0] < PERIOD, "at once, not after the silence timeout"
    wd.joints([q + 0.1 for q in q_fault])  # the hold answers the joint state
    gains = parse_hold_gains(*(wd.watchdog.get_parameter(n).value for n in ("hold_stiffness", "hold_damping")))
    expected = -gains.apply(gains.stiffness, np.full(7, 0.1))
    assert wd.wait_for(lambda: np.allclose(wd.arm_values(), expected, atol=1e-9), 1.0), wd.arm_values()
    core = wd.watchdog.core
    assert core.in_fault and core.node_safe_actions == 1 and 9.0 not in [v for i in range(len(wd.arm))
                                                                           for v in wd.arm_values(i)]
    wd.send([0.25] * 7)
    assert wd.wait_for(lambda: wd.arm_values() == [0.25] * 7), "the policy's commands end it"
    assert not core.in_fault


@pytest.mark.parametrize("mode", ["position", "velocity", "trajectory"])
def test_the_safe_action_in_each_output_mode(mode):
    wd = Harness(mode)
    try:
        q_fault = [0.1, -0.7, 0.0, -2.3, 0.0, 1.6, 0.8]
        wd.joints(q_fault, [0.3] * 7)
        time.sleep(0.1)
        wd.send([0.2] * 7)
        assert wd.wait_for(lambda: wd.arm and wd.arm_values() != [0.2] * 7, 2.0)
        expected = [0.0] * 7 if mode == "velocity" else q_fault  # stand still / hold the fault pose
        np.testing.assert_allclose(wd.arm_values(), expected, atol=1e-12)
        if mode == "trajectory":
            point = wd.arm[-1][1].points[0]
            assert list(wd.arm[-1][1].joint_names) == ARM and list(point.velocities) == [0.0] * 7
    finally:
        wd.close()


def test_the_control_period_is_learnt_from_the_stamps_when_not_given():
    """control_rate_hz 0 (the shared params file's "the model's rate"): the stamps of the first commands tell."""
    wd = Harness(control_rate_hz=0.0)
    try:
        start = time.monotonic()
        for i in range(15):  # the policy at 25 Hz, stamps on its own clock
            wd.send([0.1 * i] * 7)
            time.sleep(max(0.0, start + (i + 1) * 0.04 - time.monotonic()))
        assert wd.wait_for(lambda: len(wd.arm) >= 15)
        assert abs(wd.watchdog.core.period_s - 0.04) < 0.004
        last_relayed = wd.arm[-1][0]
        assert wd.wait_for(lambda: len(wd.arm) > 15, 1.0)
        assert wd.arm[15][0] - last_relayed <= 2 * 0.04, "the safe action within 2 of the learnt periods"
    finally:
        wd.close()


def test_on_sim_time_a_command_handled_before_its_clock_tick_is_no_silence():
    """/clock and the commands are separate topics: the watchdog may handle the command answering tick t before
    the /clock message of t. Silence counts from the command's stamp, so that order never puts a safe action on
    an arm whose policy answered every step; a step without an answer still does."""
    wd = Harness(use_sim_time=True)
    try:
        clock_pub = wd.peer.create_publisher(Clock, f"{wd.ns}/clock", 10)
        core = wd.watchdog.core

        def clock(t: float) -> None:
            clock_pub.publish(Clock(clock=Time(seconds=t).to_msg()))
            assert wd.wait_for(lambda: abs(wd.watchdog.get_clock().now().nanoseconds * 1e-9 - t) < 1e-6)
            time.sleep(0.05)  # the check timers due at t have run

        def command(stamp: float) -> None:
            relayed = core.relayed
            msg = JointState(name=NAMES, effort=[0.5] * 7 + [-15.0])
            msg.header.stamp = Time(seconds=stamp).to_msg()
            wd.command_pub.publish(msg)
            assert wd.wait_for(lambda: core.relayed == relayed + 1)

        clock(10.0)
        command(10.0)
        for step in range(1, 7):
            t = 10.0 + step * PERIOD
            if step % 2:  # the answer to tick t handled while the watchdog's clock still reads the tick before
                command(t)
                clock(t)
            else:  # the usual order: the tick's /clock (the check runs then), then its answer
                clock(t)
                command(t)
        assert core.faults == 0 and core.safe_commands == 0, core.fault_cause
        clock(10.0 + 8 * PERIOD)  # two steps without an answer: a real silence
        assert core.faults == 1 and core.safe_commands >= 1
    finally:
        wd.close()


def test_zero_is_refused_as_a_safe_action_in_position_mode():
    with pytest.raises(ValueError, match="zero"):
        Harness("position", safe_action="zero")


# --------------------------------------------------------------------------- in the sim, each fault

pytest.importorskip("pybullet")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    from sim.faults import FaultRig

    r = FaultRig(Path(tmp_path_factory.mktemp("faults")))
    r.start()
    yield r
    r.stop()


@pytest.mark.parametrize("fault", ["sigkill", "sigstop", "blocked_tick"])
def test_a_dead_hung_or_blocked_policy_gets_the_safe_action_within_two_periods(rig, fault):
    """A few trials in CI; scripts/fault_trials.py runs >= 20 of each."""
    for _ in range(3):
        result = rig.trial(fault, watch_s=0.6)
        assert result.after_last_fresh_s <= 2 * PERIOD and result.safe_by == "watchdog", result
        assert result.safe_commands >= 5, "the safe action repeats while the fault lasts"
        # The stand-in moves the hand at up to ~3.5 cm/s; the hold (a PD closed at 20 Hz, so soft) stops it
        # within ~1.5 cm. Coasting on the last torque would carry it on for as long as the fault lasts.
        assert result.hand_drift_m < 0.02, "the arm holds"
        assert result.recovered, "relayed commands again once the policy is back"
