"""Episode datasets on disk: a sharded, self-describing format (numpy only).

    DIR/dataset.json     {"format": FORMAT, "num_episodes", "num_steps", "shards": [...]}
    DIR/spec.json        the EmbodimentSpec the episodes were recorded with
    DIR/episodes.jsonl   one line per episode: episode, shard, start, length + free metadata
    DIR/shard-NNNNN.npz  "obs.<key>" (steps, *shape), "actions" (steps, A) float32, "episode" (steps,),
                         "aux.<key>" (steps, n) float32 for each auxiliary key

Auxiliary keys are privileged values kept beside the observations for training only (a seeing policy's
`task_state`: not an input, a target), listed in dataset.json with the normalization to apply.

Shards of a spec with image keys are deflate-compressed (np.savez_compressed): rendered frames are
flat colours and consecutive frames repeat, so uint8 frames shrink many times and read back
bit-exact. Shards without images stay uncompressed (noisy floats barely shrink, and it costs time).

Every file is written under a temporary name and renamed when complete, and dataset.json comes
last: a directory without it is an unfinished (or crashed) collection, never mistaken for data.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gato_ros import contract
from gato_ros.spec import EmbodimentSpec

FORMAT = "gato_ros.episodes/v1"


class DatasetError(ValueError):
    """A dataset on disk is incomplete, inconsistent with its spec, or holds bad values."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_episode(spec: EmbodimentSpec, observations: dict[str, np.ndarray], actions: np.ndarray, where: str) -> None:
    expected = {o.name for o in spec.observations}
    if set(observations) != expected:
        raise DatasetError(f"{where}: observation keys {sorted(observations)} differ from spec {sorted(expected)}")
    if actions.ndim != 2 or actions.shape[1] != spec.action_size:
        raise DatasetError(f"{where}: field 'actions' has shape {actions.shape}, spec needs (T, {spec.action_size})")
    steps = actions.shape[0]
    if not np.all(np.isfinite(actions)):
        raise DatasetError(f"{where}: field 'actions' holds NaN or inf")
    for o in spec.observations:
        value = observations[o.name]
        if value.shape != (steps, *o.shape):
            raise DatasetError(f"{where}: field 'obs.{o.name}' has shape {value.shape}, spec needs {(steps, *o.shape)}")
        if o.kind != "image" and not np.all(np.isfinite(value)):
            raise DatasetError(f"{where}: field 'obs.{o.name}' holds NaN or inf")


@dataclass(frozen=True)
class AuxSpec:
    """An auxiliary key: its width and the normalization a training target takes, (value - offset) / scale."""

    size: int
    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def normalize(self, values: np.ndarray) -> np.ndarray:
        return ((values - np.asarray(self.offset, np.float32)) / np.asarray(self.scale, np.float32)).astype(np.float32)


def _check_aux(expected: dict[str, AuxSpec], aux: dict[str, np.ndarray], steps: int, where: str) -> None:
    if set(aux) != set(expected):
        raise DatasetError(f"{where}: auxiliary keys {sorted(aux)} differ from the dataset's {sorted(expected)}")
    for key, spec in expected.items():
        if aux[key].shape != (steps, spec.size) or not np.all(np.isfinite(aux[key])):
            raise DatasetError(f"{where}: field 'aux.{key}' has shape {aux[key].shape} or non-finite values, "
                               f"needs ({steps}, {spec.size}) finite")


