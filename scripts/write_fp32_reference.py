"""Record the fp32 policy's greedy action tokens on two expert episodes, for tests/test_shipped_model.py.

    python scripts/write_fp32_reference.py FP32.onnx DATASET_DIR models/stack_fp32_reference.npz
    python scripts/write_fp32_reference.py FP32.onnx OLD_REFERENCE.npz models/stack_fp32_reference.npz

The second form re-records the tokens on the observations of an earlier reference (the dataset itself
is generated, not committed).
"""

import sys
from collections.abc import Iterator

import numpy as np

from gato_ros.runtime import PolicyRuntime


def dataset_episodes(data: str, episodes: tuple[int, ...]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    from gato_ros.data import read_dataset

    dataset = read_dataset(data)
    for e in episodes:
        yield e, dataset.episode(e)[0]


def reference_episodes(path: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    old = dict(np.load(path))
    for e in np.unique(old["episode"]):
        rows = old["episode"] == e
        yield int(e), {k.removeprefix("obs."): v[rows] for k, v in old.items() if k.startswith("obs.")}


def main(model: str, data: str, out: str, episodes: tuple[int, ...] = (0, 1)) -> None:
    runtime = PolicyRuntime(model, provider="cpu", threads=1)
    source = reference_episodes(data) if data.endswith(".npz") else dataset_episodes(data, episodes)
    tokens, episode_ids, observations = [], [], {o.name: [] for o in runtime.spec.observations}
    for e, obs in source:
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
