"""`gato-ros`: one console command, one subcommand per job.

Each subcommand lives in the module that does the job; it is imported only when chosen, so
`gato-ros node` never imports torch and `gato-ros train` never imports rclpy.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module exposing `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sim.demo", "closed-loop stacking demo: sim bridge + policy node over ROS 2"),
    "node": ("gato_ros.node", "run the ROS 2 policy node (lifecycle node gato_policy)"),
    "watchdog": ("gato_ros.watchdog", "run the policy watchdog: relays fresh commands, the safe action when they stop"),
    "sim": ("sim.bridge", "run the PyBullet arm as a ROS 2 robot (joint states, camera, effort commands)"),
    "collect": ("sim.collect", "collect scripted-expert episodes into a dataset"),
    "train": ("gato_ros.train", "train a Gato model on a dataset"),
    "export": ("gato_ros.export", "export a checkpoint to ONNX (fp32, int8, int4, fp16)"),
    "eval": ("sim.evaluate", "closed-loop success rate of a policy on the stacking task"),
    "bench": ("gato_ros.bench", "latency benchmark per control step"),
    "info": ("gato_ros.info", "what a policy file serves: arms, tasks, specs, window, variant"),
    "record": ("gato_ros.record", "record the arm's inputs, commands and the policy's ticks as a rosbag2 MCAP bag"),
    "dataset": ("gato_ros.bags", "turn recorded bags into a training dataset"),
    "replay": ("gato_ros.bag_replay", "open-loop check of a policy on a recorded episode: per-joint action error"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gato-ros", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"gato-ros {name}", description=help_text)
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
