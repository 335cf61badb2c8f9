"""The recording figures the README quotes: bag size per minute, the recorder's CPU, publish → receive
latency at the recorder, and the bag → dataset conversion time.

    python scripts/record_numbers.py --episodes 5 --out runs/record-numbers [--image-size 64]

Runs the shipped policy over ROS (sim_bridge + policy_node, as `gato-ros demo`) with `gato-ros record`
started beside it as a process of its own (so its CPU time is its own), then converts the bag.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=Path("runs/record-numbers"))
    parser.add_argument("--model", default=str(ROOT / "models" / "stack_int8.onnx"))
    args = parser.parse_args()

    from gato_ros.bags import bags_to_dataset, load_spec
    from gato_ros.rosbag import open_bag
    from sim.ros_eval import evaluate_over_ros, ros_environment

    ros_environment()
    args.out.mkdir(parents=True, exist_ok=True)
    bag = args.out / "bag"
    recorder = subprocess.Popen([str(Path(sys.executable).parent / "gato-ros"), "record", "--out", str(bag)],
                                stdout=open(args.out / "recorder.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    time.sleep(3.0)  # the recorder is up; it subscribes each topic as its publisher appears
    start = time.monotonic()
    results = evaluate_over_ros(args.model, [args.seed + i for i in range(args.episodes)], provider="cpu",
                                log_dir=args.out / "logs", progress=False).results
    wall = time.monotonic() - start
    recorder.send_signal(signal.SIGINT)
    _, status, usage = os.wait4(recorder.pid, 0)
    cpu_s = usage.ru_utime + usage.ru_stime

    opened = open_bag(bag)
    messages = list(opened.messages())
    info = opened.metadata["rosbag2_bagfile_information"]
    span_s = info["duration"]["nanoseconds"] / 1e9
    size = sum(f.stat().st_size for f in bag.glob("*.mcap"))
    delay_ms = np.array([(m.log_time_ns - m.publish_time_ns) / 1e6 for m in messages])
    t0 = time.perf_counter()
    summary = bags_to_dataset([bag], args.out / "dataset", load_spec(args.model, None))
    convert_s = time.perf_counter() - t0
    numbers = {
        "episodes": len(results), "steps": sum(r.steps for r in results), "messages": len(messages),
        "bag_span_s": round(span_s, 1), "mcap_bytes": size, "mb_per_minute": round(size / 1e6 / span_s * 60, 3),
        "recorder_cpu_s": round(cpu_s, 2), "recorder_cpu_share": round(cpu_s / (wall + 3.0), 4),
        "recorder_exit": os.waitstatus_to_exitcode(status), "recorder_max_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "publish_to_recorder_ms": {"p50": round(float(np.percentile(delay_ms, 50)), 3),
                                   "p99": round(float(np.percentile(delay_ms, 99)), 3)},
        "dataset_steps": summary["steps"], "convert_s": round(convert_s, 3),
        "per_topic": {t["topic_metadata"]["name"]: t["message_count"] for t in info["topics_with_message_count"]},
        "load_average_at_end": os.getloadavg(), "self_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    (args.out / "numbers.json").write_text(json.dumps(numbers, indent=2))
    print(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
