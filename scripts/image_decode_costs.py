"""The policy node's image decode + resize per frame: `gato_ros.control.image_observation`, the code its image
callback runs (decode the sensor_msgs/Image, check the aspect ratio, resize to the model's input).

Frames are the sim's scene camera (rendered once, then resized to each camera size with OpenCV, so the
content is a real scene); each case is timed over `--repeats` calls in one process, one thread. The node
reports the same quantity live, per tick, in its diagnostics (image_decode_p50_ms / _p99_ms).

    .venv/bin/python scripts/image_decode_costs.py [--repeats 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import cv2
import numpy as np
from sensor_msgs.msg import Image

from gato_ros.control import image_observation
from sim.env import StackingEnv

CASES = [(64, "rgb8"), (128, "rgb8"), (256, "bgr8"), (480, "rgba8"), (720, "rgb8")]  # square: the model's aspect
CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4}
CONVERT = {"rgb8": None, "bgr8": cv2.COLOR_RGB2BGR, "rgba8": cv2.COLOR_RGB2RGBA}


def message(frame: np.ndarray, size: int, encoding: str) -> Image:
    pixels = cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR)
    if CONVERT[encoding] is not None:
        pixels = cv2.cvtColor(pixels, CONVERT[encoding])
    return Image(height=size, width=size, encoding=encoding, step=size * CHANNELS[encoding], data=pixels.tobytes())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--model-size", type=int, default=64, help="the model's input (square)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    env = StackingEnv(image_size=256, cameras=("scene",))
    frame = env.reset(seed=0)[0]["camera_scene"]
    env.close()
    print(f"{cpu_name()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; model input {args.model_size} px; {args.repeats} calls per row")
    print("| camera frame | encoding | ms p50 | ms p99 |\n|---|---|---|---|")
    for size, encoding in CASES:
        msg = message(frame, size, encoding)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            image_observation(msg, (args.model_size, args.model_size, 3))
            times.append((time.perf_counter() - t0) * 1e3)
        p50, p99 = np.percentile(times, [50, 99])
        print(f"| {size}×{size} | {encoding} | {p50:.3f} | {p99:.3f} |")


if __name__ == "__main__":
    main()
