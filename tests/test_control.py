"""The ROS-free control loop (gato_ros/control.py) with the shipped model and the real PyBullet arm; no rclpy.

Messages are plain objects with the fields of sensor_msgs/JointState and std_msgs/Float64MultiArray: the
loop reads fields, never ROS types. Times are explicit (`received`, `now`: monotonic seconds).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gato_ros import commands
from gato_ros.control import (
    ERROR,
    OK,
    WARN,
    ClockJumpDetector,
    ContextLoader,
    ControlLoop,
    DeadlineMonitor,
    SafeActionSettings,
    build_layout,
    hold_gains,
    load_prompt,
    parse_joint_name_map,
    tightened_limits,
)
from gato_ros.hold_table import load_table
from gato_ros.runtime import PolicyRuntime

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "stack_int8.onnx"
PANDA = tuple(f"panda_joint{i}" for i in range(1, 8)) + ("panda_finger_joint1",)
FR3_MAP = [f"{n}={n.replace('panda', 'fr3')}" for n in PANDA]
PERIOD = 0.05
SIMPLE_GAINS = hold_gains([10.0], [2.0], 7)  # diagonal: easy to check by hand


@pytest.fixture(scope="module")
def runtime() -> PolicyRuntime:
    return PolicyRuntime(str(SHIPPED), threads=1)


def joints(names=PANDA, position=None, velocity=None, stamp_ns: int | None = None) -> SimpleNamespace:
    n = len(names)
    msg = SimpleNamespace(name=list(names), position=list(np.linspace(-0.5, 0.5, n) if position is None else position),
                          velocity=list(np.zeros(n) if velocity is None else velocity))
    if stamp_ns is not None:
        msg.header = SimpleNamespace(stamp=SimpleNamespace(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9))
    return msg


def task(value: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(data=[value] * 17)


def feed(loop: ControlLoop, t: float, joint_msg=None, task_msg=None) -> None:
    loop.on_joint_state(joint_msg or joints(), t)
    loop.on_vector("task_state", task_msg or task(), t)


def make_loop(runtime, kind: str = "hold", gains=SIMPLE_GAINS, **kwargs) -> ControlLoop:
    runtime.reset()
    return ControlLoop(runtime, build_layout(runtime.spec), safe=SafeActionSettings(kind, gains), **kwargs)


# ----------------------------------------------------------------------------- layout and modes


def test_control_module_needs_neither_rclpy_nor_torch():
    code = ("import sys; sys.modules['rclpy'] = None; sys.modules['torch'] = None\n"
            "import gato_ros.control, gato_ros.commands; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_layout_maps_joint_names_orders_the_arm_and_keeps_the_gripper_apart(runtime):
    layout = build_layout(runtime.spec, parse_joint_name_map(FR3_MAP))
    assert layout.arm_names == tuple(f"fr3_joint{i}" for i in range(1, 8))
    assert layout.gripper_name == "fr3_finger_joint1" and layout.gripper_action == 7
    assert layout.robot_joint_names == tuple(n.replace("panda", "fr3") for n in PANDA)
    order = [f"fr3_joint{i}" for i in (7, 1, 2, 3, 4, 5, 6)]
    reordered = build_layout(runtime.spec, parse_joint_name_map(FR3_MAP), order)
    assert reordered.arm_actions.tolist() == [6, 0, 1, 2, 3, 4, 5]
    assert reordered.spec_limits.tolist() == [12.0, 87, 87, 87, 87, 12, 12, 20.0]
    assert build_layout(runtime.spec, gripper_action="none").gripper_name is None
    with pytest.raises(ValueError, match="permutation"):
        build_layout(runtime.spec, parse_joint_name_map(FR3_MAP), PANDA[:7])
    with pytest.raises(ValueError, match="does not have"):
        build_layout(runtime.spec, {"elbow": "fr3_elbow"})
    for bad in (["panda_joint1"], ["=fr3_joint1"], ["panda_joint1=a", "panda_joint1=b"], ["panda_joint1=a",
                                                                                          "panda_joint2=a"]):
        with pytest.raises(ValueError):
            parse_joint_name_map(bad)


def test_robot_joint_names_drive_the_policy_and_model_names_do_not(runtime):
    runtime.reset()
    loop = ControlLoop(runtime, build_layout(runtime.spec, parse_joint_name_map(FR3_MAP)))
    fr3 = [n.replace("panda", "fr3") for n in PANDA]
    feed(loop, 0.0, joints(fr3))
    result = loop.tick(0.01)
    assert not result.safe and result.level == OK and result.arm.shape == (7,) and result.gripper in (15.0, -15.0)
    assert len(result.tokens) == 8 and result.step_ms > 0 and result.command == [*result.arm, result.gripper]
    feed(loop, 0.05, joints(PANDA))
    result = loop.tick(0.06)
    assert result.safe and result.level == ERROR and "lacks joints" in result.reason


def test_an_output_mode_the_model_cannot_drive_is_refused(runtime):
    layout = build_layout(runtime.spec)
    for mode in ("position", "velocity", "trajectory"):
        with pytest.raises(ValueError, match="effort"):
            ControlLoop(runtime, layout, mode)
    commands.check_output_mode("trajectory", "position")  # a position policy may drive either controller
    with pytest.raises(ValueError, match="output_mode"):
        commands.check_output_mode("torque", "effort")
    position_spec = SimpleNamespace(action_mode="position")
    assert commands.model_action_mode(position_spec) == "position"
    assert commands.model_action_mode(runtime.spec) == "effort"
    with pytest.raises(ValueError, match="0 rad"):
        commands.check_safe_action("zero", "trajectory")


# ----------------------------------------------------------------------------- time


def test_staleness_is_judged_on_the_monotonic_receive_time(runtime):
    loop = make_loop(runtime, stale_timeout_s=0.25)
    feed(loop, 10.0)
    assert not loop.tick(10.2).safe
    stale = loop.tick(10.3)
    assert stale.safe and stale.level == WARN and "stale" in stale.reason and "joint_states" in stale.reason
    assert loop.tick(9.9).safe, "an input received after `now` is never fresh"


def test_a_lasting_fault_keeps_one_cause_while_its_details_change(runtime):
    """The node logs a fault when its cause changes: the ages in the reason must not make every tick new."""
    loop = make_loop(runtime, stale_timeout_s=0.25)
    feed(loop, 0.0)
    first, later = loop.tick(0.3), loop.tick(0.35)
    assert first.reason != later.reason and first.cause == later.cause == "safe action: stale ['joint_states', " \
        "'task_state']"
    loop.on_joint_state(joints(position=[np.nan] * 8), 0.4)
    assert loop.tick(0.41).cause == "invalid input: ['joint_states']"


@pytest.mark.parametrize("offset_s, ok", [(0.0, True), (0.4, True), (-5.0, False), (5.0, False)])
def test_a_header_stamp_far_from_the_node_clock_is_invalid(runtime, offset_s, ok):
    loop = make_loop(runtime, max_stamp_offset_s=1.0)
    node_now = 1_000 * 10**9
    loop.on_joint_state(joints(stamp_ns=node_now + int(offset_s * 1e9)), 0.0, node_now)
    loop.on_vector("task_state", task(), 0.0)
    result = loop.tick(0.01)
    assert result.safe != ok
    if not ok:
        assert result.level == ERROR and "header stamp" in result.reason
    loop.on_joint_state(joints(stamp_ns=0), 0.02, node_now)  # an unset stamp is not checked
    assert not loop.tick(0.03).safe


def test_deadline_overruns_warn_then_switch_to_the_safe_action_until_on_time_again():
    monitor = DeadlineMonitor(PERIOD, max_overruns=4)
    t = 0.0
    for i in range(4):  # compute longer than the period
        monitor.record(t, 0.07)
        t += PERIOD
        assert monitor.level() == (WARN if i in (1, 2) else ERROR if i == 3 else OK)
    assert monitor.fault().level == ERROR and "4 consecutive deadline overruns" in monitor.fault().reason
    for _ in range(3):
        monitor.record(t, 0.001)
        t += PERIOD
        assert monitor.fault() is not None
    monitor.record(t, 0.001)
    assert monitor.fault() is None and monitor.level() == OK and monitor.total == 4
    assert monitor.record(t + 3 * PERIOD, 0.001), "a tick that starts late is an overrun too"
    assert not monitor.record(t + 60.0, 0.001, skip_interval=True), "not across a clock jump"


def test_clock_jumps_are_counted_and_never_make_old_data_fresh(runtime):
    jumps = ClockJumpDetector(tolerance_s=1.0)
    assert jumps.observe(100 * 10**9, 0.0) is None
    assert jumps.observe(100 * 10**9 + 50_000_000, 0.05) is None
    assert "back" in jumps.observe(90 * 10**9, 0.10)
    assert "leapt" in jumps.observe(200 * 10**9, 0.15)
    assert jumps.observe(200 * 10**9 + 50_000_000, 10.0) is None, "a node clock slower than the wall is no jump"
    assert jumps.count == 2
    # After the node clock stepped back 10 s, joint states stamped before the step are from its "future".
    loop = make_loop(runtime)
    loop.on_joint_state(joints(stamp_ns=100 * 10**9), 0.0, 90 * 10**9)
    loop.on_vector("task_state", task(), 0.0)
    assert loop.tick(0.01).safe
    loop.on_joint_state(joints(stamp_ns=90 * 10**9), 0.02, 90 * 10**9)
    assert not loop.tick(0.03).safe
    assert loop.tick(1.0).safe, "freshness follows the monotonic clock whatever the node clock did"


# ----------------------------------------------------------------------------- the safe action


def test_hold_keeps_the_fault_snapshot_for_the_whole_fault_and_drops_it_on_recovery(runtime):
    loop = make_loop(runtime)
    q_a, q_b, q_c = np.full(8, 0.1), np.full(8, 0.3), np.full(8, -0.2)
    feed(loop, 0.0, joints(position=q_a))
    running = loop.tick(0.01)
    assert not running.safe
    # Fault 1 (stale task state) begins at q_a; the arm then moves to q_b with a velocity: hold pulls it back.
    loop.on_joint_state(joints(position=q_a), 0.29)
    assert loop.tick(0.3).safe
    loop.on_joint_state(joints(position=q_b, velocity=np.full(8, 0.5)), 0.32)
    held = loop.tick(0.35)
    assert held.safe and "stale" in held.reason
    np.testing.assert_allclose(held.arm, 10.0 * (q_a[:7] - q_b[:7]) - 2.0 * 0.5)
    assert held.gripper == running.gripper, "the gripper keeps its last command"
    # The cause changes (invalid joint state): still the same fault and snapshot; no fresh state, no damping.
    loop.on_joint_state(joints(position=[np.nan] * 8), 0.36)
    invalid = loop.tick(0.37)
    assert invalid.level == ERROR and "invalid" in invalid.reason
    np.testing.assert_allclose(invalid.arm, 10.0 * (q_a[:7] - q_b[:7]))
    # Good input returns: the policy runs by itself; the next fault snapshots where the arm is then.
    feed(loop, 0.4, joints(position=q_c))
    assert not loop.tick(0.41).safe
    loop.on_vector("task_state", SimpleNamespace(data=[np.inf] * 17), 0.42)
    second = loop.tick(0.43)
    assert second.safe and second.level == ERROR
    np.testing.assert_allclose(second.arm, 0.0, atol=1e-12)


def test_a_model_observing_velocities_needs_them(runtime):
    loop = make_loop(runtime)
    feed(loop, 0.0, joints(velocity=[]))
    result = loop.tick(0.01)
    assert result.safe and "velocities" in result.reason


@pytest.mark.parametrize("kind", ["damp", "zero"])
def test_damp_brakes_and_zero_releases(runtime, kind):
    loop = make_loop(runtime, kind)
    feed(loop, 0.0)
    running = loop.tick(0.01)
    loop.on_joint_state(joints(position=np.full(8, 0.3), velocity=np.full(8, 0.5)), 0.3)
    result = loop.tick(0.35)
    assert result.safe
    if kind == "damp":
        np.testing.assert_allclose(result.arm, -2.0 * 0.5)
        assert result.gripper == running.gripper
    else:
        assert result.arm.tolist() == [0.0] * 7 and result.gripper == 0.0


def test_the_safe_action_before_any_joint_state_holds_nothing(runtime):
    loop = make_loop(runtime)
    result = loop.tick(0.0)
    assert result.safe and "missing" in result.reason and result.arm.tolist() == [0.0] * 7 and result.gripper == 0.0


def test_full_matrix_gains_couple_the_joints_and_bad_gains_are_refused():
    stiffness = np.eye(7) * 4.0
    stiffness[0, 2] = stiffness[2, 0] = 1.0
    gains = hold_gains(stiffness.reshape(-1), [0.0], 7)
    snapshot = commands.FaultSnapshot(np.zeros(7), -15.0)
    q = np.zeros(7)
    q[2] = -1.0
    tau = commands.safe_arm_command("hold", "effort", snapshot, q, np.zeros(7), gains, np.full(7, 100.0))
    assert tau[0] == 1.0 and tau[2] == 4.0, "joint 3's error pulls joint 1 through the coupling"
    for bad in ([-1.0], [1.0] * 6, [np.nan], (np.eye(7) - 2 * np.eye(7)).reshape(-1), np.triu(np.ones((7, 7))).ravel()):
        with pytest.raises(ValueError):
            hold_gains(bad, [0.0], 7)


def test_position_modes_hold_the_fault_position():
    snapshot = commands.FaultSnapshot(np.arange(7.0), 15.0)
    for mode in ("position", "trajectory"):
        out = commands.safe_arm_command("hold", mode, snapshot, np.zeros(7), np.ones(7), SIMPLE_GAINS, np.ones(7))
        assert out.tolist() == list(range(7))
    assert commands.safe_arm_command("damp", "velocity", snapshot, np.zeros(7), np.ones(7), SIMPLE_GAINS,
                                     np.ones(7)).tolist() == [0.0] * 7


class FailingRuntime:
    """The real runtime, with a failure injected into chosen steps (a fault injection, not a stand-in)."""

    def __init__(self, runtime: PolicyRuntime, fail_steps: set[int]) -> None:
        self.runtime, self.fail_steps, self.calls = runtime, fail_steps, 0
        self.spec = runtime.spec

    def step_tokens(self, observation):
        self.calls += 1
        if self.calls in self.fail_steps:
            raise RuntimeError("injected: CUDA error")
        return self.runtime.step_tokens(observation)


def test_a_runtime_error_gives_the_safe_action_and_the_next_tick_recovers(runtime):
    runtime.reset()
    loop = ControlLoop(FailingRuntime(runtime, {2}), build_layout(runtime.spec),
                       safe=SafeActionSettings("hold", SIMPLE_GAINS))
    results = []
    for i in range(3):
        feed(loop, i * PERIOD)
        results.append(loop.tick(i * PERIOD + 0.01))
    assert [r.safe for r in results] == [False, True, False]
    assert results[1].level == ERROR and "policy failed: RuntimeError: injected" in results[1].reason
    assert results[1].gripper == results[0].gripper


def test_non_finite_logits_give_the_safe_action(tmp_path):
    """A model whose logits are NaN (a NaN final-norm bias): the runtime's error becomes the safe action."""
    import gato_ros.runtime as runtime_module

    if not hasattr(runtime_module, "NonFiniteLogitsError"):
        pytest.skip("the runtime does not raise on non-finite logits yet (issue 9 fix (2), the core's side)")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(SHIPPED))
    for init in model.graph.initializer:
        if init.name == "model.ln_f.bias":
            init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, np.nan, np.float32),
                                                  init.name))
    onnx.save(model, str(tmp_path / "nan.onnx"))
    nan_runtime = PolicyRuntime(str(tmp_path / "nan.onnx"), threads=1, warmup=False)
    loop = ControlLoop(nan_runtime, build_layout(nan_runtime.spec), safe=SafeActionSettings("hold", SIMPLE_GAINS))
    feed(loop, 0.0)
    result = loop.tick(0.01)
    assert result.safe and result.level == ERROR and "NonFiniteLogitsError" in result.reason


