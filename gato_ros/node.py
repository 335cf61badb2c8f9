"""The ROS 2 policy node: parameters, topics, the control timer, lifecycle, diagnostics and services.

A lifecycle node `gato_policy`. Configure loads the ONNX model through `PolicyRuntime` and builds the
ROS-free control loop (gato_ros/control.py), which decides every tick: the policy's action, or the
safe action on any fault. Activate starts the control timer; deactivate sends the safe action once
and stops it.

Every tick publishes the stamped command on `~/joint_command` (sensor_msgs/JointState, see
gato_ros/commands.py) for the watchdog, which relays it to the controllers while it is fresh, and one
JSON record on `~/tick` (std_msgs/String) for the recorder. With `direct_output:=true` the node also
publishes to the controller topics itself (the arm on the output mode's topic, the gripper on its
own): for running without the watchdog. All ML lives in the runtime; this module never imports torch.

A file of several tasks is served for one, `task`; `~/instruction` (std_msgs/String) starts a new episode
conditioned on a text instruction, in a file with an instruction model (docs/interfaces.md, "Node").
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.exceptions import InvalidParameterValueException, ParameterUninitializedException
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from gato_ros import commands, control, hold_table, ros_io, ros_process
from gato_ros.control import ERROR, OK, WARN, ControlLoop, TickResult
from gato_ros.instructions import InstructionError
from gato_ros.ticks import TICK_TOPIC, tick_json

NODE_NAME = "gato_policy"
MODEL_FILE = "stack_int8.onnx"
OBSERVATION_TOPIC_PREFIX = "gato/observations/"  # relative: a namespace moves it


def default_model_path() -> str:
    """The shipped model: share/gato_ros/models in an installed workspace, else the repo's models/."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("gato_ros")) / "models" / MODEL_FILE)
    except Exception:  # not installed through colcon, or ament_index missing: use the source tree
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "models" / MODEL_FILE)
    for path in candidates:
        if path.exists():
            return str(path)
    return str(candidates[0])


def choose_task(tasks: tuple[str, ...], task: str, path: str, arm: str = "") -> str:
    """`task`, or the first of `tasks` (those the file was trained on for the arm) when empty; a ValueError naming
    them for one it was not trained on."""
    if not task:
        return tasks[0]
    if task not in tasks:
        raise ValueError(f"{path} serves task(s) {', '.join(tasks)}{f' on arm {arm}' if arm else ''}, "
                         f"not task {task!r}")
    return task


# ----------------------------------------------------------------------------- parameters

STARTUP, CONFIGURE, LIVE = "read only", "applied at configure", "applied live"


@dataclass(frozen=True)
class Param:
    default: Any
    description: str
    when: str = CONFIGURE  # STARTUP: read once (read_only); CONFIGURE: refused while configured; LIVE
    low: float | None = None
    high: float | None = None


