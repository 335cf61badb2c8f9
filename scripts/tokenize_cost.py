"""What tokenizing a dataset's episodes costs before training can start: the whole-episode tokenizer training uses
(`gato_ros.tokenizer.tokenize_episode`) against the runtime's per-timestep tokenizer looped over the same
episodes (`tokenize_observation` + `tokenize_action`, what the episode tokenizer did before it was vectorized).
Reading the shards (decompressing the frames) is timed apart.

    python scripts/tokenize_cost.py runs/see6/statepol --episodes 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gato_ros import tokenizer as tok
from gato_ros.data import read_dataset


def per_timestep(spec: tok.EmbodimentSpec, observations: dict[str, np.ndarray], actions: np.ndarray) -> int:
    tokens = 0
    for t in range(actions.shape[0]):
        ts = tok.tokenize_observation(spec, {k: v[t] for k, v in observations.items()})
        tokens += len(ts.tokens) + len(tok.tokenize_action(spec, actions[t]))
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--episodes", type=int, default=20)
    args = parser.parse_args()
    dataset = read_dataset(args.dataset)
    n = min(args.episodes, len(dataset))
    t0 = time.perf_counter()
    episodes = [dataset.episode(i) for i in range(n)]
    t1 = time.perf_counter()
    whole = sum(len(tok.tokenize_episode(dataset.spec, o, a, pixel_patches=True)["tokens"]) for o, a in episodes)
    t2 = time.perf_counter()
    looped = sum(per_timestep(dataset.spec, o, a) for o, a in episodes)
    t3 = time.perf_counter()
    assert whole == looped
    steps = sum(a.shape[0] for _, a in episodes)
    print(f"{args.dataset}: {n} episodes, {steps} timesteps, {whole} tokens ({dataset.spec.name})")
    print(f"  read shards {t1 - t0:.2f} s; tokenize_episode {t2 - t1:.2f} s; per-timestep loop {t3 - t2:.2f} s "
          f"({(t3 - t2) / max(t2 - t1, 1e-9):.0f}x)")


if __name__ == "__main__":
    main()
