"""The control loop without ROS: input buffers, one tick's decision, the safe action, limits and joint mapping.

`ControlLoop.tick` turns the latest inputs into what goes to the arm this period: the policy's action
when every input is present, fresh and valid and the policy answers; otherwise the safe action
(gato_ros.commands: `hold` by default). The node (gato_ros/node.py) only wires it to ROS: it feeds
messages in, calls `tick` from its timer and publishes the result. numpy only, so it is tested
without rclpy (tests/test_control.py) and runs in-process against the PyBullet env.

Inputs: the joint states, one camera per image key of the model (each key its own topic, named by the
node's `image_topics`), and one vector per other key. Each is judged on its own: a camera that is
missing, stale, in an unsupported encoding, or of another aspect ratio than the model's input (resizing
would squash the field of view it was trained on) gives the safe action, and the reason names the key
and its topic. Frames of the model's aspect ratio are resized (area averaging when shrinking); the
decode + resize time of the frames a tick uses is its `image_ms`.

Time: an input's age is judged on the monotonic clock at receive (`time.monotonic()`), so a node
clock that steps back or leaps never makes old data fresh; header stamps, where a message has one,
are checked against the node clock when the message arrives, and a stamp too far from it makes the
input invalid.

The safe action: when a fault begins (the first safe tick after running), the loop snapshots the
arm's joint positions from the latest valid joint state and the gripper's last command; the snapshot
is kept for the whole fault, through any change of cause, and dropped when a tick runs the policy
again. Recovery needs no call: the first tick whose inputs are good runs the policy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from gato_ros import commands, ros_io
from gato_ros import tokenizer as tok
from gato_ros.hold_table import HoldGainTable
from gato_ros.spec import EmbodimentSpec

JOINT_KEYS = ("joint_positions", "joint_velocities")
# diagnostic_msgs/DiagnosticStatus levels
OK, WARN, ERROR = 0, 1, 2
NO_GRIPPER = "none"


# ----------------------------------------------------------------------------- the robot's joints


def parse_joint_name_map(entries: Sequence[str]) -> dict[str, str]:
    """["panda_joint1=fr3_joint1", ...] (the parameter's form) → {model name: robot name}."""
    mapping: dict[str, str] = {}
    for entry in entries:
        model, sep, robot = str(entry).partition("=")
        model, robot = model.strip(), robot.strip()
        if not sep or not model or not robot:
            raise ValueError(f"joint_name_map entries are 'model_name=robot_name', got {entry!r}")
        if model in mapping:
            raise ValueError(f"joint_name_map maps {model!r} twice")
        mapping[model] = robot
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"joint_name_map maps two model joints to one robot joint: {mapping}")
    return mapping


@dataclass(frozen=True)
class JointLayout:
    """How the model's actions and joint observations map onto the robot's controllers.

    Arm joints go to the arm controller in its joint order; the gripper (the model's discrete action
    by default) has an output of its own. `robot_joint_names` are the model's joints
    (spec.joint_names order) renamed by joint_name_map: the names looked up in JointState."""

    robot_joint_names: tuple[str, ...]
    arm_names: tuple[str, ...]  # robot names, arm controller order
    arm_actions: np.ndarray  # model action index of each arm joint
    arm_joints: np.ndarray  # index into spec.joint_names (joint observations) of each arm joint
    gripper_name: str | None
    gripper_action: int | None
    spec_limits: np.ndarray  # the model's limits: arm joints (controller order), then the gripper

    @property
    def command_names(self) -> tuple[str, ...]:
        """The joints of a full command: the arm, then the gripper."""
        return self.arm_names + ((self.gripper_name,) if self.gripper_name else ())


def _find_gripper_action(spec: EmbodimentSpec, gripper_action: str) -> int | None:
    names = [a.name for a in spec.actions]
    if gripper_action == NO_GRIPPER:
        return None
    if gripper_action:
        if gripper_action not in names:
            raise ValueError(f"gripper_action {gripper_action!r} is not one of the model's actions {names}")
        return names.index(gripper_action)
    discrete = [i for i, a in enumerate(spec.actions) if a.kind == "discrete"]
    return discrete[0] if len(discrete) == 1 else None


