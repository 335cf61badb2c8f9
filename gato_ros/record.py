"""`gato-ros record`: record what the arm saw and did as a rosbag2 bag (MCAP storage), over rclpy.

By default it records the policy's inputs (/joint_states, every camera's image and camera_info: any
topic ending in /image_raw or /camera_info, every /gato/observations/<key>), its commands
(/effort_controller/commands), the node's per-tick record (/gato_policy/tick, see `gato_ros.ticks`),
the sim bridge's episode events (/sim_bridge/episode) and /diagnostics. A topic is subscribed once a
publisher of it is seen (its type and QoS come from the graph; reliable only when every publisher is,
like `ros2 bag record`), with raw=True: the CDR bytes are written as they arrive, never re-serialized;
log time is the receive time, publish time the publisher's source time, header stamps untouched.

The writer (`gato_ros.rosbag.BagWriter`) holds one open chunk (at most `--chunk-size` bytes or
`--flush-interval` seconds of messages), so memory is flat however long the recording. Ctrl-C or
SIGTERM finishes the file and writes metadata.yaml last; a recording killed harder keeps every
chunk already written, and lacks metadata.yaml, so it never looks finished.
"""

from __future__ import annotations

import argparse
import importlib
import threading
import time
from pathlib import Path
from typing import Any

from gato_ros.rosbag import BagWriter, qos_yaml

COMMAND_TOPIC = "/effort_controller/commands"
TICK_TOPIC = "/gato_policy/tick"  # the policy node's ~/tick (gato_ros.ticks.TICK_TOPIC)
EPISODE_TOPIC = "/sim_bridge/episode"  # the sim bridge's ~/episode events
DEFAULT_TOPICS = ("/joint_states", "/camera/image_raw", "/camera/camera_info", COMMAND_TOPIC, TICK_TOPIC,
                  EPISODE_TOPIC, "/diagnostics")
DEFAULT_PREFIXES = ("/gato/observations/",)
DEFAULT_SUFFIXES = ("/image_raw", "/camera_info")  # one camera per image key: <camera>/image_raw (sim bridge, drivers)
SUBSCRIPTION_DEPTH = 1000  # a busy recorder thread queues messages instead of losing them
DISCOVERY_PERIOD_S = 0.2


def message_class(type_name: str) -> Any:
    """'sensor_msgs/msg/JointState' -> the generated Python class."""
    package, _, name = type_name.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def _policy_value(policy: Any) -> int:
    return int(getattr(policy, "value", policy))


class Recorder:
    """An rclpy node that subscribes the wanted topics as they appear and writes them to a BagWriter."""

    def __init__(self, out: Path, topics: list[str] | None, prefixes: tuple[str, ...], chunk_size: int,
                 flush_interval_s: float, context: Any = None) -> None:
        from rclpy.node import Node

        self.writer = BagWriter(out, chunk_size=chunk_size, flush_interval_s=flush_interval_s)
        self.topics = set(topics) if topics else set(DEFAULT_TOPICS)
        self.prefixes = () if topics else prefixes
        self.suffixes = () if topics else DEFAULT_SUFFIXES
        self.node = Node("gato_recorder", context=context, start_parameter_services=False)
        self.subscriptions: dict[str, Any] = {}
        self.lock = threading.Lock()  # the writer: callbacks vs close()
        self.node.create_timer(DISCOVERY_PERIOD_S, self.discover)
        self.node.create_timer(max(flush_interval_s / 2, 0.01), self._flush_if_due)
        self.discover()

    def wanted(self, name: str) -> bool:
        return name in self.topics or name.startswith(self.prefixes) or name.endswith(self.suffixes)

    def discover(self) -> None:
        for name, types in self.node.get_topic_names_and_types():
            if name in self.subscriptions or not self.wanted(name) or not types:
                continue
            publishers = self.node.get_publishers_info_by_topic(name)
            if not publishers:
                continue  # only subscribers so far: the type and QoS to match come with a publisher
            self.subscribe(name, types[0], publishers)

    def subscribe(self, name: str, type_name: str, publishers: list[Any]) -> None:
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        profiles = [p.qos_profile for p in publishers]
        reliable = all(p.reliability == ReliabilityPolicy.RELIABLE for p in profiles)
        transient = all(p.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in profiles)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=SUBSCRIPTION_DEPTH,
                         reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL if transient else DurabilityPolicy.VOLATILE)
        offered = qos_yaml([{"history": _policy_value(p.history), "depth": p.depth,
                             "reliability": _policy_value(p.reliability), "durability": _policy_value(p.durability),
                             "liveliness": _policy_value(p.liveliness)} for p in profiles])
        try:
            cls = message_class(type_name)
            with self.lock:
                self.writer.add_topic(name, type_name, offered)
        except Exception as err:  # an unknown type must not stop the other topics
            self.node.get_logger().error(f"cannot record {name} ({type_name}): {err}")
            self.subscriptions[name] = None
            return

        self.subscriptions[name] = self.node.create_subscription(cls, name, self._callback(name), qos, raw=True)
        print(f"gato-ros record: recording {name} ({type_name}, {'reliable' if reliable else 'best effort'})",
              flush=True)

    def _callback(self, topic: str) -> Any:
        """rclpy passes (message, message info) to a two-argument callback: the info holds the times."""

        def on_message(data: bytes, info: dict[str, int]) -> None:
            received = info.get("received_timestamp") or time.time_ns()
            with self.lock:
                if not self.writer.closed:
                    self.writer.write(topic, data, received, info.get("source_timestamp") or received)

        return on_message

    def _flush_if_due(self) -> None:
        with self.lock:
            if not self.writer.closed:
                self.writer.flush_if_due()

    def close(self) -> Path:
        with self.lock:
            return self.writer.close()


def record(out: Path, topics: list[str] | None = None, duration_s: float | None = None,
           chunk_size: int = 1024 * 1024, flush_interval_s: float = 1.0) -> Recorder:
    """Record until Ctrl-C / SIGTERM (or `duration_s`), then finish the bag. Returns the recorder."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from gato_ros import ros_process

    rclpy.init(args=["gato-ros-record"], signal_handler_options=SignalHandlerOptions.NO)
    ros_process.stop_on_signals()
    recorder = Recorder(out, topics, DEFAULT_PREFIXES, chunk_size, flush_interval_s)
    executor = SingleThreadedExecutor()
    executor.add_node(recorder.node)
    try:
        ros_process.spin_until_stopped(executor, time.monotonic() + duration_s if duration_s else float("inf"))
    finally:
        recorder.close()
        executor.shutdown()
        recorder.node.destroy_node()
        rclpy.try_shutdown()
    return recorder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="bag directory to create (must be new or empty)")
    parser.add_argument("--topics", nargs="+", default=None,
                        help=f"record exactly these topics (default: {' '.join(DEFAULT_TOPICS)} and "
                             f"{' '.join(p + '*' for p in DEFAULT_PREFIXES)})")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    parser.add_argument("--chunk-size", type=int, default=1024 * 1024, help="MCAP chunk size in bytes")
    parser.add_argument("--flush-interval", type=float, default=1.0,
                        help="close a chunk after this many seconds even if it is not full (what a crash can lose)")


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    recorder = record(args.out, args.topics, args.duration, args.chunk_size, args.flush_interval)
    writer = recorder.writer
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    counts = ", ".join(f"{name} {t.count}" for name, t in writer.topics.items()) or "none"
    print(f"gato-ros record: {writer.message_count()} messages in {time.monotonic() - start:.1f} s, "
          f"{size / 1e6:.2f} MB in {args.out} (metadata.yaml written); per topic: {counts}", flush=True)
    return 0

