"""How precisely the cameras' frames locate the cubes: a small CNN trained to regress them, against the seeing policy.

    .venv/bin/python scripts/camera_precision.py --train runs/r12/statepol runs/r12/expert runs/see12/cpu1 \
        --test-last 20 --minutes 14 --json runs/precision/probe.json
    # the same episodes rendered at two sizes: what resolution buys
    .venv/bin/python scripts/camera_precision.py --train runs/precision/e64 --test-last 15 --steps 2500 --json J64
    .venv/bin/python scripts/camera_precision.py --train runs/precision/e128 --test-last 15 --steps 2500 --json J128
    # soft-argmax keypoints per camera beside the pooled features: whether the frame or the probe's pooling limits it
    .venv/bin/python scripts/camera_precision.py --train ... --keypoints 16 --steps 11911 --save runs/precision/kp.pt

A seeing policy can place the hand only as precisely as it can read the cubes off its frames. This trains a plain
convolutional regressor (no transformer, no history) from one timestep's camera frames and joint positions to the
privileged task_state parts the grasp and the placing need (red cube − hand, blue cube − red cube, the red cube's
yaw), on datasets collected with `--aux-keys task_state`, and reports its error on the last `--test-last` episodes
of the last dataset (held out), where the grasp and the placing happen:
  - red − hand with the hand within 5 cm of the red cube (the grasp: the expert closes within 0.8 cm, 5.7°);
  - blue − red with the red cube carried (2 cm above resting, the hand on it; the expert releases within 1 cm);
  - the red cube's yaw (modulo 90°) with the hand within 5 cm.
Compare with the policy's own aux head on the same episodes (`scripts/seeing_pilot.py aux-error CHECKPOINT DATA
--first-episode N`): a probe much better than the policy says the frames hold the precision and the policy has not
learnt to read it; a probe no better says the cameras (view, size) are the limit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gato_ros.data import read_dataset
from sim.results import BLUE_MINUS_RED, RED_MINUS_HAND, RED_YAW, carried, yaw_error_deg

TARGETS = slice(RED_MINUS_HAND.start, RED_YAW.stop)  # task_state's red − hand, blue − red, sin/cos of 4 × yaw
CAMERAS = ("camera_scene", "camera_wrist")


class SpatialKeypoints(nn.Module):
    """One camera's frame → `count` soft-argmax keypoints (x, y in [-1, 1]) from maps at half the frame's side:
    each map's expected pixel position, which resolves finer than its pixels (Levine et al. 2016, "End-to-End
    Training of Deep Visuomotor Policies"), where a stride-2 stack down to 4×4 keeps only pooled features."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.maps = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
                                  nn.Conv2d(32, count, 1))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        maps = self.maps(frame)
        n, k, h, w = maps.shape
        weights = torch.softmax(maps.flatten(2) / self.log_temperature.exp(), dim=-1).view(n, k, h, w)
        ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
        return torch.cat([(weights.sum(3) * ys).sum(2), (weights.sum(2) * xs).sum(2)], dim=1)