def build_layout(spec: EmbodimentSpec, joint_name_map: Mapping[str, str] | None = None,
                 arm_joint_names: Sequence[str] = (), gripper_action: str = "") -> JointLayout:
    """The layout for a model; `arm_joint_names` (robot names) orders the arm controller's joints.

    `gripper_action`: "" = the model's one discrete action, "none" = no gripper output, else a model action name."""
    rename = dict(joint_name_map or {})
    unknown = sorted(set(rename) - set(spec.joint_names) - {a.name for a in spec.actions})
    if unknown:
        raise ValueError(f"joint_name_map names joints the model does not have: {unknown}")
    model_joints = list(spec.joint_names)
    gripper = _find_gripper_action(spec, gripper_action)
    arm_model = [a.name for i, a in enumerate(spec.actions) if i != gripper]
    missing = [n for n in arm_model if n not in model_joints]
    if missing:
        raise ValueError(f"arm actions {missing} are not among the model's joints {model_joints}: cannot hold them")
    default_order = [rename.get(n, n) for n in arm_model]
    order = list(arm_joint_names) or default_order
    if sorted(order) != sorted(default_order) or len(set(order)) != len(order):
        raise ValueError(f"joint_names {order} must be a permutation of the arm joints {default_order}")
    to_model = {rename.get(n, n): n for n in arm_model}
    names = [a.name for a in spec.actions]
    arm_actions = np.array([names.index(to_model[r]) for r in order], dtype=np.int64)
    limits = [spec.actions[i].limit for i in arm_actions]
    limits += [spec.actions[gripper].limit] if gripper is not None else []
    gripper_name = None if gripper is None else rename.get(names[gripper], names[gripper])
    return JointLayout(
        robot_joint_names=tuple(rename.get(n, n) for n in model_joints),
        arm_names=tuple(order),
        arm_actions=arm_actions,
        arm_joints=np.array([model_joints.index(to_model[r]) for r in order], dtype=np.int64),
        gripper_name=gripper_name,
        gripper_action=gripper,
        spec_limits=np.asarray(limits, dtype=np.float64),
    )


def tightened_limits(layout: JointLayout, limits: Sequence[float] | None) -> np.ndarray:
    """The model's limits tightened by `limits` (the arm joints, optionally then the gripper): the minimum applies."""
    spec = layout.spec_limits
    if limits is None or not len(limits):
        return spec.copy()
    x = np.asarray(limits, dtype=np.float64).reshape(-1)
    n_arm = len(layout.arm_names)
    if x.size not in (n_arm, spec.size) or not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError(f"torque_limits must be {n_arm} (arm) or {spec.size} (arm, gripper) non-negative finite "
                         f"numbers, got {x.tolist()}")
    out = spec.copy()
    out[: x.size] = np.minimum(spec[: x.size], x)
    return out


# ----------------------------------------------------------------------------- inputs

CAMERA_KEY_PREFIX = "camera_"  # image key `camera_<name>` reads `<name>/image_raw` unless image_topics says otherwise
MAX_ASPECT_ERROR = 0.01  # relative: a frame whose width/height differs more from the model's is another view


def default_image_topic(key: str, fallback: str) -> str:
    """The topic of image key `key` when image_topics does not name one: `camera_<name>` → `<name>/image_raw`
    (the sim bridge's and ROS camera drivers' layout), any other key → `fallback` (the node's image_topic)."""
    if key.startswith(CAMERA_KEY_PREFIX) and len(key) > len(CAMERA_KEY_PREFIX):
        return f"{key[len(CAMERA_KEY_PREFIX):]}/image_raw"
    return fallback


def parse_image_topics(entries: Sequence[str], image_keys: Sequence[str], fallback: str) -> dict[str, str]:
    """["camera_scene=scene/image_raw", ...] (the image_topics parameter) → {image key: topic}, for every image
    key of the model: the keys not named take `default_image_topic`."""
    named: dict[str, str] = {}
    for entry in entries:
        key, sep, topic = str(entry).partition("=")
        key, topic = key.strip().rstrip(":"), topic.strip()  # 'key:=topic' reads as 'key=topic' too
        if not sep or not key or not topic:
            raise ValueError(f"image_topics entries are 'image_key=topic', got {entry!r}")
        if key not in image_keys:
            raise ValueError(f"image_topics names {key!r}, not an image key of the model {list(image_keys)}")
        if key in named:
            raise ValueError(f"image_topics maps {key!r} twice")
        named[key] = topic
    return {key: named.get(key, default_image_topic(key, fallback)) for key in image_keys}


