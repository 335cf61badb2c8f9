"""Loop quality from outside the node: tick-interval jitter at 20 and 100 Hz, and what the watchdog's relay costs.

    .venv/bin/python scripts/jitter.py                     # the shipped model, 30 s at 20 Hz and at 100 Hz
    .venv/bin/python scripts/jitter.py --rates 20 --seconds 60

For each rate it runs the closed loop (sim_bridge at real time, the policy node on the wall clock, each a
process) twice: through `policy_watchdog` (the default wiring), and with `direct_output:=true` and no
watchdog. An observer in this process (a third process to both) records every stamped command and every
message on the arm controller topic with its receive time, and reports:

    tick interval      intervals between the node's stamped commands as received here: p50, p99, max, and
                       jitter |interval - period| p50 / p99
    stamp → controller from the tick's start (the command's stamp) to the command's arrival on the
                       controller topic here, p50 / p99: through the watchdog, and direct
    relay              receive → publish inside the watchdog (its diagnostics), p50 / p99
    deadline misses    the node's own count (its diagnostics)

Wall-clock figures on a shared machine: the printed line names the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gato_ros.node import default_model_path
from sim.rig import LoopRig, machine


def percentiles(values: np.ndarray, scale: float = 1e3) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {"p50": float(np.percentile(values, 50) * scale), "p99": float(np.percentile(values, 99) * scale),
            "max": float(values.max() * scale)}


def measure(rig: LoopRig, seconds: float) -> dict:
    """Record `seconds` of the running loop and reduce it."""
    rig.seen.clear()
    time.sleep(seconds)
    seen = rig.seen
    with seen.lock:
        commands = list(seen.commands)
        controller = list(seen.controller)
    receive = np.array([t for t, *_ in commands])
    intervals = np.diff(receive)
    stamp_of = {values: stamp for _, _, stamp, values in commands}
    to_controller = np.array([wall - stamp_of[values] for _, wall, values in controller if values in stamp_of])
    node = rig.diagnostics("gato_policy")
    watchdog = rig.diagnostics("policy_watchdog")
    return {
        "commands": len(commands), "controller_messages": len(controller),
        "tick_interval_ms": percentiles(intervals),
        "jitter_ms": percentiles(np.abs(intervals - rig.period_s)),
        "stamp_to_controller_ms": percentiles(to_controller),
        "relay_us": {"p50": watchdog.get("relay_latency_p50_us", ""), "p99": watchdog.get("relay_latency_p99_us", "")},
        "watchdog_faults": watchdog.get("faults", ""), "watchdog_dropped_stale": watchdog.get("dropped_stale", ""),
        "node_deadline_misses": node.get("deadline_misses", ""), "node_ticks": node.get("ticks", ""),
        "node_step_p50_ms": node.get("step_latency_p50_ms", ""),
        "node_step_p99_ms": node.get("step_latency_p99_ms", ""),
    }


def run(model: str, rate: float, seconds: float, watchdog: bool, log_dir: Path) -> dict:
    rig = LoopRig(log_dir / f"{rate:g}hz-{'watchdog' if watchdog else 'direct'}", policy="node", model_path=model,
                  rate_hz=rate, watchdog=watchdog, direct_output=not watchdog)
    try:
        rig.start()
        time.sleep(1.0)  # the diagnostics of the warm-up second are not the loop's
        result = measure(rig, seconds)
    finally:
        result_codes = rig.stop()
    return {"rate_hz": rate, "wiring": "watchdog" if watchdog else "direct", "seconds": seconds, **result,
            "exit_codes": result_codes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="ONNX policy (default: the shipped model)")
    parser.add_argument("--rates", type=float, nargs="+", default=[20.0, 100.0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    model = args.model or default_model_path()
    log_dir = Path(tempfile.mkdtemp(prefix="jitter-"))
    runs = [run(model, rate, args.seconds, watchdog, log_dir) for rate in args.rates for watchdog in (True, False)]
    print(f"\n{Path(model).name}, {args.seconds:g} s per run; {machine()}; logs in {log_dir}\n")
    print("| rate | wiring | commands | tick interval p50 / p99 / max | jitter p50 / p99 | stamp → controller "
          "p50 / p99 | relay (in the watchdog) p50 / p99 | node deadline misses |")
    print("|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in runs:
        ti, jit, e2e = r["tick_interval_ms"], r["jitter_ms"], r["stamp_to_controller_ms"]
        relay = f"{r['relay_us']['p50']} / {r['relay_us']['p99']} µs" if r["wiring"] == "watchdog" else "—"
        print(f"| {r['rate_hz']:g} Hz | {r['wiring']} | {r['commands']} | "
              f"{ti.get('p50', nan):.1f} / {ti.get('p99', nan):.1f} / {ti.get('max', nan):.1f} ms | "
              f"{jit.get('p50', nan):.2f} / {jit.get('p99', nan):.2f} ms | "
              f"{e2e.get('p50', nan):.2f} / {e2e.get('p99', nan):.2f} ms | {relay} | "
              f"{r['node_deadline_misses']} of {r['node_ticks']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": model, "machine": machine(), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
