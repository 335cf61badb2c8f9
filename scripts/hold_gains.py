"""The `hold` gains of the policy node and the watchdog for the sim Panda: the fixed matrices and the pose table.

    python scripts/hold_gains.py [--model models/stack_int8.onnx] [--omega 9] [--zeta 0.75] [--seeds 6]
    python scripts/hold_gains.py --write-table config/panda_hold_table.json [--seeds 8]

`--write-table` writes the pose-dependent table the node and the watchdog use by default (gato_ros/hold_table.py):
the mass matrix at every pose of --seeds episodes of the policy from the home pose on, and at those poses
perturbed (σ 0.1 rad: where a fault may leave the arm), thinned to poses at least 0.25 rad apart; it then prints
the worst spectral radius of the table's gains over poses it was not made from (other seeds, perturbed), next
to the fixed gains' and to the exact mass matrix's.

The hold torque is computed once per 50 ms control period and held (zero-order hold), so per-joint
gains fail: the Panda's joints 1/3/5/7 are nearly coaxial in carrying poses and a diagonal gain that
damps one excites the others. The hold therefore uses full matrices, stiffness = M0·ω² and damping =
M0·2ζω, with M0 the joint-space mass matrix averaged over the poses in which the shipped policy carries
the cube (seeds 100000…, PyBullet's model). This prints the worst spectral radius of the sampled-data
closed loop (< 1: stable at every sampled pose) over those poses for the node's default gains, then the
gains M0 gives for --omega/--zeta (as YAML) and theirs, each also at the home pose, where every episode
starts. `--poses all` fits M0 over every pose of the episodes instead of the carrying ones. The defaults
came from the int8 model as shipped before its re-export (`git show 0ac0736:models/stack_int8.onnx >
old.onnx; ... --model old.onnx`).
"""

from __future__ import annotations

import argparse

import numpy as np
import pybullet as p

from gato_ros.control import DEFAULT_HOLD_DAMPING, DEFAULT_HOLD_STIFFNESS
from gato_ros.runtime import PolicyRuntime
from sim.env import HOME_Q, StackingEnv

PERIOD_S = 0.05
MODEL = "models/stack_int8.onnx"


def carrying_poses(seeds: int, model: str = MODEL, every_step: bool = False) -> np.ndarray:
    """Arm joint positions of every step in which the policy holds the red cube lifted (`every_step`: of
    every step, from the home pose on)."""
    runtime, env, poses = PolicyRuntime(model, threads=1), StackingEnv(), []
    for seed in range(100000, 100000 + seeds):
        obs, _ = env.reset(seed=seed)
        runtime.reset()
        for _ in range(env.config.max_steps):
            action = runtime.step(obs)
            obs, _, done, truncated, _ = env.step(action)
            if every_step or (action[7] < 0 and obs["task_state"][5] > 0.03):  # gripper closed, red cube lifted
                poses.append(obs["joint_positions"][:7].copy())
            if done or truncated:
                break
    env.close()
    return np.array(poses)


def mass_matrices(poses: np.ndarray) -> list[np.ndarray]:
    env = StackingEnv()
    env.reset(seed=0)
    out = [np.array(p.calculateMassMatrix(env.robot, list(q) + [0.02, 0.02], physicsClientId=env.client))[:7, :7]
           for q in poses]
    env.close()
    return out


def spectral_radius(stiffness: np.ndarray, damping: np.ndarray, masses: list[np.ndarray]) -> float:
    """Worst spectral radius of (q, q̇) over one period with the PD torque held, over the sampled poses."""
    eye, worst = np.eye(7), 0.0
    for m in masses:
        acc = -np.linalg.inv(m) @ np.hstack([stiffness, damping])
        a = np.zeros((14, 14))
        a[:7, :7], a[:7, 7:], a[7:, 7:] = eye, PERIOD_S * eye, eye
        a[:7] += 0.5 * PERIOD_S**2 * acc
        a[7:] += PERIOD_S * acc
        worst = max(worst, float(np.abs(np.linalg.eigvals(a)).max()))
    return worst


def thinned(poses: np.ndarray, key: np.ndarray, spacing: float) -> np.ndarray:
    """A subset of `poses` in which no two are closer than `spacing` (rad, over the `key` joints)."""
    kept: list[np.ndarray] = []
    for q in poses:
        if not kept or np.min(np.linalg.norm(np.array(kept)[:, key] - q[key], axis=1)) >= spacing:
            kept.append(q)
    return np.array(kept)


