"""How a ROS entry point (node, watchdog, sim bridge, recorder) runs: signals that end it cleanly, and the
spin loop that lets them land. Each entry point keeps its own shutdown steps around it."""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt in the main thread (after rclpy.init with
    SignalHandlerOptions.NO): a process started from a background shell inherits SIGINT ignored, and ros2
    launch and supervisors stop their children with SIGINT or SIGTERM. Each entry point then ends the same
    clean way (the node with its safe action)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def spin_until_stopped(executor: Any, deadline: float = math.inf) -> None:
    """Spin until Ctrl-C, SIGTERM, rclpy shutdown, or `deadline` (time.monotonic). spin_once with a timeout,
    not spin(): the main thread returns to Python at least every 0.1 s, so a signal lands even while no
    callback is due (on sim time with the clock paused nothing else would wake the executor)."""
    try:
        while rclpy.ok() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
