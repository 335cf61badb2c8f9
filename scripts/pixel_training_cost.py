"""Seconds per training step from state against from pixels (tiny preset, one thread).

Rolls out a few scripted-expert episodes with the camera(s) on, writes them as two datasets (joints +
privileged task_state; joints + camera images, no task_state), and times optimizer steps of the
`tiny` model on a window of `--timesteps` timesteps, batch `--batch-size`, as `gato-ros train` runs
them (`GatoModel.action_loss`, backward, AdamW). Batches are built before the clock starts; their
build time is printed apart. The cases take turns step by step, so load from other jobs on the machine
hits them alike.

`--before` adds the patch network as it was before it ran on patch tokens only: the same ResNet-v2
block at the full 16x16 resolution (3x3 stem, 4x4 average pool at the end), applied to every token
of the window. It reproduces the old numbers without checking out old code.

    nice -n 10 .venv/bin/python scripts/pixel_training_cost.py --before
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import resource
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.data import EpisodeWriter, read_dataset
from gato_ros.model import GatoConfig, GatoModel
from gato_ros.sequences import SequenceDataset
from gato_ros.train import make_optimizer
from sim.env import StackingEnv
from sim.expert import ScriptedExpert, run_episode
from sim.spec import stacking_spec


class FullResolutionPatchEmbedding(nn.Module):
    """The patch network before this change: 3x3 convolutions at 16x16, pooled to 4x4 at the end."""

    def __init__(self, config: GatoConfig) -> None:
        super().__init__()
        c = config.patch_channels
        groups = math.gcd(c, 8)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm_out = nn.GroupNorm(groups, c)
        self.pool = nn.AvgPool2d(4)
        self.proj = nn.Linear(c * 16, config.n_embd)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        lead = patches.shape[:-3]
        x = self.stem(patches.reshape(-1, 3, contract.PATCH_SIZE, contract.PATCH_SIZE))
        h = self.conv1(F.gelu(self.norm1(x)))
        x = x + self.conv2(F.gelu(self.norm2(h)))
        x = self.pool(F.gelu(self.norm_out(x)))
        return self.proj(x.flatten(1)).reshape(*lead, -1)


def embed_every_token(self: GatoModel, input_ids: torch.Tensor, local_positions: torch.Tensor,
                      patches: torch.Tensor | None = None, patch_positions: torch.Tensor | None = None) -> torch.Tensor:
    """GatoModel.embed before this change: the patch network runs on all B x S tokens."""
    x = self.tokens(input_ids.clamp(0, self.config.vocab_size - 1))
    if self.values is not None:
        first = contract.CONTINUOUS_OFFSET
        continuous = (input_ids >= first) & (input_ids < first + contract.NUM_BINS)
        x = torch.where(continuous.unsqueeze(-1), self.values(input_ids), x)
    if patches is not None:
        is_patch = (input_ids == contract.PATCH_TOKEN).unsqueeze(-1)
        pe = self.patch_embed(patches.to(x.dtype))
        if patch_positions is not None:
            pos = patch_positions.clamp(0, contract.PATCH_POSITION_INTERVALS - 1)
            pe = pe + self.patch_rows(pos[..., 0]) + self.patch_cols(pos[..., 1])
        x = torch.where(is_patch, pe, x)
    has_local = (local_positions >= 0).unsqueeze(-1).to(x.dtype)  # as GatoModel.embed: negative adds nothing
    return x + self.local_positions(local_positions.clamp(0, self.config.max_local_positions - 1)) * has_local


def full_resolution_model(config: GatoConfig) -> GatoModel:
    model = GatoModel(config)
    model.patch_embed = FullResolutionPatchEmbedding(config)
    model.embed = types.MethodType(embed_every_token, model)
    return model


def write_datasets(root: Path, episodes: int, image_size: int, cameras: tuple[str, ...]) -> dict[str, Path]:
    env, expert = StackingEnv(image_size=image_size, cameras=cameras), ScriptedExpert()
    specs = {"state": stacking_spec(), "pixels": stacking_spec(image_size, privileged=False, cameras=cameras)}
    writers = {name: EpisodeWriter(root / name, spec) for name, spec in specs.items()}
    for seed in range(episodes):
        episode = run_episode(env, expert, seed, noisy=seed % 2 == 1)
        for name, writer in writers.items():
            keys = [o.name for o in specs[name].observations]
            writer.add_episode({k: episode.observations[k] for k in keys}, episode.actions, {"seed": seed})
    for writer in writers.values():
        writer.close()
    env.close()
    return {name: root / name for name in specs}


class Case:
    """One model on one dataset, with its batches built ahead and its own optimizer."""

    def __init__(self, model: GatoModel, data: Path, timesteps: int, batch_size: int, steps: int) -> None:
        dataset = read_dataset(data)
        self.seq_len = timesteps * tok.timestep_token_count(dataset.spec)
        windows = SequenceDataset(dataset, self.seq_len, train=True, seed=0,
                                  observation_local_positions_only=model.config.observation_local_positions_only)
        loader = DataLoader(windows, batch_size=batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        self.batches: list[dict[str, torch.Tensor]] = []
        while len(self.batches) < steps:  # more passes when the episodes hold fewer windows
            self.batches += list(itertools.islice(loader, steps - len(self.batches)))
        self.batch_seconds = (time.perf_counter() - t0) / len(self.batches)
        self.patch_tokens = int((self.batches[0]["input_ids"] == tok.PATCH_TOKEN).sum()) // batch_size
        self.model = model.train()
        self.optimizer = make_optimizer(model, 1e-3, 0.01, torch.device("cpu"))
        self.seconds: list[float] = []
        self.user = self.system = 0.0

    def step(self, i: int) -> None:
        usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = self.model.action_loss(**self.batches[i])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        seconds, usage1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        if i >= WARMUP_STEPS:
            self.seconds.append(seconds)
            self.user += usage1.ru_utime - usage0.ru_utime
            self.system += usage1.ru_stime - usage0.ru_stime


WARMUP_STEPS = 2  # the first steps allocate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4, help="expert episodes to roll out (data for the windows)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cameras", nargs="+", default=["scene"], choices=("scene", "wrist"))
    parser.add_argument("--timesteps", type=int, default=4, help="timesteps per training window")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per case")
    parser.add_argument("--before", action="store_true", help="also time the full-resolution, every-token patch net")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = GatoConfig.from_preset("tiny", context_window=1024)
    cases = {"state": (GatoModel, "state"), "pixels": (GatoModel, "pixels")}
    if args.before:
        cases["pixels, before (patch net on every token, 16x16)"] = (full_resolution_model, "pixels")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_datasets(Path(tmp), args.episodes, args.image_size, tuple(args.cameras))
        print(f"tiny preset, batch {args.batch_size}, {args.timesteps}-timestep window, 1 thread, "
              f"cameras {args.cameras} at {args.image_size} px; load average {os.getloadavg()[0]:.1f}, "
              f"niceness {os.nice(0)}")
        print("| case | tokens/window | patch tokens/window | s/step (median) | batch build s | system time share |")
        print("|---|---|---|---|---|---|")
        runs = {}
        for name, (make_model, dataset) in cases.items():
            torch.manual_seed(0)
            runs[name] = Case(make_model(config), data[dataset], args.timesteps, args.batch_size,
                              args.steps + WARMUP_STEPS)
        for i in range(args.steps + WARMUP_STEPS):  # interleaved: a load change on the machine hits every case
            for case in runs.values():
                case.step(i)
        for name, c in runs.items():
            print(f"| {name} | {c.seq_len} | {c.patch_tokens} | {np.median(c.seconds):.2f} | {c.batch_seconds:.2f} "
                  f"| {100 * c.system / max(1e-9, c.user + c.system):.0f} % |")


if __name__ == "__main__":
    main()
