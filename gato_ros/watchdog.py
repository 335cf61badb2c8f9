"""The policy watchdog: `gato-ros watchdog` / console script `policy_watchdog`.

A forward controller applies its last command forever, so when the policy process dies (SIGKILL), hangs
(SIGSTOP) or blocks inside a tick, nothing on the controller side stops its last torque. This small process
(rclpy, numpy and the node's ROS-free contract modules; no model) stands between the policy node and the
arm's controllers:

- it subscribes the node's stamped commands (gato_ros.commands: sensor_msgs/JointState on the node's
  `~/joint_command`) and the joint states;
- it relays a command to the controller topics (the mode's arm topic, the gripper topic) when it is fresh
  by its stamp: `now - stamp <= max_command_age_periods` control periods on the node's clock; a stale
  one, a stamp from the future (a clock that stepped) or an invalid one is dropped and counted;
- when no fresh command has come for `timeout_periods` control periods (on a steady clock from the command's
  arrival, or, with use_sim_time unless `silence_clock` is steady, on the sim clock from the command's
  stamp) it publishes the safe action
  (commands.safe_arm_command; `safe_action`, `hold` by default: a damped hold of the joint positions at
  the fault, the gripper keeping its last command) at the control rate until fresh commands return. It
  checks ten times a period, so the safe action is on the controller topic within (timeout_periods + 0.1)
  periods of the last fresh command plus the time to publish: under 2 periods with the default 1.5;
- it logs each fault once with its cause, and the recovery; diagnostics on /diagnostics once a second
  (fault count, commands relayed and dropped, relay latency receive → publish p50/p99).

Before the first fresh command it publishes nothing: the controller holds as it starts (zero effort
over gravity compensation, or its current position).
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gato_ros import ros_io, ros_process
from gato_ros.commands import (
    ARM_COMMAND_TOPICS,
    GRIPPER_COMMAND_TOPIC,
    JOINT_STATE_FIELD,
    OUTPUT_MODES,
    SAFE_ACTION_FRAME_ID,
    SAFE_ACTIONS,
    FaultSnapshot,
    HoldGains,
    hold_feedback,
    safe_arm_command,
    safe_gripper_command,
)
from gato_ros.control import DEFAULT_HOLD_DAMPING, DEFAULT_HOLD_STIFFNESS, hold_gains
from gato_ros.hold_table import HoldGainTable, load_table

NODE_NAME = "policy_watchdog"
PANDA_EFFORT_LIMITS = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
LEARN_INTERVALS = 10  # with control_rate_hz 0: the period is the median of the first ten stamp intervals
UNKNOWN_PERIOD_MAX_AGE_S = 0.25  # the freshness bound before the first two commands give a period


# ----------------------------------------------------------------------------- ROS-free core


def parse_hold_gains(stiffness: list[float], damping: list[float]) -> HoldGains:
    """The node's rule (gato_ros.control.hold_gains), for the arm size the values imply (n values or n×n)."""
    size = len(stiffness)
    root = int(round(size**0.5))
    n_arm = root if root > 1 and root * root == size else size
    return hold_gains(stiffness, damping, n_arm) if n_arm > 1 else HoldGains(tuple(stiffness), tuple(damping))


@dataclass
class Command:
    """What goes to the controllers: arm values in the controller's joint order, and the gripper's (or None)."""

    arm: np.ndarray
    gripper: float | None
    safe: bool = False


