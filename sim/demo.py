"""`gato-ros demo` (`make demo`): the shipped policy stacking blocks in closed loop over ROS 2.

Starts `sim_bridge` (the PyBullet arm) and `policy_node` (the lifecycle node a robot runs) as
separate processes talking over ROS 2 on loopback, runs a few episodes at the control rate
(20 Hz, real time), prints success and step latency, and saves into --out: `demo.json` (the same
summary as `gato-ros eval`), `demo.png` (plot), `episode1.mp4` and `episode1.gif` (a replay of the
first episode rendered after the run, so filming never slows the loop). For a seeing policy the film
shows, beside the scene, the frames the policy acted on at each step, one panel per camera in the model's
order (its 64 px frames upscaled, as the bridge rendered and published them).

The policy file comes from `--model` (`make demo MODEL=models/see_int8.onnx`); the default is the
shipped model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--model", default=None, help="ONNX policy (default: the shipped models/stack_int8.onnx)")
    parser.add_argument("--seed", type=int, default=200_000, help="episodes use seed, seed+1, ... (not training seeds)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto, cpu, cuda, tensorrt")
    parser.add_argument("--max-steps", type=int, default=None, help="episode step limit (default: the env's)")
    parser.add_argument("--real-time-factor", type=float, default=1.0, help="sim speed; 1.0 = real time")
    parser.add_argument("--record", type=Path, default=None, help="also record the run as a rosbag2 MCAP bag here")


def model_image_keys(model: str) -> list[str]:
    """The image keys of the model's spec (empty for a state policy)."""
    from sim.spec import model_spec

    return [o.name for o in model_spec(model).observations if o.kind == "image"]


def run(args: argparse.Namespace) -> int:
    from gato_ros.node import default_model_path
    from sim.evaluate import plot_summary, summarize
    from sim.ros_eval import describe, evaluate_over_ros, ros_environment, ros_summary

    model = args.model or default_model_path()
    if not Path(model).is_file():
        print(f"gato-ros demo: no model at {model}.\n"
              "The shipped policy is models/stack_int8.onnx (see models/README.md for the command sequence that "
              "trains and exports it); pass another one with --model PATH.onnx.", file=sys.stderr)
        return 1
    discovery, domain = ros_environment()
    print(f"ROS 2: ROS_AUTOMATIC_DISCOVERY_RANGE={discovery} ROS_DOMAIN_ID={domain} (set them to override)")
    print(f"model {model}: {args.episodes} episode(s) from seed {args.seed}, sim_bridge + policy_node over ROS 2 "
          f"at 20 Hz, {args.real_time_factor:g}x real time")
    image_keys = model_image_keys(model)
    if image_keys:
        from gato_ros.control import default_image_topic

        topics = ", ".join(f"{key} on {default_image_topic(key, 'camera/image_raw')}" for key in image_keys)
        print(f"a seeing policy ({topics}): the film shows what it saw beside the scene")
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + i for i in range(args.episodes)]
    video, gif = args.out / "episode1.mp4", args.out / "episode1.gif"
    start = time.perf_counter()
    ros_run = evaluate_over_ros(model, seeds, provider=args.provider, max_steps=args.max_steps, video=video, gif=gif,
                                real_time_factor=args.real_time_factor, log_dir=args.out / "logs", record=args.record)
    results = ros_run.results
    summary = summarize(results, model, "over-ros demo", args.seed, time.perf_counter() - start)
    summary["over_ros"] = ros_summary(ros_run)
    (args.out / "demo.json").write_text(json.dumps(summary, indent=2))
    plot_summary(summary, np.concatenate([r.step_ms for r in results]) if results else np.zeros(0),
                 args.out / "demo.png")
    for r in results:
        print(f"  seed {r.seed}: {'stacked' if r.success else 'not stacked'} in {r.steps} steps, "
              f"{r.control_rate_hz:.1f} Hz, {r.stale_steps} stale command(s)")
    lat = summary.get("step_latency_ms", {})
    print(f"success {summary['successes']}/{summary['episodes']}; step latency (observation published → command "
          f"received) p50 {lat.get('p50', float('nan')):.1f} ms, p99 {lat.get('p99', float('nan')):.1f} ms")
    print(describe(summary["over_ros"]))
    print(f"every process exited with {ros_run.exit_codes}; wrote {args.out / 'demo.json'}, "
          f"{args.out / 'demo.png'}, {video}, {gif} (logs in {args.out / 'logs'})")
    if args.record is not None:
        print(f"recorded the run into the bag {args.record} (gato-ros dataset --from-bag {args.record} ...)")
    return 0