def check_aspect(image: np.ndarray, shape: Sequence[int]) -> None:
    """InputError when a decoded frame's aspect ratio is not the model's input's: resizing would squash it."""
    h, w = image.shape[:2]
    want_h, want_w = int(shape[0]), int(shape[1])
    if abs(w * want_h - h * want_w) > MAX_ASPECT_ERROR * h * want_w:
        raise ros_io.InputError(f"frame is {w}×{h}, not the aspect ratio of the model's {want_w}×{want_h} input "
                                f"(another field of view; only the size may differ)")


def image_observation(msg: Any, shape: Sequence[int], max_bytes: int = ros_io.MAX_IMAGE_BYTES) -> np.ndarray:
    """A sensor_msgs/Image → the model's (H, W, 3) uint8 RGB input: decoded, its aspect ratio checked, resized."""
    image = ros_io.decode_image(msg.encoding, int(msg.height), int(msg.width), int(msg.step), msg.data, max_bytes)
    check_aspect(image, shape)
    return ros_io.resize_image(image, int(shape[0]), int(shape[1]))


@dataclass
class Buffered:
    """The latest message of one input, converted: a value or the reason it is invalid."""

    value: Any
    error: str | None
    received: float  # time.monotonic() at receive
    cost_ms: float = 0.0  # conversion time (an image's decode + resize)


@dataclass(frozen=True)
class JointReading:
    """A valid joint state, in spec.joint_names order."""

    positions: np.ndarray
    velocities: np.ndarray | None
    received: float


# ----------------------------------------------------------------------------- the tick's result


@dataclass(frozen=True)
class Fault:
    """Why a tick sends the safe action: `reason` with its details (ages, values), `cause` without the
    numbers that change every tick, so that a lasting fault is logged once."""

    level: int
    reason: str
    cause: str


@dataclass(frozen=True)
class TickResult:
    """What one tick sends: the arm command (controller order; None = nothing to send) and the gripper's."""

    arm: np.ndarray | None
    gripper: float | None
    level: int  # OK / WARN / ERROR
    reason: str  # "" while the policy runs
    safe: bool
    tokens: tuple[int, ...] = ()
    step_ms: float | None = None
    cause: str = ""  # the reason without per-tick details ("" while running)
    image_ms: float | None = None  # decode + resize of the frames this tick used (None: no policy step, or no image)

    @property
    def message(self) -> str:
        return self.reason or "running"

    @property
    def command(self) -> list[float]:
        """The arm, then the gripper, as sent (what ~/tick records)."""
        arm = [] if self.arm is None else [float(v) for v in self.arm]
        return arm + ([] if self.gripper is None else [float(self.gripper)])


# The hold's default gains, for the simulated Panda at 20 Hz (scripts/hold_gains.py derives and checks them):
# full matrices M0·ω² and M0·2ζω (ω = 9 rad/s, ζ = 0.75), M0 the joint-space mass matrix averaged over the
# poses in which the first shipped int8 policy carries a cube (stable over the re-exported one's too). The
# torque is held for a whole 50 ms period, and the Panda's joints 1/3/5/7 are nearly coaxial there: per-joint
# gains that brake one joint excite the others (every diagonal choice tried either went unstable or let the
# hand drift > 1 cm), mass-scaled ones do not.
DEFAULT_HOLD_STIFFNESS = (
    105, -0.9834, 90.59, -2.756, -3.192, 0.1648, -0.3397,
    -0.9834, 130.3, -2.866, -61.16, -1.142, -9.276, -0.0006461,
    90.59, -2.866, 84.28, -1.094, -2.684, 0.3158, -0.3203,
    -2.756, -61.16, -1.094, 72.04, 2.598, 10.99, 0.005354,
    -3.192, -1.142, -2.684, 2.598, 2.34, -0.002752, 0.284,
    0.1648, -9.276, 0.3158, 10.99, -0.002752, 3.638, 0.0,
    -0.3397, -0.0006461, -0.3203, 0.005354, 0.284, 0.0, 0.3397)
DEFAULT_HOLD_DAMPING = (
    17.5, -0.1639, 15.1, -0.4594, -0.532, 0.02746, -0.05661,
    -0.1639, 21.72, -0.4777, -10.19, -0.1904, -1.546, -0.0001077,
    15.1, -0.4777, 14.05, -0.1823, -0.4473, 0.05263, -0.05338,
    -0.4594, -10.19, -0.1823, 12.01, 0.4329, 1.831, 0.0008923,
    -0.532, -0.1904, -0.4473, 0.4329, 0.39, -0.0004587, 0.04733,
    0.02746, -1.546, 0.05263, 1.831, -0.0004587, 0.6064, 0.0,
    -0.05661, -0.0001077, -0.05338, 0.0008923, 0.04733, 0.0, 0.05662)