class EpisodeWriter:
    """Append episodes; `close()` (or leaving the `with` block) finishes the dataset."""

    def __init__(self, out_dir: str | Path, spec: EmbodimentSpec, episodes_per_shard: int = 64,
                 aux: dict[str, AuxSpec] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.aux = dict(aux or {})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / "dataset.json").exists():
            raise DatasetError(f"{self.out_dir}: already holds a finished dataset")
        self.spec = spec
        self.episodes_per_shard = episodes_per_shard
        # (observations, actions, metadata, auxiliary values) per episode not yet in a shard
        self._pending: list[tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any], dict[str, np.ndarray]]] = []
        self._index: list[dict[str, Any]] = []
        self._shards: list[str] = []
        self._steps = 0
        _atomic_write_text(self.out_dir / "spec.json", spec.to_json())

    def add_episode(self, observations: dict[str, np.ndarray], actions: np.ndarray, metadata: dict[str, Any],
                    aux: dict[str, np.ndarray] | None = None) -> None:
        observations = {k: np.asarray(v) for k, v in observations.items()}
        actions = np.asarray(actions, dtype=np.float32)
        where = f"episode {len(self._index) + len(self._pending)}"
        _check_episode(self.spec, observations, actions, where)
        aux = {k: np.asarray(v, dtype=np.float32).reshape(len(actions), -1) for k, v in (aux or {}).items()}
        _check_aux(self.aux, aux, len(actions), where)
        self._pending.append((observations, actions, dict(metadata), aux))
        if len(self._pending) >= self.episodes_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self._shards):05d}.npz"
        arrays: dict[str, np.ndarray] = {}
        start = 0
        for key in (o.name for o in self.spec.observations):
            arrays[f"obs.{key}"] = np.concatenate([obs[key] for obs, *_ in self._pending])
        for key in self.aux:
            arrays[f"aux.{key}"] = np.concatenate([aux[key] for *_, aux in self._pending])
        arrays["actions"] = np.concatenate([act for _, act, *_ in self._pending])
        first = len(self._index)
        arrays["episode"] = np.concatenate(
            [np.full(len(act), first + i, dtype=np.int64) for i, (_, act, *_) in enumerate(self._pending)]
        )
        tmp = self.out_dir / (name + ".tmp.npz")
        save = np.savez_compressed if self.spec.image_keys else np.savez
        save(tmp, **arrays)
        os.replace(tmp, self.out_dir / name)
        for _, act, meta, _ in self._pending:
            self._index.append({**meta, "episode": len(self._index), "shard": name, "start": start, "length": len(act)})
            start += len(act)
            self._steps += len(act)
        self._shards.append(name)
        self._pending = []

    def close(self) -> None:
        self._flush()
        lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self._index)
        _atomic_write_text(self.out_dir / "episodes.jsonl", lines)
        summary = {
            "format": FORMAT,
            "num_episodes": len(self._index),
            "num_steps": self._steps,
            "shards": self._shards,
        }
        if self.aux:
            summary["aux"] = {k: asdict(v) for k, v in self.aux.items()}
        _atomic_write_text(self.out_dir / "dataset.json", json.dumps(summary, indent=2))

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:  # a failed collection stays visibly unfinished
            self.close()


class EpisodeDataset:
    """Read access to a finished dataset. Shards load lazily and are cached."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        summary_path = self.root / "dataset.json"
        if not summary_path.exists():
            raise DatasetError(f"{summary_path}: missing; the dataset is unfinished or not a gato_ros dataset")
        summary = json.loads(summary_path.read_text())
        if summary.get("format") != FORMAT:
            raise DatasetError(f"{summary_path}: field 'format' is {summary.get('format')!r}, expected {FORMAT!r}")
        try:
            self.spec = EmbodimentSpec.from_json((self.root / "spec.json").read_text())
        except (OSError, KeyError, ValueError) as err:
            raise DatasetError(f"{self.root / 'spec.json'}: unreadable spec ({err})") from err
        self.episodes = [json.loads(line) for line in (self.root / "episodes.jsonl").read_text().splitlines() if line]
        if len(self.episodes) != summary["num_episodes"]:
            raise DatasetError(f"{self.root / 'episodes.jsonl'}: {len(self.episodes)} episodes, dataset.json says "
                               f"{summary['num_episodes']}")
        self._shards: dict[str, dict[str, np.ndarray]] = {}
        self.aux = {k: AuxSpec(v["size"], tuple(v["offset"]), tuple(v["scale"]))
                    for k, v in summary.get("aux", {}).items()}

    def __len__(self) -> int:
        return len(self.episodes)

    def aux_values(self, index: int, key: str) -> np.ndarray:
        """(T, n) float32: auxiliary key `key` of episode `index`, as stored (not normalized)."""
        if key not in self.aux:
            raise DatasetError(f"{self.root / 'dataset.json'}: no auxiliary key {key!r} (has {sorted(self.aux)})")
        meta = self.episodes[index]
        return self._shard(meta["shard"])[f"aux.{key}"][meta["start"] : meta["start"] + meta["length"]]

    def _shard(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._shards:
            path = self.root / name
            try:
                with np.load(path) as npz:
                    self._shards[name] = {k: npz[k] for k in npz.files}
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
                raise DatasetError(f"{path}: unreadable or truncated shard ({err})") from err
        return self._shards[name]

    def episode(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(observations {key: (T, ...)}, actions (T, A)), checked against the spec."""
        meta = self.episodes[index]
        shard = self._shard(meta["shard"])
        sl = slice(meta["start"], meta["start"] + meta["length"])
        where = f"{self.root / meta['shard']} episode {index}"
        try:
            observations = {o.name: shard[f"obs.{o.name}"][sl] for o in self.spec.observations}
            actions = shard["actions"][sl]
        except KeyError as err:
            raise DatasetError(f"{where}: field {err.args[0]!r} missing") from err
        _check_episode(self.spec, observations, actions, where)
        return observations, actions

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        for i in range(len(self)):
            yield self.episode(i)


