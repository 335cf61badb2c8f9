"""The ROS 2 policy node: topics, a fixed-rate timer, validation, limits and diagnostics.

A lifecycle node `gato_policy`. Configure loads the ONNX model through `PolicyRuntime`; activate
starts the control timer; deactivate publishes one safe (zero) command and stops it. Every tick
publishes exactly one std_msgs/Float64MultiArray on `command_topic` (the interface of ros2_control's
effort forward-command controller). The hardware adds gravity compensation, so zeros are the safe
command: any tick whose inputs are missing, stale or invalid publishes zeros and raises diagnostics.

All ML lives in the runtime; this module never imports torch. `PolicyLoop` is the ROS-free core
(latest-value buffers and one control tick) so it can be driven directly by tests.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gato_ros import ros_io
from gato_ros.spec import EmbodimentSpec
from gato_ros.ticks import TICK_TOPIC, tick_json

NODE_NAME = "gato_policy"
MODEL_FILE = "stack_int8.onnx"
JOINT_KEYS = ("joint_positions", "joint_velocities")
OBSERVATION_TOPIC_PREFIX = "/gato/observations/"
# diagnostic_msgs/DiagnosticStatus levels
OK, WARN, ERROR = 0, 1, 2


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


# ----------------------------------------------------------------------------- ROS-free core


@dataclass
class Buffered:
    """The latest message of one input, converted: a value or the reason it is invalid."""

    value: Any
    error: str | None
    stamp: float  # receive time, seconds on the node's clock


@dataclass
class TickResult:
    command: np.ndarray  # controller order, finite, within limits
    level: int  # OK / WARN / ERROR
    message: str
    stepped: bool  # the runtime produced this command (False: safe command)
    latency_s: float  # runtime.step time (NaN when not called)


class PolicyLoop:
    """Latest-value input buffers and one control tick, independent of rclpy.

    `joint_names` is the controller's order; the command is permuted into it from the spec's order.
    `limits` (controller order, optional) tightens the spec's action limits: the minimum applies.
    Thread-safe: message callbacks and the tick may run on different executor threads.
    """

    def __init__(
        self,
        runtime: Any,
        joint_names: Sequence[str] = (),
        limits: Sequence[float] | None = None,
        stale_timeout_s: float = 0.25,
        max_image_bytes: int = ros_io.MAX_IMAGE_BYTES,
    ) -> None:
        self.runtime = runtime
        spec: EmbodimentSpec = runtime.spec
        self.spec = spec
        self.stale_timeout_s = float(stale_timeout_s)
        self.max_image_bytes = int(max_image_bytes)
        self.joint_names = tuple(joint_names) or tuple(spec.joint_names)
        if len(self.joint_names) != spec.action_size or sorted(self.joint_names) != sorted(spec.joint_names):
            raise ValueError(
                f"joint_names {list(self.joint_names)} must be a permutation of the model's joints "
                f"{list(spec.joint_names)} (one per action)"
            )
        self.order = np.array([spec.joint_names.index(n) for n in self.joint_names], dtype=np.int64)
        spec_limits = np.asarray(spec.action_limits, dtype=np.float64)[self.order]
        if limits is not None and len(limits):
            limits = np.asarray(limits, dtype=np.float64).reshape(-1)
            if limits.shape != spec_limits.shape or not np.all(np.isfinite(limits)) or np.any(limits < 0):
                raise ValueError(f"torque_limits must be {len(spec_limits)} non-negative finite numbers, got {limits}")
            spec_limits = np.minimum(spec_limits, limits)
        self.limits = spec_limits
        keys = {o.name for o in spec.observations}
        for key in JOINT_KEYS:
            if key in keys and spec.observation(key).shape != (len(spec.joint_names),):
                raise ValueError(f"model observation {key!r} has shape {spec.observation(key).shape}, "
                                 f"expected one value per joint ({len(spec.joint_names)})")
        self.uses_joints = any(k in keys for k in JOINT_KEYS)
        self.need_velocity = "joint_velocities" in keys
        self.image_specs = [o for o in spec.observations if o.kind == "image"]
        self.vector_specs = [o for o in spec.observations if o.kind != "image" and o.name not in JOINT_KEYS]
        self._lock = threading.Lock()
        self._inputs: dict[str, Buffered] = {}

    # --- inputs (called from subscription callbacks) ---

    def _store(self, name: str, value: Any, error: str | None, stamp: float) -> None:
        with self._lock:
            old = self._inputs.get(name)
            if old is None or stamp >= old.stamp:
                self._inputs[name] = Buffered(value, error, stamp)

    def on_joint_state(self, msg: Any, stamp: float) -> None:
        try:
            value, error = ros_io.joint_state_arrays(msg, self.spec.joint_names, self.need_velocity), None
        except (ros_io.InputError, ValueError, TypeError) as err:
            value, error = None, f"joint states: {err}"
        self._store("joint_states", value, error, stamp)

    def on_image(self, msg: Any, stamp: float) -> None:
        try:
            value = {o.name: ros_io.image_to_observation(msg, o.shape, self.max_image_bytes) for o in self.image_specs}
            error = None
        except (ros_io.InputError, ValueError, TypeError, MemoryError) as err:
            value, error = None, f"image: {err}"
        self._store("image", value, error, stamp)

    def on_vector(self, key: str, msg: Any, stamp: float) -> None:
        try:
            value, error = ros_io.vector_observation(msg.data, self.spec.observation(key).shape), None
        except (ros_io.InputError, ValueError, TypeError) as err:
            value, error = None, f"{key}: {err}"
        self._store(key, value, error, stamp)

    def required_inputs(self) -> list[str]:
        names = ["joint_states"] if self.uses_joints else []
        names += ["image"] if self.image_specs else []
        return names + [o.name for o in self.vector_specs]

    def input_ages(self, now: float) -> dict[str, float]:
        with self._lock:
            inputs = dict(self._inputs)
        return {n: now - inputs[n].stamp if n in inputs else float("inf") for n in self.required_inputs()}

    def latest(self, name: str) -> Buffered | None:
        """The latest converted input `name` ("joint_states", "image" or a vector key), for diagnostics."""
        with self._lock:
            return self._inputs.get(name)

    def clear(self) -> None:
        with self._lock:
            self._inputs.clear()

    # --- the tick ---

    def safe(self, level: int, message: str) -> TickResult:
        return TickResult(np.zeros_like(self.limits), level, message, False, float("nan"))

    def tick(self, now: float) -> TickResult:
        with self._lock:
            inputs = dict(self._inputs)
        missing, stale, invalid = [], [], []
        for name in self.required_inputs():
            buf = inputs.get(name)
            if buf is None:
                missing.append(name)
            elif now - buf.stamp > self.stale_timeout_s:
                stale.append(f"{name} ({now - buf.stamp:.3f} s old)")
            elif buf.error is not None:
                invalid.append(buf.error)
        if invalid:
            return self.safe(ERROR, "invalid input: " + "; ".join(invalid))
        if missing or stale:
            parts = ([f"missing {missing}"] if missing else []) + ([f"stale {stale}"] if stale else [])
            return self.safe(WARN, "safe command: " + ", ".join(parts))
        obs: dict[str, np.ndarray] = {}
        if self.uses_joints:
            pos, vel = inputs["joint_states"].value
            obs["joint_positions"] = pos
            if self.need_velocity:
                obs["joint_velocities"] = vel
            obs = {k: v for k, v in obs.items() if k in {o.name for o in self.spec.observations}}
        if self.image_specs:
            obs.update(inputs["image"].value)
        for o in self.vector_specs:
            obs[o.name] = inputs[o.name].value
        start = time.perf_counter()
        try:
            action = self.runtime.step(obs)
        except Exception as err:  # a runtime failure must never stop the loop: safe command instead
            return self.safe(ERROR, f"runtime.step failed: {type(err).__name__}: {err}")
        latency = time.perf_counter() - start
        try:
            action = np.asarray(action, dtype=np.float64).reshape(-1)[self.order]
        except (IndexError, ValueError, TypeError):
            return self.safe(ERROR, f"runtime returned an action of the wrong shape ({np.shape(action)})")
        command, ok = ros_io.clamp_command(action, self.limits)
        if not ok:
            return TickResult(command, ERROR, "runtime returned a non-finite action", False, latency)
        return TickResult(command, OK, "running", True, latency)


def load_prompt(path: str, spec: EmbodimentSpec, episode: int = 0, steps: int = 0) -> dict[str, Any]:
    """A demonstration episode from a gato_ros dataset as the runtime's prompt (last `steps` steps)."""
    from gato_ros.data import read_dataset

    observations, actions = read_dataset(path, spec=spec).episode(episode)
    if steps > 0:
        observations = {k: v[-steps:] for k, v in observations.items()}
        actions = actions[-steps:]
    return {"observations": observations, "actions": actions}