def hold_gains(stiffness: Sequence[float], damping: Sequence[float], n_arm: int) -> commands.HoldGains:
    """Hold gains for `n_arm` joints: one value for all, one per joint (≥ 0), or an n×n matrix (row-major,
    symmetric with a non-negative spectrum, so it never pushes the arm away)."""
    out = []
    for name, values in (("hold_stiffness", stiffness), ("hold_damping", damping)):
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if x.size == 1:
            x = np.full(n_arm, x[0])
        ok = x.size in (n_arm, n_arm * n_arm) and bool(np.all(np.isfinite(x)))
        if ok and x.size == n_arm:
            ok = bool(np.all(x >= 0))
        elif ok:
            m = x.reshape(n_arm, n_arm)
            ok = bool(np.allclose(m, m.T)) and bool(np.linalg.eigvalsh(m).min() >= -1e-9)
        if not ok:
            raise ValueError(f"{name} must be 1 or {n_arm} non-negative numbers, or a symmetric positive "
                             f"semi-definite {n_arm}×{n_arm} matrix (row-major), got {list(values)}")
        out.append(tuple(float(v) for v in x))
    return commands.HoldGains(*out)


@dataclass
class SafeActionSettings:
    kind: str = "hold"
    gains: commands.HoldGains = field(
        default_factory=lambda: commands.HoldGains(tuple(map(float, DEFAULT_HOLD_STIFFNESS)),
                                                   tuple(map(float, DEFAULT_HOLD_DAMPING))))
    # Pose-dependent hold gains (gato_ros.hold_table): the gains at the fault pose replace `gains` for that fault.
    table: HoldGainTable | None = None


# ----------------------------------------------------------------------------- the loop


