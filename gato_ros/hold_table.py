"""Hold gains that fit the pose: the arm's joint-space mass matrix at the fault pose, from a table made offline.

numpy only (no ROS, no PyBullet): the node and the watchdog both read it.

The `hold` torque (gato_ros.commands) is computed once per control period from the latest joint state and
held until the next one, so it is a sampled-data PD. With one fixed gain matrix that loop is stable only
where the arm's inertia is close to the one the gains were made for (the Panda's spectral radius: 0.95 over
carrying poses, 1.53 at the home pose). Gains scaled by the mass matrix at the pose being held,
K = M(q)·ω² and D = M(q)·2ζω, make every joint direction the same mass-spring at ω, ζ, so the sampled loop
is as stable in every pose as in any (scripts/hold_gains.py measures it). The mass matrix needs the robot's
model; the table holds it at poses that cover the workspace, computed offline from the URDF
(scripts/hold_gains.py --write-table), and the hold takes the nearest pose's. The mass matrix of an arm on a
fixed base does not depend on the first joint (a rotation about the vertical axis), so the lookup compares
the other joints (`key_joints`).

With those gains the hold's ideal closed loop is known in closed form (each joint error a damped oscillator
at ω, ζ), so when no valid joint state is at hand the hold can still brake: `commands.hold_feedback` runs
that model forward from the last valid state instead of coasting on zero torque.

File format (JSON): {"robot": str, "omega": rad/s, "zeta": (0, 1), "joint_names": [n], "key_joints": [k],
"poses": [[n] × N], "mass_matrices": [[n·(n+1)/2 upper-triangle values, row by row] × N]}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gato_ros.commands import HoldGains

TABLE_FILE = "panda_hold_table.json"  # the sim Panda's, in config/ (share/gato_ros/config when installed)


@dataclass(frozen=True)
class HoldGainTable:
    robot: str
    omega: float  # rad/s: the hold's natural frequency in every joint direction
    zeta: float  # damping ratio
    joint_names: tuple[str, ...]
    key_joints: np.ndarray  # indices of the joints the mass matrix depends on (the lookup's distance)
    poses: np.ndarray  # (N, n) rad
    masses: np.ndarray  # (N, n, n) kg·m²

    def __post_init__(self) -> None:
        n = len(self.joint_names)
        if self.poses.ndim != 2 or self.poses.shape[1] != n or self.masses.shape != (len(self.poses), n, n):
            raise ValueError(f"hold gain table: {len(self.poses)} poses of {n} joints need as many {n}×{n} "
                             f"mass matrices, got {self.masses.shape}")
        if not (self.omega > 0 and 0 < self.zeta < 1 and len(self.poses)):
            raise ValueError(f"hold gain table needs omega > 0, 0 < zeta < 1 and poses; got omega {self.omega}, "
                             f"zeta {self.zeta}, {len(self.poses)} poses")
        if not (np.all(np.isfinite(self.poses)) and np.all(np.isfinite(self.masses))):
            raise ValueError("hold gain table holds NaN or inf")

    @classmethod
    def load(cls, path: str | Path) -> HoldGainTable:
        data = json.loads(Path(path).read_text())
        names = tuple(data["joint_names"])
        n = len(names)
        upper = np.triu_indices(n)
        packed = np.asarray(data["mass_matrices"], dtype=np.float64)
        masses = np.zeros((len(packed), n, n))
        masses[:, upper[0], upper[1]] = packed
        masses = masses + np.triu(masses, 1).transpose(0, 2, 1)
        return cls(str(data.get("robot", "")), float(data["omega"]), float(data["zeta"]), names,
                   np.asarray(data["key_joints"], dtype=np.int64), np.asarray(data["poses"], dtype=np.float64),
                   masses)

    def save(self, path: str | Path) -> None:
        upper = np.triu_indices(len(self.joint_names))
        data = {"robot": self.robot, "omega": self.omega, "zeta": self.zeta, "joint_names": list(self.joint_names),
                "key_joints": self.key_joints.tolist(),
                "poses": [[float(f"{v:.5g}") for v in q] for q in self.poses],
                "mass_matrices": [[float(f"{v:.5g}") for v in m[upper]] for m in self.masses]}
        Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n")

    def serves(self, arm_names: Sequence[str]) -> bool:
        return sorted(arm_names) == sorted(self.joint_names)

    def order(self, arm_names: Sequence[str]) -> np.ndarray:
        """Index into this table's joints of each of `arm_names` (the controller's order); ValueError when the
        table is for other joints."""
        if not self.serves(arm_names):
            raise ValueError(f"the hold gain table ({self.robot}) is for joints {list(self.joint_names)}, the arm's "
                             f"are {list(arm_names)}: give a table for this arm, or hold_gain_table:=none")
        return np.array([self.joint_names.index(n) for n in arm_names], dtype=np.int64)

    def mass_at(self, q: np.ndarray) -> np.ndarray:
        """The mass matrix of the table pose nearest to `q` (this table's joint order)."""
        k = self.key_joints
        nearest = int(np.argmin(np.linalg.norm(self.poses[:, k] - np.asarray(q)[k], axis=1)))
        return self.masses[nearest]

    def gains_at(self, arm_names: Sequence[str], q: np.ndarray) -> HoldGains:
        """Hold gains for the arm at `q` (both in the controller's order `arm_names`)."""
        index = self.order(arm_names)
        table_q = np.empty(len(index))
        table_q[index] = np.asarray(q, dtype=np.float64)
        mass = self.mass_at(table_q)[np.ix_(index, index)]
        return HoldGains(tuple((mass * self.omega**2).reshape(-1).tolist()),
                         tuple((mass * 2 * self.zeta * self.omega).reshape(-1).tolist()),
                         natural=(self.omega, self.zeta))


def default_table_path() -> Path:
    """The shipped table: share/gato_ros/config in an installed workspace, else the repo's config/."""
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory("gato_ros")) / "config" / TABLE_FILE
        if installed.exists():
            return installed
    except Exception:  # not installed through colcon, or ament_index missing: use the source tree
        pass
    return Path(__file__).resolve().parent.parent / "config" / TABLE_FILE


def load_table(path: str) -> HoldGainTable | None:
    """The table a `hold_gain_table` parameter names: "" = the shipped one (the sim Panda's), "none" = no
    table (the fixed hold_stiffness / hold_damping)."""
    if path == "none":
        return None
    return HoldGainTable.load(path or default_table_path())
