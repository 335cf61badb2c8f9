"""The closed loop as a robot runs it, for measurements from outside every process.

`LoopRig` starts `sim_bridge` (at real time), `policy_watchdog` and a policy — `policy_node`
serving an ONNX model, or the stand-in `ReachPolicy` (sim/faults.py) — each as its own process, or the
policy in this process where a fault must be injected inside it. An observer node here records, with
their receive times:

    controller   the arm controller topic (what the arm gets: relayed commands, safe actions)
    commands     the policy's stamped commands (`gato_policy/joint_command`): stamp, arm values
    ticks        the node's tick records (`gato_policy/tick`): whether the tick was safe, and why
    hand         the hand position (from `gato/observations/task_state`)
    diagnostics  the latest status of each node on /diagnostics

Clocks: by default every node runs on the wall clock and the bridge stamps with it, like a real arm's
driver, and the policy ticks out of step with the sim. With `sim_time` the node and the watchdog run on the
bridge's /clock, so the policy's tick t answers observation t as in the evaluation (the policy was trained
in that lockstep); the watchdog still judges silence on the steady clock (`silence_clock:=steady`).

Faults in the input are injected by an input relay: with `relay_inputs` the policy reads
`policy_in/joint_states`, which this process forwards from `joint_states` unless told to stop (missing),
to stamp them in the past (stale) or to corrupt them (invalid).
Used by sim/faults.py (fault trials), scripts/jitter.py and scripts/soak.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gato_ros.commands import ARM_COMMAND_TOPICS
from sim.ros_eval import Processes, _console_script, model_image_size

POLICY_COMMAND_TOPIC = "gato_policy/joint_command"  # the node's ~/joint_command (node name gato_policy)
POLICY_TICK_TOPIC = "gato_policy/tick"
RELAYED_JOINT_STATES = "policy_in/joint_states"
INPUT_FAULTS = ("none", "missing", "stale", "invalid")


@dataclass
class Seen:
    """What the observer received; times are time.monotonic() at receipt unless named wall."""

    controller: list[tuple[float, float, tuple[float, ...]]] = field(default_factory=list)  # (t, wall, values)
    commands: list[tuple[float, float, float, tuple[float, ...]]] = field(default_factory=list)  # (t, wall, stamp, arm)
    ticks: list[tuple[float, dict]] = field(default_factory=list)
    hand: list[tuple[float, np.ndarray]] = field(default_factory=list)
    diagnostics: dict[str, dict[str, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.controller.clear()
            self.commands.clear()
            self.ticks.clear()
            self.hand.clear()


class LoopRig:
    """Bridge + watchdog + policy and an observer (module docstring).

    policy: "stand_in", "node" (a `policy_node` process) or "none" (the caller runs one in this process).
    `model_path` for the node; `node_args` and `watchdog_args` more `name:=value` parameters.
    `watchdog=False` with `direct_output` runs the node straight to the controller (the relay's cost).
    """

    def __init__(self, log_dir: Path, policy: str = "stand_in", model_path: str = "", rate_hz: float = 20.0,
                 watchdog: bool = True, direct_output: bool = False, relay_inputs: bool = False,
                 sim_time: bool = False,
                 node_args: list[str] | None = None, watchdog_args: list[str] | None = None,
                 max_steps: int = 1_000_000, keep: int = 200_000) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.policy, self.model_path, self.rate_hz = policy, model_path, rate_hz
        self.period_s = 1.0 / rate_hz
        self.watchdog, self.direct_output, self.relay_inputs = watchdog, direct_output, relay_inputs
        self.sim_time = sim_time
        self.node_args = list(node_args or [])
        self.watchdog_args = list(watchdog_args or [])  # more `-p name:=value` for the watchdog
        self.max_steps = max_steps  # the bridge's episode length (an episode that ends leaves the arm controlled)
        self.keep = keep  # the observer keeps this many of each record (a soak runs for long)
        self.procs = Processes(self.log_dir)
        self.seen = Seen()
        self.input_fault = "none"
        self.context: Any = None
        self.node: Any = None

    # --- processes ---

    def start(self, settle_s: float = 2.0) -> None:
        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        image_size = model_image_size(self.model_path) if self.model_path else 0
        self.procs.start("bridge", _console_script("sim_bridge", "sim.bridge") + [
            "--ros-args", "-p", f"image_size:={image_size}", "-p", f"max_steps:={self.max_steps}",
            *(["-p", f"model_path:={self.model_path}"] if self.model_path else []),  # its spec's cameras
            "-p", "real_time_factor:=1.0", "-p", f"wall_clock_stamps:={str(not self.sim_time).lower()}",
            "--log-level", "warn"])
        if self.watchdog:
            clock = ["use_sim_time:=true", "silence_clock:=steady"] if self.sim_time else []
            self.procs.start("watchdog", _console_script("policy_watchdog", "gato_ros.watchdog") + [
                "--ros-args", "-p", f"control_rate_hz:={self.rate_hz}",
                *[a for param in clock + self.watchdog_args for a in ("-p", param)]])
        self._start_observer()
        if self.policy != "none":
            self.start_policy()
            if not self.wait_relaying(120.0):
                raise RuntimeError(f"no policy commands reach the controller\n{self.logs()}")
            time.sleep(settle_s)  # the arm catches up with the policy's motion from the home pose

    def node_parameters(self) -> list[str]:
        """The policy node's `-p` arguments: model, rate, one ONNX thread, outputs, inputs."""
        params = [f"model_path:={self.model_path}", f"control_rate_hz:={self.rate_hz}", "threads:=1",
                  "autostart:=true", f"direct_output:={str(self.direct_output).lower()}",
                  f"use_sim_time:={str(self.sim_time).lower()}"]
        if self.relay_inputs:
            params.append(f"joint_states_topic:={RELAYED_JOINT_STATES}")
        return params + self.node_args

    def start_policy(self) -> None:
        if self.policy == "stand_in":
            argv = [_python(), "-m", "sim.faults"]
        else:
            argv = _console_script("policy_node", "gato_ros.node") + ["--ros-args"]
            for param in self.node_parameters():
                argv += ["-p", param]
        self.procs.start("policy", argv)

    def end_policy_process(self) -> None:
        proc = self.procs.procs.pop("policy", None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.procs.items() if proc.poll() is None}

    def logs(self, chars: int = 1500) -> str:
        return "\n".join(f"--- {name} ---\n{self.procs.log_tail(name, chars)}" for name in self.procs.procs)

    def stop(self) -> dict[str, int]:
        codes = self.procs.stop()
        if self.context is not None:
            import rclpy

            self.executor.shutdown()
            self.node.destroy_node()
            rclpy.try_shutdown(context=self.context)
            self.thread.join(timeout=5)
            self.context = None
        return codes

    # --- the observer (and the input relay) ---

    def _start_observer(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64MultiArray, String

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = node = rclpy.create_node(f"loop_observer_{os.getpid()}", context=self.context)
        seen, keep = self.seen, self.keep

        def add(records: list, item: Any) -> None:
            with seen.lock:
                records.append(item)
                if len(records) > keep:
                    del records[: keep // 10]

        def on_controller(msg: Float64MultiArray) -> None:
            add(seen.controller, (time.monotonic(), time.time(), tuple(msg.data)))

        def on_command(msg: JointState) -> None:
            now, wall = time.monotonic(), time.time()
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            add(seen.commands, (now, wall, stamp, tuple(msg.effort[:7])))

        def on_tick(msg: String) -> None:
            add(seen.ticks, (time.monotonic(), json.loads(msg.data)))

        def on_task(msg: Float64MultiArray) -> None:
            add(seen.hand, (time.monotonic(), np.array(msg.data[0:3])))

        def on_diagnostics(msg: DiagnosticArray) -> None:
            with seen.lock:
                for status in msg.status:
                    seen.diagnostics[status.name] = {kv.key: kv.value for kv in status.values}

        node.create_subscription(Float64MultiArray, ARM_COMMAND_TOPICS["effort"], on_controller, 100)
        node.create_subscription(JointState, POLICY_COMMAND_TOPIC, on_command, 100)
        node.create_subscription(String, POLICY_TICK_TOPIC, on_tick, 100)
        node.create_subscription(Float64MultiArray, "gato/observations/task_state", on_task, qos_profile_sensor_data)
        node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
        if self.relay_inputs:
            relay_pub = node.create_publisher(JointState, RELAYED_JOINT_STATES, qos_profile_sensor_data)
            node.create_subscription(JointState, "joint_states", lambda m: self._relay(m, relay_pub),
                                     qos_profile_sensor_data)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _relay(self, msg: Any, pub: Any) -> None:
        fault = self.input_fault
        if fault == "missing":
            return
        if fault == "stale":  # measured two seconds ago, delivered now
            ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec - 2_000_000_000
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(max(ns, 0), 1_000_000_000)
        elif fault == "invalid":
            msg.position = [float("nan")] * len(msg.position)
        pub.publish(msg)

    # --- reading what was seen ---

    def relaying(self, since: float, count: int = 5) -> bool:
        """At least `count` controller commands after `since` that are the policy's own (relayed or direct)
        and not a safe action of the node's."""
        with self.seen.lock:
            policy = {values for *_, values in self.seen.commands}
            policy -= {tuple(record["command"][:7]) for _, record in self.seen.ticks if record.get("safe")}
            relayed = [t for t, _, values in self.seen.controller if t > since and values in policy]
        return len(relayed) >= count

    def wait_relaying(self, timeout_s: float) -> bool:
        since = time.monotonic()
        end = since + timeout_s
        while time.monotonic() < end:
            self.procs.check()
            if self.relaying(since):
                return True
            time.sleep(0.05)
        return False

    def diagnostics(self, node: str) -> dict[str, str]:
        """The latest diagnostics of node `node` of this rig (root namespace)."""
        with self.seen.lock:
            return next((dict(v) for k, v in self.seen.diagnostics.items() if k.startswith(f"/{node}:")), {})


class Episodes:
    """~/reset of the node and of the bridge, and the bridge's ~/status, called from the rig's observer."""

    def __init__(self, rig: LoopRig) -> None:
        from std_srvs.srv import Trigger

        self.node_reset = rig.node.create_client(Trigger, "gato_policy/reset")
        self.bridge_reset = rig.node.create_client(Trigger, "sim_bridge/reset")
        self.bridge_status = rig.node.create_client(Trigger, "sim_bridge/status")
        self.count = self.successes = self.stale_steps = self.steps = 0

    @staticmethod
    def _call(client: Any, tries: int = 4) -> Any:
        """A Trigger call; asked again when unanswered (a request sent while a restarted server's reader is
        still being matched is lost)."""
        from std_srvs.srv import Trigger

        if not client.wait_for_service(timeout_sec=30.0):
            raise TimeoutError(f"{client.srv_name} is not available")
        for _ in range(tries):
            future = client.call_async(Trigger.Request())
            end = time.monotonic() + 5.0
            while not future.done() and time.monotonic() < end:
                time.sleep(0.01)
            if future.done():
                return future.result()
            client.remove_pending_request(future)
        raise TimeoutError(f"{client.srv_name} did not answer {tries} requests")

    def status(self) -> dict:
        return json.loads(self._call(self.bridge_status).message)

    def next(self) -> None:
        """Account the episode that ends, then start the next one: the bridge first, then the node's context (its
        fresh context then starts on the new episode; the other order let it see the old episode's last steps and
        then the arm jump home, and the policy sometimes flailed from there)."""
        status = self.status()
        self.count += 1
        self.successes += bool(status["success"])
        self.stale_steps += int(status["stale_steps"])
        self.steps += int(status["steps"])
        self._call(self.bridge_reset)
        self._call(self.node_reset)


def _python() -> str:
    import sys

    return sys.executable


def machine() -> str:
    """The CPU model and core count, for the line under every number a script prints."""
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return f"{model or 'unknown CPU'}, {os.cpu_count()} cores, no GPU in use"


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MiB; nan when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")
