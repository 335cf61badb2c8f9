"""Scripted expert for every task of the stacking scene (sim/tasks.py) that acts only on what the policy observes.

DESIGN.md ("What is known about learnability") found that clones of a timer-driven expert froze at
the grasp: the policy cannot see a timer. So every decision here is a function of the current
observation alone:
  - the phase (approach, grasp, carry, release, retreat) is read off the hand/cube positions and
    the finger width and its rate (a grasp is done when the width has settled on the cube);
  - the next waypoint comes from the current hand pose (a bounded step toward a target that lies on
    a funnel above the cube, so the hand comes down from above without a remembered plan);
  - IK to the waypoint in the expert's own kinematic model of the Panda, then a mass-scaled joint PD
    τ = M(q)(ωₙ²·e − 2ζωₙ·q̇), ωₙ = 10, ζ = 1, on top of the hardware's gravity compensation;
  - the gripper is a discrete decision: +15 N open, −15 N close.
The task only changes which cube is picked and where it is carried (`sim.tasks.expert_goal`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pybullet as p
import pybullet_data

from sim import tasks
from sim.env import (
    ARM_TORQUE_LIMITS,
    GRIPPER_CLOSE,
    GRIPPER_OPEN,
    HAND_LINK,
    HOME_Q,
    MOVABLE_JOINTS,
)


@dataclass
class ExpertConfig:
    omega: float = 10.0  # PD natural frequency (rad/s)
    zeta: float = 1.0  # critical damping
    max_step: float = 0.04  # waypoint distance from the current hand position (m)
    cube_size: float = 0.04
    grasp_height: float = 0.0  # grasp point above the cube centre (m)
    place_clearance: float = 0.004  # release the top cube this far above resting (m)
    funnel_slope: float = 6.0  # height gained per metre of horizontal error (m/m)
    funnel_height: float = 0.12  # top of the funnel above the grasp/place point (m)
    xy_tolerance: float = 0.008
    z_tolerance: float = 0.01
    yaw_tolerance: float = 0.1  # rad
    finger_open: float = 0.035  # half-width above which the hand counts as open (m)
    finger_settled: float = 0.005  # finger speed below which the width has settled (m/s)
    # Noise on the EXECUTED torques (N·m). Shoulder/elbow as DESIGN.md; the wrist is lower than its
    # 0.3 because this URDF's light wrist links swing the hand ±0.4 rad under 0.3 N·m held for 50 ms
    # and the expert then never lines up with the cube (0/15 noisy successes; 8/8 with these values).
    noise_std: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.05)
    # Deliberate grasp errors, to measure what the gripper tolerates (`python -m sim.expert --yaw-offset-deg`):
    # the hand lines up this far off the cube's yaw (rad), and grasps this far along world x from its centre (m).
    yaw_offset: float = 0.0
    grasp_offset: float = 0.0


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


class ScriptedExpert:
    """`act(obs) -> (8,)` command: 7 arm torques (added to gravity compensation) + finger force."""

    def __init__(self, config: ExpertConfig | None = None, task: str = tasks.DEFAULT_TASK):
        self.config = config or ExpertConfig()
        self.task = tasks.get_task(task)
        # The expert's own kinematic/dynamic model of the arm: it never reads the simulator's state.
        self.client = p.connect(p.DIRECT)
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=self.client)
        self.robot = p.loadURDF("franka_panda/panda.urdf", [0, 0, 0], useFixedBase=True, physicsClientId=self.client)
        info = [p.getJointInfo(self.robot, j, physicsClientId=self.client) for j in MOVABLE_JOINTS]
        self.lower = [i[8] for i in info]
        self.upper = [i[9] for i in info]
        self.ranges = [u - lo for lo, u in zip(self.lower, self.upper, strict=True)]
        self.rest = list(HOME_Q) + [0.04, 0.04]

    def close(self) -> None:
        if self.client is not None and p.isConnected(self.client):
            p.disconnect(self.client)
        self.client = None

    # ---------------------------------------------------------------- model
    def _set_state(self, q: np.ndarray, finger: float) -> list[float]:
        full = list(q) + [finger, finger]
        for j, v in zip(MOVABLE_JOINTS, full, strict=True):
            p.resetJointState(self.robot, j, v, physicsClientId=self.client)
        return full

    def _hand_yaw(self) -> float:
        orn = p.getLinkState(self.robot, HAND_LINK, computeForwardKinematics=True, physicsClientId=self.client)[5]
        r = np.asarray(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
        return math.atan2(r[1, 0], r[0, 0])

    def _ik(self, position: np.ndarray, yaw: float) -> np.ndarray:
        orn = p.getQuaternionFromEuler([math.pi, 0.0, yaw])
        q = p.calculateInverseKinematics(
            self.robot, HAND_LINK, list(position), orn, self.lower, self.upper, self.ranges, self.rest,
            maxNumIterations=50, residualThreshold=1e-5, physicsClientId=self.client,
        )
        return np.asarray(q[:7])

    # ---------------------------------------------------------------- policy
    def plan(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, float, float, str]:
        """Observation → (hand target, hand yaw target, finger force, phase name)."""
        c = self.config
        finger = float(obs["joint_positions"][-1])  # the finger joint comes last, whatever the arm
        finger_speed = abs(float(obs["joint_velocities"][-1]))
        s = obs["task_state"]
        hand = s[0:3]
        goal = tasks.expert_goal(self.task, s, c.cube_size, c.grasp_height, c.place_clearance, c.xy_tolerance,
                                 c.z_tolerance)
        cube = goal.pick
        cube_yaw = math.atan2(s[15], s[16]) / 4.0  # the picked cube's yaw, defined modulo 90°
        hand_yaw = self._hand_yaw()
        # The 90°-equivalent of the cube's yaw closest to the hand's: never more than 45° to turn.
        yaw = hand_yaw + _wrap(4.0 * (cube_yaw - hand_yaw)) / 4.0 + c.yaw_offset
        yaw_err = abs(yaw - hand_yaw)

        closed_on_cube = 0.012 < finger < 0.025
        grasp_point = cube + np.array([0.0, 0.0, c.grasp_height])
        if not goal.in_place and not closed_on_cube:  # the offset moves where it grasps, not the cube
            grasp_point = grasp_point + np.array([c.grasp_offset, 0.0, 0.0])
        near_cube = np.linalg.norm((hand - grasp_point)[:2]) < 0.02 and abs(hand[2] - grasp_point[2]) < 0.02
        settled = finger_speed < c.finger_settled

        if goal.in_place and near_cube and finger < c.finger_open:
            return grasp_point, yaw, GRIPPER_OPEN, "release"
        if goal.in_place and finger >= c.finger_open:
            return self._funnel(hand, cube, c.funnel_height, force_up=True), yaw, GRIPPER_OPEN, "retreat"
        if near_cube and closed_on_cube and settled:
            return self._funnel(hand, goal.carry_to, 0.0), yaw, GRIPPER_CLOSE, "carry"
        at_grasp = (
            np.linalg.norm((hand - grasp_point)[:2]) < c.xy_tolerance
            and abs(hand[2] - grasp_point[2]) < c.z_tolerance
            and yaw_err < c.yaw_tolerance
            and finger > 0.012
        )
        if at_grasp:
            return grasp_point, yaw, GRIPPER_CLOSE, "grasp"
        # Approach: open; hover until open and turned, then come down the funnel onto the cube.
        hover = 0.0 if finger >= c.finger_open and yaw_err < c.yaw_tolerance else 0.06
        return self._funnel(hand, grasp_point, hover), yaw, GRIPPER_OPEN, "approach"

    def phase(self, obs: dict[str, np.ndarray]) -> tuple[str, float]:
        """The phase this observation is in for the expert, and how far the hand is turned from the yaw it wants
        there (rad): what a learner's state looks like to its teacher (`scripts/seeing_phases.py`)."""
        self._set_state(np.asarray(obs["joint_positions"][:7]), float(obs["joint_positions"][-1]))
        _, yaw, _, phase = self.plan(obs)
        return phase, abs(yaw - self._hand_yaw())

    def _funnel(self, hand: np.ndarray, goal: np.ndarray, min_height: float, force_up: bool = False) -> np.ndarray:
        """A target above `goal`, higher the further the hand is from it horizontally."""
        c = self.config
        xy_err = float(np.linalg.norm((goal - hand)[:2]))
        height = min(c.funnel_height, max(0.0, (xy_err - 0.5 * c.xy_tolerance) * c.funnel_slope))
        if force_up:
            height = c.funnel_height
        return goal + np.array([0.0, 0.0, max(height, min_height)])

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        c = self.config
        q = np.asarray(obs["joint_positions"][:7], dtype=np.float64)
        qd = np.asarray(obs["joint_velocities"][:7], dtype=np.float64)
        full = self._set_state(q, float(obs["joint_positions"][7]))
        target, yaw, force, _ = self.plan(obs)
        hand = np.asarray(obs["task_state"][0:3])
        delta = target - hand
        dist = float(np.linalg.norm(delta))
        waypoint = hand + delta * min(1.0, c.max_step / max(dist, 1e-9))
        q_goal = self._ik(waypoint, yaw)
        self._set_state(q, float(obs["joint_positions"][7]))  # IK moves the model; put it back
        mass = np.asarray(p.calculateMassMatrix(self.robot, full, physicsClientId=self.client))[:7, :7]
        tau = mass @ (c.omega**2 * (q_goal - q) - 2.0 * c.zeta * c.omega * qd)
        tau = np.clip(tau, -ARM_TORQUE_LIMITS, ARM_TORQUE_LIMITS)
        return np.concatenate([tau, [force]])

    def noisy(self, action: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The executed command for noise-injected demos: torque noise on the arm, gripper untouched."""
        out = np.array(action, dtype=np.float64)
        out[:7] = np.clip(out[:7] + rng.normal(0.0, self.config.noise_std), -ARM_TORQUE_LIMITS, ARM_TORQUE_LIMITS)
        return out


@dataclass
class Episode:
    """One rollout. `actions` are the expert's clean commands (the labels); `executed` what the arm got."""

    observations: dict[str, np.ndarray]  # key -> (T, ...)
    actions: np.ndarray  # (T, 8) float32
    executed: np.ndarray  # (T, 8) float32
    success: bool
    nan: bool
    seed: int
    noisy: bool

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])


