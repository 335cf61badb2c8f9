"""The episode store: what a collection writes is what training reads, and bad data says where."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gato_ros.data import DatasetError, EpisodeWriter, read_dataset, read_datasets
from gato_ros.spec import ActionSpec, EmbodimentSpec, ObservationSpec

SPEC = EmbodimentSpec(
    name="test-arm",
    observations=(ObservationSpec("joint_positions", (2,)), ObservationSpec("image", (16, 16, 3), kind="image")),
    actions=(ActionSpec("j1", limit=5.0), ActionSpec("grip", "discrete", 1.0, (1.0, -1.0))),
)


def episode(steps: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = {"joint_positions": rng.normal(size=(steps, 2)), "image": rng.integers(0, 255, (steps, 16, 16, 3), np.uint8)}
    return obs, rng.normal(size=(steps, 2)).astype(np.float32)


def write(root: Path, lengths: list[int]) -> None:
    with EpisodeWriter(root, SPEC, episodes_per_shard=2) as writer:
        for i, n in enumerate(lengths):
            writer.add_episode(*episode(n, i), {"seed": i, "success": True})


def test_round_trip_across_shards(tmp_path: Path) -> None:
    write(tmp_path, [5, 3, 7])
    ds = read_dataset(tmp_path, SPEC)
    assert len(ds) == 3 and ds.spec == SPEC
    assert sorted(p.name for p in tmp_path.glob("shard-*.npz")) == ["shard-00000.npz", "shard-00001.npz"]
    for i, n in enumerate([5, 3, 7]):
        obs, actions = ds.episode(i)
        want_obs, want_actions = episode(n, i)
        np.testing.assert_array_equal(obs["image"], want_obs["image"])
        np.testing.assert_allclose(obs["joint_positions"], want_obs["joint_positions"])
        np.testing.assert_array_equal(actions, want_actions)
        assert ds.episodes[i]["seed"] == i and ds.episodes[i]["length"] == n
    assert json.loads((tmp_path / "dataset.json").read_text())["num_steps"] == 15


def test_unfinished_collection_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), EpisodeWriter(tmp_path, SPEC) as writer:
        writer.add_episode(*episode(3, 0), {})
        raise RuntimeError("collector crashed")
    with pytest.raises(DatasetError, match="dataset.json"):
        read_dataset(tmp_path)


def test_nan_is_refused_at_write_time_naming_the_field(tmp_path: Path) -> None:
    obs, actions = episode(3, 0)
    obs["joint_positions"][1, 0] = np.nan
    with pytest.raises(DatasetError, match="obs.joint_positions"), EpisodeWriter(tmp_path, SPEC) as writer:
        writer.add_episode(obs, actions, {})


def test_truncated_shard_names_the_file(tmp_path: Path) -> None:
    write(tmp_path, [4, 4])
    shard = tmp_path / "shard-00000.npz"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(DatasetError, match="shard-00000.npz"):
        read_dataset(tmp_path).episode(0)


def test_mismatched_spec_is_refused(tmp_path: Path) -> None:
    write(tmp_path, [2])
    other = EmbodimentSpec(name="other", observations=SPEC.observations, actions=SPEC.actions[:1])
    with pytest.raises(DatasetError, match="spec.json"):
        read_dataset(tmp_path, other)


def test_nan_written_behind_the_writers_back_is_caught_on_read(tmp_path: Path) -> None:
    write(tmp_path, [3])
    shard = tmp_path / "shard-00000.npz"
    with np.load(shard) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["actions"][0, 0] = np.nan
    np.savez(shard, **arrays)
    with pytest.raises(DatasetError, match="shard-00000.npz.*'actions'"):
        read_dataset(tmp_path).episode(0)


def test_datasets_with_one_spec_read_as_one(tmp_path: Path) -> None:
    write(tmp_path / "a", [2, 3])
    write(tmp_path / "b", [4])
    both = read_datasets([tmp_path / "a", tmp_path / "b"])
    assert len(both) == 3 and [e["length"] for e in both.episodes] == [2, 3, 4]
    np.testing.assert_array_equal(both.episode(2)[1], episode(4, 0)[1])
    with EpisodeWriter(tmp_path / "c", EmbodimentSpec("other", SPEC.observations, SPEC.actions[:1])) as writer:
        writer.add_episode(episode(2, 0)[0], episode(2, 0)[1][:, :1], {})
    with pytest.raises(DatasetError, match="differs"):
        read_datasets([tmp_path / "a", tmp_path / "c"])
