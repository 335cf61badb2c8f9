"""A camera rendered in a process of its own, from a copy of the scene posed like the env's every step.

PyBullet holds the GIL while TinyRenderer draws, so two cameras in one process render one after the
other (two 64 px frames of the Panda scene: ~38 ms of the 50 ms control period). A `CameraProcess`
owns a second env built from the same config: the scene is the same bodies in the same order, so
posing it from the env's snapshot (every body's base pose and joint positions) and rendering gives
the same frame bit for bit (tests/test_camera_process.py). The env renders its first camera itself
while each other camera renders in its process (`StackingConfig.parallel_cameras`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from typing import Any

import numpy as np
import pybullet as p

from sim import cameras as cams

BodyPose = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]  # base position, orientation, joint q


def scene_snapshot(client: int) -> list[BodyPose]:
    """Every body's base pose and joint positions in PyBullet client `client`, in body order."""
    poses = []
    for body in range(p.getNumBodies(physicsClientId=client)):
        position, orientation = p.getBasePositionAndOrientation(body, physicsClientId=client)
        joints = range(p.getNumJoints(body, physicsClientId=client))
        q = tuple(s[0] for s in p.getJointStates(body, joints, physicsClientId=client)) if joints else ()
        poses.append((position, orientation, q))
    return poses


def pose_scene(client: int, poses: list[BodyPose]) -> None:
    """Put every body of client `client` where `scene_snapshot` found its twin."""
    for body, (position, orientation, q) in enumerate(poses):
        p.resetBasePositionAndOrientation(body, position, orientation, physicsClientId=client)
        for joint, value in enumerate(q):
            p.resetJointState(body, joint, value, physicsClientId=client)


def _serve(env_type: type, config: Any, camera: str, connection: Any) -> None:
    """The process: build the env's twin, then render `camera` for each snapshot until told to stop (None)."""
    env = env_type(config)
    try:
        while (request := connection.recv()) is not None:
            poses, perturbation = request
            pose_scene(env.client, poses)
            env.perturbation = perturbation
            connection.send(env.render(config.image_size, camera))
    finally:
        env.close()


class CameraProcess:
    """Renders `camera` of an env of type `env_type` and `config` in a spawned process."""

    def __init__(self, env_type: type, config: Any, camera: str) -> None:
        self.camera = camera
        self._connection, child = mp.Pipe()
        self._process = mp.get_context("spawn").Process(target=_serve, args=(env_type, config, camera, child),
                                                        daemon=True, name=f"camera-{camera}")
        self._process.start()
        child.close()

    def request(self, poses: list[BodyPose], perturbation: cams.CameraPerturbation | None) -> None:
        """Start rendering the scene posed as `poses`; `frame()` returns it."""
        self._connection.send((poses, perturbation))

    def frame(self) -> np.ndarray:
        """The frame `request` started (waits for it)."""
        try:
            if self._connection.poll(30.0):
                return self._connection.recv()
        except (EOFError, OSError):
            pass
        self._process.join(timeout=1)
        raise RuntimeError(f"the {self.camera} camera's process gave no frame (exit code {self._process.exitcode})")

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):  # it may be gone already
                self._connection.send(None)
            self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._connection.close()
