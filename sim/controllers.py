"""The arm's joint controllers as the sim bridge runs them: what ros2_control runs on a real arm at 1 kHz.

Numpy only (no ROS, no PyBullet). Each controller turns the last command it was given into arm torques
at every physics sub-step (1 kHz); the env adds gravity compensation on top, like Franka's torque
interface, so every law here is the part above gravity:

    effort      forward_command_controller: the commanded torques, unchanged
    position    forward position controller: joint PD to the commanded positions
    velocity    forward velocity controller: joint damping toward the commanded velocities
    trajectory  joint_trajectory_controller with a one-point trajectory: the reference runs linearly from
                where the arm was when the point arrived to the point in `time_from_start`, then holds it

Like the real ones, each applies its last command until a new one arrives, forever; `hold_here` is what
a controller does on its own when told to stop (joint_trajectory_controller's cmd_timeout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Diagonal of the Panda's joint-space inertia (kg·m²) in the stacking workspace (PyBullet's URDF,
# calculateMassMatrix over scripted-expert episodes), rounded toward the heavy end of its range so
# the gains stay stable at 1 kHz when the arm reaches out.
PANDA_JOINT_INERTIA = np.array([1.0, 1.5, 1.0, 0.85, 0.04, 0.045, 0.0045])
POSITION_OMEGA = 30.0  # rad/s: closed-loop bandwidth of the position PD (critically damped)


@dataclass(frozen=True)
class JointGains:
    stiffness: np.ndarray  # N·m/rad
    damping: np.ndarray  # N·m·s/rad


def panda_gains(omega: float = POSITION_OMEGA, zeta: float = 1.0) -> JointGains:
    """Per-joint PD gains from the nominal inertia: each joint a critically damped mass-spring at `omega`."""
    return JointGains(stiffness=omega**2 * PANDA_JOINT_INERTIA, damping=2.0 * zeta * omega * PANDA_JOINT_INERTIA)


@dataclass
class ArmController:
    """One of the four modes (module docstring). `command(...)` takes a new command; `torque(...)` runs at 1 kHz."""

    mode: str
    gains: JointGains = field(default_factory=panda_gains)
    target: np.ndarray = field(default_factory=lambda: np.zeros(7))  # torques, positions or velocities
    # trajectory mode: the segment from `start` (at `t_start`) to `target` (at `t_end`)
    start: np.ndarray = field(default_factory=lambda: np.zeros(7))
    t_start: float = 0.0
    t_end: float = 0.0

    def reset(self, q: np.ndarray) -> None:
        """At power-up a controller holds where the arm is: zero torque (over gravity), here, or still."""
        self.hold_here(0.0, q)

    def hold_here(self, t: float, q: np.ndarray) -> None:
        q = np.asarray(q, dtype=np.float64).copy()
        self.target = q if self.mode in ("position", "trajectory") else np.zeros_like(q)
        self.start, self.t_start, self.t_end = q, t, t

    def command(self, values: np.ndarray, t: float = 0.0, q: np.ndarray | None = None,
                duration_s: float = 0.0) -> None:
        """A new command at sim time `t`; trajectory mode starts its segment at the reference it is at now."""
        values = np.asarray(values, dtype=np.float64).copy()
        if self.mode == "trajectory":
            self.start = self.reference(t)[0] if q is None else np.asarray(q, dtype=np.float64).copy()
            self.t_start, self.t_end = t, t + max(float(duration_s), 0.0)
        self.target = values

    def reference(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Trajectory mode: the reference position and velocity at sim time `t`."""
        if t >= self.t_end or self.t_end <= self.t_start:
            return self.target, np.zeros_like(self.target)
        span = self.t_end - self.t_start
        s = max(0.0, (t - self.t_start) / span)
        return self.start + s * (self.target - self.start), (self.target - self.start) / span

    def torque(self, t: float, q: np.ndarray, qd: np.ndarray) -> np.ndarray:
        """Arm torque above gravity compensation at sim time `t` for joint state (q, qd)."""
        k, d = self.gains.stiffness, self.gains.damping
        if self.mode == "effort":
            return self.target
        if self.mode == "position":
            return k * (self.target - q) - d * qd
        if self.mode == "velocity":
            return d * (self.target - qd)
        if self.mode == "trajectory":
            q_ref, qd_ref = self.reference(t)
            return k * (q_ref - q) + d * (qd_ref - qd)
        raise ValueError(f"unknown command mode {self.mode!r}")
