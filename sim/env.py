"""PyBullet block stacking with a torque-controlled Franka Panda, as a gymnasium env.

The env plays the part of the robot *hardware*: like Franka's torque interface it adds gravity
compensation to whatever arm torques it is sent, so a zero command holds the arm. Physics runs at
1 kHz; one control step (20 Hz) holds the command for 50 physics sub-steps and resends it every
sub-step, because PyBullet's TORQUE_CONTROL only lasts one step.

Action (8,): 7 arm torques in N·m, then the finger force in N (positive opens, negative closes;
the two fingers are coupled by a gear constraint like the real hand's linkage).
Observation dict:
    joint_positions  (8,)  panda_joint1..7 (rad) + panda_finger_joint1 (m, half the finger width)
    joint_velocities (8,)  same order
    task_state       (17,) privileged: hand xyz, red xyz, blue xyz, red - hand, blue - red,
                           sin/cos of 4 × the yaw of the cube the task picks up (a cube looks the same
                           every 90°; red, or blue in the tasks that move blue: sim/tasks.py)
    image            (H, W, 3) uint8, only when `image_size` is set and `cameras` is not (the scene camera)
    camera_<name>    (H, W, 3) uint8, one per camera in `cameras` ("scene", "wrist": sim/cameras.py)

Robustness options (`camera_shift_m`, `camera_tilt_deg`, `light_change`) perturb every camera per episode,
drawn from the episode's seed apart from the scene's random stream: the same seeds give the same cube
layouts with and without them (sim/cameras.py `sample_perturbation`). Their magnitudes are exact, or with
`perturb_up_to` drawn per episode between 0 and the option (`gato-ros collect` randomizing its training data).

Tasks (`task=`, sim/tasks.py) share the scene and the observations and differ in what counts as success.
Arms: this env is the Panda's; the velocity-commanded UFactory xArm6 is its sibling `sim.xarm.XArmStackingEnv`.
`sim.arms.make_env(arm=..., task=...)` builds either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import gymnasium as gym
import numpy as np
import pybullet as p
import pybullet_data

from sim import cameras as cams
from sim import tasks
from sim.camera_process import CameraProcess, scene_snapshot

JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8)) + ("panda_finger_joint1",)
ARM_TORQUE_LIMITS = np.array([87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0])
FINGER_FORCE_LIMIT = 20.0  # the URDF's finger effort limit (N)
GRIPPER_OPEN, GRIPPER_CLOSE = 15.0, -15.0  # finger force commands (N): positive opens
HOME_Q = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])
FINGER_OPEN = 0.04  # finger joint upper limit: 8 cm between the fingers
ARM_JOINTS = list(range(7))
FINGER_JOINTS = [9, 10]
MOVABLE_JOINTS = ARM_JOINTS + FINGER_JOINTS  # the DOFs PyBullet's dynamics calls expect
HAND_LINK = 11  # panda_grasptarget: the point between the fingertips
log = logging.getLogger(__name__)
COLOURS = {
    "red": (0.85, 0.15, 0.15, 1.0),
    "blue": (0.15, 0.3, 0.85, 1.0),
    "green": (0.2, 0.7, 0.25, 1.0),
    "yellow": (0.9, 0.8, 0.15, 1.0),
}
ARM_NAMES = ("panda", "xarm6")  # what `arm=` (and `gato-ros collect/eval --arm`) accepts
DEFAULT_ARM = "panda"


def check_arm(name: str) -> str:
    """`name` if it is a simulated arm; a ValueError naming the valid choices otherwise."""
    if name not in ARM_NAMES:
        raise ValueError(f"unknown arm {name!r}: choose one of {', '.join(ARM_NAMES)}")
    return name


@dataclass
class StackingConfig:
    task: str = tasks.DEFAULT_TASK  # a name in sim/tasks.py TASKS ("stack" is the legacy name of the default)
    arm: str = DEFAULT_ARM  # a name in ARM_NAMES
    colours: tuple[str, ...] = ("red", "blue")  # task_state's red and blue cubes; more: distractors
    cube_size: float = 0.04
    cube_mass: float = 0.05
    physics_hz: int = 1000
    control_hz: int = 20
    max_steps: int = 200
    image_size: int | None = None  # None: no camera (rendering costs ~14-30 ms per frame: README)
    cameras: tuple[str, ...] | None = None  # named cameras (sim/cameras.py); None: the legacy `image` key
    hold_steps: int = 5  # consecutive steps the stack must hold after release
    place_tolerance: float = 0.015  # top cube's xy offset from the bottom one (m)
    workspace: tuple[float, float, float, float] = (0.4, 0.65, -0.2, 0.2)  # x_lo, x_hi, y_lo, y_hi
    min_separation: float = 0.1
    friction: float = 1.0
    camera: dict = field(
        default_factory=lambda: {k: getattr(cams.CAMERAS["scene"], k) for k in ("eye", "target", "up", "fov")}
    )  # the scene camera's pose
    # Per-episode camera perturbation (robustness runs): every camera moved this far in a random direction
    # (m), turned this much about a random axis (degrees), the light scaled by 1 ± light_change; 0 = none.
    camera_shift_m: float = 0.0
    camera_tilt_deg: float = 0.0
    light_change: float = 0.0
    perturb_up_to: bool = False  # each magnitude drawn in [0, the option] per episode (randomized training data)
    # Render every camera after the first in a process of its own (sim/camera_process.py: the same frames,
    # drawn at the same time on another core); for one env on a machine with cores to spare (the sim bridge).
    parallel_cameras: bool = False


def yaw_of(quaternion) -> float:
    return p.getEulerFromQuaternion(quaternion)[2]


class StackingEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    # The arm and its joint and link indices in PyBullet (sim/xarm.py has the xArm6's).
    arm = "panda"
    hand_link = HAND_LINK
    finger_links = FINGER_JOINTS
    wrist_camera = True  # the wrist camera is mounted on this arm's hand (sim/cameras.py)
    observed_joints = ARM_JOINTS + [FINGER_JOINTS[0]]

    def __init__(self, config: StackingConfig | None = None, **overrides):
        # keyword overrides (gym.make("GatoStack-v0", image_size=64)) never mutate the caller's config
        self.config = replace(config or StackingConfig(), **overrides)
        c = self.config
        self.task = tasks.get_task(c.task)
        if check_arm(c.arm) != self.arm:
            raise ValueError(f"{type(self).__name__} simulates the {self.arm}; sim.arms.make_env(arm={c.arm!r}) "
                             f"builds the {c.arm}'s env")
        if len(c.colours) < 2:
            raise ValueError("the stacking scene needs at least two blocks")
        if c.physics_hz % c.control_hz:
            raise ValueError("physics rate must be a multiple of the control rate")
        self.substeps = c.physics_hz // c.control_hz
        self.joint_names = JOINT_NAMES
        self.render_mode = "rgb_array"
        spaces = {
            "joint_positions": gym.spaces.Box(-np.inf, np.inf, (8,), np.float64),
            "joint_velocities": gym.spaces.Box(-np.inf, np.inf, (8,), np.float64),
            "task_state": gym.spaces.Box(-np.inf, np.inf, (17,), np.float64),
        }
        if c.cameras is not None:
            cams.check_cameras(c.cameras)
            if not c.image_size:
                raise ValueError("cameras need an image_size")
            if "wrist" in c.cameras and not self.wrist_camera:
                raise ValueError(f"the wrist camera is mounted on the Panda's hand only; the {self.arm} has the "
                                 "scene camera")
        for key in self.image_keys:
            spaces[key] = gym.spaces.Box(0, 255, (c.image_size, c.image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        limits = np.concatenate([ARM_TORQUE_LIMITS, [FINGER_FORCE_LIMIT]])
        self.action_space = gym.spaces.Box(-limits, limits, dtype=np.float64)
        self.client = p.connect(p.DIRECT)  # own client: several envs coexist in one process
        self._build_scene()
        self._last_obs: dict[str, np.ndarray] | None = None
        self._episode_seed = 0  # the perturbation's seed: the reset's seed, else one more than the last
        self.perturbation: cams.CameraPerturbation | None = None
        self.camera_processes: dict[str, CameraProcess] = {}
        if c.parallel_cameras:
            twin = replace(c, parallel_cameras=False)
            self.camera_processes = {name: CameraProcess(type(self), twin, name)
                                     for name in list(self.image_keys.values())[1:]}

    # ---------------------------------------------------------------- scene
    def _build_scene(self) -> None:
        c, cid = self.config, self.client
        p.resetSimulation(physicsClientId=cid)
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=cid)
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        p.setTimeStep(1.0 / c.physics_hz, physicsClientId=cid)
        p.loadURDF("plane.urdf", [0, 0, -0.626], physicsClientId=cid)
        self.table = p.loadURDF("table/table.urdf", [0.5, 0, -0.626], physicsClientId=cid)  # top at z = 0
        self._load_robot()
        half = c.cube_size / 2
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=[half] * 3, physicsClientId=cid)
        self.cubes = []
        for name in c.colours:
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=[half] * 3, rgbaColor=COLOURS[name], physicsClientId=cid)
            body = p.createMultiBody(c.cube_mass, col, vis, [0, 0, half], physicsClientId=cid)
            p.changeDynamics(body, -1, lateralFriction=c.friction, physicsClientId=cid)
            self.cubes.append(body)
        if self.task.has_marker:
            self._add_marker()

    def _load_robot(self) -> None:
        """The Panda, torque-controlled: default motors off, fingers coupled."""
        c, cid = self.config, self.client
        self.robot = p.loadURDF("franka_panda/panda.urdf", [0, 0, 0], useFixedBase=True, physicsClientId=cid)
        # Torque control needs the default velocity motors off.
        p.setJointMotorControlArray(
            self.robot, MOVABLE_JOINTS, p.VELOCITY_CONTROL, forces=[0.0] * len(MOVABLE_JOINTS), physicsClientId=cid
        )
        # Couple the fingers like the real hand's linkage: finger2 = finger1.
        gear = p.createConstraint(
            self.robot, 9, self.robot, 10, p.JOINT_GEAR, [1, 0, 0], [0, 0, 0], [0, 0, 0], physicsClientId=cid
        )
        p.changeConstraint(gear, gearRatio=-1, erp=0.1, maxForce=50, physicsClientId=cid)
        for j in FINGER_JOINTS:
            p.changeDynamics(self.robot, j, lateralFriction=c.friction, physicsClientId=cid)

    def _add_marker(self) -> None:
        """A flat disc on the table, visual only (no collision shape: physics is unchanged)."""
        cid = self.client
        vis = p.createVisualShape(p.GEOM_CYLINDER, radius=tasks.MARKER_RADIUS, length=0.002,
                                  rgbaColor=COLOURS[tasks.MARKER_COLOUR], physicsClientId=cid)
        self.marker = p.createMultiBody(0.0, -1, vis, [*tasks.MARKER_XY, 0.001], physicsClientId=cid)

    def _sample_cube_positions(self, rng: np.random.Generator) -> list[tuple[float, float]]:
        c = self.config
        x_lo, x_hi, y_lo, y_hi = c.workspace
        while True:
            xy = rng.uniform([x_lo, y_lo], [x_hi, y_hi], size=(len(self.cubes), 2))
            d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy))
            # a marker task also keeps the cubes off the marker (its scenes are a subset of the other tasks')
            clear = not self.task.has_marker or np.linalg.norm(xy - tasks.MARKER_XY, axis=-1).min() >= c.min_separation
            if d.min() >= c.min_separation and clear:
                return [tuple(v) for v in xy]

    # ---------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        cid, half = self.client, self.config.cube_size / 2
        c = self.config
        self._episode_seed = int(seed) if seed is not None else self._episode_seed + 1
        self.perturbation = cams.sample_perturbation(self._episode_seed, c.camera_shift_m, c.camera_tilt_deg,
                                                     c.light_change, c.perturb_up_to)
        # Rebuild so a seed fully determines the state (no solver warm-start from a previous episode).
        self._build_scene()
        self._reset_robot()
        for body, (x, y) in zip(self.cubes, self._sample_cube_positions(self.np_random), strict=True):
            yaw = self.np_random.uniform(-math.pi, math.pi)
            p.resetBasePositionAndOrientation(body, [x, y, half], p.getQuaternionFromEuler([0, 0, yaw]), cid)
        self.steps = 0
        self.hold = 0
        obs = self._observe()
        self._last_obs = obs
        return obs, {"success": False, "nan": False}

    def _reset_robot(self) -> None:
        """Home pose, hand open."""
        for j, q in zip(ARM_JOINTS, HOME_Q, strict=True):
            p.resetJointState(self.robot, j, q, 0.0, physicsClientId=self.client)
        for j in FINGER_JOINTS:
            p.resetJointState(self.robot, j, FINGER_OPEN, 0.0, physicsClientId=self.client)

    def gravity_compensation(self, q: np.ndarray) -> np.ndarray:
        """The torques that hold the arm still at q: inverse dynamics with zero velocity and acceleration."""
        zeros = [0.0] * len(MOVABLE_JOINTS)
        tau = p.calculateInverseDynamics(self.robot, list(q), zeros, zeros, physicsClientId=self.client)
        return np.asarray(tau[:7])

    def step(self, action, arm_torque: Callable[[float, np.ndarray, np.ndarray], np.ndarray] | None = None):
        """`arm_torque(t, q, qd)`, when given, replaces action[:7] at every physics sub-step (t: seconds into the
        step; q, qd: the arm's 7 joints): a joint controller on the robot, as ros2_control runs at 1 kHz."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (8,):
            raise ValueError(f"action must have 8 values, got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action holds NaN or inf")
        cid = self.client
        arm = np.clip(action[:7], -ARM_TORQUE_LIMITS, ARM_TORQUE_LIMITS)
        finger = float(np.clip(action[7], -FINGER_FORCE_LIMIT, FINGER_FORCE_LIMIT))
        nan = False
        for i in range(self.substeps):
            states = p.getJointStates(self.robot, MOVABLE_JOINTS, physicsClientId=cid)
            q = np.array([s[0] for s in states])
            if not np.all(np.isfinite(q)):
                nan = True
                break
            if arm_torque is not None:
                qd = np.array([s[1] for s in states[:7]])
                arm = np.clip(arm_torque(i / self.config.physics_hz, q[:7], qd), -ARM_TORQUE_LIMITS, ARM_TORQUE_LIMITS)
            tau = np.clip(arm + self.gravity_compensation(q), -ARM_TORQUE_LIMITS, ARM_TORQUE_LIMITS)
            p.setJointMotorControlArray(
                self.robot, MOVABLE_JOINTS, p.TORQUE_CONTROL, forces=list(tau) + [finger, finger], physicsClientId=cid
            )
            p.stepSimulation(physicsClientId=cid)
        return self._end_step(nan)

    def _end_step(self, nan: bool) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        """After the physics of one control step: observe, judge success, end the episode when due."""
        self.steps += 1
        obs = self._observe()
        nan = nan or not all(np.all(np.isfinite(v)) for k, v in obs.items() if k not in self.image_keys)
        if nan:
            # Physics blew up: end as a failure, loudly, and hand back the last finite observation.
            log.warning("NaN physics state at step %d: episode ends as a failure", self.steps)
            info = {"success": False, "nan": True, "steps": self.steps}
            return self._last_obs, 0.0, True, False, info
        self._last_obs = obs
        self.hold = self.hold + 1 if self.task_achieved() else 0
        success = self.hold >= self.config.hold_steps
        truncated = not success and self.steps >= self.config.max_steps
        info = {"success": success, "nan": False, "steps": self.steps}
        return obs, float(success), success, truncated, info

    # ---------------------------------------------------------------- state
    def _cube_pose(self, i: int) -> tuple[np.ndarray, float]:
        pos, orn = p.getBasePositionAndOrientation(self.cubes[i], physicsClientId=self.client)
        return np.asarray(pos), yaw_of(orn)

    def hand_position(self) -> np.ndarray:
        state = p.getLinkState(self.robot, self.hand_link, computeForwardKinematics=True, physicsClientId=self.client)
        return np.asarray(state[4])

    def task_achieved(self) -> bool:
        """The task's success predicate at this instant (sim/tasks.py); success needs it `hold_steps` in a row."""
        return tasks.achieved(self.task, self, self.config.cube_size, self.config.place_tolerance)

    def cube_position(self, i: int) -> np.ndarray:
        return self._cube_pose(i)[0]

    def cube_speed(self, i: int) -> float:
        return float(np.linalg.norm(p.getBaseVelocity(self.cubes[i], physicsClientId=self.client)[0]))

    def fingers_touch(self, i: int) -> bool:
        """Whether a finger touches cube i."""
        return any(p.getContactPoints(self.robot, self.cubes[i], j, -1, physicsClientId=self.client)
                   for j in self.finger_links)

    def _observe(self) -> dict[str, np.ndarray]:
        cid = self.client
        states = p.getJointStates(self.robot, self.observed_joints, physicsClientId=cid)
        hand = self.hand_position()
        red, _ = self._cube_pose(0)
        blue, _ = self._cube_pose(1)
        _, yaw = self._cube_pose(self.task.pick)
        task = np.concatenate(
            [hand, red, blue, red - hand, blue - red, [math.sin(4 * yaw), math.cos(4 * yaw)]]
        )
        obs = {
            "joint_positions": np.array([s[0] for s in states]),
            "joint_velocities": np.array([s[1] for s in states]),
            "task_state": task,
        }
        if self.camera_processes:
            poses = scene_snapshot(cid)
            for process in self.camera_processes.values():
                process.request(poses, self.perturbation)
        local = {key: self.render(self.config.image_size, name)  # while the processes render theirs
                 for key, name in self.image_keys.items() if name not in self.camera_processes}
        for key, name in self.image_keys.items():
            obs[key] = local[key] if key in local else self.camera_processes[name].frame()
        return obs

    @property
    def image_keys(self) -> dict[str, str]:
        """Observation key -> camera name, in the order the cameras were listed."""
        c = self.config
        if not c.image_size:
            return {}
        if c.cameras is None:
            return {cams.LEGACY_IMAGE_KEY: "scene"}
        return {cams.observation_key(name): name for name in c.cameras}

    def camera(self, name: str) -> cams.Camera:
        """Camera `name`; the scene camera's pose comes from the config (so it can be perturbed)."""
        return cams.FixedCamera(**self.config.camera) if name == "scene" else cams.CAMERAS[name]

    def render(self, size: int | None = None, camera: str = "scene") -> np.ndarray:
        """RGB (size, size, 3) uint8 from camera `camera` (TinyRenderer: runs headless)."""
        size = size or self.config.image_size or 64
        return cams.render_camera(self.camera(camera), size, self.robot, self.client, self.perturbation)

    def close(self) -> None:
        for process in self.camera_processes.values():
            process.close()
        self.camera_processes = {}
        if self.client is not None and p.isConnected(self.client):
            p.disconnect(self.client)
        self.client = None
