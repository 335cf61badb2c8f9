"""Record the fp32 policy's greedy action tokens on two expert episodes, for tests/test_shipped_model.py.

    python scripts/write_fp32_reference.py FP32.onnx DATASET_DIR models/stack_fp32_reference.npz
"""

import sys

import numpy as np

from gato_ros.data import read_dataset
from gato_ros.runtime import PolicyRuntime


def main(model: str, data: str, out: str, episodes: tuple[int, ...] = (0, 1)) -> None:
    dataset = read_dataset(data)
    runtime = PolicyRuntime(model, provider="cpu", threads=1)
    tokens, episode_ids, observations = [], [], {o.name: [] for o in dataset.spec.observations}
    for e in episodes:
        obs, _ = dataset.episode(e)
        runtime.reset()
        for t in range(len(next(iter(obs.values())))):
            step = {k: v[t] for k, v in obs.items()}
            tokens.append(runtime.step_tokens(step))
            episode_ids.append(e)
            for k, v in step.items():
                observations[k].append(v)
    np.savez_compressed(out, episode=np.array(episode_ids), tokens=np.array(tokens),
                        **{f"obs.{k}": np.array(v) for k, v in observations.items()})
    print(f"wrote {out}: {len(tokens)} steps")


if __name__ == "__main__":
    main(*sys.argv[1:4])