def run_episode(
    env,
    expert: ScriptedExpert,
    seed: int,
    noisy: bool = False,
    tokenize_spec=None,
    driver=None,
) -> Episode:
    """Roll the expert out for one episode. With `tokenize_spec` every command goes through Gato's
    action token round trip before the arm sees it (the label stays the expert's command).
    `driver(obs, label) -> command`, when given, decides what the arm is sent instead (DAgger: a
    learned policy drives while the expert only labels)."""
    from gato_ros.tokenizer import detokenize_action, tokenize_action

    rng = np.random.default_rng([seed, 1])  # noise stream apart from the env's reset stream
    obs, info = env.reset(seed=seed)
    frames: dict[str, list[np.ndarray]] = {k: [] for k in obs}
    actions, executed = [], []
    done = False
    while not done:
        action = expert.act(obs)
        command = expert.noisy(action, rng) if noisy else action
        if driver is not None:
            command = driver(obs, action)
        if tokenize_spec is not None:
            command = detokenize_action(tokenize_spec, tokenize_action(tokenize_spec, command))
        for k, v in obs.items():
            frames[k].append(v)
        actions.append(action)
        executed.append(command)
        obs, _, terminated, truncated, info = env.step(command)
        done = terminated or truncated
    return Episode(
        observations={k: np.stack(v) for k, v in frames.items()},
        actions=np.asarray(actions, dtype=np.float32),
        executed=np.asarray(executed, dtype=np.float32),
        success=bool(info["success"]),
        nan=bool(info["nan"]),
        seed=seed,
        noisy=noisy,
    )


