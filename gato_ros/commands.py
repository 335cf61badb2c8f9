"""What the policy process sends the arm, and the safe action: one contract for the node and the watchdog.

numpy only (no ROS, no torch), so the node, the watchdog process and the tests share it.

Output modes, as the arm's ros2_control controller takes them:
    effort      arm torques (N·m), std_msgs/Float64MultiArray on `<controller>/commands`
    position    arm joint positions (rad), same message type
    velocity    arm joint velocities (rad/s), same message type
    trajectory  a one-point trajectory_msgs/JointTrajectory for joint_trajectory_controller
The gripper is never on the arm's topic: it has an output of its own.

Between the policy node and the watchdog the command travels stamped: a sensor_msgs/JointState on the
node's `~/joint_command` (JOINT_COMMAND_TOPIC, relative to the node) whose `header.stamp` is the node
clock at the start of the tick that computed it, `name` the robot's joint names (arm, then gripper),
and the field of the output mode filled (`effort`, `position` or `velocity`; `trajectory` fills
`position`). The watchdog judges a command's age from that stamp, not from when it arrived. When the tick
sent the node's safe action (a fault the node saw), `header.frame_id` is SAFE_ACTION_FRAME_ID: the watchdog
then holds the arm itself, answering each joint state at once (the node's hold is computed at its tick, from
a joint state that may be a period old, and a PD sampled at 20 Hz does not stand a period of delay).

The safe action (`SAFE_ACTIONS`) replaces the policy's command on any fault:
    hold  a damped hold of the joint positions captured at the fault, gripper unchanged
    damp  velocity damping only (the arm may sink slowly only if gravity compensation is off), gripper unchanged
    zero  zeros for the arm and the gripper (releases the grip: not safe while carrying)
Zero torque is not safe by itself: over gravity compensation a moving or loaded arm coasts, and a
zero finger force opens the hand (two zero ticks while carrying dropped the cube in the sim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

OutputMode = Literal["effort", "position", "velocity", "trajectory"]
SafeActionKind = Literal["hold", "damp", "zero"]
OUTPUT_MODES: tuple[str, ...] = ("effort", "position", "velocity", "trajectory")
SAFE_ACTIONS: tuple[str, ...] = ("hold", "damp", "zero")

JOINT_COMMAND_TOPIC = "~/joint_command"  # node → watchdog, sensor_msgs/JointState, stamped
SAFE_ACTION_FRAME_ID = "safe_action"  # its header.frame_id when the tick sent the safe action
# Default controller topics, relative so that a namespace moves them (ros2_control's conventions).
ARM_COMMAND_TOPICS: dict[str, str] = {
    "effort": "effort_controller/commands",  # std_msgs/Float64MultiArray, arm joints only
    "position": "position_controller/commands",
    "velocity": "velocity_controller/commands",
    "trajectory": "joint_trajectory_controller/joint_trajectory",  # trajectory_msgs/JointTrajectory
}
GRIPPER_COMMAND_TOPIC = "gripper_controller/commands"  # std_msgs/Float64MultiArray, [finger force N]
# The JointState field a mode's values travel in on JOINT_COMMAND_TOPIC.
JOINT_STATE_FIELD: dict[str, str] = {"effort": "effort", "position": "position", "velocity": "velocity",
                                     "trajectory": "position"}


@dataclass(frozen=True)
class HoldGains:
    """Joint-space PD gains of the `hold` torque (effort mode): one per arm joint (a diagonal gain), or a
    full n×n matrix, row-major, that couples the joints (e.g. a mass matrix times ωₙ² and 2ζωₙ)."""

    stiffness: tuple[float, ...]  # N·m/rad: n values, or n·n
    damping: tuple[float, ...]  # N·m·s/rad: n values, or n·n
    # (ω, ζ) when the gains are a mass matrix times ω² and 2ζω (gato_ros.hold_table): the hold's ideal closed
    # loop is then known, so it can brake on a prediction while no valid joint state comes
    natural: tuple[float, float] | None = None

    def apply(self, gain: tuple[float, ...], x: np.ndarray) -> np.ndarray:
        """`gain` (this object's stiffness or damping) times the joint vector `x`."""
        g = np.asarray(gain, dtype=np.float64).reshape(-1)
        n = x.shape[0]
        return g.reshape(n, n) @ x if g.size == n * n and n > 1 else g * x


@dataclass(frozen=True)
class FaultSnapshot:
    """What the safe action holds: the arm's joint positions when the fault began, the gripper's last command,
    and the hold gains for that pose (None: the configured fixed ones)."""

    arm_positions: np.ndarray
    gripper_command: float
    gains: HoldGains | None = None


def safe_arm_command(kind: SafeActionKind, mode: OutputMode, snapshot: FaultSnapshot, positions: np.ndarray,
                     velocities: np.ndarray, gains: HoldGains, limits: np.ndarray) -> np.ndarray:
    """The arm part of the safe action in `mode`, from the latest valid joint state (finite, within `limits`).

    effort:      hold τ = K (q_fault − q) − D q̇;  damp τ = −D q̇;  zero τ = 0  (K, D diagonal or full: the
                 snapshot's gains for its pose where it has them, else `gains`)
    position:    hold and damp command q_fault (position controllers hold by themselves); zero is refused
    velocity:    0 rad/s for every kind
    trajectory:  hold and damp send q_fault (zero velocity at the point)
    """
    if kind not in SAFE_ACTIONS:
        raise ValueError(f"safe action must be one of {SAFE_ACTIONS}, got {kind!r}")
    q_fault = np.asarray(snapshot.arm_positions, dtype=np.float64)
    gains = snapshot.gains or gains
    if mode == "effort":
        q = np.asarray(positions, dtype=np.float64)
        qd = np.asarray(velocities, dtype=np.float64)
        if kind == "zero":
            tau = np.zeros_like(q_fault)
        elif kind == "damp":
            tau = -gains.apply(gains.damping, qd)
        else:
            tau = gains.apply(gains.stiffness, q_fault - q) - gains.apply(gains.damping, qd)
        tau = np.where(np.isfinite(tau), tau, 0.0)
        return np.clip(tau, -limits, limits)
    if mode == "velocity":
        return np.zeros_like(q_fault)
    if mode in ("position", "trajectory"):
        if kind == "zero":
            raise ValueError("a zero position is a large motion, not a safe action: use hold or damp")
        return q_fault.copy()
    raise ValueError(f"output mode must be one of {OUTPUT_MODES}, got {mode!r}")


def predicted_hold_state(q0: np.ndarray, qd0: np.ndarray, q_hold: np.ndarray, age_s: float,
                         natural: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Where the hold (ω, ζ = `natural`, underdamped) has taken the arm `age_s` after the state (q0, qd0): each
    joint's error to `q_hold` is a damped oscillator. The hold's stand-in for a joint state it does not have."""
    omega, zeta = natural
    sigma, omega_d = zeta * omega, omega * np.sqrt(1.0 - zeta**2)
    t = max(float(age_s), 0.0)
    e0, v0 = np.asarray(q0, dtype=np.float64) - q_hold, np.asarray(qd0, dtype=np.float64)
    decay, c, s = np.exp(-sigma * t), np.cos(omega_d * t), np.sin(omega_d * t)
    error = decay * (e0 * c + (v0 + sigma * e0) / omega_d * s)
    velocity = decay * (v0 * c - (sigma * v0 + omega**2 * e0) / omega_d * s)
    return q_hold + error, velocity


def hold_feedback(kind: SafeActionKind, snapshot: FaultSnapshot, gains: HoldGains, positions: np.ndarray,
                  velocities: np.ndarray | None, age_s: float, fresh: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The joint state the safe action acts on, from the last valid one (`positions`, `velocities`, `age_s` old).

    Fresh: that state. Not fresh (no joint state, or an invalid or stale one since): for `hold` with gains that
    know their ω, ζ (a pose's mass matrix: the snapshot's), the last valid positions plus the motion the hold's
    own loop has made of the last valid velocity since (braked to a stop, and back), so the hold brakes the
    motion it saw last instead of letting it coast, while its stiffness term keeps the torque that held the load
    at the last valid state (the arm rests there: a load the gravity compensation does not know, a grasped
    cube, sagged it to there); otherwise None (nothing to act on: the caller decides)."""
    q = np.asarray(positions, dtype=np.float64)
    qd = np.zeros_like(q) if velocities is None else np.asarray(velocities, dtype=np.float64)
    if fresh:
        return q, qd
    natural = (snapshot.gains or gains).natural if kind == "hold" else None
    if natural is None:
        return None
    return predicted_hold_state(q, qd, q, age_s, natural)


def safe_gripper_command(kind: SafeActionKind, snapshot: FaultSnapshot) -> float:
    """hold and damp keep the gripper's last command (a grasp stays closed); zero sends 0."""
    return 0.0 if kind == "zero" else float(snapshot.gripper_command)


# ----------------------------------------------------------------------------- output mode vs the model

# What a model's actions are, and the controller modes that can take them. An effort policy cannot
# drive a position controller; a position policy can drive a forward position controller or
# joint_trajectory_controller (one point per tick).
MODES_FOR_ACTIONS: dict[str, tuple[str, ...]] = {
    "effort": ("effort",),
    "position": ("position", "trajectory"),
    "velocity": ("velocity",),
}


def model_action_mode(spec: Any) -> str:
    """What the model's actions are: `spec.action_mode` where a spec declares it, else effort.

    Every model gato_ros trains today outputs joint torques (N·m) and a finger force (N)."""
    mode = getattr(spec, "action_mode", "effort") or "effort"
    if mode not in MODES_FOR_ACTIONS:
        raise ValueError(f"the model's action mode must be one of {tuple(MODES_FOR_ACTIONS)}, got {mode!r}")
    return mode


def default_output_mode(spec: Any) -> str:
    """The controller mode a model's actions drive as they are: the first of MODES_FOR_ACTIONS for its action mode."""
    return MODES_FOR_ACTIONS[model_action_mode(spec)][0]


def check_output_mode(output_mode: str, action_mode: str) -> None:
    """Refuse an output mode that the model's actions cannot drive, with the reason in the message."""
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
    allowed = MODES_FOR_ACTIONS[action_mode]
    if output_mode not in allowed:
        raise ValueError(f"output_mode {output_mode!r} cannot be driven by this model: its actions are "
                         f"{action_mode} commands, which only a {' or '.join(allowed)} controller takes")


def check_safe_action(kind: str, mode: str) -> None:
    """Refuse a safe action that is not one in `mode` (a zero position is a large motion)."""
    if kind not in SAFE_ACTIONS:
        raise ValueError(f"safe_action must be one of {SAFE_ACTIONS}, got {kind!r}")
    if kind == "zero" and mode in ("position", "trajectory"):
        raise ValueError(f"safe_action 'zero' in {mode} mode would command every joint to 0 rad: use hold or damp")
