"""A closed-loop soak: the policy node, the watchdog and the sim arm for 30 minutes, episode after episode.

    nice -n 10 .venv/bin/python scripts/soak.py                     # 30 minutes, the shipped model
    .venv/bin/python scripts/soak.py --minutes 2 --json runs/soak.json

sim_bridge (real time), policy_node (20 Hz) and policy_watchdog run as separate processes, the node and
the watchdog on the bridge's /clock (the policy's tick t answers observation t, as in the evaluation; with
`--wall-clock` every node runs on the wall clock, out of step with the sim, as on a robot);
every `--episode-s` seconds this script resets the node's context and the bridge's episode (a new seed), as
an operator would between tasks. It reports, from outside the node:

    RSS of node, bridge and watchdog at the start (after a minute's warm-up) and at the end
    deadline misses (the node's count) and ticks
    stale commands: commands the watchdog dropped as stale, its faults (silences that brought the safe
    action), and steps the bridge ran without a command answering the latest observation
    episodes and successes

`--json` writes the figures (tests/test_soak.py, marked slow, runs this and checks them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from gato_ros.node import default_model_path
from sim.rig import Episodes, LoopRig, machine, rss_mb


def sample_rss(rig: LoopRig) -> dict[str, float]:
    return {name: round(rss_mb(pid), 1) for name, pid in rig.pids().items()}


def soak(model: str, minutes: float, episode_s: float, warmup_s: float, log_dir: Path, wall_clock: bool) -> dict:
    # 200-step episodes as in the evaluation; only the last seconds of records are kept (liveness checks)
    rig = LoopRig(log_dir, policy="node", model_path=model, rate_hz=20.0, max_steps=200, keep=2_000,
                  sim_time=not wall_clock)
    try:
        rig.start()
        episodes = Episodes(rig)
        started = time.monotonic()
        end = started + minutes * 60.0
        rss_start: dict[str, float] = {}
        while time.monotonic() < end:
            time.sleep(min(episode_s, max(0.0, end - time.monotonic())))
            rig.procs.check()
            if not rss_start and time.monotonic() - started >= warmup_s:
                rss_start = sample_rss(rig)
            episodes.next()
        rss_end = sample_rss(rig)
        alive = rig.wait_relaying(10.0)
        node, watchdog = rig.diagnostics("gato_policy"), rig.diagnostics("policy_watchdog")
    finally:
        codes = rig.stop()
    return {
        "minutes": minutes, "model": model, "machine": machine(), "clock": "wall" if wall_clock else "sim",
        "rss_mb_start": rss_start, "rss_mb_end": rss_end,
        "node_ticks": int(node.get("ticks", 0) or 0), "node_deadline_misses": int(node.get("deadline_misses", 0) or 0),
        "node_safe_ticks": int(node.get("safe_ticks", 0) or 0),
        "watchdog_relayed": int(watchdog.get("relayed", 0) or 0),
        "watchdog_dropped_stale": int(watchdog.get("dropped_stale", 0) or 0),
        "watchdog_faults": int(watchdog.get("faults", 0) or 0),
        "bridge_steps": episodes.steps, "bridge_stale_steps": episodes.stale_steps,
        "episodes": episodes.count, "successes": episodes.successes, "relaying_at_the_end": alive,
        "exit_codes": codes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="ONNX policy (default: the shipped model)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--episode-s", type=float, default=12.0, help="seconds per episode (the bridge's 200 steps "
                        "take 10 s)")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="RSS at the start is sampled after this")
    parser.add_argument("--wall-clock", action="store_true", help="every node on the wall clock, the policy out of "
                        "step with the sim (default: node and watchdog on the bridge's /clock, in lockstep)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    log_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    result = soak(args.model or default_model_path(), args.minutes, args.episode_s,
                  min(args.warmup_s, args.minutes * 30.0), log_dir, args.wall_clock)
    print(json.dumps(result, indent=1))
    print(f"logs in {log_dir}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
