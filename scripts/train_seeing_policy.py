"""The seeing policy's recipe: expert demos -> behaviour cloning -> DAgger rounds -> int8 export, on a
clock. Cameras at 64 px (`--cameras`: the scene camera by default, `scene wrist` for both) + joint positions
and velocities; no `task_state` (the expert still acts on it and labels every state; the demos keep it beside
the frames as a training target of an auxiliary head, never an input). Every step is a `gato-ros` subcommand;
the driver only sequences them, times them, and stops starting rounds when the budget runs short, so one
command fits a fixed lease of a machine (it was sized for 16 cores + one GPU: `--workers 15 --budget-minutes 9`).

Rerunning with the same `--work` resumes: a stage whose output is complete is skipped.

    python scripts/train_seeing_policy.py --work runs/see --workers 2 --budget-minutes 600

`--seed-data` starts from datasets collected elsewhere (a slow box can collect for an hour, a leased
GPU machine then only trains and runs DAgger); `--prime-policy` drives more episodes while behaviour
cloning trains, so the simulator workers are not idle then (a privileged-state policy may drive: the
stored observations stay camera + joints, the expert labels every state).
`--sim-python` runs the simulator stages (collect, eval) with another interpreter: PyBullet wheels
exist for fewer Python versions than torch's CUDA builds, so a GPU box may need two.
Outputs: WORK/see.onnx (fp32), WORK/see.int8.onnx, WORK/latest.int8.onnx (the newest int8 file, also when the
run is cut short), WORK/ablation-w1.int8.onnx and WORK/bc.int8.onnx (the
window ablation: behaviour cloning with a 1-timestep and the 4-timestep window, side by side on the same
data with the same steps and seed), WORK/summary.json.
DAgger rounds are pipelined: while one round's policy drives, the trainer fine-tunes on the data so far.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

WINDOW_STEPS = 4
EVAL_SEED = 100_000  # held out: collection seeds derive from --seed below 100 000's streams


def tokens_per_step(cameras: list[str]) -> int:
    """16 patches per 64 px camera + 8 joint positions + 8 velocities + separator + 8 actions."""
    return 16 * len(cameras) + 25


def check_cameras(datasets: list[Path], cameras: list[str]) -> None:
    """Seed data (or a checkpoint) recorded with other cameras would train a second spec beside the first."""
    from gato_ros.spec import EmbodimentSpec

    expected = {f"camera_{c}" for c in cameras}
    for d in datasets:
        spec = EmbodimentSpec.from_json((d / "spec.json").read_text())
        found = {o.name for o in spec.observations if o.kind == "image"}
        if found != expected:
            raise SystemExit(f"{d}: cameras {sorted(found)}, the recipe's are {sorted(expected)} (--cameras)")


def last_log_record(checkpoint: Path) -> dict | None:
    """The final line of a training stage's log.jsonl (step, wall time since its first step, losses)."""
    path = checkpoint / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else None