# ----------------------------------------------------------------------------- the ROS node

import rclpy  # noqa: E402  (below the ROS-free core on purpose: that part documents itself first)
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue  # noqa: E402
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup  # noqa: E402
from rclpy.exceptions import ParameterUninitializedException  # noqa: E402
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor  # noqa: E402
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

PARAMETERS: dict[str, Any] = {
    "autostart": True,
    "model_path": "",  # "" = the shipped model
    "control_rate_hz": 0.0,  # 0 = the model's rate
    "joint_names": Parameter.Type.STRING_ARRAY,  # unset = the model's joints
    "joint_states_topic": "/joint_states",
    "image_topic": "/camera/image_raw",
    "command_topic": "/effort_controller/commands",
    "stale_timeout_s": 0.25,
    "torque_limits": Parameter.Type.DOUBLE_ARRAY,  # unset = the model's action limits (the minimum applies)
    "provider": "auto",
    "context_tokens": 0,  # 0 = the model's default
    "threads": 0,  # ONNX Runtime intra-op threads; 0 = its default (one per core)
    "max_image_bytes": ros_io.MAX_IMAGE_BYTES,
    "prompt_path": "",  # a gato_ros dataset directory: its episode becomes the prompt on each reset
    "prompt_episode": 0,
    "prompt_steps": 0,  # 0 = the whole episode
}