class ControlLoop:
    """Latest-value input buffers and one control tick, independent of rclpy.

    Thread-safe: message callbacks and the tick may run on different threads. Settings that a node
    parameter changes live (limits, stale timeout, safe action, stamp offset) are plain attributes
    applied from the next tick."""

    def __init__(self, runtime: Any, layout: JointLayout, mode: str = "effort", limits: np.ndarray | None = None,
                 stale_timeout_s: float = 0.25, max_stamp_offset_s: float = 1.0,
                 safe: SafeActionSettings | None = None, max_image_bytes: int = ros_io.MAX_IMAGE_BYTES,
                 image_topics: Mapping[str, str] | None = None) -> None:
        spec: EmbodimentSpec = runtime.spec
        commands.check_output_mode(mode, commands.model_action_mode(spec))
        self.runtime, self.spec, self.layout, self.mode = runtime, spec, layout, mode
        self.limits = layout.spec_limits.copy() if limits is None else np.asarray(limits, dtype=np.float64)
        self.stale_timeout_s = float(stale_timeout_s)
        self.max_stamp_offset_s = float(max_stamp_offset_s)
        self.safe_settings = safe or SafeActionSettings()
        commands.check_safe_action(self.safe_settings.kind, mode)
        n_arm = len(layout.arm_names)
        if {len(self.safe_settings.gains.stiffness), len(self.safe_settings.gains.damping)} - {n_arm, n_arm * n_arm}:
            raise ValueError(f"hold gains must be {n_arm} values or {n_arm}×{n_arm} matrices (the arm's joints): "
                             f"set hold_stiffness and hold_damping for this arm")
        self.max_image_bytes = int(max_image_bytes)
        keys = {o.name for o in spec.observations}
        for key in JOINT_KEYS:
            if key in keys and spec.observation(key).shape != (len(spec.joint_names),):
                raise ValueError(f"model observation {key!r} has shape {spec.observation(key).shape}, "
                                 f"expected one value per joint ({len(spec.joint_names)})")
        self.observed_joint_keys = [k for k in JOINT_KEYS if k in keys]
        self._needs_velocity = "joint_velocities" in keys
        self.image_specs = [o for o in spec.observations if o.kind == "image"]
        # image key -> its topic, to name it in faults (the node subscribes; here only for the messages)
        self.image_topics = dict(image_topics or {o.name: default_image_topic(o.name, "camera/image_raw")
                                                  for o in self.image_specs})
        self.vector_specs = [o for o in spec.observations if o.kind != "image" and o.name not in JOINT_KEYS]
        self._lock = threading.Lock()
        self._inputs: dict[str, Buffered] = {}
        self._joints: JointReading | None = None  # the latest valid joint state
        self._snapshot: commands.FaultSnapshot | None = None  # set while a fault lasts
        self._last_gripper = 0.0  # the policy's last gripper command (0 N before the first)

    # --- inputs (called from subscription callbacks; `now_ns` is the node clock, for header stamps) ---

    def _store(self, name: str, value: Any, error: str | None, received: float, cost_ms: float = 0.0) -> None:
        with self._lock:
            old = self._inputs.get(name)
            if old is None or received >= old.received:
                self._inputs[name] = Buffered(value, error, received, cost_ms)

    def _stamp_error(self, msg: Any, now_ns: int | None) -> str | None:
        if now_ns is None:
            return None
        return ros_io.stamp_error(ros_io.header_stamp_ns(msg), now_ns, self.max_stamp_offset_s)

    def on_joint_state(self, msg: Any, received: float, now_ns: int | None = None) -> None:
        """A sensor_msgs/JointState (robot names, any order). Velocities are required when the model observes
        them; otherwise they are read where present and valid (the hold damps with them) and may be absent."""
        try:
            error = self._stamp_error(msg, now_ns)
            if error:
                raise ros_io.InputError(error)
            pos, vel = ros_io.joint_state_arrays(msg, self.layout.robot_joint_names, self._needs_velocity)
            if vel is None:
                vel = self._optional_velocities(msg)
            value: Any = (pos, vel)
        except (ros_io.InputError, ValueError, TypeError) as err:
            value, error = None, f"joint states: {err}"
        if value is not None:
            with self._lock:
                if self._joints is None or received >= self._joints.received:
                    self._joints = JointReading(value[0], value[1], received)
        self._store("joint_states", value, error, received)

    def _optional_velocities(self, msg: Any) -> np.ndarray | None:
        try:
            return ros_io.joint_state_arrays(msg, self.layout.robot_joint_names, True)[1]
        except (ros_io.InputError, ValueError, TypeError):
            return None

    def on_image(self, key: str, msg: Any, received: float, now_ns: int | None = None) -> None:
        """A sensor_msgs/Image for image key `key` (its own topic): decoded to RGB and resized to the model's input."""
        start = time.perf_counter()
        shape = self.spec.observation(key).shape
        try:
            error = self._stamp_error(msg, now_ns)
            if error:
                raise ros_io.InputError(error)
            value: Any = image_observation(msg, shape, self.max_image_bytes)
        except (ros_io.InputError, ValueError, TypeError, MemoryError) as err:
            value, error = None, f"{self.describe_input(key)}: {err}"
        self._store(key, value, error, received, (time.perf_counter() - start) * 1e3)

    def describe_input(self, name: str) -> str:
        """An input as faults name it: an image key with its topic."""
        return f"{name} ({self.image_topics[name]})" if name in self.image_topics else name

    def on_vector(self, key: str, msg: Any, received: float) -> None:
        """A std_msgs/Float64MultiArray observation (no header: no stamp to check)."""
        try:
            value, error = ros_io.vector_observation(msg.data, self.spec.observation(key).shape), None
        except (ros_io.InputError, ValueError, TypeError) as err:
            value, error = None, f"{key}: {err}"
        self._store(key, value, error, received)

    def required_inputs(self) -> list[str]:
        names = ["joint_states"] if self.observed_joint_keys else []
        names += [o.name for o in self.image_specs]
        return names + [o.name for o in self.vector_specs]

    def input_ages(self, now: float) -> dict[str, float]:
        """Seconds since each required input last arrived (monotonic clock); inf when never."""
        with self._lock:
            inputs = dict(self._inputs)
        return {n: now - inputs[n].received if n in inputs else float("inf") for n in self.required_inputs()}

    def latest(self, name: str) -> Buffered | None:
        """The latest converted input `name` ("joint_states", an image key or a vector key), for diagnostics."""
        with self._lock:
            return self._inputs.get(name)

    def clear(self) -> None:
        """Forget every input and the fault snapshot (a new activation)."""
        with self._lock:
            self._inputs.clear()
            self._joints = None
            self._snapshot = None
            self._last_gripper = 0.0

    # --- the tick ---

    def _input_fault(self, inputs: dict[str, Buffered], now: float) -> Fault | None:
        missing, stale, invalid = [], [], {}
        for name in self.required_inputs():
            buf = inputs.get(name)
            if buf is None:
                missing.append(self.describe_input(name))
            elif now - buf.received > self.stale_timeout_s or not now >= buf.received:
                stale.append((self.describe_input(name), now - buf.received))
            elif buf.error is not None:
                invalid[name] = buf.error
        if invalid:
            return Fault(ERROR, "invalid input: " + "; ".join(invalid.values()), f"invalid input: {sorted(invalid)}")
        if missing or stale:
            ages = [f"{name} ({age:.3f} s old)" for name, age in stale]
            parts = ([f"missing {missing}"] if missing else []) + ([f"stale {ages}"] if stale else [])
            causes = ([f"missing {missing}"] if missing else []) + ([f"stale {[n for n, _ in stale]}"] if stale else [])
            return Fault(WARN, "safe action: " + ", ".join(parts), "safe action: " + ", ".join(causes))
        return None

    def _observation(self, inputs: dict[str, Buffered]) -> dict[str, np.ndarray]:
        obs: dict[str, np.ndarray] = {}
        if self.observed_joint_keys:
            pos, vel = inputs["joint_states"].value
            joint_values = {"joint_positions": pos, "joint_velocities": vel}
            obs.update({k: joint_values[k] for k in self.observed_joint_keys})
        for o in self.image_specs:
            obs[o.name] = inputs[o.name].value
        for o in self.vector_specs:
            obs[o.name] = inputs[o.name].value
        return obs

    def _run_policy(self, obs: dict[str, np.ndarray], now: float) -> TickResult:
        start = time.perf_counter()
        try:
            tokens = self.runtime.step_tokens(obs)
            action = np.asarray(tok.detokenize_action(self.spec, tokens), dtype=np.float64).reshape(-1)
        except Exception as err:  # NonFiniteLogitsError or any runtime failure: the safe action, never a crash
            return self._fault(Fault(ERROR, f"policy failed: {type(err).__name__}: {err}",
                                     f"policy failed: {type(err).__name__}"), now)
        step_ms = (time.perf_counter() - start) * 1e3
        layout = self.layout
        if action.shape != (self.spec.action_size,) or not np.all(np.isfinite(action)):
            return self._fault(Fault(ERROR, f"policy returned a non-finite or misshapen action {action.tolist()}",
                                     "policy returned a non-finite or misshapen action"), now)
        arm = np.clip(action[layout.arm_actions], -self.limits[: len(layout.arm_names)],
                      self.limits[: len(layout.arm_names)])
        gripper = None
        if layout.gripper_action is not None:
            gripper = float(np.clip(action[layout.gripper_action], -self.limits[-1], self.limits[-1]))
        with self._lock:
            self._snapshot = None  # good input is back: the fault is over
            if gripper is not None:
                self._last_gripper = gripper
        return TickResult(arm, gripper, OK, "", False, tuple(int(t) for t in tokens), step_ms)

    def tick(self, now: float, fault: Fault | None = None) -> TickResult:
        """One control period at monotonic time `now`. `fault` forces the safe action (the node's
        deadline-overrun rule); otherwise the inputs decide."""
        with self._lock:
            inputs = dict(self._inputs)
        fault = fault or self._input_fault(inputs, now)
        if fault is not None:
            return self._fault(fault, now)
        result = self._run_policy(self._observation(inputs), now)
        if self.image_specs and not result.safe:
            result = replace(result, image_ms=sum(inputs[o.name].cost_ms for o in self.image_specs))
        return result

    # --- the safe action ---

    def _fault(self, fault: Fault, now: float | None = None) -> TickResult:
        now = time.monotonic() if now is None else now
        with self._lock:
            joints = self._joints
            if self._snapshot is None or (self._snapshot.arm_positions.size == 0 and joints is not None):
                self._snapshot = self._take_snapshot(joints)
            snapshot = self._snapshot
            fresh = joints is not None and self._joint_state_fresh(now)
        arm = self._safe_arm(snapshot, joints, fresh, now)
        gripper = None
        if self.layout.gripper_action is not None:
            gripper = commands.safe_gripper_command(self.safe_settings.kind, snapshot)  # type: ignore[arg-type]
        reason = fault.reason
        if arm is not None and not fresh and self.mode == "effort" and self.safe_settings.kind == "hold":
            # Say what the hold acts on when it has no current joint state: the diagnostics show it.
            if joints is None:
                reason += "; no valid joint state yet: zero torque (gravity compensation holds)"
            else:
                braking = (snapshot.gains or self.safe_settings.gains).natural is not None
                reason += (f"; holding the snapshot from the last valid joint state ({now - joints.received:.3f} s "
                           f"old), {'braking on the hold model' if braking else 'without damping'}")
        return TickResult(arm, gripper, fault.level, reason, True, cause=fault.cause)

    def _take_snapshot(self, joints: JointReading | None) -> commands.FaultSnapshot:
        """The fault's snapshot (lock held): the arm at the latest valid joint state, the gripper's last command,
        and the hold gains for that pose when a gain table is set."""
        if joints is None:
            return commands.FaultSnapshot(np.empty(0), self._last_gripper)
        arm_q = joints.positions[self.layout.arm_joints].copy()
        table = self.safe_settings.table
        gains = table.gains_at(self.layout.arm_names, arm_q) if table is not None else None
        return commands.FaultSnapshot(arm_q, self._last_gripper, gains)

    def _joint_state_fresh(self, now: float) -> bool:
        latest = self._inputs.get("joint_states")
        return latest is not None and latest.error is None and 0.0 <= now - latest.received <= self.stale_timeout_s

    def _safe_arm(self, snapshot: commands.FaultSnapshot, joints: JointReading | None,
                  fresh: bool, now: float) -> np.ndarray | None:
        n_arm = len(self.layout.arm_names)
        if snapshot.arm_positions.size == 0:  # no valid joint state ever: nothing to hold
            return None if self.mode in ("position", "trajectory") else np.zeros(n_arm)
        settings = self.safe_settings
        index = self.layout.arm_joints
        velocities = None if joints.velocities is None else joints.velocities[index]
        # Without a fresh joint state there is no measurement to close the loop on: the hold acts on the last
        # valid state run forward on its own model where its gains have one (commands.hold_feedback); else the
        # stiffness term from the last valid positions stays (it held the load when the state went bad), and
        # there is no velocity to damp.
        state = commands.hold_feedback(settings.kind, snapshot, settings.gains,  # type: ignore[arg-type]
                                       joints.positions[index], velocities, now - joints.received, fresh)
        q, qd = state if state is not None else (joints.positions[index], np.zeros(n_arm))
        return commands.safe_arm_command(settings.kind, self.mode, snapshot, q, qd,  # type: ignore[arg-type]
                                         settings.gains, self.limits[:n_arm])

    def safe_action(self, level: int = WARN, reason: str = "safe action") -> TickResult:
        """The safe action now (deactivate, shutdown): from the fault snapshot, or one taken now."""
        return self._fault(Fault(level, reason, reason))


