"""Video of an episode that ran over ROS, rendered afterwards so filming never slows the real-time loop.

The supervisor records /joint_states and /gato/observations/task_state once per step; here a
kinematic PyBullet replay (the `StackingEnv` scene, no physics) poses the arm and the cubes from
them and renders a three-quarter view: an MP4 (OpenCV) and a small GIF (Pillow) for the README.

The observation holds the red cube's yaw only as sin/cos(4·yaw) (a cube looks the same every 90°),
so the replay picks the yaw nearest the previous frame's; the blue cube's yaw is not observed and
keeps its value from the seed's reset (it is the base, it rarely turns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pybullet as p

from sim.env import DEFAULT_ARM, StackingEnv, yaw_of
from sim.tasks import DEFAULT_TASK

VIEW = {"target": (0.45, 0.0, 0.2), "distance": 1.45, "yaw": 55.0, "pitch": -28.0}  # three-quarter, front right


def _nearest_yaw(four_yaw: float, previous: float) -> float:
    """The yaw y with 4y ≡ four_yaw (mod 2π) that is nearest `previous`."""
    base = four_yaw / 4
    k = round((previous - base) / (math.pi / 2))
    return base + k * math.pi / 2


def render_view(env: StackingEnv, size: int = 256) -> np.ndarray:
    cid = env.client
    view = p.computeViewMatrixFromYawPitchRoll(VIEW["target"], VIEW["distance"], VIEW["yaw"], VIEW["pitch"], 0.0, 2,
                                               physicsClientId=cid)
    proj = p.computeProjectionMatrixFOV(45.0, 1.0, 0.05, 5.0, physicsClientId=cid)
    _, _, rgba, _, _ = p.getCameraImage(size, size, view, proj, renderer=p.ER_TINY_RENDERER, physicsClientId=cid)
    return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()


def replay_frames(seed: int, joint_positions: np.ndarray, task_states: np.ndarray, size: int = 256,
                  arm: str = DEFAULT_ARM, task: str = DEFAULT_TASK) -> list[np.ndarray]:
    """One frame per recorded step of `arm` in `task`'s scene: joints (T, the arm's joints then its finger) and
    task states (T, 17) as the bridge published them."""
    from sim.arms import make_env

    env = make_env(arm, task=task)
    arm_joints = env.observed_joints[:-1]  # the observed joints are the arm's, then one finger
    try:
        env.reset(seed=seed)  # the seed's scene: the blue cube's yaw and the starting red yaw
        cid = env.client
        red, blue = env.cubes[0], env.cubes[1]
        red_yaw = yaw_of(p.getBasePositionAndOrientation(red, physicsClientId=cid)[1])
        blue_orn = p.getBasePositionAndOrientation(blue, physicsClientId=cid)[1]
        frames = []
        for q, task in zip(joint_positions, task_states, strict=True):
            for j, value in zip(arm_joints, q[:-1], strict=True):
                p.resetJointState(env.robot, j, float(value), physicsClientId=cid)
            for j in env.finger_links:  # coupled fingers: both at the observed finger joint
                p.resetJointState(env.robot, j, float(q[-1]), physicsClientId=cid)
            red_yaw = _nearest_yaw(math.atan2(task[15], task[16]), red_yaw)
            p.resetBasePositionAndOrientation(red, task[3:6].tolist(), p.getQuaternionFromEuler([0, 0, red_yaw]), cid)
            p.resetBasePositionAndOrientation(blue, task[6:9].tolist(), blue_orn, cid)
            frames.append(render_view(env, size))
        return frames
    finally:
        env.close()


def write_video(frames: list[np.ndarray], path: Path, fps: float) -> None:
    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def write_gif(frames: list[np.ndarray], path: Path, fps: float, size: int = 160, every: int = 2,
              max_bytes: int = 2_000_000) -> None:
    """A README-sized GIF: `size` px tall (the frames' aspect ratio kept), every `every`-th frame; shrinks further
    until under `max_bytes`."""
    from PIL import Image

    height, width = frames[0].shape[:2]
    while True:
        shape = (round(size * width / height), size)
        images = [Image.fromarray(f).resize(shape, Image.Resampling.LANCZOS) for f in frames[::every]]
        images = [im.convert("P", palette=Image.Palette.ADAPTIVE, colors=128) for im in images]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 * every / fps), loop=0,
                       optimize=True)
        if path.stat().st_size <= max_bytes or size <= 64:
            return
        size, every = int(size * 0.8), every + 1


def beside(scene: list[np.ndarray], cameras: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each scene frame with the policy's camera frames of the same step to its right (one [T, H, W, 3] array per
    camera, in the policy's order), each upscaled (nearest: its pixels stay visible as pixels) to the scene
    frame's height."""
    for frames in cameras:
        if len(frames) != len(scene):
            raise ValueError(f"{len(frames)} camera frames for {len(scene)} scene frames")
    size = scene[0].shape[0]
    return [np.concatenate([s, *(_upscale_nearest(frames[t], size) for frames in cameras)], axis=1)
            for t, s in enumerate(scene)]


def _upscale_nearest(frame: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(frame, (size * frame.shape[1] // frame.shape[0], size), interpolation=cv2.INTER_NEAREST)


def replay_to_files(seed: int, joint_positions: np.ndarray, task_states: np.ndarray, video: Path | str | None = None,
                    gif: Path | str | None = None, fps: float = 20.0, size: int = 256,
                    policy_frames: Sequence[np.ndarray] = (), arm: str = DEFAULT_ARM,
                    task: str = DEFAULT_TASK) -> list[np.ndarray]:
    """Render the recorded episode of `arm` in `task`'s scene to an MP4 (`video`, `size` px tall) and/or a GIF;
    returns the frames. With
    `policy_frames` (per camera of a seeing policy, one frame per recorded step: what it saw) each frame shows
    them beside the scene."""
    if len(joint_positions) == 0:
        raise ValueError("nothing was recorded: no frames to replay")
    frames = replay_frames(seed, joint_positions, task_states, size, arm, task)
    if len(policy_frames):
        frames = beside(frames, policy_frames)
    for path, write in ((video, lambda f, pth: write_video(f, pth, fps)), (gif, lambda f, pth: write_gif(f, pth, fps))):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write(frames, Path(path))
    return frames