def write_table(path: str, seeds: int, model: str, omega: float, zeta: float) -> None:
    from gato_ros.hold_table import HoldGainTable
    from sim.env import JOINT_NAMES

    rng = np.random.default_rng(0)
    key = np.arange(1, 7)  # the mass matrix does not depend on joint 1 (about the vertical axis)
    visited = np.concatenate([carrying_poses(seeds, model, every_step=True), [HOME_Q]])
    perturbed = visited[rng.integers(0, len(visited), 2 * len(visited))] + rng.normal(0, 0.1, (2 * len(visited), 7))
    poses = thinned(np.concatenate([visited, perturbed]), key, 0.25)
    table = HoldGainTable("franka_panda (pybullet_data URDF, PyBullet)", omega, zeta, JOINT_NAMES[:7], key, poses,
                          np.array(mass_matrices(poses)))
    table.save(path)
    table = HoldGainTable.load(path)  # judge what was written (rounded)
    held_out = carrying_poses(seeds + 4, model, every_step=True)[len(visited) - 1:]
    held_out = np.concatenate([held_out, held_out + rng.normal(0, 0.1, held_out.shape), [HOME_Q]])
    names = JOINT_NAMES[:7]
    masses = mass_matrices(held_out)
    from_table = [spectral_radius(*(np.asarray(g).reshape(7, 7) for g in (gains.stiffness, gains.damping)), [m])
                  for gains, m in ((table.gains_at(names, q), m) for q, m in zip(held_out, masses, strict=True))]
    exact = [spectral_radius(m * omega**2, m * 2 * zeta * omega, [m]) for m in masses]
    defaults = [np.asarray(g, dtype=np.float64).reshape(7, 7) for g in (DEFAULT_HOLD_STIFFNESS, DEFAULT_HOLD_DAMPING)]
    fixed = [spectral_radius(*defaults, [m]) for m in masses]
    print(f"# {path}: {len(poses)} poses, omega {omega:g}, zeta {zeta:g}. Over {len(held_out)} poses not in it "
          f"(home included), worst / median spectral radius: table {max(from_table):.3f} / "
          f"{np.median(from_table):.3f}, exact mass matrix {max(exact):.3f} / {np.median(exact):.3f}, fixed default "
          f"gains {max(fixed):.3f} / {np.median(fixed):.3f}; at the home pose: table {from_table[-1]:.3f}, fixed "
          f"{fixed[-1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omega", type=float, default=9.0, help="natural frequency ω (rad/s)")
    parser.add_argument("--zeta", type=float, default=0.75, help="damping ratio ζ")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--model", default=MODEL, help="the policy that carries the cube")
    parser.add_argument("--poses", choices=["carrying", "all"], default="carrying",
                        help="fit M0 over the carrying poses, or over every pose of the episodes")
    parser.add_argument("--write-table", default="", metavar="PATH", help="write the pose table (JSON) and judge it")
    args = parser.parse_args()
    if args.write_table:
        write_table(args.write_table, args.seeds, args.model, args.omega, args.zeta)
        return
    poses = carrying_poses(args.seeds, args.model, every_step=args.poses == "all")
    masses = mass_matrices(poses)
    home = mass_matrices(np.array([HOME_Q]))
    defaults = [np.asarray(g, dtype=np.float64).reshape(7, 7) for g in (DEFAULT_HOLD_STIFFNESS, DEFAULT_HOLD_DAMPING)]
    print(f"# {len(poses)} {args.poses} poses; the node's default gains: worst spectral radius "
          f"{spectral_radius(*defaults, masses):.3f}, at the home pose {spectral_radius(*defaults, home):.3f}")
    m0 = np.mean(masses, axis=0)
    m0 = (m0 + m0.T) / 2
    stiffness, damping = m0 * args.omega**2, m0 * 2 * args.zeta * args.omega
    print(f"# M0 at omega {args.omega:g}, zeta {args.zeta:g}: worst spectral radius "
          f"{spectral_radius(stiffness, damping, masses):.3f}, at the home pose "
          f"{spectral_radius(stiffness, damping, home):.3f}")
    for name, gain in (("hold_stiffness", stiffness), ("hold_damping", damping)):
        rows = ",\n".join("      " + ", ".join(f"{v if abs(v) > 1e-6 else 0.0:.4g}" for v in row) for row in gain)
        print(f"    {name}: [\n{rows}]")


if __name__ == "__main__":
    main()