def test_limits_tighten_the_models_and_apply_from_the_next_tick(runtime):
    layout = build_layout(runtime.spec)
    assert tightened_limits(layout, [100.0] * 7).tolist() == list(layout.spec_limits)
    assert tightened_limits(layout, [1.0] * 8).tolist() == [1.0] * 8
    for bad in ([1.0] * 6, [np.nan] * 7, [-1.0] * 7):
        with pytest.raises(ValueError, match="torque_limits"):
            tightened_limits(layout, bad)
    loop = make_loop(runtime)
    feed(loop, 0.0, joints(velocity=np.full(8, 3.0)))
    assert np.abs(loop.tick(0.01).arm).max() > 0.01
    loop.limits = tightened_limits(layout, [0.01] * 7)  # what the node does on a live parameter change
    feed(loop, 0.05, joints(velocity=np.full(8, 3.0)))
    result = loop.tick(0.06)
    assert np.abs(result.arm).max() <= 0.01 and abs(result.gripper) == 15.0


# ----------------------------------------------------------------------------- the policy's context


def write_demo(root: Path, spec, steps: int) -> None:
    from gato_ros.data import EpisodeWriter

    rng = np.random.default_rng(0)
    with EpisodeWriter(root, spec) as writer:
        obs = {o.name: rng.normal(size=(steps, *o.shape)) for o in spec.observations}
        writer.add_episode(obs, np.tile([0.0] * 7 + [15.0], (steps, 1)), {"seed": 0})