# ----------------------------------------------------------------------------- timing


class DeadlineMonitor:
    """Counts deadline overruns: a tick that started more than half a period late, or took longer than a period.

    `max_overruns` consecutive overruns switch the loop to the safe action (`fault`), which holds until
    as many consecutive ticks are on time again; half as many in a row already raise WARN (`level`)."""

    def __init__(self, period_s: float, max_overruns: int) -> None:
        self.period_s = float(period_s)
        self.max_overruns = int(max_overruns)
        self.total = 0
        self.streak = 0
        self.on_time = 0
        self.tripped = False
        self._last: float | None = None

    def record(self, now_s: float, duration_s: float, skip_interval: bool = False) -> bool:
        """One tick that started at `now_s` (node clock) and ran `duration_s` (wall); True when it overran."""
        late = not skip_interval and self._last is not None and now_s - self._last > 1.5 * self.period_s
        self._last = now_s
        overrun = late or duration_s > self.period_s
        self.total += overrun
        self.streak = self.streak + 1 if overrun else 0
        self.on_time = 0 if overrun else self.on_time + 1
        if self.streak >= self.max_overruns:
            self.tripped = True
        elif self.tripped and self.on_time >= self.max_overruns:
            self.tripped = False
        return overrun

    def describe(self) -> str:
        return f"{self.streak} consecutive deadline overruns ({self.total} in all; max_overruns {self.max_overruns})"

    def fault(self) -> Fault | None:
        """The fault while the overrun rule holds the safe action, else None."""
        if not self.tripped:
            return None
        return Fault(ERROR, f"safe action: deadline overruns ({self.describe()})", "safe action: deadline overruns")

    def level(self) -> int:
        if self.tripped:
            return ERROR
        return WARN if self.streak >= (self.max_overruns + 1) // 2 else OK