PARAMETERS: dict[str, Param] = {
    "autostart": Param(True, "walk the lifecycle to active at startup (no lifecycle manager)", STARTUP),
    "model_path": Param("", "ONNX policy file; empty = the shipped model"),
    # Read only: a file of several arms is served for this one; the wrong body's spec must never be swapped in live.
    "arm": Param("", "which of the model's arms to serve (gato-ros info lists them); empty = its default arm",
                 STARTUP),
    # Read only, like the arm: the task the node was started for is the task every episode is conditioned on.
    "task": Param("", "which of the tasks the model was trained on for `arm` to perform (gato-ros info lists "
                  "them); empty = the first; a model with an instruction model starts each episode with this task's "
                  "instruction", STARTUP),
    "provider": Param("auto", "ONNX Runtime provider: auto | cpu | cuda | tensorrt"),
    "threads": Param(0, "ONNX Runtime intra-op threads; 0 = its default", low=0, high=256),
    "context_tokens": Param(0, "KV cache size in tokens; 0 = the model's", low=0, high=1 << 20),
    "control_rate_hz": Param(0.0, "control rate; 0 = the model's", low=0.0, high=1000.0),
    "output_mode": Param("", "effort | position | velocity | trajectory; must suit the model's actions; "
                               "'' = the model's own (effort for torques, position, velocity)"),
    "joint_name_map": Param(Parameter.Type.STRING_ARRAY, "model joint → robot joint, as 'panda_joint1=fr3_joint1'"),
    "joint_names": Param(Parameter.Type.STRING_ARRAY, "arm controller joint order (robot names); unset = model's"),
    "gripper_action": Param("", "the model action that is the gripper; empty = its discrete action, 'none' = none"),
    "joint_states_topic": Param("joint_states", "sensor_msgs/JointState in"),
    "image_topic": Param("camera/image_raw", "sensor_msgs/Image in, for image keys not named camera_<name> "
                         "(the legacy 'image' key) and not in image_topics"),
    "image_topics": Param(Parameter.Type.STRING_ARRAY, "image key → sensor_msgs/Image topic, as "
                          "'camera_scene=scene/image_raw'; unset keys: camera_<name> → <name>/image_raw, others → "
                          "image_topic"),
    "arm_command_topic": Param("", "arm controller topic; empty = the output mode's default (commands.py)"),
    "gripper_command_topic": Param(commands.GRIPPER_COMMAND_TOPIC, "gripper command topic (Float64MultiArray)"),
    "direct_output": Param(False, "also publish to the controller topics (no watchdog relaying)"),
    "max_image_bytes": Param(ros_io.MAX_IMAGE_BYTES, "larger camera frames are invalid input", low=1, high=1 << 31),
    "stale_timeout_s": Param(0.25, "an input older than this (monotonic) gives the safe action", LIVE, 1e-3, 60.0),
    "max_stamp_offset_s": Param(1.0, "a header stamp further from the node clock is invalid input", LIVE, 1e-3,
                                3600.0),
    "torque_limits": Param(Parameter.Type.DOUBLE_ARRAY, "tighten the model's limits: arm joints (controller "
                           "order), optionally then the gripper; the minimum applies; unset = the model's", LIVE),
    "safe_action": Param("hold", "hold | damp | zero: what replaces the policy on any fault", LIVE),
    "hold_stiffness": Param([float(v) for v in control.DEFAULT_HOLD_STIFFNESS], "hold stiffness (N·m/rad): one "
                            "value, one per arm joint, or an n×n matrix row-major; default: the sim Panda's", LIVE),
    "hold_damping": Param([float(v) for v in control.DEFAULT_HOLD_DAMPING], "hold and damp damping (N·m·s/rad), "
                          "same forms", LIVE),
    "hold_gain_table": Param("", "pose-dependent hold gains (gato_ros.hold_table, JSON): the mass matrix at the "
                             "fault pose; empty = the sim Panda's shipped table (fixed gains for an arm with other "
                             "joints), 'none' = the fixed hold_stiffness/hold_damping", LIVE),
    "max_overruns": Param(5, "consecutive deadline overruns that switch to the safe action", LIVE, 1, 1000),
    "prompt_path": Param("", "gato_ros dataset dir: its episode is the prompt on reset (read by ~/load_prompt)",
                         LIVE),
    "prompt_episode": Param(0, "episode of prompt_path", LIVE, 0, 1 << 30),
    "prompt_steps": Param(0, "the last N steps of that episode; 0 = all (cut to what fits the context)", LIVE, 0,
                          1 << 30),
}


def _descriptor(name: str, spec: Param) -> ParameterDescriptor:
    desc = ParameterDescriptor(name=name, description=f"{spec.description} ({spec.when})",
                               read_only=spec.when == STARTUP)
    if spec.low is not None:
        if isinstance(spec.default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(spec.low), to_value=float(spec.high))]
        else:
            desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
    return desc


@dataclass
class LoopSettings:
    """The live settings of the control loop, parsed from parameters (ValueError names a bad one)."""

    limits: np.ndarray
    safe: control.SafeActionSettings
    stale_timeout_s: float
    max_stamp_offset_s: float


