"""`gato-ros replay BAG --policy MODEL`: open-loop check of a policy on a recorded episode, before the arm.

The recorded episode (`gato_ros.bags`: what the node observed on each tick, and the command it sent)
is fed to `MODEL` through `PolicyRuntime`, one observation per control step, in a fresh context; the
model's command is compared with the recorded one joint by joint. It prints a table (mean absolute
and RMS error, worst step, per joint) and writes `replay.json` and `replay.png` (recorded vs replayed
command over the episode, per joint) into --out. The model's own actions fill its context, as they
would on the arm, so the error grows where the model would have acted differently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gato_ros.bags import Episode, convert_bag, episode_arrays
from gato_ros.rosbag import BagError


def replay_episode(runtime: Any, episode: Episode) -> tuple[np.ndarray, np.ndarray]:
    """(recorded commands (T, A), the model's commands (T, A)), both in the spec's action order."""
    observations, recorded = episode_arrays(runtime.spec, episode)
    runtime.reset()
    replayed = np.stack([runtime.step({k: v[t] for k, v in observations.items()}) for t in range(len(recorded))])
    return recorded, replayed


def action_errors(names: list[str], recorded: np.ndarray, replayed: np.ndarray) -> dict[str, dict[str, float]]:
    """Per joint: mean absolute error, RMS error, and the worst step."""
    err = replayed - recorded
    return {name: {"mae": float(np.mean(np.abs(err[:, j]))), "rmse": float(np.sqrt(np.mean(err[:, j] ** 2))),
                   "max_abs": float(np.max(np.abs(err[:, j]))), "worst_step": int(np.argmax(np.abs(err[:, j])))}
            for j, name in enumerate(names)}


def plot(names: list[str], recorded: np.ndarray, replayed: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.2 * rows), sharex=True, squeeze=False)
    steps = np.arange(len(recorded))
    for j, name in enumerate(names):
        ax = axes[j // cols][j % cols]
        ax.plot(steps, recorded[:, j], label="recorded command", lw=1.5)
        ax.plot(steps, replayed[:, j], label="replayed (open loop)", lw=1.0, ls="--")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("control step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="a bag directory (gato-ros record) or .mcap file")
    parser.add_argument("--policy", required=True, help="ONNX policy to check")
    parser.add_argument("--episode", type=int, default=0, help="which recorded episode (0 = the first)")
    parser.add_argument("--out", type=Path, default=Path("runs/replay"))
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime provider: cpu, auto, cuda, tensorrt")
    parser.add_argument("--keep-partial", action="store_true", help="also consider episodes cut short")


def run(args: argparse.Namespace) -> int:
    from gato_ros.runtime import ModelLoadError, PolicyRuntime

    try:
        runtime = PolicyRuntime(args.policy, provider=args.provider, threads=1)
        episodes, report = convert_bag(args.bag, runtime.spec, keep_partial=args.keep_partial)
        if not 0 <= args.episode < len(episodes):
            raise BagError(f"{args.bag} holds {len(episodes)} usable episode(s), no episode {args.episode}: "
                           + "; ".join(report.lines()))
    except (BagError, ModelLoadError, OSError, ValueError) as err:
        print(f"gato-ros replay: {err}", file=sys.stderr)
        return 1
    episode = episodes[args.episode]
    recorded, replayed = replay_episode(runtime, episode)
    names = list(runtime.spec.joint_names)
    errors = action_errors(names, recorded, replayed)
    args.out.mkdir(parents=True, exist_ok=True)
    recorded_model = episode.steps[0].tick["model"]
    summary = {"bag": str(args.bag), "policy": str(args.policy), "recorded_model": recorded_model,
               "episode": args.episode, "seed": episode.seed, "steps": len(recorded), "per_joint": errors,
               "mean_mae": float(np.mean([e["mae"] for e in errors.values()])), "bag_report": report.to_dict()}
    (args.out / "replay.json").write_text(json.dumps(summary, indent=2))
    plot(names, recorded, replayed, args.out / "replay.png",
         f"{Path(args.policy).name} open loop on {Path(args.bag).name} episode {args.episode} "
         f"(recorded with {recorded_model})")
    print(f"{Path(args.policy).name} on {args.bag} episode {args.episode} (seed {episode.seed}, {len(recorded)} "
          f"steps, recorded with {recorded_model}): action error vs the recorded command")
    print(f"{'joint':<22}{'MAE':>10}{'RMSE':>10}{'max':>10}{'at step':>9}")
    for name, e in errors.items():
        print(f"{name:<22}{e['mae']:>10.4f}{e['rmse']:>10.4f}{e['max_abs']:>10.4f}{e['worst_step']:>9d}")
    print(f"wrote {args.out / 'replay.json'} and {args.out / 'replay.png'}")
    return 0