def test_a_prompt_is_cut_to_the_context_and_prepared_off_the_calling_thread(runtime, tmp_path):
    write_demo(tmp_path / "demo", runtime.spec, 2000)
    prompt = load_prompt(str(tmp_path / "demo"), runtime)
    per_step = runtime.obs_tokens + runtime.spec.action_size
    assert len(prompt["actions"]) == runtime.capacity // per_step
    assert len(load_prompt(str(tmp_path / "demo"), runtime, steps=1)["actions"]) == 1
    with pytest.raises(ValueError, match="no episode 3"):
        load_prompt(str(tmp_path / "demo"), runtime, episode=3)
    made: list[str] = []

    def make() -> PolicyRuntime:
        made.append(threading.current_thread().name)
        return PolicyRuntime(str(SHIPPED), threads=1, warmup=False)

    loader = ContextLoader(make)
    assert loader.take() is None
    assert loader.start(lambda: prompt, "live")
    loader.wait(30.0)
    fresh, taken_prompt, note, _ = loader.take(current=runtime)
    assert note == "live" and taken_prompt is prompt and fresh.position > 0, "the prompt is in the new context"
    assert made and made[0] != threading.current_thread().name
    assert loader.start(lambda: None, "again")
    loader.wait(30.0)
    assert loader.take()[0] is runtime, "the replaced runtime is reused as the spare"
    loader.close()


