"""The stacking env's cameras: a fixed scene camera and a wrist camera on the Panda hand.

One module decides where each camera looks, so collection, evaluation and the sim bridge render
identical frames (they all go through `StackingEnv`, which calls `render_camera`). Rendering is
PyBullet's TinyRenderer: headless, CPU only, and deterministic for a given scene.

Observation keys: a camera named `scene` appears as `camera_scene`, `wrist` as `camera_wrist`. The
legacy single-camera env (`image_size` without `cameras`) keeps its `image` key for the scene view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pybullet as p

CAMERA_KEY_PREFIX = "camera_"
LEGACY_IMAGE_KEY = "image"
HAND_LINK_FRAME = 8  # panda_hand: z points from the flange to the fingertips, fingers open along y


@dataclass(frozen=True)
class FixedCamera:
    """A camera at a fixed pose in the world."""

    eye: tuple[float, float, float]
    target: tuple[float, float, float]
    up: tuple[float, float, float]
    fov: float  # vertical field of view (degrees)
    near: float = 0.05
    far: float = 5.0


@dataclass(frozen=True)
class HandCamera:
    """A camera rigidly mounted on the hand, in the hand frame (panda_hand).

    Like the wrist cameras of real Pandas: offset from the flange along the hand's x axis (across the
    fingers' opening direction, so the fingers never hide each other), looking along the approach
    axis z, tilted towards the point between the fingertips so the grasp sits in the image centre.
    """

    eye: tuple[float, float, float]  # in the hand frame (m)
    target: tuple[float, float, float]  # in the hand frame (m)
    up: tuple[float, float, float]  # in the hand frame
    fov: float
    near: float = 0.01
    far: float = 2.0


Camera = FixedCamera | HandCamera

CAMERAS: dict[str, Camera] = {
    # Today's view: in front of the table, looking back at the robot over the workspace.
    "scene": FixedCamera(eye=(1.05, 0.0, 0.45), target=(0.5, 0.0, 0.0), up=(0.0, 0.0, 1.0), fov=50.0),
    # 6 cm off the flange, looking 25 cm down the approach axis (the fingertips are 10.5 cm down).
    "wrist": HandCamera(eye=(0.06, 0.0, 0.0), target=(0.0, 0.0, 0.25), up=(1.0, 0.0, 0.0), fov=70.0),
}


def observation_key(camera: str) -> str:
    return CAMERA_KEY_PREFIX + camera


def camera_from_key(key: str) -> str | None:
    """The camera name of observation key `key` ('camera_wrist' -> 'wrist'), None for other keys."""
    if key.startswith(CAMERA_KEY_PREFIX) and key[len(CAMERA_KEY_PREFIX):] in CAMERAS:
        return key[len(CAMERA_KEY_PREFIX):]
    return None


def check_cameras(cameras: tuple[str, ...]) -> None:
    unknown = [c for c in cameras if c not in CAMERAS]
    if unknown:
        raise ValueError(f"unknown camera(s) {unknown}; known: {sorted(CAMERAS)}")
    if len(set(cameras)) != len(cameras):
        raise ValueError(f"camera listed twice in {cameras}")


def _view_matrix(camera: Camera, robot: int, client: int) -> list[float]:
    if isinstance(camera, FixedCamera):
        return p.computeViewMatrix(camera.eye, camera.target, camera.up, physicsClientId=client)
    state = p.getLinkState(robot, HAND_LINK_FRAME, computeForwardKinematics=True, physicsClientId=client)
    origin = np.asarray(state[4])
    rotation = np.asarray(p.getMatrixFromQuaternion(state[5])).reshape(3, 3)
    eye = origin + rotation @ np.asarray(camera.eye)
    target = origin + rotation @ np.asarray(camera.target)
    up = rotation @ np.asarray(camera.up)
    return p.computeViewMatrix(eye.tolist(), target.tolist(), up.tolist(), physicsClientId=client)


def render_camera(camera: Camera, size: int, robot: int, client: int) -> np.ndarray:
    """RGB (size, size, 3) uint8 from `camera` (TinyRenderer)."""
    view = _view_matrix(camera, robot, client)
    projection = p.computeProjectionMatrixFOV(camera.fov, 1.0, camera.near, camera.far, physicsClientId=client)
    # No segmentation mask: the same pixels, a little less work per frame.
    _, _, rgba, _, _ = p.getCameraImage(size, size, view, projection, renderer=p.ER_TINY_RENDERER,
                                        flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=client)
    return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()


def body_pixels(camera: Camera, size: int, robot: int, client: int, bodies: list[int]) -> list[int]:
    """How many pixels of `camera` show each of `bodies` (from the renderer's segmentation mask)."""
    view = _view_matrix(camera, robot, client)
    projection = p.computeProjectionMatrixFOV(camera.fov, 1.0, camera.near, camera.far, physicsClientId=client)
    _, _, _, _, segmentation = p.getCameraImage(size, size, view, projection, renderer=p.ER_TINY_RENDERER,
                                                physicsClientId=client)
    mask = np.asarray(segmentation).reshape(size, size)
    return [int(np.count_nonzero(mask == body)) for body in bodies]
