"""Fault injection over ROS: the sim bridge, the policy watchdog and a policy, each its own process.

What the watchdog guarantees (gato_ros.watchdog), measured from outside every process: an observer in
this process subscribes the controller topic, the policy's stamped commands and the hand position.
A trial injects one fault into the policy — SIGKILL, SIGSTOP (a hang) or a tick blocked inside the
process — and measures

    time to safe  from the last relayed policy command to the first other command on the controller
                  topic (the watchdog's safe action), both as the observer received them
    hand drift    how far the hand moved from where it was at the last relayed command, over the next
                  `watch_s` seconds (the arm was moving under the policy when the fault hit)

then ends the fault (restart, SIGCONT, release) and waits for relayed commands again (recovery).

The policy is `policy_node` (the shipped model) or, for the watchdog's own tests, `ReachPolicy`: a
stand-in that publishes stamped commands exactly as the node does (gato_ros.commands), a joint PD
toward a slowly moving target with the gripper closed, so the arm moves when a fault hits.
Used by tests/test_watchdog.py (a few trials) and scripts/fault_trials.py (>= 20 of each).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gato_ros.commands import ARM_COMMAND_TOPICS, JOINT_COMMAND_TOPIC
from sim.env import GRIPPER_CLOSE, HOME_Q, JOINT_NAMES
from sim.ros_eval import Processes, _console_script

FAULTS = ("sigkill", "sigstop", "blocked_tick")
POLICY_COMMAND_TOPIC = "gato_policy/joint_command"  # the node's ~/joint_command, node name gato_policy
STAND_IN_NAME = "gato_policy"  # the stand-in takes the node's name, so its ~/joint_command is the same topic


@dataclass
class TrialResult:
    fault: str
    time_to_safe_s: float  # nan: no safe action seen
    hand_drift_m: float
    recovered: bool
    safe_commands: int  # safe actions the observer received during the fault


@dataclass
class Received:
    """What the observer saw, with perf_counter receive times."""

    controller: list[tuple[float, tuple[float, ...]]] = field(default_factory=list)
    policy: list[tuple[float, tuple[float, ...]]] = field(default_factory=list)
    hand: list[tuple[float, np.ndarray]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


# ----------------------------------------------------------------------------- the stand-in policy


def reach_target(t: float) -> np.ndarray:
    """A slow figure in joint space around the home pose at wall time `t`: the arm is always moving (the hand
    at up to ~3 cm/s), and a restarted stand-in carries on where the last one was."""
    return HOME_Q + np.array([0.1 * math.sin(0.4 * t), 0.05 * math.sin(0.3 * t), 0.0,
                              0.05 * math.sin(0.35 * t), 0.0, 0.0, 0.0])


def make_reach_policy(context: Any = None, **kwargs: Any) -> Any:
    """The stand-in policy node (module docstring); `node.blocker` (an Event) blocks its tick while cleared.

    It ticks on each joint state (the bridge publishes them at the control rate): a torque-level PD closed at
    20 Hz through ROS is only stable without a period of delay, and a stand-in must not shake the arm."""
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import JointState

    from gato_ros.watchdog import PANDA_HOLD_DAMPING, PANDA_HOLD_STIFFNESS

    class ReachPolicy(Node):
        def __init__(self) -> None:
            super().__init__(STAND_IN_NAME, context=context, **kwargs)
            self.blocker = threading.Event()
            self.blocker.set()
            self.pub = self.create_publisher(JointState, JOINT_COMMAND_TOPIC, 10)
            self.create_subscription(JointState, "joint_states", self._tick, qos_profile_sensor_data)

        def _tick(self, joints: JointState) -> None:
            stamp = self.get_clock().now().to_msg()  # the start of the tick, as the node stamps it
            self.blocker.wait()  # a test clears it: this tick blocks inside the process
            q, qd = np.array(joints.position[:7]), np.array(joints.velocity[:7])
            target = reach_target(time.time())
            tau = np.asarray(PANDA_HOLD_STIFFNESS) * (target - q) - np.asarray(PANDA_HOLD_DAMPING) * qd
            msg = JointState(name=list(JOINT_NAMES), effort=[*tau.tolist(), GRIPPER_CLOSE])
            msg.header.stamp = stamp
            self.pub.publish(msg)

    return ReachPolicy()


def stand_in_main(argv: list[str] | None = None) -> int:
    """`python -m sim.faults`: the stand-in policy as its own process (for SIGKILL / SIGSTOP)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    rclpy.init(args=list(sys.argv if argv is None else argv))
    node = make_reach_policy()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        rclpy.try_shutdown()
    return 0