class ClockJumpDetector:
    """Counts jumps of the node clock against the monotonic clock: backwards, or ahead by more than `tolerance_s`.

    A sim clock running slower than real time is no jump; one running faster gains a period per tick."""

    def __init__(self, tolerance_s: float = 1.0) -> None:
        self.tolerance_s = float(tolerance_s)
        self.count = 0
        self._last: tuple[int, float] | None = None

    def observe(self, node_ns: int, monotonic_s: float) -> str | None:
        """The jump since the last call, described, or None."""
        last, self._last = self._last, (node_ns, monotonic_s)
        if last is None:
            return None
        node_dt, wall_dt = (node_ns - last[0]) * 1e-9, monotonic_s - last[1]
        if node_dt < 0:
            jump = f"node clock went back {-node_dt:.3f} s"
        elif node_dt - wall_dt > self.tolerance_s:
            jump = f"node clock leapt {node_dt:.3f} s in {wall_dt:.3f} s"
        else:
            return None
        self.count += 1
        return jump


# ----------------------------------------------------------------------------- the policy's context


def open_prompt(path: str, runtime: Any, episode: int = 0, steps: int = 0) -> Callable[[], dict[str, Any]]:
    """Check that `path` is a gato_ros dataset recorded with the runtime's spec and holds `episode` (its
    metadata only: quick, so a bad path is refused at once), and return the function that reads that
    episode as a prompt: its last `steps` steps (0 = all), cut to the whole steps that fit the runtime's
    context (older ones would only be overwritten). The read is the slow part: ContextLoader runs it."""
    from gato_ros.data import DatasetError, read_dataset

    dataset = read_dataset(path, spec=runtime.spec)
    if not 0 <= episode < len(dataset):
        raise DatasetError(f"{path} has {len(dataset)} episodes, no episode {episode}")
    fit = max(1, int(runtime.capacity) // tok.timestep_token_count(runtime.spec))

    def read() -> dict[str, Any]:
        observations, actions = dataset.episode(episode)
        keep = min(len(actions), fit, steps or len(actions))
        return {"observations": {k: v[-keep:] for k, v in observations.items()}, "actions": actions[-keep:]}

    return read


def load_prompt(path: str, runtime: Any, episode: int = 0, steps: int = 0) -> dict[str, Any]:
    """`open_prompt` and its read, at once."""
    return open_prompt(path, runtime, episode, steps)()


class PreparedContext(NamedTuple):
    """A new episode's context, ready to take over: the runtime reset with it, and what it was reset with."""

    runtime: Any
    prompt: dict[str, Any] | None
    note: str
    instruction: str | None = None


class ContextLoader:
    """Prepares a new policy context on a thread of its own (the prompt read from disk and prefilled into a
    spare runtime), so ~/reset and ~/load_prompt never hold the control tick; the tick swaps it in with `take`."""

    def __init__(self, make_runtime: Any) -> None:
        self._make_runtime = make_runtime
        self._lock = threading.Lock()
        self._spare: Any = None
        self._ready: PreparedContext | None = None
        self._thread: threading.Thread | None = None
        self.state = "idle"

    def start(self, make_prompt: Callable[[], dict[str, Any] | None], note: str, instruction: str | None = None
              ) -> bool:
        """Begin preparing the context of `make_prompt()`, or of the text `instruction` (with a `make_prompt` that
        returns None); False while a preparation is still running."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return False
            self.state = "preparing"
            self._thread = threading.Thread(target=self._prepare, args=(make_prompt, note, instruction), daemon=True)
            self._thread.start()
        return True

    def _prepare(self, make_prompt: Callable[[], dict[str, Any] | None], note: str, instruction: str | None) -> None:
        try:
            prompt = make_prompt()
            runtime = self._spare or self._make_runtime()
            self._spare = None
            runtime.reset(prompt=prompt, instruction=instruction)
        except Exception as err:  # reported through `state` (diagnostics); the running context is untouched
            with self._lock:
                self.state = f"failed: {type(err).__name__}: {err}"
            return
        with self._lock:
            self._ready, self.state = PreparedContext(runtime, prompt, note, instruction), "ready"

    def take(self, current: Any = None) -> PreparedContext | None:
        """The prepared context, once; `current` (the runtime it replaces) becomes the spare."""
        with self._lock:
            ready, self._ready = self._ready, None
            if ready is not None:
                self.state, self._spare = "idle", current
        return ready

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def close(self) -> None:
        self.wait(timeout=10.0)
        self._spare = self._ready = None