@dataclass
class WatchdogCore:
    """Freshness, fault detection and the safe action; times in seconds. Thread-safe.

    `now` is the node's clock (the stamps' clock: system time, or the sim's), `steady` a clock that never
    steps (time.monotonic, or the sim clock with use_sim_time): ages come from stamps, silence from `steady`.
    """

    mode: str
    rate_hz: float  # the policy's control rate; 0 = learn it from the stamps of its first commands
    max_age_periods: float
    timeout_periods: float
    safe_action: str
    gains: HoldGains
    limits: np.ndarray
    gripper_joint: str = ""
    joint_state_timeout_s: float = 0.25
    table: HoldGainTable | None = None  # pose-dependent hold gains (gato_ros.hold_table); None: `gains`
    arm_joints: tuple[str, ...] = ()  # learnt from the first valid command (the controller's order)
    relayed: int = 0
    node_safe_actions: int = 0  # commands that were the node's safe action (the watchdog held instead)
    silence_faults: int = 0  # faults begun by the policy's silence (the others: the node's own safe action)
    dropped_stale: int = 0
    dropped_invalid: int = 0
    clock_jumps: int = 0
    faults: int = 0
    safe_commands: int = 0
    in_fault: bool = False
    armed: bool = False  # a fresh command has come: from now on silence is a fault
    fault_cause: str = ""
    last_fresh_steady: float = -np.inf
    last_gripper: float | None = None
    last_drop: str = ""  # why the latest command was not relayed
    hold_feedback: str = ""  # what the latest safe action acted on (diagnostics)
    next_safe_steady: float = np.inf  # in a fault: when the next safe action is due
    fault_started_steady: float = np.nan
    snapshot: FaultSnapshot | None = None
    joint_state: tuple[list[str], np.ndarray, np.ndarray] | None = None
    joint_state_steady: float = -np.inf
    period_learnt: bool = False  # set when a learnt period became final (the node re-times its check)
    _last_now: float = -np.inf
    _last_stamp: float = -np.inf
    _intervals: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {self.mode!r}")
        if self.safe_action not in SAFE_ACTIONS:
            raise ValueError(f"safe_action must be one of {SAFE_ACTIONS}, got {self.safe_action!r}")
        if self.safe_action == "zero" and self.mode in ("position", "trajectory"):
            raise ValueError("safe_action zero is a large motion in position modes: use hold or damp")
        if not (self.timeout_periods > 0 and self.max_age_periods > 0 and self.rate_hz >= 0):
            raise ValueError("timeout and command age bound must be positive, the rate positive or 0 (learn it)")

    # --- the period: given, or learnt from the stamps ---

    @property
    def period_s(self) -> float:
        """The control period; while it is being learnt, the median stamp interval so far (nan before two)."""
        if self.rate_hz > 0:
            return 1.0 / self.rate_hz
        return float(np.median(self._intervals)) if self._intervals else math.nan

    @property
    def max_age_s(self) -> float:
        period = self.period_s
        return self.max_age_periods * period if math.isfinite(period) else UNKNOWN_PERIOD_MAX_AGE_S

    @property
    def timeout_s(self) -> float:
        return self.timeout_periods * self.period_s  # nan while unknown: no fault can be judged yet

    def _learn(self, stamp: float) -> bool:
        """Counts the interval to the previous fresh command's stamp; True when the period is final now."""
        if self.rate_hz > 0 or len(self._intervals) >= LEARN_INTERVALS:
            return False
        interval, self._last_stamp = stamp - self._last_stamp, stamp
        if 0 < interval < 1.0:
            self._intervals.append(interval)
        return len(self._intervals) == LEARN_INTERVALS

    # --- inputs ---

    def on_joint_state(self, names: list[str], positions: list[float], velocities: list[float],
                       steady: float) -> None:
        """Keeps the latest joint state when it is complete and finite (mapped to the arm's joints when used)."""
        q = np.asarray(positions, dtype=np.float64)
        qd = np.asarray(velocities, dtype=np.float64) if len(velocities) else np.zeros(q.shape)
        if q.shape == qd.shape == (len(names),) and np.all(np.isfinite(q)) and np.all(np.isfinite(qd)):
            with self._lock:
                self.joint_state = (list(names), q, qd)
                self.joint_state_steady = steady

    def _arm_state(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The arm's (q, qd) in the controller's joint order from the latest joint state; None if it lacks a joint."""
        if self.joint_state is None or not self.arm_joints:
            return None
        names, q, qd = self.joint_state
        try:
            index = [names.index(n) for n in self.arm_joints]
        except ValueError:
            return None
        return q[index], qd[index]

    def on_command(self, names: list[str], values: list[float], stamp: float, now: float,
                   steady: float, safe: bool = False) -> tuple[Command | None, str]:
        """A stamped command from the policy: the command to publish (None: dropped), and an event to log ("").

        `safe`: the node sends its safe action (a fault it saw). The watchdog then holds the arm itself (its hold
        answers each joint state at once; the node's is computed at its tick, from a joint state that may be a
        period old) until the policy's own commands return."""
        with self._lock:
            if now < self._last_now - min(self.max_age_s, 1.0):
                self.clock_jumps += 1  # the node's clock stepped back: ages measured across it mean nothing
            self._last_now = max(self._last_now, now)
            age = now - stamp
            reason = self._drop_reason(names, values, age)
            if reason:
                self.last_drop = reason
                return None, ""
            arm_names = [n for n in names if n != self.gripper_joint]  # none: a gripper-only tick (no arm state)
            if not self.arm_joints:
                self.arm_joints = tuple(arm_names)
            elif arm_names and tuple(arm_names) != self.arm_joints:
                self.dropped_invalid += 1
                self.last_drop = f"invalid command: joints {arm_names}, expected {list(self.arm_joints)}"
                return None, ""
            array = np.asarray(values, dtype=np.float64)
            arm = array[[names.index(n) for n in self.arm_joints]] if arm_names else np.empty(0)
            gripper = float(array[names.index(self.gripper_joint)]) if self.gripper_joint in names else None
            self.period_learnt = self._learn(stamp) or self.period_learnt
            if safe:
                self.armed, self.last_drop, self.node_safe_actions = True, "", self.node_safe_actions + 1
                if self.in_fault:
                    return None, ""
                self.fault_cause = "the policy node sends its safe action (a fault it saw)"
                return self._begin_fault(steady), f"fault: {self.fault_cause}: the watchdog holds the arm"
            self.last_gripper = gripper if gripper is not None else self.last_gripper
            self.last_fresh_steady, self.armed, self.relayed = steady, True, self.relayed + 1
            self.last_drop = ""
            event = ""
            if self.in_fault:
                self.in_fault, self.next_safe_steady = False, np.inf
                event = f"recovered: fresh commands again after {steady - self.fault_started_steady:.3f} s"
            return Command(arm, gripper), event

    def _drop_reason(self, names: list[str], values: list[float], age: float) -> str:
        # A stamp ahead of this clock by up to the age bound is ordinary on sim time (the command for tick t handled
        # before the /clock message of t: -1 period); twice that is a clock that stepped.
        if age < -2 * self.max_age_s:
            self.clock_jumps += 1
            return f"stamp {-age:.3f} s in the future (a clock stepped)"
        if age > self.max_age_s:
            self.dropped_stale += 1
            return f"stale command ({age:.3f} s old > {self.max_age_s:.3f} s)"
        if len(values) != len(names) or len(names) == 0 or not np.all(np.isfinite(values)):
            self.dropped_invalid += 1
            return f"invalid command ({len(values)} values for {len(names)} joints, or NaN/inf)"
        return ""

    # --- the check, ten times a period ---

    def check(self, steady: float) -> tuple[Command | None, str]:
        """The safe action to publish now (None: nothing due), and an event to log once ("")."""
        with self._lock:
            if not self.armed or not math.isfinite(self.period_s):
                return None, ""
            silence = steady - self.last_fresh_steady
            event = ""
            if not self.in_fault:
                if silence <= self.timeout_s:
                    return None, ""
                self.silence_faults += 1
                self.fault_cause = f"no fresh command for {silence:.3f} s" + (
                    f"; the latest was dropped: {self.last_drop}" if self.last_drop else
                    " (the policy is silent: dead, hung or blocked)")
                event = f"fault: {self.fault_cause}: publishing the {self.safe_action} safe action"
                return self._begin_fault(steady), event
            if steady >= self.next_safe_steady + 0.5 * self.period_s:
                # No joint state came to answer: the timer keeps the control rate (due again in one period).
                return self._next_safe(steady, steady + 0.5 * self.period_s), event
            return None, event

    def _begin_fault(self, steady: float) -> Command | None:
        """A fault begins now (lock held, `fault_cause` set): snapshot, count, and the first safe action."""
        self.in_fault, self.faults, self.fault_started_steady = True, self.faults + 1, steady
        self.snapshot = self._snapshot(steady)
        return self._next_safe(steady, steady + self.period_s)

    def safe_on_joint_state(self, steady: float) -> Command | None:
        """In a fault, the safe action computed from the joint state that just came, when one is due.

        Answering the joint state at once keeps the hold's loop delay near zero (a PD closed at 20 Hz over a
        sample-and-hold is unstable with a period of delay); due once a control period, a quarter early at most.
        """
        with self._lock:
            if not self.in_fault or steady < self.next_safe_steady - 0.25 * self.period_s:
                return None
            return self._next_safe(steady, max(self.next_safe_steady + self.period_s, steady + 0.75 * self.period_s))

    def _next_safe(self, steady: float, next_due: float) -> Command | None:
        self.next_safe_steady = next_due
        self.safe_commands += 1
        return self._safe_command(steady)

    def _snapshot(self, steady: float) -> FaultSnapshot | None:
        state = self._arm_state()
        if state is None:
            return None
        gripper = self.last_gripper if self.last_gripper is not None else np.nan
        gains = None
        if self.table is not None and self.mode == "effort":
            try:
                gains = self.table.gains_at(self.arm_joints, state[0])
            except ValueError as err:  # a table for other joints: the fixed gains, and say why
                self.fault_cause += f"; fixed hold gains: {err}"
        return FaultSnapshot(state[0].copy(), float(gripper), gains)

    def _safe_command(self, steady: float) -> Command | None:
        if self.snapshot is None:  # no joint state yet: only an effort controller can hold without one
            return Command(np.zeros(len(self.arm_joints)), None, safe=True) if self.mode == "effort" else None
        state = self._arm_state()
        age = steady - self.joint_state_steady
        feedback = None if state is None else hold_feedback(self.safe_action, self.snapshot, self.gains,  # type: ignore
                                                            state[0], state[1], age, age <= self.joint_state_timeout_s)
        if feedback is not None and age <= self.joint_state_timeout_s:
            self.hold_feedback = "the current joint state"
        elif feedback is not None:
            self.hold_feedback = f"the last valid joint state ({age:.3f} s old), braking on the hold model"
        else:
            # No current joint state and no model to brake on: a PD on an old one would push forever; zero effort
            # (gravity holds).
            self.hold_feedback = f"none (the last valid joint state is {age:.3f} s old): zero effort"
            feedback = self.snapshot.arm_positions, np.zeros_like(self.snapshot.arm_positions)
        q, qd = feedback
        arm = safe_arm_command(self.safe_action, self.mode, self.snapshot, q, qd, self.gains, self.limits)
        gripper = None if self.last_gripper is None else safe_gripper_command(self.safe_action, self.snapshot)
        return Command(arm, gripper, safe=True)


# ----------------------------------------------------------------------------- the ROS node

import rclpy  # noqa: E402  (below the ROS-free core on purpose, as in gato_ros.node)
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue  # noqa: E402
from rcl_interfaces.msg import ParameterDescriptor  # noqa: E402
from rclpy.clock import Clock, ClockType  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402

PARAMETERS: dict[str, Any] = {
    "command_topic": "gato_policy/joint_command",  # the policy node's ~/joint_command
    "joint_states_topic": "joint_states",
    "output_mode": "effort",  # effort | position | velocity | trajectory: as the policy node's
    "arm_command_topic": "",  # "" = the mode's controller topic (gato_ros.commands.ARM_COMMAND_TOPICS)
    "gripper_command_topic": GRIPPER_COMMAND_TOPIC,
    # The command's gripper entry, a robot joint name (the node's `gripper_action` names the model's action).
    "gripper_joint": "panda_finger_joint1",  # "" = no gripper
    "control_rate_hz": 0.0,  # the policy node's rate; 0 = learn it from the stamps of its first commands
    "max_command_age_periods": 1.0,  # fresh: now - stamp <= this many periods
    "timeout_periods": 1.5,  # no fresh command for this long: the safe action
    "safe_action": "hold",  # hold | damp | zero
    # The hold's gains, as the node's (the same params file sets both): one value, one per arm joint, or an n×n
    # matrix row-major; default the sim Panda's mass-scaled matrices (gato_ros.control, scripts/hold_gains.py).
    "hold_stiffness": [float(v) for v in DEFAULT_HOLD_STIFFNESS],  # N·m/rad (effort mode)
    "hold_damping": [float(v) for v in DEFAULT_HOLD_DAMPING],  # N·m·s/rad
    # Pose-dependent hold gains (gato_ros.hold_table), as the node's: "" = the sim Panda's shipped table,
    # "none" = the fixed hold_stiffness / hold_damping above.
    "hold_gain_table": "",
    "effort_limits": list(PANDA_EFFORT_LIMITS),  # N·m per arm joint: the safe torque is clipped to these
    "joint_state_timeout_s": 0.25,  # an older joint state is not used for the hold
    # The clock silence is judged on: auto = the sim clock with use_sim_time (a paused sim is no fault), else
    # steady time; steady = steady time always (a sim at real time, judged as a robot would be).
    "silence_clock": "auto",
}


class PolicyWatchdog(Node):
    """Node `policy_watchdog`: see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        for name, default in PARAMETERS.items():
            # Numbers take any numeric type (`control_rate_hz:=20` is an integer to ROS); cast below.
            numeric = isinstance(default, float) or (isinstance(default, list) and isinstance(default[0], float))
            self.declare_parameter(name, default, ParameterDescriptor(dynamic_typing=numeric))
        prm = {name: self.get_parameter(name).value for name in PARAMETERS}
        rate = float(prm["control_rate_hz"])
        if not np.isfinite(rate) or rate < 0:
            raise ValueError(f"control_rate_hz must be positive or 0 (learn it), got {rate}")
        self.core = WatchdogCore(
            mode=str(prm["output_mode"]), rate_hz=rate, max_age_periods=float(prm["max_command_age_periods"]),
            timeout_periods=float(prm["timeout_periods"]), safe_action=str(prm["safe_action"]),
            gains=parse_hold_gains(prm["hold_stiffness"], prm["hold_damping"]),
            limits=np.asarray(prm["effort_limits"], dtype=np.float64),
            gripper_joint=str(prm["gripper_joint"]), joint_state_timeout_s=float(prm["joint_state_timeout_s"]),
            table=load_table(str(prm["hold_gain_table"])))
        # Silence is judged on a clock that never steps: steady time, or the sim clock with use_sim_time.
        silence_clock = str(prm["silence_clock"])
        if silence_clock not in ("auto", "steady"):
            raise ValueError(f"silence_clock must be auto or steady, got {silence_clock!r}")
        on_sim_clock = bool(self.get_parameter("use_sim_time").value) and silence_clock == "auto"
        self._steady_clock = self.get_clock() if on_sim_clock else Clock(clock_type=ClockType.STEADY_TIME)
        # On the sim clock a command's moment is its stamp, not the clock read when it is handled: /clock and the
        # commands arrive on different topics, and a /clock message handled after a queued command made that
        # command look a period older than it was (a safe action while the policy answered every step).
        self._fresh_at_stamp = on_sim_clock
        self.relay_latency_s: deque[float] = deque(maxlen=2000)
        arm_topic = prm["arm_command_topic"] or ARM_COMMAND_TOPICS[self.core.mode]
        arm_type = ros_io.arm_command_type(self.core.mode)
        self.arm_pub = self.create_publisher(arm_type, arm_topic, 10)
        self.gripper_pub = self.create_publisher(Float64MultiArray, prm["gripper_command_topic"], 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.field = JOINT_STATE_FIELD[self.core.mode]
        self.create_subscription(JointState, prm["command_topic"], self._on_command, 10)
        self.create_subscription(JointState, prm["joint_states_topic"], self._on_joint_state, qos_profile_sensor_data)
        # Ten checks a period; while the period is being learnt, every 5 ms (re-timed once it is known).
        self._check_timer = self.create_timer(self.core.period_s / 10 if rate else 0.005, self._on_check,
                                              clock=self._steady_clock)
        self.create_timer(1.0, self._publish_diagnostics, clock=self._steady_clock)
        if self.core.timeout_periods + 0.1 >= 2.0:
            self.get_logger().warning(f"timeout_periods {self.core.timeout_periods:g} + 0.1 (the check interval) is 2 "
                                      "periods or more: the safe action may come later than 2 periods after the "
                                      "last fresh command")
        self.get_logger().info(
            f"relaying {self.resolve_topic_name(prm['command_topic'])} → {self.arm_pub.topic_name} ({self.core.mode}) "
            f"and {self.gripper_pub.topic_name}; safe action '{self.core.safe_action}' after "
            f"{self.core.timeout_periods:g} control periods without a fresh command "
            f"({f'{rate:g} Hz' if rate else 'rate learnt from the command stamps'})")

    def _steady(self) -> float:
        return self._steady_clock.now().nanoseconds * 1e-9

    def _on_joint_state(self, msg: JointState) -> None:
        steady = self._steady()
        self.core.on_joint_state(list(msg.name), list(msg.position), list(msg.velocity), steady)
        command = self.core.safe_on_joint_state(steady)
        if command is not None:
            self._publish(command)

    def _on_command(self, msg: JointState) -> None:
        received = time.perf_counter()
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        now = self.get_clock().now().nanoseconds * 1e-9
        command, event = self.core.on_command(list(msg.name), list(getattr(msg, self.field)), stamp, now,
                                              stamp if self._fresh_at_stamp else self._steady(),
                                              safe=msg.header.frame_id == SAFE_ACTION_FRAME_ID)
        if command is not None:
            self._publish(command)
            self.relay_latency_s.append(time.perf_counter() - received)
        if event:
            self.get_logger().info(event)
        if self.core.period_learnt:
            self.core.period_learnt = False
            self.destroy_timer(self._check_timer)
            self._check_timer = self.create_timer(self.core.period_s / 10, self._on_check, clock=self._steady_clock)
            self.get_logger().info(f"control period learnt from the command stamps: {self.core.period_s:.4f} s")

    def _on_check(self) -> None:
        command, event = self.core.check(self._steady())
        if event:
            self.get_logger().error(event)
        if command is not None:
            self._publish(command)

    def _publish(self, command: Command) -> None:
        # The gripper first: by the time the arm controller has this tick's command, the gripper's is on its way.
        if command.gripper is not None and np.isfinite(command.gripper):
            self.gripper_pub.publish(Float64MultiArray(data=[command.gripper]))
        if command.arm.size:  # the node's builder: the same message the node sends with direct_output
            period = self.core.period_s if math.isfinite(self.core.period_s) else UNKNOWN_PERIOD_MAX_AGE_S
            self.arm_pub.publish(ros_io.arm_command_message(self.core.mode, self.core.arm_joints, command.arm, period))

    def _publish_diagnostics(self) -> None:
        core = self.core
        latency_us = np.asarray(self.relay_latency_s, dtype=np.float64) * 1e6
        values = {
            "state": "fault" if core.in_fault else "relaying" if core.armed else "waiting for the first command",
            "output_mode": core.mode, "safe_action": core.safe_action,
            "relayed": str(core.relayed), "node_safe_actions": str(core.node_safe_actions),
            "dropped_stale": str(core.dropped_stale),
            "dropped_invalid": str(core.dropped_invalid), "clock_jumps": str(core.clock_jumps),
            "control_period_s": f"{core.period_s:.4f}", "faults": str(core.faults),
            "silence_faults": str(core.silence_faults),
            "safe_commands": str(core.safe_commands), "last_fault": core.fault_cause,
            "hold_acts_on": core.hold_feedback if core.in_fault else "",
            "relay_latency_p50_us": f"{np.percentile(latency_us, 50):.1f}" if latency_us.size else "",
            "relay_latency_p99_us": f"{np.percentile(latency_us, 99):.1f}" if latency_us.size else "",
        }
        level = ERROR if core.in_fault else OK if core.armed else WARN
        message = core.fault_cause if core.in_fault else values["state"]
        status = DiagnosticStatus(level=bytes([level]), name=f"{self.get_fully_qualified_name()}: watchdog",
                                  message=message, hardware_id=core.mode,
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)


def main(argv: list[str] | None = None) -> int:
    """Console script `policy_watchdog`: spin until Ctrl-C / SIGTERM."""
    argv = list(sys.argv if argv is None else argv)
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    ros_process.stop_on_signals()
    node = PolicyWatchdog()
    executor = SingleThreadedExecutor()  # see gato_ros.node.main: the multi-threaded one busy-waits
    executor.add_node(node)
    try:
        ros_process.spin_until_stopped(executor)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ros_io.add_ros_arguments(parser, "gato-ros watchdog --ros-args -p output_mode:=effort -p control_rate_hz:=20.0")


def run(args: argparse.Namespace) -> int:
    return main(ros_io.ros_argv("gato-ros-watchdog", args))


if __name__ == "__main__":
    sys.exit(main())
