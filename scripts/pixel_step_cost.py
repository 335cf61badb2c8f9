"""Policy step latency with image tokens: the runtime (ONNX Runtime, one thread) on camera frames.

Records one scripted-expert episode with the cameras on, then replays its observations through
`PolicyRuntime.step` (tokenize, prefill the observation, decode 8 action tokens through the KV ring)
for a `tiny` model whose window holds `--timesteps` timesteps, so the ring evicts every step. Rendering
is not timed. Weights are random (latency does not depend on them). Cases: the state policy's spec
(joints + task_state, no image: the baseline under the same load), in the fused serving graph and in the
plain TorchScript graph that image specs export through, the patch network as it is (patch tokens only,
4x4 after the stem) and, with `--before`, as it was (every token, 16x16).

    nice -n 10 .venv/bin/python scripts/pixel_step_cost.py --before
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gato_ros import tokenizer as tok
from gato_ros.export import export
from gato_ros.model import GatoConfig, GatoModel
from gato_ros.runtime import PolicyRuntime
from sim.env import StackingEnv
from sim.expert import ScriptedExpert, run_episode
from sim.spec import stacking_spec

sys.path.insert(0, str(Path(__file__).parent))
from pixel_training_cost import full_resolution_model  # noqa: E402  (the old patch network, one definition)


def step_times(path: Path, observations: list[dict[str, np.ndarray]], repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall-clock and process CPU ms per step (CPU time is what other jobs on a busy machine inflate less)."""
    runtime = PolicyRuntime(str(path), provider="cpu", threads=1)
    wall, cpu = [], []
    for _ in range(repeats):
        runtime.reset()
        for obs in observations:
            t0, cpu0 = time.perf_counter(), time.process_time()
            runtime.step(obs)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - cpu0)
    return np.asarray(wall) * 1e3, np.asarray(cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cameras", nargs="+", default=["scene"], choices=("scene", "wrist"))
    parser.add_argument("--timesteps", type=int, default=4, help="timesteps the attention window holds")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the recorded episode")
    parser.add_argument("--before", action="store_true", help="also time the old every-token, 16x16 patch net")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cameras = tuple(args.cameras)
    pixels = stacking_spec(args.image_size, privileged=False, cameras=cameras)
    env = StackingEnv(image_size=args.image_size, cameras=cameras)  # also gives task_state
    episode = run_episode(env, ScriptedExpert(), seed=0)
    # (spec, model, graph): the fused serving graph (the default export) and the plain TorchScript graph,
    # so the table separates what the image tokens cost from what the unfused graph costs.
    cases = {"state (joints + task_state), no image": (stacking_spec(), GatoModel, "fused"),
             "state, plain graph": (stacking_spec(), GatoModel, "plain"),
             "pixels, fused graph (the default export)": (pixels, GatoModel, "fused"),
             "pixels, plain graph": (pixels, GatoModel, "plain")}
    if args.before:
        cases["pixels, before: every token, 16x16"] = (pixels, full_resolution_model, "plain")
    patches = sum((o.shape[0] // tok.PATCH_SIZE) * (o.shape[1] // tok.PATCH_SIZE) for o in pixels.image_keys)
    print(f"tiny, cameras {list(cameras)} at {args.image_size} px ({patches} patch tokens per timestep), window "
          f"{args.timesteps} timesteps; ORT CPU, 1 thread; {episode.steps * args.repeats} steps per case; "
          f"load average {os.getloadavg()[0]:.1f}, niceness {os.nice(0)}")
    print("| case | tokens/timestep | file | wall ms/step p50 | p90 | p99 | CPU ms/step p50 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (spec, make_model, graph)) in enumerate(cases.items()):
            keys = [o.name for o in spec.observations]
            observations = [{k: episode.observations[k][t] for k in keys} for t in range(episode.steps)]
            step_tokens = tok.timestep_token_count(spec)
            config = GatoConfig.from_preset("tiny", context_window=args.timesteps * step_tokens)
            torch.manual_seed(0)
            paths = export(make_model(config).eval(), spec, Path(tmp) / f"case{i}.onnx", ("fp32", "int8"),
                           attention=graph)
            for variant in ("fp32", "int8"):
                ms, cpu = step_times(paths[variant], observations, args.repeats)
                print(f"| {name} | {step_tokens} | {variant} | {np.median(ms):.2f} | {np.percentile(ms, 90):.2f} "
                      f"| {np.percentile(ms, 99):.2f} | {np.median(cpu):.2f} |")


if __name__ == "__main__":
    main()