class Recipe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.deadline = time.time() + 60 * args.budget_minutes
        self.log = (self.work / "recipe.jsonl").open("a")
        self.summary: dict = {"stages": []}
        self.startup_seconds = 0.0  # the longest a training stage took beyond its clock (data loading), measured
        self.tokens_per_step = tokens_per_step(args.cameras)

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, python: str, argv: list[str], done: Path | None = None, check: bool = True) -> float:
        """One gato-ros subcommand; skipped when `done` exists (a resumed recipe)."""
        if done is not None and done.exists():
            print(f"[recipe] {name}: done before, skipped", flush=True)
            return 0.0
        print(f"[recipe] {name}: {' '.join(argv)} ({self.left():.0f} s left)", flush=True)
        t0 = time.time()
        returncode = subprocess.run([python, "-m", "gato_ros.cli", *argv], check=check).returncode
        seconds = time.time() - t0
        record = {"stage": name, "seconds": round(seconds, 1), "left_s": round(self.left(), 1), "rc": returncode}
        self.summary["stages"].append(record)
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        return seconds

    def collect(self, name: str, episodes: int, seed: int, policy: Path | None = None, beta: float = 0.0,
                workers: int | None = None, background: bool = False) -> tuple[Path, subprocess.Popen | None]:
        """Episodes into WORK/name; in the background, the caller waits on the returned process."""
        out = self.work / name
        argv = ["collect", "--episodes", str(episodes), "--workers", str(workers or self.args.workers),
                "--seed", str(seed), "--image-size", "64", "--cameras", *self.args.cameras, "--no-task-state",
                "--aux-keys", "task_state", "--out", str(out)]
        if policy is not None:
            argv += ["--policy", str(policy), "--beta", str(beta)]
        shift_cm, tilt_deg, light = self.args.randomize
        argv += ["--camera-shift-cm", str(shift_cm), "--camera-tilt-deg", str(tilt_deg), "--light", str(light)]
        if background and not (out / "dataset.json").exists():
            print(f"[recipe] {name} (background): {' '.join(argv)}", flush=True)
            return out, subprocess.Popen([self.args.sim_python, "-m", "gato_ros.cli", *argv])
        self.run(name, self.args.sim_python, argv, done=out / "dataset.json")
        return out, None

    def train(self, name: str, data: list[Path], steps: int, minutes: float, init: Path | None = None,
              window_steps: int = WINDOW_STEPS, lr: float = 1e-3, seed: int = 0, background: bool = False):
        out = self.work / name
        step = self.tokens_per_step
        argv = ["train", "--data", *map(str, data), "--out", str(out), "--preset", "tiny",
                "--context-window", str(step * window_steps), "--seq-len", str(step * 8),
                "--stride-steps", "2", "--steps", str(steps), "--batch-size", str(self.args.batch_size),
                "--lr", str(lr), "--warmup", str(max(20, steps // 20)), "--eval-every", str(max(100, steps // 4)),
                "--max-minutes", f"{minutes:.2f}", "--workers", str(self.args.loader_workers), "--seed", str(seed),
                "--no-progress"]
        if self.args.aux_weight > 0:  # task_state as a target only: the policy's inputs stay camera + joints
            argv += ["--aux-key", "task_state", "--aux-weight", str(self.args.aux_weight)]
        if self.args.discrete_weight is not None:
            argv += ["--discrete-weight", str(self.args.discrete_weight)]
        if self.args.threads:
            argv += ["--threads", str(self.args.threads)]
        if init is not None:
            argv += ["--init", str(init)]
        if background:
            print(f"[recipe] {name} (background): {' '.join(argv)}", flush=True)
            return subprocess.Popen([self.args.train_python, "-m", "gato_ros.cli", *argv])
        seconds = self.run(name, self.args.train_python, argv, done=out / "model.safetensors")
        last = last_log_record(out)
        if seconds and last:  # loading the data (decompressing every frame) before the first step, and saving
            self.startup_seconds = max(self.startup_seconds, seconds - last["time"])
        return out

    def measured_steps_per_minute(self, checkpoint: Path, fallback: float) -> float:
        """The rate the last training stage reached (its log's final line), so later stages end their
        cosine schedule inside their time."""
        last = last_log_record(checkpoint)
        if not last:
            return fallback
        return 60 * last["step"] / max(last["time"], 1.0) if last["step"] > 50 else fallback

    def export(self, checkpoint: Path, out: Path, variants: str) -> Path:
        self.run(f"export {out.name}", self.args.train_python,
                 ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--variants", variants],
                 done=out.with_suffix(".int8.onnx") if "int8" in variants else out)
        if "int8" in variants and out.with_suffix(".int8.onnx").exists():  # a run cut short still leaves its newest
            shutil.copyfile(out.with_suffix(".int8.onnx"), self.work / "latest.int8.onnx")
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/see")
    parser.add_argument("--workers", type=int, default=2, help="simulator processes")
    parser.add_argument("--budget-minutes", type=float, default=9.0)
    parser.add_argument("--sim-python", default=sys.executable)
    parser.add_argument("--train-python", default=sys.executable)
    parser.add_argument("--cameras", nargs="+", choices=("scene", "wrist"), default=["scene"],
                        help="cameras at 64 px (the wrist view brought the arm twice as close in a CPU comparison)")
    parser.add_argument("--seed-data", nargs="*", default=[], help="datasets collected before (same cameras)")
    parser.add_argument("--init", default=None, help="continue from this checkpoint (a run cut short, or a file "
                        "recovered with scripts/recover_checkpoint.py): no behaviour cloning, DAgger rounds from it")
    parser.add_argument("--expert-episodes", type=int, default=600, help="expert demos collected first (0: none)")
    parser.add_argument("--prime-policy", default=None, help="a policy that drives episodes (expert-labelled) "
                        "while behaviour cloning trains")
    parser.add_argument("--prime-episodes", type=int, default=0)
    parser.add_argument("--ablation", choices=("bc", "none"), default="bc", help="bc: a 1-timestep window trained "
                        "beside behaviour cloning, same data, steps and seed")
    parser.add_argument("--dagger-episodes", type=int, default=150)
    parser.add_argument("--round-seed", type=int, default=600, help="round r collects with seed round-seed + r "
                        "(a continued run takes other seeds than the run it continues)")
    parser.add_argument("--bc-minutes", type=float, default=1.5)
    parser.add_argument("--round-minutes", type=float, default=1.0, help="training time per DAgger round")
    parser.add_argument("--steps-per-minute", type=float, default=2000, help="expected optimizer steps per minute")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--loader-workers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--final-minutes", type=float, default=2.0, help="kept for the last fine-tune and the exports")
    parser.add_argument("--max-rounds", type=int, default=8)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.3, 0.2, 0.1, 0.1, 0.1, 0.05],
                        help="the expert's share of steps in rounds 0, 1, ... (the last repeats): a file that "
                        "flings the arm from the table needs more of the expert so its labels stay near the task")
    parser.add_argument("--aux-weight", type=float, default=0.0, help="weight of the auxiliary task_state target "
                        "(0: none; the GPU runs used 0.5; its error is scripts/seeing_pilot.py image-probe's measure)")
    parser.add_argument("--discrete-weight", type=float, default=None, help="gato-ros train --discrete-weight: the "
                        "gripper token's loss weight (default: the model's)")
    parser.add_argument("--randomize", type=float, nargs=3, default=[0.0, 0.0, 0.0],
                        metavar=("SHIFT_CM", "TILT_DEG", "LIGHT"), help="collect with every camera moved and turned "
                        "up to these and the light scaled by up to 1 ± LIGHT per episode (gato-ros collect's options)")
    parser.add_argument("--eval-seconds", type=float, default=0, help="kept for a 100-seed in-process evaluation "
                        "of the int8 file at the end (0: none)")
    args = parser.parse_args()
    recipe = Recipe(args)
    per_minute = args.steps_per_minute

    data = [Path(d) for d in args.seed_data]
    check_cameras(data + ([Path(args.init)] if args.init else []), args.cameras)  # a checkpoint has spec.json too
    if args.expert_episodes > 0:
        data.append(recipe.collect("expert", args.expert_episodes, seed=500)[0])
    ablating = args.ablation == "bc" and not args.init  # a continued run has no behaviour cloning to compare
    sim_workers = max(1, args.workers - args.loader_workers * (2 if ablating else 1) - 1)
    priming = None
    if args.prime_policy and args.prime_episodes > 0:
        primed, priming = recipe.collect("primed", args.prime_episodes, seed=550, policy=Path(args.prime_policy),
                                         beta=0.0, workers=sim_workers, background=True)
    bc_steps = 0 if args.init else int(per_minute * args.bc_minutes)
    ablation = (recipe.train("ablation-w1", data, steps=bc_steps, minutes=args.bc_minutes, window_steps=1,
                             background=True) if ablating else None)
    if args.init:
        model = Path(args.init)
    else:
        model = recipe.train("bc", data, steps=bc_steps, minutes=args.bc_minutes)
        per_minute = 0.9 * recipe.measured_steps_per_minute(model, per_minute)
    recipe.summary["steps_per_minute"] = per_minute
    if ablation is not None and ablation.wait() == 0:
        recipe.export(recipe.work / "ablation-w1", recipe.work / "ablation-w1.onnx", "int8")
    if priming is not None:
        if priming.wait() != 0:
            raise SystemExit(f"{primed}: collection failed")
        data.append(primed)
    # DAgger, pipelined: while round r's policy drives (simulator workers), the trainer fine-tunes on the data
    # so far, so the next round's policy is one fine-tune newer and neither the CPUs nor the GPU wait.
    rounds = 0
    betas = args.betas + [args.betas[-1]] * max(0, args.max_rounds - len(args.betas))
    round_seconds = 90.0
    sim_workers = max(1, args.workers - args.loader_workers - 1)
    # The int8 file drives every round: the shipped file is int8, and DAgger labels the states it visits.
    policy = recipe.export(model, recipe.work / ("start.onnx" if args.init else "bc.onnx"), "fp32,int8").with_suffix(
        ".int8.onnx")
    while rounds < args.max_rounds and recipe.left() > round_seconds + 60 * args.final_minutes + recipe.startup_seconds:
        t0 = time.time()
        dagger, collecting = recipe.collect(f"dagger{rounds}", args.dagger_episodes, seed=args.round_seed + rounds,
                                            policy=policy, beta=betas[rounds], workers=sim_workers, background=True)
        model = recipe.train(f"ft{rounds}", data, steps=int(per_minute * args.round_minutes),
                             minutes=args.round_minutes, init=model, lr=5e-4, seed=rounds + 1)
        if collecting is not None and collecting.wait() != 0:
            raise SystemExit(f"{dagger}: collection failed")
        data.append(dagger)
        rounds += 1
        policy = recipe.export(model, recipe.work / f"round{rounds}.onnx", "int8").with_suffix(".int8.onnx")
        round_seconds = max(round_seconds, time.time() - t0)

    # Last, a fine-tune on everything, the last round's data included.
    minutes = max(0.3, (recipe.left() - 30 - args.eval_seconds - recipe.startup_seconds) / 60)
    model = recipe.train("ft-final", data, steps=int(per_minute * minutes), minutes=minutes, init=model, lr=2e-4,
                         seed=99)
    recipe.export(model, recipe.work / "see.onnx", "fp32,int8")
    if args.eval_seconds and recipe.left() > 30:
        recipe.run("eval see.int8", args.sim_python,
                   ["eval", "--policy", str(recipe.work / "see.int8.onnx"), "--episodes", "100",
                    "--seed", str(EVAL_SEED),
                    "--workers", str(args.workers), "--json", str(recipe.work / "eval-see-int8.json")],
                   check=False)  # the JSON is written before the plot, which needs matplotlib
    recipe.summary.update(rounds=rounds, final=str(model), data=[str(d) for d in data], bc_steps=bc_steps)
    for d in data:
        meta = json.loads((d / "dataset.json").read_text())
        episodes = [json.loads(line) for line in (d / "episodes.jsonl").read_text().splitlines()]
        recipe.summary.setdefault("datasets", {})[d.name] = {
            "episodes": meta["num_episodes"], "steps": meta["num_steps"],
            "successful": sum(bool(e.get("success")) for e in episodes)}
    (recipe.work / "summary.json").write_text(json.dumps(recipe.summary, indent=2))
    print(json.dumps(recipe.summary, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
