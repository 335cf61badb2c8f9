"""The UFactory xArm6 in the stacking scene: a second body with a different command interface.

pybullet_data ships the arm (`xarm/xarm6_robot.urdf`, no gripper; used here in its white version) and
`xarm6_with_gripper.urdf`, whose xArm gripper is a four-bar linkage written with `mimic` joints, which PyBullet
ignores (each mimic and the loop closure would need constraints of their own; not attempted here). So
the arm here carries a **simple parallel gripper** (built below: a block on the flange and two prismatic
fingers, coupled like the Panda's), not the xArm gripper. Its finger joint reads like the Panda's: half
the gap between the fingers, 0.04 m open.

The arm is **velocity-commanded**, as a real xArm is through ros2_control's forward velocity controller
(xarm_ros2): the action is six joint velocities (rad/s) and the gripper command. The xArm's own servo
loop holds the commanded velocity within each joint's effort limit (PyBullet's velocity motor, the
URDF's efforts) and compensates gravity; a zero command holds the arm still. The gripper, like the
real one, takes a position: the finger target (open 0.04 m, closed 0 m, squeezing with at most
`GRIPPER_FORCE`).

Action (7,): joint1..joint6 velocities (rad/s), then the finger position target (m).
Observation: joint_positions / joint_velocities (7,) (joint1..6 rad, finger m), and the same
`task_state` (17,) and cameras as the Panda's env (the wrist camera is the Panda's only, for now).
Build it as `XArmStackingEnv(task=...)`, `sim.arms.make_env(arm="xarm6")` or `gym.make("GatoStackXArm6-v0")`.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pybullet as p
import pybullet_data

from gato_ros.spec import ActionSpec, EmbodimentSpec, ObservationSpec
from sim import tasks
from sim.env import StackingEnv
from sim.expert import ExpertConfig, ScriptedExpert
from sim.spec import stacking_spec

ARM_JOINT_NAMES = tuple(f"joint{i}" for i in range(1, 7))
FINGER_JOINT_NAME = "gripper_finger_left"
JOINT_NAMES = ARM_JOINT_NAMES + (FINGER_JOINT_NAME,)
HAND_LINK_NAME = "grasp_target"
# joint1..6 effort limits from the URDF (N·m) and the xArm6's joint speed limit (rad/s, 180 °/s)
ARM_EFFORT_LIMITS = np.array([50.0, 50.0, 32.0, 32.0, 32.0, 20.0])
ARM_VELOCITY_LIMIT = 3.14
# Hand 0.45 m in front of the base, 0.25 m over the table, pointing down (IK of that pose, rounded).
HOME_Q = np.array([0.0, -0.055, -1.0, 0.0, 1.055, 0.0])
FINGER_OPEN, FINGER_CLOSED = 0.04, 0.0
GRIPPER_FORCE = 20.0  # N: the fingers squeeze a grasped cube with at most this
GRIPPER_OPEN, GRIPPER_CLOSE = FINGER_OPEN, FINGER_CLOSED  # the discrete gripper command values (finger target, m)

_GRIPPER_URDF = """
  <joint name="gripper_fix" type="fixed">
    <parent link="link6"/><child link="gripper_base"/><origin xyz="0 0 0" rpy="0 0 0"/>
  </joint>
  <link name="gripper_base">
    <inertial><origin xyz="0 0 0.025"/><mass value="0.4"/>
      <inertia ixx="5e-4" iyy="2e-4" izz="5e-4" ixy="0" ixz="0" iyz="0"/></inertial>
    <visual><origin xyz="0 0 0.025"/><geometry><box size="0.05 0.13 0.05"/></geometry>
      <material name="gripper_grey"><color rgba="0.35 0.35 0.38 1"/></material></visual>
    <collision><origin xyz="0 0 0.025"/><geometry><box size="0.05 0.13 0.05"/></geometry></collision>
  </link>
  {fingers}
  <joint name="grasp_target_fix" type="fixed">
    <parent link="gripper_base"/><child link="grasp_target"/><origin xyz="0 0 0.105" rpy="0 0 0"/>
  </joint>
  <link name="grasp_target">
    <inertial><mass value="0.001"/><inertia ixx="1e-7" iyy="1e-7" izz="1e-7" ixy="0" ixz="0" iyz="0"/></inertial>
  </link>
