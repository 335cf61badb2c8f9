"""The hold on the PyBullet arm: pose-dependent gains (gato_ros.hold_table) hold it in every pose, and without a
valid joint state the hold brakes on its own model instead of letting the arm coast."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gato_ros import commands
from gato_ros.control import SafeActionSettings, build_layout
from gato_ros.hold_table import HoldGainTable, load_table

pytest.importorskip("pybullet")
from sim.env import HOME_Q, JOINT_NAMES, StackingEnv  # noqa: E402

ARM = JOINT_NAMES[:7]
LIMITS = np.array([87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0])
PUSH = np.array([0.0, -6.0, 0.0, 6.0, 0.0, 0.0, 0.0])  # a shove: the arm moves when the fault begins


def test_the_table_gives_the_mass_matrix_of_the_nearest_pose_in_the_controllers_order(tmp_path):
    masses = np.stack([np.diag(np.arange(1.0, 8.0)), np.diag(np.arange(1.0, 8.0)) * 3])
    masses[1, 0, 6] = masses[1, 6, 0] = 0.5  # a coupling: it must travel with the joint order
    poses = np.stack([np.zeros(7), np.full(7, 1.0)])
    HoldGainTable("test", 10.0, 0.5, ARM, np.arange(1, 7), poses, masses).save(tmp_path / "t.json")
    table = HoldGainTable.load(tmp_path / "t.json")
    q = np.full(7, 0.9)
    q[0] = -3.0  # joint 1 turns the whole arm about the vertical: the inertia does not depend on it
    reversed_names = ARM[::-1]
    gains = table.gains_at(reversed_names, q[::-1])
    stiffness = np.asarray(gains.stiffness).reshape(7, 7)
    np.testing.assert_allclose(stiffness, masses[1][::-1, ::-1] * 100.0)
    np.testing.assert_allclose(np.asarray(gains.damping).reshape(7, 7), masses[1][::-1, ::-1] * 2 * 0.5 * 10.0)
    assert gains.natural == (10.0, 0.5)
    with pytest.raises(ValueError, match="fr3_joint1"):
        table.gains_at([n.replace("panda", "fr3") for n in ARM], q)


def hold_from(env: StackingEnv, gains: commands.HoldGains | None, table: HoldGainTable | None,
              steps: int = 40) -> tuple[float, float]:
    """Shove the arm for 0.1 s, then hold it (20 Hz, the torque held over each period, as the node and the
    watchdog send it) from where the fault found it. Returns the hand's farthest drift (m) and the arm's
    final speed (rad/s)."""
    obs = None
    for _ in range(2):
        obs, *_ = env.step(np.concatenate([PUSH, [0.0]]))
    q_fault = obs["joint_positions"][:7].copy()
    snapshot = commands.FaultSnapshot(q_fault, 0.0, table.gains_at(ARM, q_fault) if table else None)
    start, drift = env.hand_position(), 0.0
    for _ in range(steps):
        q, qd = obs["joint_positions"][:7], obs["joint_velocities"][:7]
        tau = commands.safe_arm_command("hold", "effort", snapshot, q, qd, gains, LIMITS)
        obs, _, done, _, info = env.step(np.concatenate([tau, [0.0]]))
        if info.get("nan"):
            return np.inf, np.inf
        drift = max(drift, float(np.linalg.norm(env.hand_position() - start)))
    return drift, float(np.max(np.abs(obs["joint_velocities"][:7])))


def test_the_pose_tables_hold_is_stable_at_the_home_pose_where_the_fixed_gains_are_not():
    env = StackingEnv()
    try:
        env.reset(seed=0)
        assert np.allclose(env._last_obs["joint_positions"][:7], HOME_Q)
        fixed = SafeActionSettings().gains  # the fixed matrices: made for the carrying poses
        drift, speed = hold_from(env, fixed, load_table(""))
        assert drift < 0.03 and speed < 0.02, f"the table's hold: hand drift {drift * 100:.1f} cm, speed {speed}"
        env.reset(seed=0)
        drift, speed = hold_from(env, fixed, None)
        assert drift > 0.1 or speed > 0.5, f"the fixed gains at home: drift {drift * 100:.1f} cm, speed {speed}"
    finally:
        env.close()


def brake_without_joint_states(runtime, table: HoldGainTable | None) -> tuple[float, str]:
    """The node's loop with the arm moving when its joint states turn invalid (NaN) for 1 s: the hand's drift."""
    from gato_ros.control import ControlLoop

    runtime.reset()
    loop = ControlLoop(runtime, build_layout(runtime.spec), safe=SafeActionSettings("hold", table=table))
    env = StackingEnv()
    try:
        obs, _ = env.reset(seed=0)
        for _ in range(2):
            obs, *_ = env.step(np.concatenate([PUSH, [0.0]]))
        start, drift, t, reason = env.hand_position(), 0.0, 0.0, ""
        for step in range(20):
            position = obs["joint_positions"].copy()
            if step:  # the first joint state is valid (the fault's snapshot), every later one invalid
                position[1] = np.nan
            loop.on_joint_state(SimpleNamespace(name=list(JOINT_NAMES), position=list(position),
                                                velocity=list(obs["joint_velocities"])), t)
            result = loop.tick(t)  # no task state: the safe action throughout
            assert result.safe
            reason = result.reason
            obs, *_ = env.step(np.concatenate([result.arm, [result.gripper]]))
            drift = max(drift, float(np.linalg.norm(env.hand_position() - start)))
            t += 0.05
        return drift, reason
    finally:
        env.close()


def test_without_a_valid_joint_state_the_hold_brakes_instead_of_coasting():
    from gato_ros.runtime import PolicyRuntime

    runtime = PolicyRuntime(str(Path(__file__).resolve().parent.parent / "models" / "stack_int8.onnx"), threads=1)
    braked, reason = brake_without_joint_states(runtime, load_table(""))
    coasted, _ = brake_without_joint_states(runtime, None)
    print(f"hand drift over 1 s without joint states: {braked * 100:.1f} cm braking, {coasted * 100:.1f} cm coasting")
    assert "last valid joint state" in reason and "braking" in reason, reason
    assert braked < 0.5 * coasted, f"braked {braked * 100:.1f} cm vs coasting {coasted * 100:.1f} cm"
