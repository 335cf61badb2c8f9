"""The stacking env's cameras: a fixed scene camera and a wrist camera on the Panda hand.

One module decides where each camera looks, so collection, evaluation and the sim bridge render
identical frames (they all go through `StackingEnv`, which calls `render_camera`). Rendering is
PyBullet's TinyRenderer: headless, CPU only, and deterministic for a given scene.

Observation keys: a camera named `scene` appears as `camera_scene`, `wrist` as `camera_wrist`. The
legacy single-camera env (`image_size` without `cameras`) keeps its `image` key for the scene view.

Robustness runs perturb every camera by a `CameraPerturbation` (the mount moved and turned, the light
brighter or dimmer), sampled per episode from the episode's seed (`sample_perturbation`); without one
the frames are exactly the unperturbed renderer's. `intrinsics` gives the pinhole model of the same
projection the renderer uses (the bridge's sensor_msgs/CameraInfo), and `frames_to_text` /
`frames_from_text` carry an episode's frames bit-exact through a JSON service (the bridge's ~/frames).
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np
import pybullet as p

CAMERA_KEY_PREFIX = "camera_"
LEGACY_IMAGE_KEY = "image"
HAND_LINK_FRAME = 8  # panda_hand: z points from the flange to the fingertips, fingers open along y
# TinyRenderer's default light coefficients (PyBullet's TinyRendererVisualShapeConverter): a light change
# scales all three, so a change of 0 renders exactly the default image.
LIGHT_COEFFICIENTS = {"lightAmbientCoeff": 0.6, "lightDiffuseCoeff": 0.35, "lightSpecularCoeff": 0.05}
PERTURBATION_STREAM = 0xCA3E  # mixed into the episode seed: the perturbation never draws from the scene's stream


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


@dataclass(frozen=True)
class CameraPerturbation:
    """A camera mount moved by `shift` (m, world frame) and turned by `rotation` about its eye, and the
    light scaled by `light_scale` (1 = unchanged)."""

    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    light_scale: float = 1.0

    @property
    def moves(self) -> bool:
        return self.shift != (0.0, 0.0, 0.0) or not np.array_equal(self.rotation, np.eye(3))


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def sample_perturbation(seed: int, shift_m: float = 0.0, tilt_deg: float = 0.0,
                        light_change: float = 0.0, up_to: bool = False) -> CameraPerturbation | None:
    """The perturbation of episode `seed`: the camera moved `shift_m` in a random direction, turned `tilt_deg`
    about a random axis, the light `1 ± light_change` (random sign). Magnitudes are exact (robustness runs) or,
    with `up_to`, each drawn uniformly between 0 and the option (randomization of training data); directions
    random; None when all three are 0 (the unperturbed renderer, bit for bit)."""
    if not (shift_m or tilt_deg or light_change):
        return None
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, PERTURBATION_STREAM])
    direction, axis = _unit_vector(rng), _unit_vector(rng)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    shift_frac, tilt_frac, light_frac = rng.random(3) if up_to else (1.0, 1.0, 1.0)
    shift = shift_m * shift_frac * direction
    angle = np.radians(tilt_deg * tilt_frac)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross  # Rodrigues
    light = 1.0 + light_change * light_frac * sign
    return CameraPerturbation(tuple(float(x) for x in shift), tuple(tuple(float(x) for x in row) for row in rotation),
                              float(light))


def _camera_pose(camera: Camera, robot: int, client: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The camera's eye, target and up in the world."""
    if isinstance(camera, FixedCamera):
        return np.asarray(camera.eye, float), np.asarray(camera.target, float), np.asarray(camera.up, float)
    state = p.getLinkState(robot, HAND_LINK_FRAME, computeForwardKinematics=True, physicsClientId=client)
    origin = np.asarray(state[4])
    rotation = np.asarray(p.getMatrixFromQuaternion(state[5])).reshape(3, 3)
    return origin + rotation @ np.asarray(camera.eye), origin + rotation @ np.asarray(camera.target), \
        rotation @ np.asarray(camera.up)


def _view_matrix(camera: Camera, robot: int, client: int,
                 perturbation: CameraPerturbation | None = None) -> list[float]:
    if isinstance(camera, FixedCamera) and (perturbation is None or not perturbation.moves):
        return p.computeViewMatrix(camera.eye, camera.target, camera.up, physicsClientId=client)
    eye, target, up = _camera_pose(camera, robot, client)
    if perturbation is not None and perturbation.moves:
        turn = np.asarray(perturbation.rotation)
        eye, target, up = eye + np.asarray(perturbation.shift), eye + np.asarray(perturbation.shift) + \
            turn @ (target - eye), turn @ up
    return p.computeViewMatrix(eye.tolist(), target.tolist(), up.tolist(), physicsClientId=client)


def _projection_matrix(camera: Camera, client: int) -> list[float]:
    return p.computeProjectionMatrixFOV(camera.fov, 1.0, camera.near, camera.far, physicsClientId=client)


def render_camera(camera: Camera, size: int, robot: int, client: int,
                  perturbation: CameraPerturbation | None = None) -> np.ndarray:
    """RGB (size, size, 3) uint8 from `camera` (TinyRenderer), perturbed when `perturbation` is given."""
    view = _view_matrix(camera, robot, client, perturbation)
    light = {} if perturbation is None or perturbation.light_scale == 1.0 else \
        {name: value * perturbation.light_scale for name, value in LIGHT_COEFFICIENTS.items()}
    # No segmentation mask: the same pixels, a little less work per frame.
    _, _, rgba, _, _ = p.getCameraImage(size, size, view, _projection_matrix(camera, client),
                                        renderer=p.ER_TINY_RENDERER, flags=p.ER_NO_SEGMENTATION_MASK,
                                        physicsClientId=client, **light)
    return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()


def intrinsics(camera: Camera, size: int, client: int) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) in pixels of the pinhole camera that `render_camera` renders at `size`: read off the
    renderer's own projection matrix (column-major OpenGL: P[0] = 2 fx / w, P[5] = 2 fy / h)."""
    projection = _projection_matrix(camera, client)
    return projection[0] * size / 2, projection[5] * size / 2, size / 2, size / 2


def frames_to_text(frames: list[np.ndarray]) -> dict:
    """An episode's frames (each (H, W, 3) uint8) as JSON-ready text: deflated, base64, bit-exact."""
    stack = np.ascontiguousarray(np.stack(frames)) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    return {"shape": list(stack.shape), "deflate_b64": base64.b64encode(zlib.compress(stack.tobytes(), 6)).decode()}


def frames_from_text(record: dict) -> np.ndarray:
    """The inverse of `frames_to_text`: (T, H, W, 3) uint8."""
    data = zlib.decompress(base64.b64decode(record["deflate_b64"]))
    return np.frombuffer(data, dtype=np.uint8).reshape(record["shape"]).copy()


def body_pixels(camera: Camera, size: int, robot: int, client: int, bodies: list[int]) -> list[int]:
    """How many pixels of `camera` show each of `bodies` (from the renderer's segmentation mask)."""
    view = _view_matrix(camera, robot, client)
    _, _, _, _, segmentation = p.getCameraImage(size, size, view, _projection_matrix(camera, client),
                                                renderer=p.ER_TINY_RENDERER, physicsClientId=client)
    mask = np.asarray(segmentation).reshape(size, size)
    return [int(np.count_nonzero(mask == body)) for body in bodies]