"""
_FINGER_URDF = """
  <joint name="gripper_finger_{side}" type="prismatic">
    <parent link="gripper_base"/><child link="finger_{side}"/><origin xyz="0 0 0.05" rpy="0 0 0"/>
    <axis xyz="0 {sign} 0"/><limit lower="0" upper="0.04" effort="{force}" velocity="0.2"/>
  </joint>
  <link name="finger_{side}">
    <inertial><origin xyz="0 {offset} 0.035"/><mass value="0.05"/>
      <inertia ixx="2e-5" iyy="2e-5" izz="2e-6" ixy="0" ixz="0" iyz="0"/></inertial>
    <visual><origin xyz="0 {offset} 0.035"/><geometry><box size="0.02 0.012 0.07"/></geometry>
      <material name="gripper_grey"/></visual>
    <collision><origin xyz="0 {offset} 0.035"/><geometry><box size="0.02 0.012 0.07"/></geometry></collision>
  </link>
"""


def urdf_path() -> Path:
    """The xArm6 URDF with the parallel gripper, written once per user into the temp folder (the arm's
    meshes are referenced in pybullet_data by absolute path)."""
    data = Path(pybullet_data.getDataPath()) / "xarm"
    # the white arm: the coloured one has red and blue links, the colours a seeing policy tells the cubes by
    text = (data / "xarm6_robot_white.urdf").read_text()
    fingers = "".join(
        _FINGER_URDF.format(side=side, sign=sign, offset=0.006 * sign, force=GRIPPER_FORCE)
        for side, sign in (("left", 1), ("right", -1))
    )
    text = text.replace("package://xarm_description/", f"{data}/xarm_description/")
    text = text.replace("</robot>", _GRIPPER_URDF.format(fingers=fingers) + "</robot>")
    path = Path(tempfile.gettempdir()) / f"gato_ros_xarm6_gripper_{hashlib.sha1(text.encode()).hexdigest()[:12]}.urdf"
    if not path.exists() or path.read_text() != text:
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(path)  # atomic: parallel workers never read half a file
    return path


def joint_indices(robot: int, client: int) -> dict[str, int]:
    return {p.getJointInfo(robot, j, physicsClientId=client)[1].decode(): j
            for j in range(p.getNumJoints(robot, physicsClientId=client))}


def link_index(robot: int, client: int, name: str) -> int:
    for j in range(p.getNumJoints(robot, physicsClientId=client)):
        if p.getJointInfo(robot, j, physicsClientId=client)[12].decode() == name:
            return j
    raise KeyError(name)


class XArmStackingEnv(StackingEnv):
    """The stacking scene with the xArm6 (module docstring)."""

    arm = "xarm6"
    wrist_camera = False

    def __init__(self, config=None, **overrides):  # noqa: ANN001 - as StackingEnv
        super().__init__(config, **{"arm": self.arm, **overrides})
        self.joint_names = JOINT_NAMES
        n = len(JOINT_NAMES)
        self.observation_space = gym.spaces.Dict({
            **self.observation_space.spaces,
            "joint_positions": gym.spaces.Box(-np.inf, np.inf, (n,), np.float64),
            "joint_velocities": gym.spaces.Box(-np.inf, np.inf, (n,), np.float64),
        })
        low = np.concatenate([np.full(6, -ARM_VELOCITY_LIMIT), [FINGER_CLOSED]])
        high = np.concatenate([np.full(6, ARM_VELOCITY_LIMIT), [FINGER_OPEN]])
        self.action_space = gym.spaces.Box(low, high, dtype=np.float64)

    def _load_robot(self) -> None:
        c, cid = self.config, self.client
        self.robot = p.loadURDF(str(urdf_path()), [0, 0, 0], useFixedBase=True, physicsClientId=cid)
        joints = joint_indices(self.robot, cid)
        self.arm_joints = [joints[n] for n in ARM_JOINT_NAMES]
        self.finger_links = [joints["gripper_finger_left"], joints["gripper_finger_right"]]
        self.observed_joints = self.arm_joints + [self.finger_links[0]]
        self.hand_link = link_index(self.robot, cid, HAND_LINK_NAME)
        # Couple the fingers (right = left), as the Panda's: uncoupled fingers let cube and fingers drift.
        gear = p.createConstraint(self.robot, self.finger_links[0], self.robot, self.finger_links[1], p.JOINT_GEAR,
                                  [0, 1, 0], [0, 0, 0], [0, 0, 0], physicsClientId=cid)
        p.changeConstraint(gear, gearRatio=-1, erp=0.1, maxForce=50, physicsClientId=cid)
        for j in self.finger_links:
            p.changeDynamics(self.robot, j, lateralFriction=c.friction, physicsClientId=cid)

    def _reset_robot(self) -> None:
        cid = self.client
        for j, q in zip(self.arm_joints, HOME_Q, strict=True):
            p.resetJointState(self.robot, j, q, 0.0, physicsClientId=cid)
        for j in self.finger_links:
            p.resetJointState(self.robot, j, FINGER_OPEN, 0.0, physicsClientId=cid)
        self._command(np.zeros(6), FINGER_OPEN)

    def _command(self, velocities: np.ndarray, finger: float) -> None:
        """The servo loop's setpoints; PyBullet's motors hold them over every sub-step until the next command.
        The fingers' position servo (gain 0.05, at most GRIPPER_FORCE) closes them in about two control steps."""
        cid = self.client
        p.setJointMotorControlArray(self.robot, self.arm_joints, p.VELOCITY_CONTROL, targetVelocities=list(velocities),
                                    forces=list(ARM_EFFORT_LIMITS), physicsClientId=cid)
        p.setJointMotorControlArray(self.robot, self.finger_links, p.POSITION_CONTROL, targetPositions=[finger] * 2,
                                    forces=[GRIPPER_FORCE] * 2, positionGains=[0.05] * 2, physicsClientId=cid)

    def step(self, action, arm_torque=None):  # noqa: ANN001, ANN201 - as StackingEnv.step
        if arm_torque is not None:
            raise ValueError("the xArm6 is velocity-commanded: it takes no joint torque controller")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (7,):
            raise ValueError(f"action must have 7 values (6 joint velocities, finger target), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action holds NaN or inf")
        velocities = np.clip(action[:6], -ARM_VELOCITY_LIMIT, ARM_VELOCITY_LIMIT)
        self._command(velocities, float(np.clip(action[6], FINGER_CLOSED, FINGER_OPEN)))
        for _ in range(self.substeps):
            p.stepSimulation(physicsClientId=self.client)
        states = p.getJointStates(self.robot, self.observed_joints, physicsClientId=self.client)
        nan = not np.all(np.isfinite([s[0] for s in states]))
        return self._end_step(nan)

    def gravity_compensation(self, q: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the xArm6 compensates gravity in its own servo loop")


def xarm_spec(image_size: int | None = None, privileged: bool = True,
              cameras: tuple[str, ...] | None = None) -> EmbodimentSpec:
    """xArm6 stacking: the Panda spec's observations with 7 joints; actions six joint velocities (rad/s)
    and the gripper as a discrete choice of finger targets (0.04 m open, 0 m closed); action mode velocity."""
    panda = stacking_spec(image_size, privileged, cameras)
    observations = tuple(_xarm_observation(o) for o in panda.observations)
    actions = tuple(ActionSpec(name, "continuous", ARM_VELOCITY_LIMIT) for name in ARM_JOINT_NAMES)
    actions += (ActionSpec(FINGER_JOINT_NAME, "discrete", FINGER_OPEN, (GRIPPER_OPEN, GRIPPER_CLOSE)),)
    return EmbodimentSpec(
        name=panda.name.replace("panda_stack", "xarm6_stack", 1),
        observations=observations,
        actions=actions,
        control_rate_hz=panda.control_rate_hz,
        joint_names=JOINT_NAMES,
        action_mode="velocity",
    )


# z-scores of the xArm6's joints, from the mean/std of 30 expert episodes (`XArmStackingEnv()` + `XArmExpert`,
# stack_red_on_blue, seeds 0-29, odd seeds noisy), rounded; joint4 barely moves, so its scales get a floor of 0.1
# (as the Panda's near-constant entries do: sim/spec.py).
JOINT_POSITION_OFFSET = (-0.05, 0.41, -1.22, 0.0, 0.81, -0.1, 0.03)
JOINT_POSITION_SCALE = (0.18, 0.24, 0.27, 0.1, 0.16, 0.49, 0.01)
JOINT_VELOCITY_SCALE = (0.35, 0.74, 0.53, 0.1, 0.62, 0.77, 0.015)


def _xarm_observation(o: ObservationSpec) -> ObservationSpec:
    if o.name == "joint_positions":
        return ObservationSpec(o.name, (7,), "continuous", JOINT_POSITION_OFFSET, JOINT_POSITION_SCALE)
    if o.name == "joint_velocities":
        return ObservationSpec(o.name, (7,), "continuous", (0.0,) * 7, JOINT_VELOCITY_SCALE)
    return o


class XArmExpert(ScriptedExpert):
    """The Panda expert's plan (same phases, same task goals), executed through the xArm6's velocity
    interface: IK to the waypoint in its own model of the arm, then a joint velocity toward it."""

    gain = 10.0  # 1/s: joint velocity per radian of IK error

    def __init__(self, config: ExpertConfig | None = None, task: str = tasks.DEFAULT_TASK):
        # no ScriptedExpert.__init__: it loads the Panda
        self.config = config or ExpertConfig(noise_std=(0.05,) * 6)
        self.task = tasks.get_task(task)
        self.client = p.connect(p.DIRECT)
        self.robot = p.loadURDF(str(urdf_path()), [0, 0, 0], useFixedBase=True, physicsClientId=self.client)
        joints = joint_indices(self.robot, self.client)
        self.arm_joints = [joints[n] for n in ARM_JOINT_NAMES]
        self.finger_joints = [joints["gripper_finger_left"], joints["gripper_finger_right"]]
        self.movable = [j for j in range(p.getNumJoints(self.robot, physicsClientId=self.client))
                        if p.getJointInfo(self.robot, j, physicsClientId=self.client)[2] != p.JOINT_FIXED]
        self.hand_link = link_index(self.robot, self.client, HAND_LINK_NAME)
        info = [p.getJointInfo(self.robot, j, physicsClientId=self.client) for j in self.movable]
        self.lower = [i[8] for i in info]
        self.upper = [i[9] for i in info]
        self.ranges = [u - lo for lo, u in zip(self.lower, self.upper, strict=True)]
        self.rest = list(HOME_Q) + [FINGER_OPEN, FINGER_OPEN]

    def _set_state(self, q: np.ndarray, finger: float) -> list[float]:
        full = list(q) + [finger, finger]
        for j, v in zip(self.arm_joints + self.finger_joints, full, strict=True):
            p.resetJointState(self.robot, j, v, physicsClientId=self.client)
        return full

    def _hand_yaw(self) -> float:
        orn = p.getLinkState(self.robot, self.hand_link, computeForwardKinematics=True,
                             physicsClientId=self.client)[5]
        r = np.asarray(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
        return math.atan2(r[1, 0], r[0, 0])

    def _ik(self, position: np.ndarray, yaw: float) -> np.ndarray:
        orn = p.getQuaternionFromEuler([math.pi, 0.0, yaw])
        q = p.calculateInverseKinematics(
            self.robot, self.hand_link, list(position), orn, self.lower, self.upper, self.ranges, self.rest,
            maxNumIterations=50, residualThreshold=1e-5, physicsClientId=self.client,
        )
        return np.asarray(q[:6])

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        c = self.config
        q = np.asarray(obs["joint_positions"][:6], dtype=np.float64)
        finger = float(obs["joint_positions"][6])
        self._set_state(q, finger)
        target, yaw, force, _ = self.plan(obs)
        hand = np.asarray(obs["task_state"][0:3])
        delta = target - hand
        waypoint = hand + delta * min(1.0, c.max_step / max(float(np.linalg.norm(delta)), 1e-9))
        q_goal = self._ik(waypoint, yaw)
        self._set_state(q, finger)
        velocities = np.clip(self.gain * (q_goal - q), -ARM_VELOCITY_LIMIT, ARM_VELOCITY_LIMIT)
        gripper = GRIPPER_OPEN if force > 0 else GRIPPER_CLOSE  # the plan speaks Panda finger forces
        return np.concatenate([velocities, [gripper]])

    def noisy(self, action: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise on the executed joint velocities (rad/s), gripper untouched."""
        out = np.array(action, dtype=np.float64)
        out[:6] = np.clip(out[:6] + rng.normal(0.0, self.config.noise_std[:6]), -ARM_VELOCITY_LIMIT,
                          ARM_VELOCITY_LIMIT)
        return out
