"""The PyBullet arm as a ROS 2 robot: `gato-ros sim` / console script `sim_bridge`.

It looks to the policy exactly like the real arm's contract (DESIGN.md "The arm's contract"):
publishes joint_states, one sensor_msgs/Image (rgb8) + sensor_msgs/CameraInfo per camera and
gato/observations/<key> for the other observation keys, all relative so a namespace moves them, and takes
commands the way ros2_control controllers do (gato_ros.commands), in the `command_mode` chosen.

`arm` picks the simulated arm (sim/arms.py: `panda` or `xarm6`; "" = the default arm of the model at
`model_path`, else the Panda, as the node's `arm` reads ""). Its spec (sim.arms.embodiment_spec, or the
spec the model at `model_path` serves for that arm) names everything on the wire: the joint_states names and
order, the arm controller's joints (the spec's arm actions, gato_ros.control.build_layout, as the node reads
them), the gripper's joint and the observation keys. Nothing here is an arm's constant.

The Panda (torque-commanded, as Franka's interface) takes every mode; the arm controller's joints are its 7:

    effort      arm torques (N·m) on effort_controller/commands (std_msgs/Float64MultiArray)
    position    arm positions (rad) on position_controller/commands, a joint PD at 1 kHz (sim.controllers)
    velocity    arm velocities (rad/s) on velocity_controller/commands, joint damping at 1 kHz
    trajectory  a one-point trajectory_msgs/JointTrajectory on joint_trajectory_controller/joint_trajectory:
                the reference runs to the point in its time_from_start, then holds it; `trajectory_cmd_timeout_s`
                (> 0) holds the position where the arm is when no trajectory came for that long, as
                joint_trajectory_controller's cmd_timeout does
    gripper     the finger force (1 value, N, positive opens) on gripper_controller/commands, in every mode

The xArm6 is velocity-commanded, as a real xArm through ros2_control's forward velocity controller: `velocity`
only (its spec's action mode), six joint velocities (rad/s, joint1..joint6) on velocity_controller/commands that
its own servo loop holds (sim/xarm.py), and the gripper a finger target (1 value, m: 0.04 open, 0 closed) on
gripper_controller/commands. `command_mode` "" (the default) is the arm's own mode (the Panda's is effort).

Cameras: the named cameras of sim/cameras.py listed in `cameras` (or those of the model at `model_path`,
whose spec also sets `image_size`) publish `<camera>/image_raw` and `<camera>/camera_info`; with
`image_size` and no cameras, the legacy scene camera publishes on `image_topic` / `camera_info_topic`.
Each frame is the one the env rendered for that step (the same bytes in-process evaluation feeds the
policy), stamped like the joint states, one per control step; CameraInfo holds the pinhole intrinsics
of the renderer's projection. With `parallel_cameras` (the default) every camera after the first renders
in a process of its own at the same time (sim/camera_process.py, the same frames). `camera_shift_m`,
`camera_tilt_deg` and `light_change` perturb the cameras per episode (robustness runs, sim/cameras.py).
~/frames (Trigger) returns the frames of the current and the previous episode as JSON (deflated, bit-exact:
sim.cameras.frames_from_text), for the demo's view of what the policy saw and for comparing with in-process
rendering.

Like Franka's torque interface the Panda's env adds gravity compensation, so a zero torque holds a still arm
(the xArm6's servo loop holds a zero velocity still). Like forward_command_controller the bridge applies the last
command until a new one arrives, forever: nothing on the controller side stops a stale command, so the tests see
what a real arm would do. A command of the wrong length (not one value per arm controller joint) or with NaN/inf
is refused (counted, logged) and the previous one stays, as a real controller refuses a message.
`command_timeout_s` (> 0, sim time; default 0 = off) is an option the real controllers do not have: an arm
command older than that is replaced by zeros (zero effort, or zero velocity), a gripper command by the gripper's
rest command (sim.arms.GRIPPER_REST: no force for the Panda, open for the xArm6).

The env steps in a thread of its own at `real_time_factor` × real time (0 = as fast as it can) and
publishes /clock, so nodes with use_sim_time follow it; with `wall_clock_stamps` (and real_time_factor 1)
it stamps its messages with the system clock instead, like a real arm's driver, for nodes on the wall
clock. Services: ~/reset (std_srvs/Trigger) starts an episode with the `seed` parameter (then seed + 1
for the next one); ~/status (Trigger) reports the episode as JSON in `message` and success in `success`;
~/pause (Trigger) stops stepping (and /clock) where the episode is, until the next ~/reset.
A NaN physics state ends the episode as a failure, logged as an error, and the env resets.

For closed-loop evaluation (`sim.ros_eval`) the bridge behaves like in-process stepping: it
publishes the observation before /clock, so a policy node on sim time ticks on observation t and
its command arrives before step t + 1; a reset advances /clock by one period (the policy acts on the
first observation before the first step) and restarts the step schedule. `wait_for_reset` keeps the
sim still until the first ~/reset, `pause_when_done` stops stepping (and /clock) when an episode
ends. ~/trajectory (Trigger) returns, as JSON, every observation vector the bridge published in the
current and the previous episode (exact floats: a record that survives best-effort QoS, for replays
and for comparing with in-process stepping). Per episode the status reports arm commands received,
steps that had a fresh command (one that arrived after the observation it answers, and once the gripper is
commanded, a gripper command too) or a stale one,
and the wall-clock latency from publishing an observation to receiving the arm command that answers it.
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
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from gato_ros import ros_io, ros_process
from gato_ros.commands import ARM_COMMAND_TOPICS, GRIPPER_COMMAND_TOPIC, OUTPUT_MODES
from gato_ros.control import build_layout
from gato_ros.spec import EmbodimentSpec
from sim import cameras as cams
from sim.arms import DEFAULT_ARM, GRIPPER_REST, embodiment_spec, make_env
from sim.controllers import ArmController
from sim.env import check_arm
from sim.results import red_distance_cm
from sim.tasks import DEFAULT_TASK

PARAMETERS: dict[str, Any] = {
    "arm": "",  # the simulated arm (sim/arms.py): panda | xarm6; "" = the model's default arm, else panda
    "task": DEFAULT_TASK,  # what counts as success (sim/tasks.py; '' = the model's first, as the node reads '')
    "seed": 0,
    "image_size": 64,  # 0 = no camera (rendering costs ~14-30 ms a frame: README)
    "cameras": Parameter.Type.STRING_ARRAY,  # named cameras (sim/cameras.py); unset = the legacy scene camera
    "model_path": "",  # an ONNX policy: its spec's image size and cameras replace image_size and cameras
    "camera_shift_m": 0.0,  # robustness: every camera moved this far per episode, in a seeded random direction
    "camera_tilt_deg": 0.0,  # robustness: and turned this much about a seeded random axis
    "light_change": 0.0,  # robustness: the light scaled by 1 ± this per episode
    "parallel_cameras": True,  # each camera after the first renders in a process of its own (the same frames)
    "real_time_factor": 1.0,  # 0 = as fast as possible
    "command_mode": "",  # "" = the arm's own (its spec's action mode); the Panda takes every OUTPUT_MODES one
    "command_timeout_s": 0.0,  # sim time; > 0: an older command is replaced by zeros / rest (real controllers: 0)
    "trajectory_cmd_timeout_s": 0.0,  # trajectory mode, sim time; > 0: hold here when no trajectory came for that long
    "max_steps": 200,
    "wait_for_reset": False,  # stay still (no steps, no /clock) until the first ~/reset
    "pause_when_done": False,  # stop stepping when an episode ends, until the next ~/reset
    "publish_clock": True,
    "wall_clock_stamps": False,  # stamp messages with the system clock, as a real arm's driver does (no /clock then)
    "joint_states_topic": "joint_states",
    "image_topic": "camera/image_raw",
    "camera_info_topic": "camera/camera_info",
    "command_topic": "",  # "" = the mode's controller topic (gato_ros.commands.ARM_COMMAND_TOPICS)
    "gripper_command_topic": GRIPPER_COMMAND_TOPIC,
    "observation_prefix": "gato/observations/",
}


class SimBridge(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("sim_bridge", **kwargs)
        for name, default in PARAMETERS.items():
            self.declare_parameter(name, default)
        prm = {name: self._value(name) for name in PARAMETERS}
        self.prm = prm
        self.arm_name, spec, model_task = self._served(prm)
        self.env = make_env(self.arm_name, **self._env_options(prm, spec, model_task))
        if tuple(self.env.joint_names) != tuple(spec.joint_names):
            raise ValueError(f"the {self.arm_name} spec's joints {list(spec.joint_names)} are not the simulated "
                             f"arm's {list(self.env.joint_names)}")
        # The wire, from the spec: joint_states names (the env's observation order), the arm controller's joints
        # and where each sits in joint_states, the gripper's command at rest.
        layout = build_layout(spec)
        self.joint_names = tuple(spec.joint_names)
        self.arm_joints = layout.arm_names
        self.arm_index = layout.arm_joints
        self.gripper_rest = GRIPPER_REST[self.arm_name]
        self.native_mode = spec.action_mode  # what the env's step takes; other modes run sim.controllers' laws
        self.period = 1.0 / self.env.config.control_hz
        # Sim time counts whole nanoseconds: a float sum of periods drifts a few ns off the period grid
        # over a long run, and a /clock stamp 1 ns short of a timer's deadline makes a node on sim time
        # skip that tick (the step then runs on the previous command).
        self.period_ns = round(1e9 / self.env.config.control_hz)
        self.lock = threading.Lock()  # env and episode state: the step thread vs the services
        self.sim_ns = 0
        self.mode = str(prm["command_mode"]) or self.native_mode
        modes = self.command_modes()
        if self.mode not in modes:
            raise ValueError(f"command_mode must be one of {modes} for the {self.arm_name}, got {self.mode!r}")
        self.arm = ArmController(self.mode)
        self.command_time = -math.inf  # sim time of the last arm command
        self.gripper = self.gripper_rest
        self.gripper_time = -math.inf
        self._held = False  # trajectory mode: holding here after trajectory_cmd_timeout_s without a trajectory
        self._arm_positions = np.zeros(len(self.arm_joints))  # the latest observation's, for holding here
        self.rejected = 0
        self.timeouts = 0
        self.seed = int(prm["seed"])  # the next episode's; setting the parameter chooses it
        self.episode: dict[str, Any] = {}
        self.latency_ms: list[float] = []  # this episode's: observation published -> command received (wall)
        self._published_at = time.monotonic()  # wall time of the last observation
        self._answered = True  # an arm command arrived since the last observation
        self._gripper_answered = True  # a gripper command arrived since the last observation
        # The gripper is a controller of its own: once something commands it, a step whose gripper command has
        # not arrived is as stale as one without an arm command.
        self._gripper_commanded = False
        self._next_t = time.monotonic()  # wall time of the next step
        self._started = not prm["wait_for_reset"]
        self.joint_pub = self.create_publisher(JointState, prm["joint_states_topic"], qos_profile_sensor_data)
        # Observation key -> (camera name, image publisher, camera_info publisher)
        self.camera_pubs: dict[str, tuple[str, Any, Any]] = {}
        for key, camera in self.env.image_keys.items():
            legacy = key == cams.LEGACY_IMAGE_KEY
            image_topic = prm["image_topic"] if legacy else f"{camera}/image_raw"
            info_topic = prm["camera_info_topic"] if legacy else f"{camera}/camera_info"
            self.camera_pubs[key] = (camera, self.create_publisher(Image, image_topic, qos_profile_sensor_data),
                                     self.create_publisher(CameraInfo, info_topic, qos_profile_sensor_data))
        on_sim_clock = prm["publish_clock"] and not prm["wall_clock_stamps"]
        self.clock_pub = self.create_publisher(Clock, "/clock", QoSProfile(depth=10)) if on_sim_clock else None
        self.vector_pubs: dict[str, Any] = {}
        # Episode boundaries for recordings (gato-ros dataset cuts episodes here): JSON {"event": "start" | "end",
        # "seed", ...}, published before the observation that begins the episode / follows its last step.
        self.episode_pub = self.create_publisher(String, "~/episode", QoSProfile(depth=100))
        self.command_topic = prm["command_topic"] or ARM_COMMAND_TOPICS[self.mode]
        if self.mode == "trajectory":
            self.create_subscription(JointTrajectory, self.command_topic, self._on_trajectory_command, 10)
        else:
            self.create_subscription(Float64MultiArray, self.command_topic, self._on_command, 10)
        self.create_subscription(Float64MultiArray, prm["gripper_command_topic"], self._on_gripper_command, 10)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_service(Trigger, "~/status", self._on_status)
        self.create_service(Trigger, "~/pause", self._on_pause)
        self.create_service(Trigger, "~/trajectory", self._on_trajectory)
        self.create_service(Trigger, "~/frames", self._on_frames)
        self.trajectory: dict[str, Any] = {}
        self.previous_trajectory: dict[str, Any] | None = None
        self.frames: dict[str, Any] = {}  # the current episode's rendered frames, per observation key
        self.previous_frames: dict[str, Any] | None = None
        with self.lock:
            self._reset_locked()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _value(self, name: str) -> Any:
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:  # declared by type only and not set
            return None

    @staticmethod
    def _served(prm: dict[str, Any]) -> tuple[str, EmbodimentSpec, str]:
        """The arm, its spec and the model's first task: the spec the model at `model_path` serves for the arm
        (through the runtime's public API; a file that does not serve the arm is refused, naming the arms it does),
        else the arm's own in the stacking scene and no task."""
        arm = str(prm["arm"])
        if prm["model_path"]:
            from gato_ros.runtime import open_session, read_model_info

            session, _ = open_session(prm["model_path"], "cpu", threads=1)
            info = read_model_info(session, prm["model_path"], arm or None)
            return check_arm(info.arm), info.spec, info.tasks[0]
        arm = check_arm(arm or DEFAULT_ARM)
        return arm, embodiment_spec(arm), ""

    @staticmethod
    def _env_options(prm: dict[str, Any], spec: EmbodimentSpec, model_task: str) -> dict[str, Any]:
        """The env options: cameras from the model's spec, else from the parameters; the task, '' meaning the
        model's first (as the node reads task ''), else the default."""
        if prm["model_path"]:
            from sim.spec import env_overrides

            images = env_overrides(spec)
        else:
            images = {"image_size": prm["image_size"] or None, "cameras": tuple(prm["cameras"] or ()) or None}
        return {**images, "task": str(prm["task"]) or model_task or DEFAULT_TASK, "max_steps": prm["max_steps"],
                "camera_shift_m": float(prm["camera_shift_m"]), "camera_tilt_deg": float(prm["camera_tilt_deg"]),
                "light_change": float(prm["light_change"]), "parallel_cameras": bool(prm["parallel_cameras"])}

    def command_modes(self) -> tuple[str, ...]:
        """The arm controller modes this arm takes: a torque-commanded env runs every mode's law at 1 kHz over its
        torques (sim.controllers); any other env takes its own command only."""
        return OUTPUT_MODES if self.native_mode == "effort" else (self.native_mode,)

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

    def _count_command(self) -> None:
        """An arm command arrived: count it, and the latency of the first one after an observation."""
        received = time.monotonic()
        self.episode["commands"] += 1
        if not self._answered:
            self._answered = True
            self.latency_ms.append(1e3 * (received - self._published_at))

    def _refuse(self, reason: str) -> None:
        self.rejected += 1
        self.episode["rejected"] += 1
        self.get_logger().warning(f"command refused ({reason}): the previous command stays", throttle_duration_sec=1.0)

    def _on_command(self, msg: Float64MultiArray) -> None:
        """effort / position / velocity: one value per arm controller joint, in its order."""
        cmd = np.asarray(msg.data, dtype=np.float64)
        n = len(self.arm_joints)
        with self.lock:
            self._count_command()
            if cmd.shape != (n,) or not np.all(np.isfinite(cmd)):
                return self._refuse(f"{cmd.size} values, expected {n} for {list(self.arm_joints)}"
                                    if cmd.shape != (n,) else "NaN or inf")
            self.arm.command(cmd)
            self.command_time = self.sim_time

    def _on_trajectory_command(self, msg: JointTrajectory) -> None:
        """trajectory: one point for the arm joints (any order, by name); positions, reached in time_from_start."""
        with self.lock:
            self._count_command()
            names = list(msg.joint_names)
            if len(msg.points) != 1 or sorted(names) != sorted(self.arm_joints):
                return self._refuse(f"{len(msg.points)} points for joints {names}, expected 1 for "
                                    f"{list(self.arm_joints)}")
            point = msg.points[0]
            positions = np.asarray(point.positions, dtype=np.float64)
            if positions.shape != (len(names),) or not np.all(np.isfinite(positions)):
                return self._refuse("positions of the wrong length, NaN or inf")
            ordered = positions[[names.index(n) for n in self.arm_joints]]
            duration = point.time_from_start.sec + point.time_from_start.nanosec * 1e-9
            self.arm.command(ordered, t=self.sim_time, duration_s=duration)
            self.command_time, self._held = self.sim_time, False

    def _on_gripper_command(self, msg: Float64MultiArray) -> None:
        """One value: the Panda's finger force (N, positive opens), the xArm6's finger target (m)."""
        with self.lock:
            self.episode["gripper_commands"] += 1
            self._gripper_answered = self._gripper_commanded = True
            force = np.asarray(msg.data, dtype=np.float64)
            if force.shape != (1,) or not np.isfinite(force[0]):
                return self._refuse(f"gripper: {force.size} values, expected 1" if force.shape != (1,)
                                    else "gripper: NaN or inf")
            self.gripper, self.gripper_time = float(force[0]), self.sim_time

    # --- episodes ---

    @property
    def sim_time(self) -> float:
        return self.sim_ns / 1e9

    def _advance_clock(self) -> None:
        self.sim_ns += self.period_ns

    def _reset_locked(self) -> None:
        obs, _ = self.env.reset(seed=self.seed)
        # /clock moves one period, so a node on sim time ticks on the first observation before the first step.
        self._advance_clock()
        self.episode = {"seed": self.seed, "steps": 0, "success": False, "done": False, "nan": False,
                        "start_time": self.sim_time, "wall_start": time.monotonic(), "wall_s": 0.0,
                        "commands": 0, "gripper_commands": 0, "rejected": 0, "fresh_steps": 0, "stale_steps": 0,
                        "stale_at": [], "closest_to_red_cm": math.inf}
        self.latency_ms = []
        if self.trajectory:
            self.previous_trajectory = self.trajectory
            self.previous_frames = self.frames
        self.trajectory = {"seed": self.seed, "observations": {}}
        self.frames = {"seed": self.seed, "frames": {key: [] for key in self.camera_pubs}}
        self.seed += 1
        self.arm.reset(np.asarray(obs["joint_positions"])[self.arm_index])  # a controller starts holding here
        self.command_time = self.gripper_time = -math.inf
        self.gripper, self._held = self.gripper_rest, False
        self.episode_pub.publish(String(data=json.dumps({"event": "start", "seed": self.episode["seed"]})))
        self._publish(obs)
        rtf = float(self.prm["real_time_factor"])
        if rtf > 0:  # the first step comes a full period after the reset: the policy's first command is in by then
            self._next_t = time.monotonic() + self.period / rtf

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self.lock:
            self._reset_locked()
            self._started = True
            response.success, response.message = True, json.dumps(self.episode)
        return response

    def _on_pause(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Stop stepping (and /clock) where the episode is, until the next ~/reset."""
        with self.lock:
            self._started = False
            response.success, response.message = True, json.dumps(self.episode)
        return response

    def _on_trajectory(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self.lock:
            response.success = bool(self.trajectory)
            response.message = json.dumps({"current": self.trajectory, "previous": self.previous_trajectory})
        return response

    def _on_frames(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self.lock:
            episodes = {"current": self.frames, "previous": self.previous_frames}
            response.success = bool(self.frames)
        # Deflating is the slow part (~ms per frame): outside the lock, from the lists as they are now.
        encoded = {name: None if ep is None else {"seed": ep["seed"], "frames": {
            key: cams.frames_to_text(list(frames)) for key, frames in ep["frames"].items()}}
            for name, ep in episodes.items()}
        response.message = json.dumps(encoded)
        return response

    def _on_status(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self.lock:
            response.success = bool(self.episode["success"])
            response.message = json.dumps({**self.episode, "arm": self.arm_name, "task": self.env.task.name,
                                           "command_mode": self.mode,
                                           "rejected_commands": self.rejected,
                                           "command_timeouts": self.timeouts, "sim_time": self.sim_time,
                                           "latency_ms": [round(x, 3) for x in self.latency_ms]})
        return response

    # --- stepping ---

    def _step_once(self) -> None:
        rtf = float(self.prm["real_time_factor"])
        with self.lock:
            if rtf > 0:
                now = time.monotonic()
                if now < self._next_t:  # a reset moved the schedule while this thread waited for the lock
                    return
                self._next_t += self.period / rtf
                if self._next_t < now - self.period:  # far behind: re-anchor instead of bursting to catch up
                    self._next_t = now
            if not self._started or (self.episode["done"] and self.prm["pause_when_done"]):
                return
            if not self.episode["done"]:
                fresh = self._answered and (self._gripper_answered or not self._gripper_commanded)
                self.episode["fresh_steps" if fresh else "stale_steps"] += 1
                if not fresh:
                    self.episode["stale_at"].append(self.episode["steps"])
            obs, terminated, truncated, info = self._step_env()
            self._advance_clock()
            if not self.episode["done"]:
                self.episode["steps"] += 1
            if info.get("nan"):
                self.get_logger().error(f"NaN physics state in episode seed {self.episode['seed']} at step "
                                        f"{info.get('steps')}: episode failed, resetting")
                self.episode.update(done=True, nan=True, success=False)
                self._announce_end()
                failed = dict(self.episode)
                self._reset_locked()
                self.episode["previous"] = failed
                return
            if (terminated or truncated) and not self.episode["done"]:
                self.episode.update(done=True, success=bool(info.get("success")),
                                    wall_s=time.monotonic() - self.episode["wall_start"])
                self.get_logger().info(f"episode seed {self.episode['seed']}: "
                                       f"{'success' if self.episode['success'] else 'failure'} "
                                       f"after {self.episode['steps']} steps")
                self._announce_end()
            self._publish(obs)

    def _step_env(self) -> tuple[dict[str, np.ndarray], bool, bool, dict]:
        """One control period of physics under the arm controller and the gripper's last command (lock held)."""
        t0 = self.sim_time
        timeout = float(self.prm["command_timeout_s"])
        arm_timed_out = timeout > 0 and t0 - self.command_time > timeout
        gripper = self.gripper_rest if timeout > 0 and t0 - self.gripper_time > timeout else self.gripper
        self.timeouts += arm_timed_out
        hold_after = float(self.prm["trajectory_cmd_timeout_s"])
        if self.mode == "trajectory" and hold_after > 0 and t0 - self.command_time > hold_after and not self._held:
            self.arm.hold_here(t0, self._arm_positions)
            self._held = True  # once per silence: the next trajectory ends it
        if arm_timed_out or self.mode == self.native_mode:  # the env takes the command (or zeros) itself
            arm = np.zeros(len(self.arm_joints)) if arm_timed_out else self.arm.target
            obs, _, terminated, truncated, info = self.env.step(np.concatenate([arm, [gripper]]))
        else:  # a torque-commanded env under another mode's law, run at every physics sub-step
            law = self.arm.torque
            obs, _, terminated, truncated, info = self.env.step(
                np.concatenate([np.zeros(len(self.arm_joints)), [gripper]]),
                arm_torque=lambda dt, q, qd: law(t0 + dt, q, qd))
        return obs, terminated, truncated, info

    def _announce_end(self) -> None:
        end = {key: self.episode[key] for key in ("seed", "steps", "success", "nan")}
        self.episode_pub.publish(String(data=json.dumps({"event": "end", **end})))

    def _run(self) -> None:
        rtf = float(self.prm["real_time_factor"])
        while not self._stop.is_set() and rclpy.ok(context=self.context):
            if rtf > 0:
                # Re-read the schedule after every sleep: a reset moves it (the first step of an episode
                # comes a full period after the reset, so the policy's first command is in by then).
                delay = self._next_t - time.monotonic()
                if delay > 0:
                    time.sleep(min(delay, self.period))
                    continue
            try:
                self._step_once()
            except Exception as err:  # the bridge must survive anything a step throws
                self.get_logger().error(f"sim step failed: {type(err).__name__}: {err}")
            paused = not self._started or (self.episode["done"] and self.prm["pause_when_done"])
            if rtf <= 0 and paused:
                time.sleep(0.002)  # paused while running as fast as possible: do not spin on the lock

    def _publish(self, obs: dict[str, np.ndarray]) -> None:
        # The observation goes out before /clock: a node on sim time ticks when the clock moves and by
        # then holds this observation, so its command answers it (as in-process stepping would).
        stamp = (self.get_clock().now() if self.prm["wall_clock_stamps"] else Time(nanoseconds=self.sim_ns)).to_msg()
        vectors = {key: np.asarray(value, np.float64).reshape(-1).tolist()  # once: published and recorded
                   for key, value in obs.items() if key not in self.camera_pubs}
        self._arm_positions = np.asarray(vectors["joint_positions"])[self.arm_index]
        js = JointState(name=list(self.joint_names), position=vectors["joint_positions"],
                        velocity=vectors["joint_velocities"])
        js.header.stamp = stamp
        self.joint_pub.publish(js)
        for key, (camera, image_pub, info_pub) in self.camera_pubs.items():
            image_pub.publish(self._image(obs[key], camera, stamp))
            info_pub.publish(self._camera_info(camera, obs[key].shape[0], stamp))
        for key, values in vectors.items():
            if key in ("joint_positions", "joint_velocities"):
                continue
            if key not in self.vector_pubs:
                self.vector_pubs[key] = self.create_publisher(
                    Float64MultiArray, self.prm["observation_prefix"] + key, qos_profile_sensor_data)
            self.vector_pubs[key].publish(Float64MultiArray(data=values))
        self._record(vectors, obs)
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=stamp))
        self._published_at, self._answered, self._gripper_answered = time.monotonic(), False, False

    def _record(self, vectors: dict[str, list[float]], obs: dict[str, np.ndarray]) -> None:
        """One entry per observation of the episode (steps + 1 of them); none after it ended."""
        record = self.trajectory["observations"]
        if len(record.get("joint_positions", ())) > self.episode["steps"]:
            return
        for key, values in vectors.items():
            record.setdefault(key, []).append(values)
        if not self.episode["done"]:  # an observation the policy acts on (in-process evaluation's measure)
            self.episode["closest_to_red_cm"] = min(self.episode["closest_to_red_cm"],
                                                    red_distance_cm(vectors["task_state"]))
        for key, frames in self.frames["frames"].items():
            frames.append(obs[key])  # a fresh array per render: kept, not copied

    @staticmethod
    def _frame_id(camera: str) -> str:
        return f"{camera}_camera"

    def _image(self, frame: np.ndarray, camera: str, stamp: Any) -> Image:
        h, w = frame.shape[:2]
        msg = Image(height=h, width=w, encoding="rgb8", step=w * 3, data=frame.tobytes())
        msg.header.stamp, msg.header.frame_id = stamp, self._frame_id(camera)
        return msg

    def _camera_info(self, camera: str, size: int, stamp: Any) -> CameraInfo:
        """The pinhole model of the renderer's projection (square frames, no distortion)."""
        fx, fy, cx, cy = cams.intrinsics(self.env.camera(camera), size, self.env.client)
        info = CameraInfo(height=size, width=size, distortion_model="plumb_bob", d=[0.0] * 5)
        info.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.p = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
        info.header.stamp, info.header.frame_id = stamp, self._frame_id(camera)
        return info


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    ros_process.stop_on_signals()
    bridge = SimBridge()
    # Single-threaded: physics runs in its own thread; rclpy's MultiThreadedExecutor busy-waits and
    # holds the GIL (see gato_ros.node.main).
    executor = SingleThreadedExecutor()
    executor.add_node(bridge)
    bridge.start()
    try:
        ros_process.spin_until_stopped(executor)
    finally:
        bridge.stop()
        executor.shutdown()
        bridge.destroy_node()
        rclpy.try_shutdown()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ros_io.add_ros_arguments(parser, "gato-ros sim --ros-args -p arm:=xarm6 -p seed:=3 -p real_time_factor:=2.0")


def run(args: argparse.Namespace) -> int:
    return main(ros_io.ros_argv("gato-ros-sim", args))


if __name__ == "__main__":
    sys.exit(main())
