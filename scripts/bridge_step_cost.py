"""The sim bridge's cost per control step, per arm: physics (the env's step, 50 sub-steps at 1 kHz for one 20 Hz
period) and the rest of the step (publishing joint_states, the observation vectors and /clock, recording), as
`sim_bridge` runs them.

    python scripts/bridge_step_cost.py --arm panda xarm6 --steps 400

The bridge node runs in this process and steps from this thread as fast as it can (the step thread is not
started); a subscriber process on loopback DDS is matched to its topics, so publishing costs what it costs with
a policy listening. The arm holds its home pose (no command: zeros for the Panda's torques over gravity
compensation, zero velocity for the xArm6). No camera unless `--image-size`, or `--model` (the bridge renders that
model's cameras, measured with every camera in the bridge's process and again with `parallel_cameras`: each camera
after the first in a process of its own). "physics" includes rendering. Prints p50/p99 per part, ms, and the share of
the 50 ms period, with the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np

TOPICS = ("joint_states", "gato/observations/task_state")


def _subscriber(domain: str, stop: mp.Event) -> None:
    """Another process listening on the bridge's topics, as a policy node does."""
    os.environ["ROS_DOMAIN_ID"] = domain
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    rclpy.init()
    node = rclpy.create_node("bridge_cost_listener")
    node.create_subscription(JointState, TOPICS[0], lambda _: None, qos_profile_sensor_data)
    node.create_subscription(Float64MultiArray, TOPICS[1], lambda _: None, qos_profile_sensor_data)
    node.create_subscription(Clock, "/clock", lambda _: None, 10)
    while not stop.is_set():
        rclpy.spin_once(node, timeout_sec=0.05)
    node.destroy_node()
    rclpy.shutdown()


def measure(arm: str, steps: int, image_size: int, model: str = "", parallel_cameras: bool = False) -> dict:
    import rclpy
    from rclpy.parameter import Parameter

    from sim.bridge import SimBridge

    context = rclpy.Context()
    rclpy.init(context=context)
    params = {"arm": arm, "image_size": image_size, "real_time_factor": 0.0, "max_steps": steps + 10,
              "model_path": model, "parallel_cameras": parallel_cameras}
    bridge = SimBridge(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    physics: list[float] = []
    env_step = bridge.env.step

    def timed_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the env's own signature
        t0 = time.perf_counter()
        out = env_step(*args, **kwargs)
        physics.append(time.perf_counter() - t0)
        return out

    bridge.env.step = timed_step
    try:
        end = time.monotonic() + 30.0
        while bridge.joint_pub.get_subscription_count() < 1 and time.monotonic() < end:
            time.sleep(0.05)
        if bridge.joint_pub.get_subscription_count() < 1:
            raise RuntimeError("the listener process never matched the bridge's joint_states")
        totals = []
        for _ in range(steps + 20):
            t0 = time.perf_counter()
            bridge._step_once()
            totals.append(time.perf_counter() - t0)
        total, phys = np.array(totals[20:]) * 1e3, np.array(physics[20:]) * 1e3  # the first 20: warm-up
    finally:
        bridge.stop()
        bridge.destroy_node()
        rclpy.shutdown(context=context)
    rest = total - phys
    period_ms = 1e3 / bridge.env.config.control_hz

    def stats(x: np.ndarray) -> dict:
        return {"p50": round(float(np.percentile(x, 50)), 3), "p99": round(float(np.percentile(x, 99)), 3)}

    return {"arm": arm, "steps": steps, "image_size": image_size, "model": model,
            "parallel_cameras": parallel_cameras, "physics_ms": stats(phys),
            "publish_and_record_ms": stats(rest), "step_ms": stats(total),
            "share_of_period_p50": round(float(np.percentile(total, 50)) / period_ms, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", nargs="+", default=["panda", "xarm6"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=0)
    parser.add_argument("--model", default="", help="an ONNX policy: the bridge renders its cameras at its size")
    args = parser.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", "0")
    from sim.rig import machine

    stop = mp.get_context("spawn").Event()
    listener = mp.get_context("spawn").Process(target=_subscriber, args=(os.environ["ROS_DOMAIN_ID"], stop))
    listener.start()
    try:
        results = [measure(arm, args.steps, args.image_size, args.model, parallel)
                   for arm in args.arm for parallel in ((False, True) if args.model else (False,))]
    finally:
        stop.set()
        listener.join(timeout=10)
    for r in results:
        print(json.dumps(r))
    print(f"machine: {machine()}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