def read_dataset(root: str | Path, spec: EmbodimentSpec | None = None) -> EpisodeDataset:
    """Open a dataset; with `spec`, raise DatasetError unless the dataset was recorded with it."""
    dataset = EpisodeDataset(root)
    if spec is not None and dataset.spec != spec:
        raise DatasetError(f"{Path(root) / 'spec.json'}: spec {dataset.spec.name!r} does not match the expected "
                           f"spec {spec.name!r}")
    return dataset


class EpisodeCollection:
    """Several datasets recorded with one spec, read as one (for example expert demos + DAgger)."""

    def __init__(self, datasets: list[EpisodeDataset]) -> None:
        if not datasets:
            raise DatasetError("no dataset given")
        self.spec = datasets[0].spec
        for d in datasets[1:]:
            if d.spec != self.spec:
                raise DatasetError(f"{d.root / 'spec.json'}: spec {d.spec.name!r} differs from "
                                   f"{datasets[0].root / 'spec.json'} ({self.spec.name!r})")
        self._parts = [(d, i) for d in datasets for i in range(len(d))]
        self.episodes = [d.episodes[i] for d, i in self._parts]
        self.aux = {k: v for k, v in datasets[0].aux.items() if all(d.aux.get(k) == v for d in datasets)}

    def __len__(self) -> int:
        return len(self._parts)

    def episode(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        dataset, i = self._parts[index]
        return dataset.episode(i)

    def aux_values(self, index: int, key: str) -> np.ndarray:
        if key not in self.aux:
            raise DatasetError(f"auxiliary key {key!r} is not in every dataset given (common: {sorted(self.aux)})")
        dataset, i = self._parts[index]
        return dataset.aux_values(i, key)

    @property
    def arm(self) -> str:
        """The arm its episodes were recorded on (their `arm` metadata; none: contract.LEGACY_ARM, the Panda of
        every dataset recorded before the metadata). DatasetError when its episodes name several."""
        arms = {str(e.get("arm", contract.LEGACY_ARM)) for e in self.episodes}
        if len(arms) != 1:
            raise DatasetError(f"episodes of spec {self.spec.name!r} name several arms {sorted(arms)}")
        return arms.pop()

    @property
    def tasks(self) -> list[str]:
        """The task names of its episodes (`task` metadata; none: contract.LEGACY_TASK), in order of appearance."""
        return list(dict.fromkeys(str(e.get("task", contract.LEGACY_TASK)) for e in self.episodes))


    @property
    def instructions(self) -> dict[str, str]:
        """Task name -> the instruction text its episodes were recorded with (`instruction` metadata); DatasetError
        when one task's episodes give different texts. Tasks recorded without one are left out."""
        texts: dict[str, str] = {}
        for e in self.episodes:
            if "instruction" not in e:
                continue
            task, text = str(e.get("task", contract.LEGACY_TASK)), str(e["instruction"])
            if texts.setdefault(task, text) != text:
                raise DatasetError(f"task {task!r} has two instructions: {texts[task]!r} and {text!r}")
        return texts


def read_datasets(roots: list[str | Path]) -> EpisodeCollection:
    """Open one or more datasets that share a spec."""
    return EpisodeCollection([read_dataset(r) for r in roots])


def read_spec_groups(roots: list[str | Path]) -> list[EpisodeCollection]:
    """Open datasets of one or more specs (a generalist's data: Gato trains on several bodies at once): one
    collection per spec, in the order the specs first appear in `roots`. Each spec is one arm's, so two specs
    recorded on the same arm are refused (a file serves one spec per arm)."""
    by_spec: dict[str, list[EpisodeDataset]] = {}
    for root in roots:
        dataset = read_dataset(root)
        by_spec.setdefault(dataset.spec.to_json(), []).append(dataset)
    groups = [EpisodeCollection(datasets) for datasets in by_spec.values()]
    arms = [g.arm for g in groups]
    for arm in dict.fromkeys(arms):
        if arms.count(arm) > 1:
            names = [g.spec.name for g in groups if g.arm == arm]
            raise DatasetError(f"datasets of arm {arm!r} were recorded with {len(names)} different specs {names}; "
                               "one spec per arm")
    return groups