# ----------------------------------------------------------------------------- the arm in the sim


def carry_then_fault(runtime: PolicyRuntime, kind: str, seed: int = 100000) -> dict[str, float]:
    """Run the shipped policy on the PyBullet arm until it carries the red cube (gripper closed, cube 5 cm up),
    then 1 s of stale input (the task state stops; joint states keep coming), 1 s of invalid input (a NaN
    joint position), then 1 s of good input again. Returns what the arm did."""
    from sim.env import JOINT_NAMES, StackingEnv

    runtime.reset()
    # The node's defaults: the shipped pose table's gains (the fixed matrices where a table is off)
    loop = ControlLoop(runtime, build_layout(runtime.spec), safe=SafeActionSettings(kind, table=load_table("")))
    env = StackingEnv()
    obs, _ = env.reset(seed=seed)
    t = 0.0

    def tick(joints_ok: bool = True, task_ok: bool = True):
        nonlocal obs, t
        position = obs["joint_positions"].copy()
        if not joints_ok:
            position[1] = np.nan
        loop.on_joint_state(joints(JOINT_NAMES, position, obs["joint_velocities"]), t)
        if task_ok:
            loop.on_vector("task_state", SimpleNamespace(data=list(obs["task_state"])), t)
        result = loop.tick(t)
        obs, *_ = env.step(np.concatenate([result.arm, [result.gripper]]))
        t += PERIOD
        return result

    try:
        for _ in range(200):
            result = tick()
            if result.gripper < 0 and obs["task_state"][5] > 0.05:
                break
        else:
            pytest.fail("the shipped policy never carried the cube")
        start, drift, lowest, reasons = None, 0.0, np.inf, set()
        for phase in ["stale"] * 20 + ["invalid"] * 20:
            result = tick(joints_ok=phase != "invalid", task_ok=phase != "stale")
            if result.safe:
                reasons.add(result.reason.split(":")[0])
                start = env.hand_position() if start is None else start
            if start is not None:
                drift = max(drift, float(np.linalg.norm(env.hand_position() - start)))
            lowest = min(lowest, float(obs["task_state"][5]))
        resumed = [tick() for _ in range(20)]
        return {"drift_m": drift, "lowest_cube_z": lowest, "cube_z_after": float(obs["task_state"][5]),
                "safe_after_resume": sum(r.safe for r in resumed), "reasons": reasons,
                "cube_to_hand_m": float(np.linalg.norm(obs["task_state"][9:12]))}
    finally:
        env.close()


