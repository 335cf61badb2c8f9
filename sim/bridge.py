"""The PyBullet arm as a ROS 2 robot: `gato-ros sim` / console script `sim_bridge`.

It looks to the policy exactly like the real arm's contract (DESIGN.md "The arm's contract"):
publishes /joint_states, /camera/image_raw (+ /camera/camera_info) and /gato/observations/<key> for
the other observation keys; subscribes /effort_controller/commands (std_msgs/Float64MultiArray, the
ros2_control effort forward-command controller's interface). Like Franka's torque interface the env
adds gravity compensation, so the zero command holds the arm: it applies when the last command is
older than `command_timeout_s` (sim time), and when a command is rejected (wrong length, NaN, inf).

The env steps in a thread of its own at `real_time_factor` × real time (0 = as fast as it can) and
publishes /clock, so nodes with use_sim_time follow it. Services: ~/reset (std_srvs/Trigger) starts
an episode with the `seed` parameter (then seed + 1 for the next one); ~/status (Trigger) reports
the episode as JSON in `message` and success in `success`. A NaN physics state ends the episode as
a failure, logged as an error, and the env resets.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

from sim.env import JOINT_NAMES, StackingEnv

PARAMETERS: dict[str, Any] = {
    "seed": 0,
    "image_size": 64,  # 0 = no camera (rendering costs ~38 ms a frame)
    "real_time_factor": 1.0,  # 0 = as fast as possible
    "command_timeout_s": 0.2,  # sim time; an older command is replaced by the zero (holding) command
    "max_steps": 200,
    "publish_clock": True,
    "joint_states_topic": "/joint_states",
    "image_topic": "/camera/image_raw",
    "camera_info_topic": "/camera/camera_info",
    "command_topic": "/effort_controller/commands",
    "observation_prefix": "/gato/observations/",
}


class SimBridge(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("sim_bridge", **kwargs)
        for name, default in PARAMETERS.items():
            self.declare_parameter(name, default)
        prm = {name: self.get_parameter(name).value for name in PARAMETERS}
        self.prm = prm
        self.env = StackingEnv(image_size=prm["image_size"] or None, max_steps=prm["max_steps"])
        self.period = 1.0 / self.env.config.control_hz
        self.lock = threading.Lock()  # env and episode state: the step thread vs the services
        self.sim_time = 0.0
        self.command = np.zeros(8)
        self.command_time = -math.inf
        self.rejected = 0
        self.timeouts = 0
        self.seed = int(prm["seed"])  # the next episode's; setting the parameter chooses it
        self.episode: dict[str, Any] = {}
        self.joint_pub = self.create_publisher(JointState, prm["joint_states_topic"], qos_profile_sensor_data)
        self.image_pub = self.create_publisher(Image, prm["image_topic"], qos_profile_sensor_data)
        self.info_pub = self.create_publisher(CameraInfo, prm["camera_info_topic"], qos_profile_sensor_data)
        self.clock_pub = self.create_publisher(Clock, "/clock", QoSProfile(depth=10)) if prm["publish_clock"] else None
        self.vector_pubs: dict[str, Any] = {}
        self.create_subscription(Float64MultiArray, prm["command_topic"], self._on_command, 10)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_service(Trigger, "~/status", self._on_status)
        with self.lock:
            self._reset_locked()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.env.close()

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        for param in params:
            if param.name == "seed":
                with self.lock:
                    self.seed = int(param.value)
        return SetParametersResult(successful=True)

    # --- commands ---

    def _on_command(self, msg: Float64MultiArray) -> None:
        cmd = np.asarray(msg.data, dtype=np.float64)
        if cmd.shape != (8,) or not np.all(np.isfinite(cmd)):
            self.rejected += 1
            reason = f"{cmd.size} values, expected 8" if cmd.shape != (8,) else "NaN or inf"
            self.get_logger().warning(f"command rejected ({reason}): holding", throttle_duration_sec=1.0)
            with self.lock:
                self.command, self.command_time = np.zeros(8), self.sim_time  # the hold command applies
            return
        with self.lock:
            self.command, self.command_time = cmd, self.sim_time

    # --- episodes ---

    def _reset_locked(self) -> None:
        obs, _ = self.env.reset(seed=self.seed)
        self.episode = {"seed": self.seed, "steps": 0, "success": False, "done": False, "nan": False}
        self.seed += 1
        self.command, self.command_time = np.zeros(8), -math.inf
        self._publish(obs)

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self.lock:
            self._reset_locked()
            response.success, response.message = True, json.dumps(self.episode)
        return response

    def _on_status(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self.lock:
            response.success = bool(self.episode["success"])
            response.message = json.dumps({**self.episode, "rejected_commands": self.rejected,
                                           "command_timeouts": self.timeouts, "sim_time": self.sim_time})
        return response

    # --- stepping ---

    def _step_once(self) -> None:
        with self.lock:
            if self.sim_time - self.command_time > self.prm["command_timeout_s"]:
                self.timeouts += 1
                command = np.zeros(8)
            else:
                command = self.command
            obs, _, terminated, truncated, info = self.env.step(command)
            self.sim_time += self.period
            if not self.episode["done"]:
                self.episode["steps"] += 1
            if info.get("nan"):
                self.get_logger().error(f"NaN physics state in episode seed {self.episode['seed']} at step "
                                        f"{info.get('steps')}: episode failed, resetting")
                self.episode.update(done=True, nan=True, success=False)
                failed = dict(self.episode)
                self._reset_locked()
                self.episode["previous"] = failed
                return
            if (terminated or truncated) and not self.episode["done"]:
                self.episode.update(done=True, success=bool(info.get("success")))
                self.get_logger().info(f"episode seed {self.episode['seed']}: "
                                       f"{'success' if self.episode['success'] else 'failure'} "
                                       f"after {self.episode['steps']} steps")
            self._publish(obs)

    def _run(self) -> None:
        rtf = float(self.prm["real_time_factor"])
        next_t = time.monotonic()
        while not self._stop.is_set() and rclpy.ok(context=self.context):
            try:
                self._step_once()
            except Exception as err:  # the bridge must survive anything a step throws
                self.get_logger().error(f"sim step failed: {type(err).__name__}: {err}")
            if rtf > 0:
                next_t += self.period / rtf
                delay = next_t - time.monotonic()
                if delay < -self.period:  # far behind: re-anchor instead of bursting to catch up
                    next_t = time.monotonic()
                time.sleep(max(0.0, delay))

    def _publish(self, obs: dict[str, np.ndarray]) -> None:
        stamp = Time(nanoseconds=int(round(self.sim_time * 1e9))).to_msg()
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=stamp))
        js = JointState(name=list(JOINT_NAMES), position=obs["joint_positions"].tolist(),
                        velocity=obs["joint_velocities"].tolist())
        js.header.stamp = stamp
        self.joint_pub.publish(js)
        if "image" in obs:
            img = obs["image"]
            h, w = img.shape[:2]
            msg = Image(height=h, width=w, encoding="rgb8", step=w * 3, data=img.tobytes())
            msg.header.stamp, msg.header.frame_id = stamp, "camera"
            self.image_pub.publish(msg)
            self.info_pub.publish(self._camera_info(h, w, stamp))
        for key, value in obs.items():
            if key in ("joint_positions", "joint_velocities", "image"):
                continue
            if key not in self.vector_pubs:
                self.vector_pubs[key] = self.create_publisher(
                    Float64MultiArray, self.prm["observation_prefix"] + key, qos_profile_sensor_data)
            self.vector_pubs[key].publish(Float64MultiArray(data=np.asarray(value, np.float64).reshape(-1).tolist()))

    def _camera_info(self, h: int, w: int, stamp: Any) -> CameraInfo:
        f = 0.5 * h / math.tan(math.radians(self.env.config.camera["fov"]) / 2)  # vertical fov, square pixels
        info = CameraInfo(height=h, width=w, distortion_model="plumb_bob", d=[0.0] * 5)
        info.k = [f, 0.0, w / 2, 0.0, f, h / 2, 0.0, 0.0, 1.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.p = [f, 0.0, w / 2, 0.0, 0.0, f, h / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
        info.header.stamp, info.header.frame_id = stamp, "camera"
        return info


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    bridge = SimBridge()
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(bridge)
    bridge.start()
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        bridge.stop()
        executor.shutdown()
        bridge.destroy_node()
        rclpy.try_shutdown()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Parameters as ROS arguments, e.g. gato-ros sim --ros-args -p seed:=3 -p real_time_factor:=2.0"
    parser.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=None,
                        help="ROS arguments (-p name:=value, --params-file FILE, -r remaps), passed to rclpy")


def run(args: argparse.Namespace) -> int:
    return main(["gato-ros-sim"] + (["--ros-args", *args.ros_args] if args.ros_args is not None else []))


if __name__ == "__main__":
    sys.exit(main())
