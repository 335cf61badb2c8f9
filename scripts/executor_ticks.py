"""Why the policy node spins a SingleThreadedExecutor: its 20 Hz loop under each rclpy executor.

    python scripts/executor_ticks.py [--seconds 8]

Runs `PolicyNode` (a micro exported model, ~3 ms per step) in this process with a peer node that
streams joint states and the task state at 20 Hz, once under a SingleThreadedExecutor and
once under a 4-thread MultiThreadedExecutor, and prints commands received, late periods (a gap over
1.5 periods), the runtime's step time and the CPU the process used. DDS stays on loopback.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 1))

import rclpy  # noqa: E402
import torch  # noqa: E402
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402

from gato_ros.export import export  # noqa: E402
from gato_ros.model import GatoConfig, GatoModel  # noqa: E402
from gato_ros.node import PolicyNode, autostart  # noqa: E402
from sim.spec import stacking_spec  # noqa: E402

PERIOD = 0.05


def micro_model(out: Path) -> str:
    torch.manual_seed(0)
    config = GatoConfig.from_preset("tiny", n_layer=1, n_embd=32, n_head=2, n_ff=64, patch_channels=8,
                                    context_window=128)
    return str(export(GatoModel(config).eval(), stacking_spec(), out, check=False)["fp32"])


def run(model: str, executor_kind: str, seconds: float) -> dict[str, float]:
    context = rclpy.Context()
    rclpy.init(context=context)
    ns = f"/ticks_{executor_kind}"
    node = PolicyNode(context=context, namespace=ns, parameter_overrides=[
        Parameter("model_path", value=model), Parameter("threads", value=1)])
    peer = rclpy.create_node("robot", context=context, namespace=ns)
    joints = peer.create_publisher(JointState, "joint_states", qos_profile_sensor_data)  # the node's relative names
    task = peer.create_publisher(Float64MultiArray, "gato/observations/task_state", qos_profile_sensor_data)
    received: list[float] = []  # the stamped command the node publishes every tick
    peer.create_subscription(JointState, "gato_policy/joint_command", lambda _: received.append(time.monotonic()), 100)
    executor = (SingleThreadedExecutor(context=context) if executor_kind == "single"
                else MultiThreadedExecutor(num_threads=4, context=context))
    executor.add_node(node)
    executor.add_node(peer)
    threading.Thread(target=executor.spin, daemon=True).start()
    autostart(node)
    names = list(stacking_spec().joint_names)
    js = JointState(name=names, position=[0.0] * len(names), velocity=[0.0] * len(names))
    cpu0, start = os.times(), time.monotonic()
    while time.monotonic() - start < seconds:
        joints.publish(js)
        task.publish(Float64MultiArray(data=[0.0] * 17))
        time.sleep(PERIOD)
    cpu1 = os.times()
    latency = np.median(list(node._latencies)) * 1e3 if node._latencies else float("nan")
    executor.shutdown()
    node.destroy_node()
    peer.destroy_node()
    rclpy.shutdown(context=context)
    gaps = np.diff(received) if len(received) > 1 else np.zeros(0)
    return {"commands": len(received), "late_periods": int((gaps > 1.5 * PERIOD).sum()),
            "max_gap_ms": float(gaps.max() * 1e3) if gaps.size else float("nan"), "step_p50_ms": float(latency),
            "cpu_s": cpu1.user - cpu0.user + cpu1.system - cpu0.system}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = micro_model(Path(tmp) / "micro.onnx")
        for kind in ("single", "multi"):
            r = run(model, kind, args.seconds)
            print(f"{kind:>6}-threaded executor, {args.seconds:g} s at 20 Hz: {r['commands']} commands, "
                  f"{r['late_periods']} late periods (max gap {r['max_gap_ms']:.0f} ms), runtime step p50 "
                  f"{r['step_p50_ms']:.1f} ms, process CPU {r['cpu_s']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
