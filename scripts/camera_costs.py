"""What each camera costs and shows: ms per frame (TinyRenderer) and the pixels a cube covers.

Replays scripted-expert episodes (no camera while acting) and, at every control step, renders each
camera at each size exactly as `StackingEnv` does, timing the render alone: wall clock, and this
process's CPU time, which other jobs on a busy machine inflate much less. The cube counts come from
the renderer's segmentation mask in a second, untimed call. One process, one thread: run it under
`nice` and say what else loaded the machine (the load average is printed).

    .venv/bin/python scripts/camera_costs.py [--seeds 0 1 2] [--sizes 64 96 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from sim.cameras import CAMERAS, body_pixels, render_camera
from sim.env import StackingEnv
from sim.expert import ScriptedExpert


def measure(seeds: list[int], sizes: list[int]) -> dict[tuple[str, int], dict[str, list[float]]]:
    env, expert = StackingEnv(), ScriptedExpert()
    results: dict[tuple[str, int], dict[str, list[float]]] = {
        (name, size): {"ms": [], "cpu_ms": [], "red": [], "blue": []} for name in CAMERAS for size in sizes
    }
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            for (name, size), r in results.items():
                camera = env.camera(name)
                t0, cpu0 = time.perf_counter(), time.process_time()
                render_camera(camera, size, env.robot, env.client)
                r["ms"].append((time.perf_counter() - t0) * 1e3)
                r["cpu_ms"].append((time.process_time() - cpu0) * 1e3)
                red, blue = body_pixels(camera, size, env.robot, env.client, env.cubes[:2])
                r["red"].append(red)
                r["blue"].append(blue)
            obs, _, terminated, truncated, _ = env.step(expert.act(obs))
            done = terminated or truncated
    env.close()
    return results


def table(results: dict[tuple[str, int], dict[str, list[float]]]) -> str:
    lines = [
        "| camera | size | frames | wall ms/frame p50 | p90 | CPU ms/frame p50 "
        "| red cube px, median (visible in % of frames) | blue cube px |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, size), r in results.items():
        ms, red, blue = np.asarray(r["ms"]), np.asarray(r["red"]), np.asarray(r["blue"])
        lines.append(
            f"| {name} | {size} | {len(ms)} | {np.median(ms):.1f} | {np.percentile(ms, 90):.1f} "
            f"| {np.median(r['cpu_ms']):.1f} "
            f"| {np.median(red):.0f} ({100 * np.mean(red > 0):.0f} %) "
            f"| {np.median(blue):.0f} ({100 * np.mean(blue > 0):.0f} %) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="expert episodes to replay")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128], help="image sizes (px)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = measure(args.seeds, args.sizes)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}; niceness {os.nice(0)}")
    print(table(results))


if __name__ == "__main__":
    main()