class PolicyNode(LifecycleNode):
    """Lifecycle node `gato_policy`: see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.refused_overrides: list[str] = []
        self.seq = 0  # of the last ~/tick record, over the node's life (gato_ros.ticks)
        for name, spec in PARAMETERS.items():
            self._declare(name, spec)
        self.state_label = "unconfigured"
        self.runtime: Any = None
        self.loop: ControlLoop | None = None
        self.model_path = ""
        self.task = ""  # the task served, one of the file's (`task` parameter)
        self.period_s = 0.0
        self.prompt: dict[str, Any] | None = None
        # What conditions the episode besides the prompt (one of the two, or neither): instruction text pinned in
        # the context; the task's own (`task_instruction`) unless ~/instruction gave another.
        self.instruction: str | None = None
        self.task_instruction: str | None = None  # the task's instruction in a file with an instruction model
        self.instruction_error = ""  # why the last ~/instruction was refused ("" once one is taken)
        self.last_error = ""
        self._tick_lock = threading.Lock()  # one tick, transition or context swap at a time
        self._active = False
        self._timer = None
        self._outputs: dict[str, Any] = {}
        self._input_subs: list[Any] = []
        self._loader: control.ContextLoader | None = None
        self._control_group = MutuallyExclusiveCallbackGroup()  # the timer never waits behind inputs
        self._reset_stats()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # Diagnostics and services live for the node's whole life, so a failed configure is visible.
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_service(Trigger, "~/load_prompt", self._on_load_prompt)
        self.create_subscription(String, "~/instruction", self._on_instruction, QoSProfile(depth=10))

    def _declare(self, name: str, spec: Param) -> None:
        try:
            self.declare_parameter(name, spec.default, _descriptor(name, spec))
        except InvalidParameterValueException as err:  # e.g. stale_timeout_s:=.nan: refuse to configure, stay up
            self.refused_overrides.append(f"{name}: {err}")
            self.declare_parameter(name, spec.default, _descriptor(name, spec), ignore_override=True)
            self.get_logger().error(f"refused parameter {name}: {err}")

    def _param(self, name: str) -> Any:
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:  # declared by type only and not set: the model's
            return None

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _reset_stats(self) -> None:
        self.ticks = 0
        self.safe_ticks = 0
        self.level, self.message, self.cause = OK, "", None
        self.worst_level = OK  # since the last diagnostics message
        self.worst_message = ""  # what that worst tick said
        self.deadline = control.DeadlineMonitor(self.period_s or 1.0, int(self._param("max_overruns")))
        self.clock_jumps = control.ClockJumpDetector()
        self._tick_times: deque[float] = deque(maxlen=1000)
        self._latencies: deque[float] = deque(maxlen=1000)
        self._image_ms: deque[float] = deque(maxlen=1000)  # per policy tick: decode + resize of its frames

    # --- parameters ---

    def _loop_settings(self, values: dict[str, Any], layout: control.JointLayout, mode: str) -> LoopSettings:
        n_arm = len(layout.arm_names)
        # Only a torque hold uses gains (velocity holds send zeros, position holds the pose at the fault): the
        # defaults are the sim Panda's 7x7 and are not asked of another arm driven in another mode.
        stiffness, damping = ((values["hold_stiffness"], values["hold_damping"]) if mode == "effort"
                              else ([0.0], [0.0]))
        table = hold_table.load_table(str(values["hold_gain_table"]))
        if table is not None and not values["hold_gain_table"] and not table.serves(layout.arm_names):
            table = None  # the shipped table is the sim Panda's: another arm holds with hold_stiffness/hold_damping
        if table is not None:
            table.order(layout.arm_names)  # a named table for other joints is refused here, with the reason
        return LoopSettings(
            limits=control.tightened_limits(layout, values["torque_limits"] or None),
            safe=control.SafeActionSettings(
                values["safe_action"], control.hold_gains(stiffness, damping, n_arm),
                table),
            stale_timeout_s=float(values["stale_timeout_s"]),
            max_stamp_offset_s=float(values["max_stamp_offset_s"]),
        )

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        configured = self.loop is not None
        late = [p.name for p in params if PARAMETERS.get(p.name, Param(0, "", LIVE)).when != LIVE]
        if configured and late:
            return SetParametersResult(successful=False, reason=f"{late} apply at configure: deactivate and "
                                                                f"clean up the node first")
        if not configured:
            return SetParametersResult(successful=True)
        values = {n: self._param(n) for n in PARAMETERS if PARAMETERS[n].when == LIVE}
        values.update({p.name: p.value for p in params if p.name in values})
        try:
            settings = self._loop_settings(values, self.loop.layout, self.loop.mode)
            commands.check_safe_action(settings.safe.kind, self.loop.mode)
        except (ValueError, OSError, KeyError) as err:  # a bad value, or a gain table that does not load
            return SetParametersResult(successful=False, reason=str(err))
        self._apply(settings, int(values["max_overruns"]))
        return SetParametersResult(successful=True)

    def _apply(self, settings: LoopSettings, max_overruns: int) -> None:
        loop = self.loop
        loop.limits, loop.safe_settings = settings.limits, settings.safe
        loop.stale_timeout_s, loop.max_stamp_offset_s = settings.stale_timeout_s, settings.max_stamp_offset_s
        self.deadline.max_overruns = max_overruns

    # --- lifecycle ---

    def _build_loop(self) -> tuple[Any, ControlLoop, float]:
        from gato_ros.runtime import PolicyRuntime  # numpy + onnxruntime only

        if self.refused_overrides:
            raise ValueError(f"refused parameters: {self.refused_overrides}")
        self.model_path = self._param("model_path") or default_model_path()
        runtime = PolicyRuntime(self.model_path, **self._runtime_kwargs())
        layout = control.build_layout(runtime.spec, control.parse_joint_name_map(self._param("joint_name_map") or ()),
                                      self._param("joint_names") or (), self._param("gripper_action"))
        values = {n: self._param(n) for n in PARAMETERS}
        mode = self._param("output_mode") or commands.default_output_mode(runtime.spec)
        settings = self._loop_settings(values, layout, mode)
        image_keys = [o.name for o in runtime.spec.observations if o.kind == "image"]
        image_topics = control.parse_image_topics(self._param("image_topics") or (), image_keys,
                                                  self._param("image_topic"))
        loop = ControlLoop(runtime, layout, mode, settings.limits, settings.stale_timeout_s,
                           settings.max_stamp_offset_s, settings.safe, self._param("max_image_bytes"), image_topics)
        rate = float(self._param("control_rate_hz")) or float(runtime.spec.control_rate_hz)
        if not np.isfinite(rate) or rate <= 0:
            raise ValueError(f"control_rate_hz must be positive, got {rate}")
        return runtime, loop, rate

    def _runtime_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"provider": self._param("provider"),
                                  "context_tokens": int(self._param("context_tokens")) or None}
        if self._param("threads"):
            kwargs["threads"] = int(self._param("threads"))
        if self._param("arm"):
            kwargs["arm"] = self._param("arm")
        return kwargs

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            runtime, loop, rate = self._build_loop()
            task = choose_task(runtime.info.tasks, self._param("task"), self.model_path, runtime.info.arm)
            task_instruction = self._task_instruction(runtime, task)
            prompt = None
            if self._param("prompt_path"):
                prompt = control.load_prompt(self._param("prompt_path"), runtime, self._param("prompt_episode"),
                                             self._param("prompt_steps"))
        except Exception as err:  # ModelLoadError, bad parameters, a bad prompt: stay unconfigured, stay up
            self.last_error = f"configure failed: {type(err).__name__}: {err}"
            self.get_logger().error(self.last_error)
            return TransitionCallbackReturn.FAILURE
        self.runtime, self.loop, self.period_s, self.prompt, self.task = runtime, loop, 1.0 / rate, prompt, task
        # A demonstration named by prompt_path wins; else a file with an instruction model hears the task's.
        self.task_instruction = task_instruction
        self.instruction = None if prompt is not None else task_instruction
        self.instruction_error = ""
        self._loader = control.ContextLoader(lambda: type(runtime)(self.model_path, warmup=False,
                                                                   **self._runtime_kwargs()))
        self._create_outputs(loop)
        self._create_inputs(loop)
        # Everything alive now (the model, the runtime, the libraries) lives as long as the node: kept out of the
        # cyclic collector, whose full passes over a large heap hold the GIL, and so the tick, for 0.1-0.3 s
        # (measured inside a test process). Reference counting still frees these objects.
        gc.freeze()
        self.last_error = ""
        self.state_label = "inactive"
        self.get_logger().info(
            f"configured: model {self.model_path} ({getattr(runtime, 'provider', '?')}) for arm "
            f"{getattr(runtime, 'arm', '?')}, task {task}, {rate:g} Hz, {loop.mode} "
            f"output, arm {list(loop.layout.arm_names)}, gripper {loop.layout.gripper_name}, "
            f"limits {loop.limits.tolist()}, safe action {loop.safe_settings.kind}")
        return TransitionCallbackReturn.SUCCESS

    def _task_instruction(self, runtime: Any, task: str) -> str | None:
        """The task's instruction when the file has an instruction model (checked against it here, at configure);
        None for a file without one, or with none for this task (a warning: it runs unconditioned)."""
        conditioning = runtime.info.conditioning
        if conditioning is None or not conditioning.instruction_model:
            return None
        if task not in conditioning.instructions:
            self.get_logger().warning(f"{self.model_path} has an instruction model but no instruction for task "
                                      f"{task!r}: its episodes start unconditioned (send one on ~/instruction)")
            return None
        text = runtime.instruction_for(task)
        runtime.instructions.encode(text)  # InstructionError (configure fails) for a text outside its vocabulary
        return text

    def _conditioning(self) -> dict[str, Any]:
        """runtime.reset's arguments for a new episode of the current conditioning."""
        if self.instruction is not None:
            return {"instruction": self.instruction}
        return {"prompt": self.prompt}

    def _create_outputs(self, loop: ControlLoop) -> None:
        reliable = QoSProfile(depth=10)
        self._outputs = {"joint_command": self.create_publisher(JointState, commands.JOINT_COMMAND_TOPIC, reliable),
                         "tick": self.create_publisher(String, TICK_TOPIC, QoSProfile(depth=100))}
        if self._param("direct_output"):
            arm_type = ros_io.arm_command_type(loop.mode)
            arm_topic = self._param("arm_command_topic") or commands.ARM_COMMAND_TOPICS[loop.mode]
            self._outputs["arm"] = self.create_publisher(arm_type, arm_topic, reliable)
            if loop.layout.gripper_action is not None:
                self._outputs["gripper"] = self.create_publisher(Float64MultiArray,
                                                                 self._param("gripper_command_topic"), reliable)

    def _create_inputs(self, loop: ControlLoop) -> None:
        def subscribe(msg_type: Any, topic: str, callback: Any) -> None:
            self._input_subs.append(self.create_subscription(msg_type, topic, callback, qos_profile_sensor_data))

        if loop.observed_joint_keys:
            subscribe(JointState, self._param("joint_states_topic"),
                      lambda m: loop.on_joint_state(m, time.monotonic(), self._now_ns()))
        for key, topic in loop.image_topics.items():  # each image key its own camera
            subscribe(Image, topic, lambda m, key=key: loop.on_image(key, m, time.monotonic(), self._now_ns()))
        for o in loop.vector_specs:
            subscribe(Float64MultiArray, OBSERVATION_TOPIC_PREFIX + o.name,
                      lambda m, key=o.name: loop.on_vector(key, m, time.monotonic()))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._tick_lock:
            try:
                self.runtime.reset(**self._conditioning())  # a fresh activation is a new episode
            except Exception as err:
                self.last_error = f"activate failed: runtime.reset: {err}"
                self.get_logger().error(self.last_error)
                return TransitionCallbackReturn.FAILURE
            self._reset_stats()
            self.loop.clear()
            self._active = True
            self._timer = self.create_timer(self.period_s, self._on_tick, self._control_group)
        self.state_label = "active"
        self.get_logger().info(f"active: ticking every {self.period_s:.4f} s")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop(publish_safe=True)
        self.state_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._unload()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop(publish_safe=True)
        self._unload()
        self.state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop(publish_safe=True)
        self._unload()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _stop(self, publish_safe: bool) -> None:
        # Under the tick lock: a tick in flight finishes first, so the safe action is the last command out.
        with self._tick_lock:
            was_active = self._active
            self._active = False
            if self._timer is not None:
                self.destroy_timer(self._timer)
                self._timer = None
            if publish_safe and was_active and self.loop is not None and self._outputs:
                self._publish(self.loop.safe_action(WARN, "deactivated"), self._now_ns())

    def _unload(self) -> None:
        with self._tick_lock:
            for sub in self._input_subs:
                self.destroy_subscription(sub)
            self._input_subs = []
            for pub in self._outputs.values():
                self.destroy_publisher(pub)
            self._outputs = {}
            if self._loader is not None:
                self._loader.close()
            self.runtime = self.loop = self.prompt = self._loader = None
            self.instruction = self.task_instruction = None
            self.task = ""

    # --- control loop ---

    def _on_tick(self) -> None:
        start = time.monotonic()
        with self._tick_lock:
            if not self._active or self.loop is None:
                return
            stamp_ns = self._now_ns()  # the node's clock: wall time, or the sim's /clock with use_sim_time
            jump = self.clock_jumps.observe(stamp_ns, start)
            self._swap_context()
            result = self.loop.tick(start, self.deadline.fault())
            self._publish(result, stamp_ns)
        if jump:
            self.get_logger().warning(f"clock jump: {jump} (counted; input freshness is judged on the monotonic "
                                      f"clock, so no old data became fresh)")
        self.deadline.record(stamp_ns * 1e-9, time.monotonic() - start, skip_interval=bool(jump))
        self._account(result, stamp_ns * 1e-9)

    def _swap_context(self) -> None:
        """A context prepared off this thread (~/reset, ~/load_prompt or ~/instruction) takes over between ticks."""
        ready = self._loader.take(self.runtime) if self._loader is not None else None
        if ready is None:
            return
        self.runtime, self.loop.runtime = ready.runtime, ready.runtime
        self.prompt, self.instruction = ready.prompt, ready.instruction
        self.get_logger().info(ready.note)

    def _publish(self, result: TickResult, stamp_ns: int) -> None:
        loop, outputs = self.loop, self._outputs
        if result.arm is not None:  # None: a position mode with no joint state yet, nothing to hold, nothing sent
            names = loop.layout.command_names if result.gripper is not None else loop.layout.arm_names
            outputs["joint_command"].publish(ros_io.joint_command_message(loop.mode, names, result.command,
                                                                          stamp_ns, safe=result.safe))
        self.seq += 1
        outputs["tick"].publish(String(data=tick_json(
            self.seq, stamp_ns, Path(self.model_path).name, result.tokens, result.step_ms, result.safe, result.reason,
            result.command)))
        # The gripper first: by the time the arm controller has this tick's command, the gripper's is on its way.
        if "gripper" in outputs and result.gripper is not None and result.arm is not None:
            outputs["gripper"].publish(ros_io.gripper_command_message(result.gripper))
        if "arm" in outputs and result.arm is not None:
            outputs["arm"].publish(ros_io.arm_command_message(loop.mode, loop.layout.arm_names, result.arm,
                                                              self.period_s))

    def _account(self, result: TickResult, now: float) -> None:
        """Counters, latencies and logging, outside the tick lock; a late or slow tick is counted, never fatal."""
        self.ticks += 1
        self.safe_ticks += result.safe
        self._tick_times.append(now)
        if result.step_ms is not None:
            self._latencies.append(result.step_ms * 1e-3)
        if result.image_ms is not None:
            self._image_ms.append(result.image_ms)
        if result.cause != self.cause:  # log changes only: each fault once, with its cause
            self._log(result.level, result.message)
        self.level, self.message, self.cause = result.level, result.message, result.cause
        level = max(result.level, self.deadline.level())
        if level > self.worst_level:  # a 1 Hz report names the worst tick since the last, not only the latest
            self.worst_level, self.worst_message = level, self._describe(result.level, result.message)
        if result.level == ERROR:
            self.last_error = result.message

    def _log(self, level: int, message: str) -> None:
        # One call site per severity: rclpy refuses a call site whose severity changes between calls.
        if level == ERROR:
            self.get_logger().error(message)
        elif level == WARN:
            self.get_logger().warning(message)
        else:
            self.get_logger().info(message)

    def achieved_rate_hz(self, window_s: float = 2.0) -> float:
        now = self._now_ns() * 1e-9
        times = [t for t in list(self._tick_times) if t >= now - window_s]
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0

    # --- diagnostics ---

    def _diagnostic_values(self) -> dict[str, str]:
        lat = np.asarray(list(self._latencies), dtype=np.float64)
        image_ms = np.asarray(list(self._image_ms), dtype=np.float64)
        values = {
            "state": self.state_label,
            "model_path": self.model_path or self._param("model_path") or default_model_path(),
            "task": self.task,
            "provider": str(getattr(self.runtime, "provider", "")),
            "output_mode": self.loop.mode if self.loop is not None else "",
            "safe_action": self.loop.safe_settings.kind if self.loop is not None else "",
            "target_rate_hz": f"{1.0 / self.period_s:.3f}" if self.period_s else "",
            "achieved_rate_hz": f"{self.achieved_rate_hz():.3f}",
            "step_latency_p50_ms": f"{np.percentile(lat, 50) * 1e3:.3f}" if lat.size else "",
            "step_latency_p99_ms": f"{np.percentile(lat, 99) * 1e3:.3f}" if lat.size else "",
            # The node's image decode + resize per policy tick (all its cameras), over the last 1000 ticks.
            "image_decode_p50_ms": f"{np.percentile(image_ms, 50):.3f}" if image_ms.size else "",
            "image_decode_p99_ms": f"{np.percentile(image_ms, 99):.3f}" if image_ms.size else "",
            "ticks": str(self.ticks),
            "safe_ticks": str(self.safe_ticks),
            "deadline_misses": str(self.deadline.total),
            "consecutive_overruns": str(self.deadline.streak),
            "clock_jumps": str(self.clock_jumps.count),
            "context": self._loader.state if self._loader is not None else "",
            "last_error": self.last_error,
            "instruction": self.instruction or "",  # pinned in the context of the episode running
            "instruction_error": self.instruction_error,  # why the last ~/instruction was refused
        }
        if self.loop is not None:
            for name, age in self.loop.input_ages(time.monotonic()).items():
                values[f"input_age_s.{name}"] = f"{age:.3f}"
            for key, topic in self.loop.image_topics.items():
                values[f"input_topic.{key}"] = self.resolve_topic_name(topic)
        return values

    def _describe(self, level: int, message: str) -> str:
        """A tick's message, or the deadline monitor's when that is the graver of the two."""
        return message if level >= self.deadline.level() else self.deadline.describe()

    def _publish_diagnostics(self) -> None:
        values = self._diagnostic_values()
        if self.state_label != "active":
            level = ERROR if self.last_error else WARN
            message = self.last_error or f"not running ({self.state_label})"
        else:
            current = max(self.level, self.deadline.level())
            level = max(self.worst_level, current)
            message = self.worst_message if self.worst_level > current else self._describe(self.level, self.message)
        self.worst_level, self.worst_message = OK, ""
        status = DiagnosticStatus(
            level=bytes([level]), name=f"{self.get_fully_qualified_name()}: control loop", message=message,
            hardware_id=Path(values["model_path"]).name,
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)

    # --- services: never block the control tick ---

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.runtime is None:
            response.success, response.message = False, f"not configured ({self.last_error or self.state_label})"
            return response
        if self.prompt is None and self.instruction is None:  # forgetting the context is O(1): between two ticks
            with self._tick_lock:
                self.runtime.reset()
            response.success, response.message = True, "context reset"
            return response
        prompt, instruction = self.prompt, self.instruction
        what = "the demonstration prompt" if instruction is None else f"the instruction {instruction!r}"
        started = self._loader.start(lambda: prompt, f"context reset with {what}", instruction)
        response.success = started
        response.message = (f"resetting with {what} off the control thread; it takes over between two ticks"
                            if started else f"busy: {self._loader.state}")
        return response

    def _on_load_prompt(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Read `prompt_path` (episode `prompt_episode`) and start a new episode with it, off the control thread."""
        path = self._param("prompt_path")
        if self.runtime is None:
            response.success, response.message = False, "not configured"
            return response
        if not path and self.task_instruction is None:
            self.prompt = self.instruction = None
            with self._tick_lock:
                self.runtime.reset()
            response.success, response.message = True, "prompt cleared (prompt_path is empty)"
            return response
        if not path:  # back to the task's instruction
            text = self.task_instruction
            started = self._loader.start(lambda: None, f"prompt cleared: the instruction {text!r} is live", text)
            response.success = started
            response.message = (f"prompt cleared (prompt_path is empty): a new episode with the task's instruction "
                                f"{text!r} takes over between two ticks" if started else f"busy: {self._loader.state}")
            return response
        try:  # the dataset's metadata only: a bad path or episode is refused here, at once
            read = control.open_prompt(path, self.runtime, self._param("prompt_episode"), self._param("prompt_steps"))
        except Exception as err:
            # e.g. a dataset recorded with another arm's spec: never prefilled into this arm's context
            response.success, response.message = False, f"cannot load prompt {path!r} for arm {self.runtime.arm}: {err}"
            return response
        started = self._loader.start(read, f"prompt from {path} is live")
        response.success = started
        response.message = (f"loading the prompt from {path} off the control thread; it takes over between two "
                            f"ticks (diagnostics key 'context')" if started else f"busy: {self._loader.state}")
        return response

    # --- instructions: a new episode conditioned on text, taken over between two ticks ---

    def _on_instruction(self, msg: String) -> None:
        """`~/instruction`: start a new episode with this instruction pinned in the context. A text the file cannot
        take (a word outside its vocabulary, no instruction model) is refused: logged once, said in the diagnostics
        (`instruction_error`), and the running episode and its commands go on as they were."""
        text = msg.data
        error = self._refuse_instruction(text)
        if not error and self._active:
            started = self._loader.start(lambda: None, f"instruction {text!r} is live", text)
            error = "" if started else f"instruction {text!r} ignored: busy preparing a context ({self._loader.state})"
        elif not error:  # configured, not ticking: the next activation starts with it
            with self._tick_lock:
                self.prompt, self.instruction = None, text
        if error and error != self.instruction_error:  # once: a publisher repeating a bad text floods no log
            self.get_logger().error(error)
        elif not error:
            self.get_logger().info(f"instruction {text!r}: a new episode starts with it")
        self.instruction_error = error

    def _refuse_instruction(self, text: str) -> str:
        """Why `text` cannot condition an episode of this node's model, or "" when it can."""
        if self.runtime is None:
            return f"instruction {text!r} ignored: the node is not configured ({self.last_error or self.state_label})"
        try:
            self.runtime.instructions.encode(text)
        except InstructionError as err:
            return f"instruction ignored, the episode goes on unchanged: {err}"
        info = self.runtime.info
        untrained = [task for task, t in info.conditioning.instructions.items() if t == text and task not in info.tasks]
        if untrained:
            return (f"instruction ignored, the episode goes on unchanged: it is task {untrained[0]!r}'s, which this "
                    f"file was not trained on for arm {info.arm} (trained: {', '.join(info.tasks)})")
        return ""


# ----------------------------------------------------------------------------- entry points


def autostart(node: PolicyNode) -> None:
    if node._param("autostart") and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
        node.trigger_activate()


def main(argv: list[str] | None = None) -> int:
    """Console script `policy_node`: spin the node until Ctrl-C / SIGTERM, then send the safe action."""
    argv = list(sys.argv if argv is None else argv)
    # Own signal handling: on Ctrl-C the context must stay up long enough to publish the safe action.
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    ros_process.stop_on_signals()  # Ctrl-C and SIGTERM (ros2 launch) end alike: safe action, clean exit
    node = PolicyNode()
    # One thread: rclpy's MultiThreadedExecutor busy-waits while a ready entity's callback group is
    # busy, holding the GIL: in 8 s at 20 Hz it delivered 31 commands instead of 160, with gaps up to
    # 2 s and a core at 100 % (scripts/executor_ticks.py). The tick and the input callbacks are each a
    # few ms, so running them in turn keeps the period; long work (a prompt) runs on a thread of its own.
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        autostart(node)
        ros_process.spin_until_stopped(executor)
    except KeyboardInterrupt:  # during autostart
        pass
    finally:
        if rclpy.ok():
            node._stop(publish_safe=True)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ros_io.add_ros_arguments(parser, "gato-ros node --ros-args -p model_path:=model.onnx")


def run(args: argparse.Namespace) -> int:
    return main(ros_io.ros_argv("gato-ros-node", args))


if __name__ == "__main__":
    sys.exit(main())