def _measure_one(args: tuple[int, bool, bool, str, ExpertConfig]) -> tuple[bool, int, bool, float]:
    import time

    from sim.env import StackingEnv
    from sim.spec import stacking_spec

    seed, tokenize, noisy, task, config = args
    if "env" not in _MEASURE:
        _MEASURE["env"], _MEASURE["expert"] = StackingEnv(task=task), ScriptedExpert(config, task=task)
    t0 = time.perf_counter()
    spec = stacking_spec() if tokenize else None
    ep = run_episode(_MEASURE["env"], _MEASURE["expert"], seed, noisy=noisy, tokenize_spec=spec)
    return ep.success, ep.steps, ep.nan, (time.perf_counter() - t0) / ep.steps


_MEASURE: dict = {}


def main(argv: list[str] | None = None) -> int:
    """`python -m sim.expert --episodes 200 --workers 2 [--task T] [--tokenize] [--noisy]`: the Panda expert's
    success rate (`gato-ros eval --task T --arm A` measures either arm's). `--yaw-offset-deg` / `--grasp-offset-cm`
    make it grasp that far off the cube's yaw or centre: how precise a learner's grasp must be."""
    import argparse
    import multiprocessing as mp

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="first seed; episodes use seed, seed+1, ...")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenize", action="store_true", help="send every command through the token round trip")
    parser.add_argument("--noisy", action="store_true", help="inject torque noise (as in the noisy demos)")
    parser.add_argument("--task", default=tasks.DEFAULT_TASK, choices=tasks.task_names())
    parser.add_argument("--yaw-offset-deg", type=float, default=0.0, help="turn the hand this far off the cube's yaw")
    parser.add_argument("--grasp-offset-cm", type=float, default=0.0, help="grasp this far along x from the centre")
    args = parser.parse_args(argv)
    config = ExpertConfig(yaw_offset=math.radians(args.yaw_offset_deg), grasp_offset=args.grasp_offset_cm / 100)
    jobs = [(args.seed + i, args.tokenize, args.noisy, args.task, config) for i in range(args.episodes)]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(_measure_one, jobs, chunksize=4)
    ok = np.array([r[0] for r in results])
    steps = np.array([r[1] for r in results])
    failed = [job[0] for job, r in zip(jobs, results, strict=True) if not r[0]]
    step_ms = 1e3 * np.mean([r[3] for r in results])
    tags = (" (token round trip)" if args.tokenize else "") + (" (noisy)" if args.noisy else "")
    tags += f" (hand {args.yaw_offset_deg:g}° off the cube's yaw)" if args.yaw_offset_deg else ""
    tags += f" (grasp {args.grasp_offset_cm:g} cm off its centre)" if args.grasp_offset_cm else ""
    print(
        f"expert {args.task}{tags}: {ok.sum()}/{len(ok)} = {ok.mean():.1%} success; "
        f"steps mean {steps.mean():.1f} median {np.median(steps):.0f} min {steps.min()} max {steps.max()}; "
        f"{step_ms:.2f} ms wall per control step (env + expert); NaN {sum(r[2] for r in results)}; "
        f"failed seeds {failed}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