class PolicyNode(LifecycleNode):
    """Lifecycle node `gato_policy`: see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        for name, default in PARAMETERS.items():
            self.declare_parameter(name, default)
        self.state_label = "unconfigured"
        self.runtime: Any = None
        self.loop: PolicyLoop | None = None
        self.model_path = ""
        self.period_s = 0.0
        self.prompt: dict[str, Any] | None = None
        self.last_error = ""
        self._tick_lock = threading.Lock()  # one tick, transition or reset at a time touches the runtime
        self._active = False
        self._timer = None
        self._command_pub = None
        self._input_subs: list[Any] = []
        # The control timer's own group: in a multi-threaded executor it never waits behind inputs.
        self._control_group = MutuallyExclusiveCallbackGroup()
        self._reset_stats()
        # Diagnostics and services live for the node's whole life, so a failed configure is visible.
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics)
        self._tick_pub = self.create_publisher(String, TICK_TOPIC, 10)  # one record per tick (gato_ros.ticks)
        self._tick_seq = 0
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_service(Trigger, "~/load_prompt", self._on_load_prompt)

    def _param(self, name: str) -> Any:
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:  # declared by type only and not set: use the model's
            return None

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _reset_stats(self) -> None:
        self.ticks = 0
        self.safe_ticks = 0
        self.deadline_misses = 0
        self.level, self.message = OK, ""
        self.worst_level = OK  # since the last diagnostics message
        self._tick_times: deque[float] = deque(maxlen=1000)
        self._latencies: deque[float] = deque(maxlen=1000)
        self._last_tick = None

    # --- lifecycle ---

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            from gato_ros.runtime import PolicyRuntime  # numpy + onnxruntime only

            self.model_path = self._param("model_path") or default_model_path()
            context = int(self._param("context_tokens"))
            kwargs = {"threads": int(self._param("threads"))} if self._param("threads") else {}
            runtime = PolicyRuntime(self.model_path, provider=self._param("provider"), context_tokens=context or None,
                                    **kwargs)
            loop = PolicyLoop(
                runtime,
                list(self._param("joint_names") or ()),
                self._param("torque_limits") or None,
                self._param("stale_timeout_s"),
                self._param("max_image_bytes"),
            )
            rate = float(self._param("control_rate_hz")) or float(runtime.spec.control_rate_hz)
            if not np.isfinite(rate) or rate <= 0:
                raise ValueError(f"control_rate_hz must be positive, got {rate}")
            prompt = None
            if self._param("prompt_path"):
                prompt = load_prompt(self._param("prompt_path"), runtime.spec, self._param("prompt_episode"),
                                     self._param("prompt_steps"))
        except Exception as err:  # ModelLoadError, bad parameters, a bad prompt: stay unconfigured, stay up
            self.last_error = f"configure failed: {type(err).__name__}: {err}"
            self.get_logger().error(self.last_error)
            return TransitionCallbackReturn.FAILURE
        self.runtime, self.loop, self.period_s, self.prompt = runtime, loop, 1.0 / rate, prompt
        self._command_pub = self.create_publisher(Float64MultiArray, self._param("command_topic"), 10)
        if loop.uses_joints:
            self._input_subs.append(self.create_subscription(
                JointState, self._param("joint_states_topic"), lambda m: loop.on_joint_state(m, self._now()),
                qos_profile_sensor_data))
        if loop.image_specs:
            self._input_subs.append(self.create_subscription(
                Image, self._param("image_topic"), lambda m: loop.on_image(m, self._now()),
                qos_profile_sensor_data))
        for o in loop.vector_specs:
            self._input_subs.append(self.create_subscription(
                Float64MultiArray, OBSERVATION_TOPIC_PREFIX + o.name,
                lambda m, key=o.name: loop.on_vector(key, m, self._now()), qos_profile_sensor_data))
        self.last_error = ""
        self.state_label = "inactive"
        self.get_logger().info(
            f"configured: model {self.model_path} ({getattr(runtime, 'provider', '?')}), {rate:g} Hz, "
            f"joints {list(loop.joint_names)}, limits {loop.limits.tolist()}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._tick_lock:
            try:
                self.runtime.reset(prompt=self.prompt)  # a fresh activation is a new episode
            except Exception as err:
                self.last_error = f"activate failed: runtime.reset: {err}"
                self.get_logger().error(self.last_error)
                return TransitionCallbackReturn.FAILURE
            self._reset_stats()
            self._active = True
            self._timer = self.create_timer(self.period_s, self._on_tick, self._control_group)
        self.state_label = "active"
        self.get_logger().info(f"active: publishing on {self._command_pub.topic_name} every {self.period_s:.4f} s")
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
        # Under the tick lock: a tick in flight finishes first, so the safe command is the last one out.
        with self._tick_lock:
            was_active = self._active
            self._active = False
            if self._timer is not None:
                self.destroy_timer(self._timer)
                self._timer = None
            if publish_safe and was_active and self._command_pub is not None and self.loop is not None:
                self._command_pub.publish(Float64MultiArray(data=np.zeros_like(self.loop.limits).tolist()))

    def _unload(self) -> None:
        with self._tick_lock:
            for sub in self._input_subs:
                self.destroy_subscription(sub)
            self._input_subs = []
            if self._command_pub is not None:
                self.destroy_publisher(self._command_pub)
                self._command_pub = None
            self.runtime = self.loop = self.prompt = None

    # --- control loop ---

    def _on_tick(self) -> None:
        start = time.perf_counter()
        with self._tick_lock:
            if not self._active or self.loop is None:
                return
            now = self._now()  # the node's clock: wall time, or the sim's /clock with use_sim_time
            result = self.loop.tick(now)
            self._command_pub.publish(Float64MultiArray(data=result.command.tolist()))
            self._tick_pub.publish(String(data=self._tick_record(result)))
        # Bookkeeping outside the lock; a late or slow tick is counted, never fatal. Lateness is judged
        # on the node's clock (so a sim running faster or slower than real time is not "late"), the
        # tick's own duration on the wall clock (compute time).
        late = self._last_tick is not None and now - self._last_tick > 1.5 * self.period_s
        self.deadline_misses += late or time.perf_counter() - start > self.period_s
        self._last_tick = now
        self.ticks += 1
        self.safe_ticks += not result.stepped
        self._tick_times.append(now)
        if result.stepped:
            self._latencies.append(result.latency_s)
        if result.message != self.message:  # log changes only; one call site per severity (rclpy requires it)
            if result.level == ERROR:
                self.get_logger().error(result.message, throttle_duration_sec=1.0)
            elif result.level == WARN:
                self.get_logger().warning(result.message, throttle_duration_sec=1.0)
            else:
                self.get_logger().info(result.message, throttle_duration_sec=1.0)
        self.level, self.message = result.level, result.message
        self.worst_level = max(self.worst_level, result.level)
        if result.level == ERROR:
            self.last_error = result.message

    def _tick_record(self, result: TickResult) -> str:
        """The tick's JSON record (gato_ros.ticks): what a recording needs to replay this decision."""
        from gato_ros.tokenizer import tokenize_action

        self._tick_seq += 1
        tokens: list[int] = []
        if result.stepped:  # the command's tokens, in the model's action order
            action = np.empty_like(result.command)
            action[self.loop.order] = result.command
            tokens = tokenize_action(self.loop.spec, action).tolist()
        return tick_json(self._tick_seq, self.get_clock().now().nanoseconds, Path(self.model_path).name, tokens,
                         result.latency_s * 1e3 if result.stepped else None, not result.stepped,
                         "" if result.stepped else result.message, result.command.tolist())

    def achieved_rate_hz(self, window_s: float = 2.0) -> float:
        times = [t for t in list(self._tick_times) if t >= self._now() - window_s]
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0

    def _publish_diagnostics(self) -> None:
        lat = np.asarray(list(self._latencies), dtype=np.float64)
        values = {
            "state": self.state_label,
            "model_path": self.model_path or self._param("model_path") or default_model_path(),
            "provider": str(getattr(self.runtime, "provider", "")),
            "target_rate_hz": f"{1.0 / self.period_s:.3f}" if self.period_s else "",
            "achieved_rate_hz": f"{self.achieved_rate_hz():.3f}",
            "step_latency_p50_ms": f"{np.percentile(lat, 50) * 1e3:.3f}" if lat.size else "",
            "step_latency_p99_ms": f"{np.percentile(lat, 99) * 1e3:.3f}" if lat.size else "",
            "ticks": str(self.ticks),
            "safe_ticks": str(self.safe_ticks),
            "deadline_misses": str(self.deadline_misses),
            "last_error": self.last_error,
        }
        loop = self.loop
        if loop is not None:
            for name, age in loop.input_ages(self._now()).items():
                values[f"input_age_s.{name}"] = f"{age:.3f}"
        if self.state_label != "active":
            level = ERROR if self.last_error else WARN
            message = self.last_error or f"not running ({self.state_label})"
        else:
            level, message = max(self.worst_level, self.level), self.message
        self.worst_level = OK
        status = DiagnosticStatus(
            level=bytes([level]), name=f"{self.get_fully_qualified_name()}: control loop", message=message,
            hardware_id=Path(values["model_path"]).name,
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)

    # --- services ---

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._tick_lock:
            if self.runtime is None:
                response.success, response.message = False, f"not configured ({self.last_error or self.state_label})"
                return response
            try:
                self.runtime.reset(prompt=self.prompt)
            except Exception as err:
                response.success, response.message = False, f"reset failed: {err}"
                return response
        response.success = True
        response.message = "context reset" + (" with the demonstration prompt" if self.prompt else "")
        return response

    def _on_load_prompt(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Load parameter `prompt_path` (episode `prompt_episode`) and start a new episode with it."""
        path = self._param("prompt_path")
        with self._tick_lock:
            if self.runtime is None:
                response.success, response.message = False, "not configured"
                return response
            try:
                prompt = load_prompt(path, self.runtime.spec, self._param("prompt_episode"),
                                     self._param("prompt_steps")) if path else None
                self.runtime.reset(prompt=prompt)
            except Exception as err:
                response.success, response.message = False, f"cannot load prompt {path!r}: {err}"
                return response
            self.prompt = prompt
        response.success = True
        response.message = f"prompt loaded from {path}" if path else "prompt cleared (prompt_path is empty)"
        return response


# ----------------------------------------------------------------------------- entry points


def autostart(node: PolicyNode) -> None:
    if node._param("autostart") and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
        node.trigger_activate()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (e.g. from ros2 launch) ends like Ctrl-C: safe command, clean exit


def main(argv: list[str] | None = None) -> int:
    """Console script `policy_node`: spin the node until Ctrl-C / SIGTERM, then send the safe command."""
    argv = list(sys.argv if argv is None else argv)
    # Own signal handling: on Ctrl-C the context must stay up long enough to publish the safe command.
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    node = PolicyNode()
    # One thread: rclpy's MultiThreadedExecutor busy-waits while a ready entity's callback group is
    # busy, holding the GIL: in 8 s at 20 Hz it delivered 31 commands instead of 160, with gaps up to
    # 2 s and a core at 100 % (scripts/executor_ticks.py). The tick and the input callbacks are each a
    # few ms, so running them in turn keeps the period; the locks stay for users who add the node to
    # their own executor.
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        autostart(node)
        # spin_once with a timeout, not spin(): on sim time with the clock paused nothing else would
        # wake the executor, and the Python signal handler only runs between calls.
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if rclpy.ok():
            node._stop(publish_safe=True)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Parameters as ROS arguments, e.g. gato-ros node --ros-args -p model_path:=model.onnx"
    parser.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=None,
                        help="ROS arguments (-p name:=value, --params-file FILE, -r remaps), passed to rclpy")


def run(args: argparse.Namespace) -> int:
    return main(["gato-ros-node"] + (["--ros-args", *args.ros_args] if args.ros_args is not None else []))


if __name__ == "__main__":
    sys.exit(main())
