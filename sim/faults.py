"""Fault trials over ROS: each fault the arm's contract names, injected into a running closed loop.

On `sim.rig.LoopRig` (bridge, watchdog and policy, each its own process, and an observer here), a trial
injects one fault, watches `watch_s` seconds, ends the fault and waits for the policy's commands to
reach the controller again (recovery). Faults:

    sigkill, sigstop   the policy process is killed / stopped (a hang)            the watchdog acts
    blocked_tick       a tick blocks inside the policy (the policy runs in this
                       process; its runtime waits on an Event)                      the watchdog acts
    overrun            every runtime step takes 1.5 periods                         whichever is first
    nonfinite_decode   the model's logits turn NaN                                  the node acts
    missing_input      joint states stop reaching the node                          the node acts
    stale_input        joint states arrive stamped 2 s in the past                  the node acts
    invalid_input      joint states arrive with NaN positions                       the node acts

From what the observer received it measures: the first safe action on the controller topic (a command
that is not the policy's, so the watchdog's, or one of the node's ticks marked safe), its time after the
fault began and after the last fresh policy command that reached the controller, who sent it, and how
far the hand moved from where it was when the fault began over the watch.

With the node, each trial starts a new episode (the node's and the bridge's ~/reset) and strikes a random
0.5-7 s into it, and the node and the watchdog run on the bridge's /clock (the policy in lockstep with the
sim, as trained and evaluated; the watchdog still judges silence on the steady clock).

The policy is `policy_node` serving a model, or `ReachPolicy`: a stand-in that publishes stamped
commands exactly as the node does (gato_ros.commands), a joint PD toward a slowly moving target with the
gripper closed, so the arm moves when a fault hits (it supports the process faults and blocked_tick).
Used by tests/test_watchdog.py (a few trials) and scripts/fault_trials.py (>= 20 of each).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gato_ros.commands import JOINT_COMMAND_TOPIC
from sim.env import GRIPPER_CLOSE, HOME_Q, JOINT_NAMES
from sim.rig import Episodes, LoopRig

PROCESS_FAULTS = ("sigkill", "sigstop")
IN_PROCESS_FAULTS = ("blocked_tick", "overrun", "nonfinite_decode", "missing_input", "stale_input", "invalid_input")
FAULTS = PROCESS_FAULTS + IN_PROCESS_FAULTS
STAND_IN_FAULTS = PROCESS_FAULTS + ("blocked_tick",)
# The stand-in's joint PD: each joint a mass-spring at 7 rad/s, ζ = 0.35, over the Panda's joint inertia
# (diagonal ~1.0, 1.5, 1.0, 0.85, 0.04, 0.045, 0.0045 kg·m²): stable closed at 20 Hz over ROS in the sim
# near the home pose, where the stand-in moves. The watchdog holds with its default gains (the pose table's,
# stable in every pose: gato_ros/hold_table.py).
REACH_STIFFNESS = np.array([50.0, 75.0, 50.0, 42.0, 2.0, 2.2, 0.22])
REACH_DAMPING = np.array([5.0, 7.5, 5.0, 4.25, 0.2, 0.225, 0.0225])
SATURATED_NM = 86.0  # a shoulder torque command at the Panda's 87 N·m limit (the policy's top bin is 86.9)
STAND_IN_NAME = "gato_policy"  # the stand-in takes the node's name, so its ~/joint_command is the same topic


@dataclass
class TrialResult:
    fault: str
    time_to_safe_s: float  # first safe action on the controller topic, after the fault began (nan: none)
    after_last_fresh_s: float  # ... after the last fresh policy command the controller received
    safe_by: str  # "watchdog" or "node"
    hand_drift_m: float  # farthest the hand got from where it was when the fault began, over the watch
    safe_commands: int  # safe actions the controller received during the watch
    recovered: bool = False
    hand_speed_before_m_s: float = math.nan  # the hand's top speed in the second before the fault (policy flailing?)
    saturated_before: float = math.nan  # share of the policy's commands in that second at a shoulder joint's limit


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
            tau = REACH_STIFFNESS * (reach_target(time.time()) - q) - REACH_DAMPING * qd
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


# ----------------------------------------------------------------------------- faults inside the policy


class FaultyRuntime:
    """The node's PolicyRuntime with a fault switched on from outside: a blocked, slow or non-finite step."""

    def __init__(self, runtime: Any, period_s: float) -> None:
        self.runtime, self.period_s = runtime, period_s
        self.fault = "none"
        self.release = threading.Event()
        self.release.set()
        # The runtime's own step calls its own forward: the NaN logits go in there, on the instance.
        self._forward = runtime.forward
        runtime.forward = self.forward

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runtime, name)

    def step_tokens(self, observation: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> np.ndarray:
        if self.fault == "blocked_tick":
            self.release.wait()
        elif self.fault == "overrun":
            time.sleep(1.5 * self.period_s)
        return self.runtime.step_tokens(observation, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        logits = self._forward(*args, **kwargs)
        return np.full_like(logits, np.nan) if self.fault == "nonfinite_decode" else logits


class LocalPolicy:
    """A policy run in this process (its own context and executor thread), with a fault switch."""

    def __init__(self, rig: LoopRig) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.runtime: FaultyRuntime | None = None
        self.blocker: threading.Event | None = None
        if rig.policy == "stand_in":
            self.node = make_reach_policy(context=self.context)
            self.blocker = self.node.blocker
        else:
            from gato_ros.node import PolicyNode, autostart

            args = ["--ros-args"] + [a for p in rig.node_parameters() for a in ("-p", p)]
            self.node = PolicyNode(context=self.context, cli_args=args)
            autostart(self.node)
            if self.node.loop is None:
                raise RuntimeError(f"the in-process policy node did not configure: {self.node.last_error}")
            self.runtime = FaultyRuntime(self.node.runtime, rig.period_s)
            self.node.runtime = self.node.loop.runtime = self.runtime
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def inject(self, fault: str, rig: LoopRig) -> None:
        if fault in ("missing_input", "stale_input", "invalid_input"):
            rig.input_fault = fault.removesuffix("_input")
        elif self.runtime is not None:
            self.runtime.fault = fault
            if fault == "blocked_tick":
                self.runtime.release.clear()
        elif fault == "blocked_tick" and self.blocker is not None:
            self.blocker.clear()
        else:
            raise ValueError(f"the stand-in policy cannot take fault {fault!r}")

    def end(self, rig: LoopRig) -> None:
        rig.input_fault = "none"
        if self.runtime is not None:
            self.runtime.fault = "none"
            self.runtime.release.set()
        if self.blocker is not None:
            self.blocker.set()

    def close(self) -> None:
        import rclpy

        if self.runtime is not None:
            self.runtime.release.set()
        if self.blocker is not None:
            self.blocker.set()
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.thread.join(timeout=5)


# ----------------------------------------------------------------------------- the trials


class FaultRig(LoopRig):
    """`LoopRig` with `trial(fault)`. In-process faults switch the policy to this process (once)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("relay_inputs", kwargs.get("policy", "stand_in") == "node")
        if kwargs.get("policy") == "node":
            kwargs.setdefault("max_steps", 200)  # the evaluation's episodes: each trial starts one
            # In lockstep with the sim, as the policy was trained (on the wall clock, out of step, the shipped
            # policy often saturates before any fault: scripts/soak.py --wall-clock).
            kwargs.setdefault("sim_time", True)
        super().__init__(*args, **kwargs)
        self.local: LocalPolicy | None = None
        self.rng = np.random.default_rng(0)
        self.episodes: Episodes | None = None

    def stop(self) -> dict[str, int]:
        if self.local is not None:
            self.local.close()
            self.local = None
        return super().stop()

    def _use_local_policy(self, local: bool, settle_s: float) -> None:
        if local == (self.local is not None):
            return
        if local:
            self.end_policy_process()
            self.local = LocalPolicy(self)
        else:
            self.local.close()
            self.local = None
            self.start_policy()
        if not self.wait_relaying(120.0):
            raise RuntimeError(f"no policy commands reach the controller\n{self.logs()}")
        time.sleep(settle_s)  # the switch was a fault of its own: let the arm settle

    def trial(self, fault: str, watch_s: float = 1.0, recover_timeout_s: float = 60.0,
              settle_s: float = 1.0) -> TrialResult:
        """One fault: (with the node: a new episode, then a random 0.5-7 s of it) inject, watch `watch_s`, end
        it, wait for recovery and `settle_s` more."""
        if fault not in FAULTS or (self.policy == "stand_in" and fault not in STAND_IN_FAULTS):
            raise ValueError(f"fault must be one of {STAND_IN_FAULTS if self.policy == 'stand_in' else FAULTS}")
        self._use_local_policy(fault in IN_PROCESS_FAULTS, settle_s)
        if self.policy == "node":
            # A new episode, and the fault somewhere in its first 7 s (approach, grasp or carry): the policy
            # acts as it was trained to, not on an arm left wherever the last fault put it.
            self.episodes = self.episodes or Episodes(self)
            self.episodes.next()
            time.sleep(float(self.rng.uniform(0.5, 7.0)))
        if not self.wait_relaying(60.0):
            raise RuntimeError(f"no policy commands reach the controller before the trial\n{self.logs()}")
        proc = self.procs.procs.get("policy")
        t_fault = time.monotonic()
        if fault == "sigkill":
            proc.send_signal(signal.SIGKILL)
        elif fault == "sigstop":
            proc.send_signal(signal.SIGSTOP)
        else:
            self.local.inject(fault, self)
        time.sleep(watch_s)
        result = self.measure(fault, t_fault, time.monotonic())
        if fault == "sigkill":
            self.end_policy_process()
            self.start_policy()
        elif fault == "sigstop":
            proc.send_signal(signal.SIGCONT)
        else:
            self.local.end(self)
        result.recovered = self.wait_relaying(recover_timeout_s)
        time.sleep(settle_s)  # the arm settles back on the policy's motion before the next fault
        return result

    def measure(self, fault: str, t_fault: float, until: float) -> TrialResult:
        seen = self.seen
        with seen.lock:
            policy = {values for *_, values in seen.commands}
            node_safe = {tuple(record["command"][:7]) for _, record in seen.ticks if record.get("safe")}
            controller = [(t, v) for t, _, v in seen.controller if t_fault - 2.0 <= t <= until]
            hand = [(t, h) for t, h in seen.hand if t_fault - 2.0 <= t <= until]

        def is_safe(values: tuple[float, ...]) -> bool:
            return values not in policy or values in node_safe

        first = next(((t, v) for t, v in controller if t >= t_fault and is_safe(v)), None)
        if first is None:
            return TrialResult(fault, math.nan, math.nan, "", math.nan, 0)
        last_fresh = max((t for t, v in controller if t <= first[0] and not is_safe(v)), default=math.nan)
        safe = sum(1 for t, v in controller if t >= first[0] and is_safe(v))
        before = [h for t, h in hand if t <= t_fault]
        after = [h for t, h in hand if t >= t_fault]
        drift = max((float(np.linalg.norm(h - before[-1])) for h in after), default=math.nan) if before else math.nan
        # Consecutive observations are one control period apart in sim time (their receive times jitter).
        last_second = [h for t, h in hand if t_fault - 1.0 <= t <= t_fault]
        speed = max((float(np.linalg.norm(h1 - h0)) / self.period_s
                     for h0, h1 in zip(last_second, last_second[1:], strict=False)), default=math.nan)
        # A policy pushing joints 1-4 at their 87 N·m limit has lost control (an arm pinned at its joint limits looks
        # still); the shipped policy's commands stay well inside the limits while it works.
        pushed = [max(abs(x) for x in v[:4]) >= SATURATED_NM for t, v in controller
                  if t_fault - 1.0 <= t <= t_fault and not is_safe(v)]
        return TrialResult(fault, first[0] - t_fault, first[0] - last_fresh,
                           "watchdog" if first[1] not in policy else "node", drift, safe,
                           hand_speed_before_m_s=speed,
                           saturated_before=float(np.mean(pushed)) if pushed else math.nan)


if __name__ == "__main__":
    sys.exit(stand_in_main())