# ----------------------------------------------------------------------------- the rig


class FaultRig:
    """Bridge + watchdog (+ a policy process) and an observer; `trial(fault)` runs one fault end to end.

    `policy`: "stand_in" (ReachPolicy) or "node" (policy_node with `model_path`). The blocked tick runs
    its policy in this process (`in_process_policy`, a callable that returns (node, blocker Event)).
    """

    def __init__(self, log_dir: Path, policy: str = "stand_in", rate_hz: float = 20.0,
                 watchdog_args: list[str] | None = None, node_args: list[str] | None = None,
                 in_process_policy: Any = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.policy, self.rate_hz, self.period_s = policy, rate_hz, 1.0 / rate_hz
        self.watchdog_args = list(watchdog_args or [])
        self.node_args = list(node_args or [])
        self.in_process_policy = in_process_policy
        self.procs = Processes(self.log_dir)
        self.seen = Received()
        self.context = self.node = self.executor = self.thread = None
        self.local_policy: Any = None

    # --- processes ---

    def start(self) -> None:
        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        self.procs.start("bridge", _console_script("sim_bridge", "sim.bridge") + [
            "--ros-args", "-p", "image_size:=0", "-p", "max_steps:=1000000", "-p", "real_time_factor:=1.0",
            "--log-level", "warn"])
        self.procs.start("watchdog", _console_script("policy_watchdog", "gato_ros.watchdog") + [
            "--ros-args", "-p", f"control_rate_hz:={self.rate_hz}", *self.watchdog_args])
        self._start_observer()
        self.start_policy()
        if not self.wait_relaying(120.0):
            raise RuntimeError(f"the watchdog relays no policy commands\n{self.procs.log_tail('watchdog')}")
        time.sleep(2.0)  # the arm catches up with the policy's motion from the home pose

    def start_policy(self) -> None:
        if self.policy == "stand_in":
            argv = [sys.executable, "-m", "sim.faults"]
        else:
            argv = _console_script("policy_node", "gato_ros.node") + ["--ros-args", *self.node_args]
        self.procs.start("policy", argv)

    def _end_policy_process(self) -> None:
        proc = self.procs.procs.pop("policy", None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def stop(self) -> dict[str, int]:
        if self.local_policy is not None:
            self._stop_local_policy()
        codes = self.procs.stop()
        if self.context is not None:
            import rclpy

            self.executor.shutdown()
            self.node.destroy_node()
            rclpy.try_shutdown(context=self.context)
            self.thread.join(timeout=5)
        return codes

    # --- observer ---

    def _start_observer(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64MultiArray

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"fault_observer_{os.getpid()}", context=self.context)
        seen = self.seen

        def on_controller(msg: Float64MultiArray) -> None:
            with seen.lock:
                seen.controller.append((time.perf_counter(), tuple(msg.data)))

        def on_policy(msg: JointState) -> None:
            with seen.lock:
                seen.policy.append((time.perf_counter(), tuple(msg.effort[:7])))

        def on_task(msg: Float64MultiArray) -> None:
            with seen.lock:
                seen.hand.append((time.perf_counter(), np.array(msg.data[0:3])))

        self.node.create_subscription(Float64MultiArray, ARM_COMMAND_TOPICS["effort"], on_controller, 100)
        self.node.create_subscription(JointState, POLICY_COMMAND_TOPIC, on_policy, 100)
        self.node.create_subscription(Float64MultiArray, "gato/observations/task_state", on_task,
                                      qos_profile_sensor_data)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _start_local_policy(self) -> Any:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        context = rclpy.Context()
        rclpy.init(context=context)
        node, blocker = (self.in_process_policy or _reach_with_blocker)(context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        thread = threading.Thread(target=executor.spin, daemon=True)
        thread.start()
        self.local_policy = (context, node, executor, thread, blocker)
        return blocker

    def _stop_local_policy(self) -> None:
        import rclpy

        context, node, executor, thread, blocker = self.local_policy
        blocker.set()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        thread.join(timeout=5)
        self.local_policy = None

    # --- measuring ---

    def relaying(self, since: float) -> bool:
        """Controller commands received after `since` that are the policy's own (relayed), at least 5 of them."""
        with self.seen.lock:
            policy = {values for _, values in self.seen.policy}
            relayed = [t for t, values in self.seen.controller if t > since and values in policy]
        return len(relayed) >= 5

    def wait_relaying(self, timeout_s: float) -> bool:
        since = time.perf_counter()
        end = since + timeout_s
        while time.perf_counter() < end:
            self.procs.check()
            if self.relaying(since):
                return True
            time.sleep(0.05)
        return False

    def measure(self, fault: str, t_fault: float, until: float) -> TrialResult:
        with self.seen.lock:
            policy = {values for _, values in self.seen.policy}
            controller = [(t, v) for t, v in self.seen.controller if t_fault - 1.0 <= t <= until]
            hand = [(t, h) for t, h in self.seen.hand if t_fault - 1.0 <= t <= until]
        first_safe = next(((t, v) for t, v in controller if t >= t_fault and v not in policy), None)
        if first_safe is None:
            return TrialResult(fault, math.nan, math.nan, False, 0)
        last_relayed = max((t for t, v in controller if t <= first_safe[0] and v in policy), default=math.nan)
        safe = sum(1 for t, v in controller if t >= first_safe[0] and v not in policy)
        before = [h for t, h in hand if t <= last_relayed]
        after = [h for t, h in hand if t >= last_relayed]
        drift = max((float(np.linalg.norm(h - before[-1])) for h in after), default=math.nan) if before else math.nan
        return TrialResult(fault, first_safe[0] - last_relayed, drift, False, safe)

    def trial(self, fault: str, watch_s: float = 1.0, recover_timeout_s: float = 30.0,
              settle_s: float = 1.0) -> TrialResult:
        """One fault: inject, watch `watch_s`, end it, wait for recovery and `settle_s` more."""
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        blocker = None
        if fault == "blocked_tick":  # the policy runs in this process for the duration of the trial
            self._end_policy_process()
            blocker = self._start_local_policy()
        if not self.wait_relaying(60.0):
            raise RuntimeError(f"no relayed commands before the trial\n{self.procs.log_tail('watchdog')}")
        if blocker is not None:
            time.sleep(settle_s)  # the switch to the in-process policy was a fault of its own: let the arm settle
        proc = self.procs.procs.get("policy")
        t_fault = time.perf_counter()
        if fault == "sigkill":
            proc.send_signal(signal.SIGKILL)
        elif fault == "sigstop":
            proc.send_signal(signal.SIGSTOP)
        else:
            blocker.clear()
        time.sleep(watch_s)
        result = self.measure(fault, t_fault, time.perf_counter())
        if fault == "sigkill":
            self._end_policy_process()
            self.start_policy()
        elif fault == "sigstop":
            proc.send_signal(signal.SIGCONT)
        else:
            blocker.set()
        result.recovered = self.wait_relaying(recover_timeout_s)
        time.sleep(settle_s)  # the arm settles back on the policy's motion before the next fault
        if fault == "blocked_tick":
            self._stop_local_policy()
            self.start_policy()
        return result


def _reach_with_blocker(context: Any) -> tuple[Any, threading.Event]:
    node = make_reach_policy(context=context)
    return node, node.blocker


if __name__ == "__main__":
    sys.exit(stand_in_main())
