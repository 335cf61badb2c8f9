"""Fault trials in the sim: each fault N times, the worst time to the safe action and what the arm did.

    .venv/bin/python scripts/fault_trials.py                        # the shipped model, 20 trials of each fault
    .venv/bin/python scripts/fault_trials.py --policy stand_in --faults sigkill sigstop blocked_tick

Runs sim/faults.py's trials on the closed loop (sim_bridge, policy_watchdog and the policy node as separate
processes; the node in this process for the faults injected inside it) on the wall clock at 20 Hz, and
prints one row per fault: trials, the worst time from the fault to the first safe action on the controller
topic, the worst time from the last fresh policy command to it (the watchdog's bound is 2 periods), who sent
it, how many trials recovered, and how far the hand moved from where it was when the fault began (worst,
median) over the watch. `--json` writes every trial.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gato_ros.node import default_model_path
from sim.faults import FAULTS, STAND_IN_FAULTS, FaultRig, TrialResult
from sim.rig import machine as rig_machine

FLAILING_M_S = 1.5  # the hand faster than this before the fault: the policy was flailing (it moves at < 1 m/s)


def summary_rows(results: list[TrialResult], period_s: float) -> list[dict]:
    rows = []
    for fault in dict.fromkeys(r.fault for r in results):
        trials = [r for r in results if r.fault == fault]
        to_safe = np.array([r.time_to_safe_s for r in trials])
        after = np.array([r.after_last_fresh_s for r in trials])
        drift = np.array([r.hand_drift_m for r in trials])
        # The policy out of control before the fault (the hand faster than FLAILING_M_S, or the shoulder commands at
        # their limit in half the ticks: an arm pinned at its joint limits): its drift is not the hold's.
        calm = np.array([not (r.hand_speed_before_m_s > FLAILING_M_S or r.saturated_before >= 0.5) for r in trials])
        calm_drift = drift[calm]
        rows.append({
            "fault": fault, "trials": len(trials), "safe_every_trial": bool(np.all(np.isfinite(to_safe))),
            "worst_time_to_safe_ms": float(np.nanmax(to_safe) * 1e3) if np.any(np.isfinite(to_safe)) else None,
            "worst_after_last_fresh_ms": float(np.nanmax(after) * 1e3) if np.any(np.isfinite(after)) else None,
            "within_2_periods": int(np.sum(after <= 2 * period_s)),
            "safe_by": sorted({r.safe_by for r in trials if r.safe_by}),
            "recovered": sum(r.recovered for r in trials),
            "hand_drift_mm_worst": float(np.nanmax(drift) * 1e3) if np.any(np.isfinite(drift)) else None,
            "hand_drift_mm_median": float(np.nanmedian(drift) * 1e3) if np.any(np.isfinite(drift)) else None,
            "flailing_before": int(np.sum(~calm)),
            "calm_hand_drift_mm_worst": float(np.nanmax(calm_drift) * 1e3) if np.any(np.isfinite(calm_drift)) else None,
            "calm_drift_under_3cm": int(np.sum(calm_drift < 0.03)),
        })
    return rows


def print_table(rows: list[dict]) -> None:
    print("| fault | trials | safe action every trial | worst time to safe action (from the fault) | "
          "worst after the last fresh command | sent by | recovered | hand drift worst / median | policy "
          "out of control before the fault | the other trials: drift worst, under 3 cm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def ms(v: float | None) -> str:
            return "—" if v is None else f"{v:.0f} ms"

        def mm(v: float | None) -> str:
            return "—" if v is None else f"{v:.1f}"

        print(f"| {r['fault']} | {r['trials']} | {'yes' if r['safe_every_trial'] else 'NO'} | "
              f"{ms(r['worst_time_to_safe_ms'])} | {ms(r['worst_after_last_fresh_ms'])} | {', '.join(r['safe_by'])} | "
              f"{r['recovered']}/{r['trials']} | {mm(r['hand_drift_mm_worst'])} / {mm(r['hand_drift_mm_median'])} mm | "
              f"{r['flailing_before']} | {mm(r['calm_hand_drift_mm_worst'])} mm, "
              f"{r['calm_drift_under_3cm']}/{r['trials'] - r['flailing_before']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", choices=["node", "stand_in"], default="node")
    parser.add_argument("--model", default="", help="ONNX policy (default: the shipped model)")
    parser.add_argument("--faults", nargs="+", default=None, help=f"default: all ({', '.join(FAULTS)})")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--watch", type=float, default=1.0, help="seconds each fault lasts")
    parser.add_argument("--watchdog-param", action="append", default=[], metavar="NAME:=VALUE",
                        help="a parameter of the watchdog (repeatable), e.g. hold_stiffness:=[...]")
    parser.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE",
                        help="a parameter of the policy node (repeatable)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    faults = args.faults or list(FAULTS if args.policy == "node" else STAND_IN_FAULTS)
    model = (args.model or default_model_path()) if args.policy == "node" else ""
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="fault-trials-"))
    extra = {"watchdog_args": args.watchdog_param} if args.watchdog_param else {}
    rig = FaultRig(log_dir, policy=args.policy, model_path=model, node_args=args.node_param, **extra)
    results: list[TrialResult] = []
    try:
        rig.start()
        for fault in faults:
            for i in range(args.trials):
                result = rig.trial(fault, watch_s=args.watch)
                results.append(result)
                print(f"{fault} {i + 1}/{args.trials}: safe after {result.time_to_safe_s * 1e3:.0f} ms "
                      f"({result.after_last_fresh_s * 1e3:.0f} ms after the last fresh command, by {result.safe_by}), "
                      f"hand drift {result.hand_drift_m * 1e3:.1f} mm (hand at up to "
                      f"{result.hand_speed_before_m_s:.2f} m/s and {result.saturated_before:.0%} of the commands at a "
                      f"shoulder limit before), recovered {result.recovered}", flush=True)
    finally:
        codes = rig.stop()
    rows = summary_rows(results, rig.period_s)
    machine = rig_machine()
    print(f"\n{args.policy} ({Path(model).name if model else 'stand-in'}), {rig.rate_hz:g} Hz, {args.watch:g} s "
          f"per fault; {machine}; logs in {log_dir}; exit codes {codes}\n")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "trials": [asdict(r) for r in results],
                                         "policy": args.policy, "model": model, "rate_hz": rig.rate_hz}, indent=1))
    return 0 if all(r["safe_every_trial"] and r["recovered"] == r["trials"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