class FrameRegressor(nn.Module):
    """Frames (stacked on channels) → conv stack → with the joints → the task_state parts; with `keypoints`,
    each camera's soft-argmax keypoints join the conv stack's features."""

    def __init__(self, channels: int, size: int, joints: int, outputs: int, keypoints: int = 0) -> None:
        super().__init__()
        self.shape = (channels, size, joints, outputs, keypoints)  # what rebuilds it from its saved weights
        widths = (channels, 32, *[64] * (int(np.log2(size // 4)) - 2), 128)  # stride-2 layers down to 4×4
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.keypoints = nn.ModuleList(SpatialKeypoints(keypoints) for _ in range(channels // 3 if keypoints else 0))
        features = 128 * 16 + joints + 2 * keypoints * len(self.keypoints)
        self.head = nn.Sequential(nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, outputs))

    def forward(self, frames: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        cameras = frames.split(3, dim=1)
        points = [branch(frame) for branch, frame in zip(self.keypoints, cameras, strict=False)]
        return self.head(torch.cat([self.conv(frames).flatten(1), *points, joints], dim=1))


class Probe:
    """The regressor with the normalization it was trained with: frames and joints in, task_state parts out (env
    units). Training builds one; --save writes it and `Probe.load` reads it (scripts/perceived_expert.py)."""

    def __init__(self, model: FrameRegressor, offset: np.ndarray, scale: np.ndarray, joint_mean: np.ndarray,
                 joint_std: np.ndarray) -> None:
        self.model, self.offset, self.scale = model, offset, scale
        self.joint_mean, self.joint_std = joint_mean, joint_std

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        saved = torch.load(path, weights_only=False)
        model = FrameRegressor(*saved["shape"])
        model.load_state_dict(saved["state_dict"])
        return cls(model.eval(), saved["offset"], saved["scale"], saved["joint_mean"], saved["joint_std"])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": self.model.state_dict(), "shape": self.model.shape, "offset": self.offset,
                    "scale": self.scale, "joint_mean": self.joint_mean, "joint_std": self.joint_std}, path)

    @property
    def size(self) -> int:
        """The frames' side (px) it reads."""
        return self.model.shape[1]

    def inputs(self, frames: np.ndarray, joints: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [N, 6, H, W] and joint positions [N, 8] as the regressor takes them."""
        return (torch.from_numpy(frames).float() / 255.0,
                torch.from_numpy(((joints - self.joint_mean) / self.joint_std).astype(np.float32)))

    def estimate(self, frames: np.ndarray, joints: np.ndarray) -> np.ndarray:
        """[N, 17] task_state rows with the TARGETS parts estimated, the rest zero (in batches of 512)."""
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = np.concatenate([self.model(*self.inputs(frames[i:i + 512], joints[i:i + 512])).numpy()
                                  for i in range(0, len(frames), 512)])
        self.model.train(training)
        full = np.zeros((len(out), 17))
        full[:, TARGETS] = out * self.scale + self.offset
        return full

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """[17] the estimate from one observation's frames and joint positions."""
        frames = np.concatenate([obs[k] for k in CAMERAS], axis=-1).transpose(2, 0, 1)[None]
        return self.estimate(frames, obs["joint_positions"][None])[0]


def load(roots: list[str], episodes: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 frames [N, 6, H, W], joint positions [N, 8], task_state [N, 17] of the chosen episodes."""
    frames, joints, states = [], [], []
    for root in roots:
        dataset = read_dataset(root)
        for index in range(len(dataset))[episodes]:
            observations, _ = dataset.episode(index)
            frames.append(np.concatenate([observations[k] for k in CAMERAS], axis=-1).transpose(0, 3, 1, 2))
            joints.append(observations["joint_positions"])
            states.append(dataset.aux_values(index, "task_state"))
    return np.concatenate(frames), np.concatenate(joints).astype(np.float32), np.concatenate(states)


def errors(estimate: np.ndarray, truth: np.ndarray) -> dict:
    """Median errors where the grasp and the placing happen (estimate and truth: task_state rows, env units)."""
    near = np.linalg.norm(truth[:, RED_MINUS_HAND], axis=1) < 0.05
    lifted = carried(truth)
    cm = lambda part, mask: float(100 * np.median(np.linalg.norm(estimate[mask, part] - truth[mask, part], axis=1)))  # noqa: E731
    return {"red_minus_hand_near_cm": cm(RED_MINUS_HAND, near), "near_steps": int(near.sum()),
            "blue_minus_red_lifted_cm": cm(BLUE_MINUS_RED, lifted) if lifted.any() else None,
            "lifted_steps": int(lifted.sum()),
            "yaw_near_deg": float(np.median(yaw_error_deg(estimate[near, RED_YAW], truth[near, RED_YAW])))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="+", required=True, help="datasets with frames and aux task_state")
    parser.add_argument("--test-last", type=int, default=20, help="held-out episodes at the end of the last dataset")
    parser.add_argument("--minutes", type=float, default=10.0, help="stop after this long ...")
    parser.add_argument("--steps", type=int, default=None, help="... or after this many steps (the schedule's length)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--keypoints", type=int, default=0,
                        help="soft-argmax keypoints per camera beside the pooled features (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--save", type=Path, default=None,
                        help="the trained probe, for scripts/perceived_expert.py (the expert acting on its estimates)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    *first, last = args.train
    parts = [load([root], slice(None)) for root in first] + [load([last], slice(None, -args.test_last))]
    frames, joints, states = (np.concatenate(x) for x in zip(*parts, strict=True))
    test_frames, test_joints, test_states = load([last], slice(-args.test_last, None))
    offset = states[:, TARGETS].mean(0)
    scale = states[:, TARGETS].std(0) + 1e-6
    targets = ((states[:, TARGETS] - offset) / scale).astype(np.float32)
    joint_mean, joint_std = joints.mean(0), joints.std(0) + 1e-6
    model = FrameRegressor(frames.shape[1], frames.shape[2], joints.shape[1], targets.shape[1], args.keypoints)
    probe = Probe(model, offset, scale, joint_mean, joint_std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

    start, step, log = time.perf_counter(), 0, []
    deadline = start + 60 * args.minutes

    def progress() -> float:  # 0 → 1 over the run: the cosine schedule's clock
        if args.steps is not None:
            return step / args.steps
        return (time.perf_counter() - start) / (deadline - start)

    while progress() < 1.0 and time.perf_counter() < deadline:
        idx = rng.integers(0, len(frames), args.batch_size)
        lr = 1e-3 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress())))
        for group in optimizer.param_groups:
            group["lr"] = lr
        predicted = model(*probe.inputs(frames[idx], joints[idx]))
        loss = nn.functional.smooth_l1_loss(predicted, torch.from_numpy(targets[idx]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 500 == 0:
            result = errors(probe.estimate(test_frames, test_joints), test_states)
            log.append({"step": step, "seconds": time.perf_counter() - start, "loss": float(loss.detach()), **result})
            print(json.dumps(log[-1]), flush=True)
    result = {"train": args.train, "frame_size": int(frames.shape[2]), "train_frames": len(frames),
              "test_frames": len(test_frames), "steps": step, "seconds": time.perf_counter() - start,
              "batch_size": args.batch_size, "minutes": args.minutes, "keypoints": args.keypoints,
              **errors(probe.estimate(test_frames, test_joints), test_states), "log": log}
    print(json.dumps({k: v for k, v in result.items() if k != "log"}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.save:
        probe.save(args.save)


if __name__ == "__main__":
    main()