@pytest.mark.parametrize("seed", [100000, 100001, 100002])
def test_hold_carries_the_cube_through_stale_and_invalid_input(runtime, seed):
    out = carry_then_fault(runtime, "hold", seed)
    print(f"seed {seed}, hold: hand drift {out['drift_m'] * 100:.2f} cm during the fault, cube lowest at z = "
          f"{out['lowest_cube_z'] * 100:.1f} cm, {out['cube_to_hand_m'] * 100:.1f} cm from the hand after resuming")
    assert out["reasons"] == {"safe action", "invalid input"}, "both faults gave the safe action"
    assert out["drift_m"] < 0.01, f"the hand drifted {out['drift_m'] * 100:.2f} cm"
    assert out["lowest_cube_z"] > 0.04, "the cube was never dropped (a cube on the table sits at z = 2 cm)"
    assert out["safe_after_resume"] == 0, "good input back: the policy runs again by itself"
    assert out["cube_to_hand_m"] < 0.03 and out["cube_z_after"] > 0.04, "the cube is still in the hand"


def test_zero_drops_the_cube(runtime):
    """The same fault with `zero` as the safe action: the gripper opens and the cube falls (the test above can fail)."""
    out = carry_then_fault(runtime, "zero")
    print(f"zero: hand drift {out['drift_m'] * 100:.1f} cm, cube lowest at z = {out['lowest_cube_z'] * 100:.1f} cm")
    assert out["lowest_cube_z"] < 0.025
