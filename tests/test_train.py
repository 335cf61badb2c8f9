"""Training: sequences from episodes, the action loss learns, `gato-ros train` checkpoints and resumes,
and the same script runs under torchrun with two CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gato_ros import tokenizer as tok
from gato_ros.cli import main as cli_main
from gato_ros.data import EpisodeWriter, read_dataset
from gato_ros.model import GatoConfig, GatoModel
from gato_ros.sequences import SequenceDataset, patches_from_pixels, pixels_from_patches
from gato_ros.spec import ActionSpec, EmbodimentSpec, ObservationSpec
from gato_ros.train import CheckpointError, load_checkpoint, split_episodes

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def toy_spec(image: bool = False) -> EmbodimentSpec:
    observations = [ObservationSpec("joint_positions", (3,)), ObservationSpec("target", (2,), scale=(2.0, 2.0))]
    if image:
        observations.append(ObservationSpec("camera", (32, 16, 3), kind="image"))
    return EmbodimentSpec(
        name="toy", observations=tuple(observations),
        actions=(ActionSpec("j1", limit=5.0), ActionSpec("j2", limit=5.0),
                 ActionSpec("gripper", kind="discrete", values=(-10.0, 10.0))),
        joint_names=("j1", "j2", "gripper"),
    )


def write_toy_dataset(root: Path, episodes: int = 6, steps: int = 12, image: bool = False) -> Path:
    """Episodes whose actions are a fixed function of the observation (so there is something to learn)."""
    rng = np.random.default_rng(0)
    spec = toy_spec(image)
    with EpisodeWriter(root, spec, episodes_per_shard=4) as writer:
        for e in range(episodes):
            q = rng.normal(size=(steps, 3)).astype(np.float32)
            target = rng.normal(size=(steps, 2)).astype(np.float32)
            actions = np.stack([2 * (target[:, 0] - q[:, 0]), -q[:, 1], np.where(q[:, 2] > 0, 10.0, -10.0)], 1)
            obs = {"joint_positions": q, "target": target}
            if image:
                obs["camera"] = rng.integers(0, 256, size=(steps, 32, 16, 3), dtype=np.uint8)
            writer.add_episode(obs, actions, {"seed": e, "success": True})
    return root


def test_pixels_round_trip_through_the_tokenizers_scaling() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, 1)
    patches = (pixels.astype(np.float32) / 127.5 - 1.0) / 4.0
    assert np.array_equal(pixels_from_patches(patches), pixels)
    assert np.array_equal(patches_from_pixels(pixels), patches)


def test_sequences_predict_action_tokens_of_the_episode(tmp_path: Path) -> None:
    data = read_dataset(write_toy_dataset(tmp_path / "d"))
    step_tokens = tok.timestep_token_count(data.spec)  # 3 + 2 + separator + 3 actions = 9
    ds = SequenceDataset(data, seq_len=2 * step_tokens, train=False)
    assert len(ds) == 6 * 12
    item = ds[0]
    obs, actions = data.episode(0)
    stream = tok.tokenize_episode(data.spec, obs, actions)
    L = 2 * step_tokens
    assert torch.equal(item["input_ids"], torch.from_numpy(stream["tokens"][:L]))
    assert torch.equal(item["targets"], torch.from_numpy(stream["tokens"][1 : L + 1]))
    assert torch.equal(item["loss_mask"], torch.from_numpy(stream["loss_mask"][1 : L + 1]))
    assert torch.equal(item["position_ids"], torch.arange(L))
    hi = item["target_hi"][item["loss_mask"]].tolist()
    assert hi[:3] == [tok.CONTINUOUS_OFFSET + tok.NUM_BINS] * 2 + [2]
    # The last window of an episode is padded, with no loss on the padding.
    last = ds[11]
    assert (last["input_ids"][step_tokens:] == tok.PAD_TOKEN).all()
    assert int(last["loss_mask"].sum()) == 3


def test_prompted_windows_start_with_another_episode_without_loss(tmp_path: Path) -> None:
    data = read_dataset(write_toy_dataset(tmp_path / "d"))
    step_tokens = tok.timestep_token_count(data.spec)
    ds = SequenceDataset(data, seq_len=4 * step_tokens, prompt_prob=1.0, prompt_tokens=2 * step_tokens, seed=3)
    plain = SequenceDataset(data, seq_len=4 * step_tokens)
    ends = 0
    for i in range(0, len(ds), 5):
        item = ds[i]
        assert not item["loss_mask"][: 2 * step_tokens - 1].any()
        assert torch.equal(item["input_ids"][2 * step_tokens :], plain[i]["input_ids"][: 2 * step_tokens])
        j = ds.index[i][0]
        prompt = item["input_ids"][: 2 * step_tokens].numpy()
        own = ds.episodes[j].tokens
        assert not any(np.array_equal(prompt, own[s : s + len(prompt)]) for s in range(0, len(own), step_tokens))
        ends += any(np.array_equal(prompt, ep.tokens[-len(prompt) :]) for ep in ds.episodes)
    assert 0 < ends < len(range(0, len(ds), 5))  # about half the prompts come from episode ends


def test_sequences_with_images_carry_patches(tmp_path: Path) -> None:
    data = read_dataset(write_toy_dataset(tmp_path / "d", episodes=2, steps=3, image=True))
    step_tokens = tok.timestep_token_count(data.spec)  # 2 patches + 5 values + separator + 3 actions
    item = SequenceDataset(data, seq_len=2 * step_tokens, train=True)[0]
    obs, actions = data.episode(0)
    stream = tok.tokenize_episode(data.spec, obs, actions)
    is_patch = item["input_ids"] == tok.PATCH_TOKEN
    assert int(is_patch.sum()) == 4
    assert item["patches"].dtype == torch.uint8  # raw pixels through the loader; the model scales them
    assert torch.equal(item["patches"][is_patch], torch.from_numpy(pixels_from_patches(stream["patches"][:4])))
    assert (item["patches"][~is_patch] == 0).all()
    rows = item["patch_positions"][is_patch][:, 0]
    assert (rows[[0, 2]] < 64).all() and (rows[[1, 3]] >= 64).all()  # two rows of 16 pixels over 128 intervals


def test_tiny_model_overfits_a_fixed_batch(tmp_path: Path) -> None:
    data = read_dataset(write_toy_dataset(tmp_path / "d", episodes=2, steps=8))
    ds = SequenceDataset(data, seq_len=3 * tok.timestep_token_count(data.spec), train=False)
    batch = torch.utils.data.default_collate([ds[i] for i in range(0, len(ds), 2)])
    torch.manual_seed(0)
    model = GatoModel(GatoConfig.from_preset("tiny", context_window=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    for _ in range(80):
        loss = model.action_loss(**batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    print(f"overfit: action loss {losses[0]:.3f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_split_holds_out_whole_episodes() -> None:
    train, val = split_episodes(20, 0.1, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert split_episodes(1, 0.5, 0) == ([0], [])


def _train_args(data: Path, out: Path, steps: int) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--preset", "tiny", "--context-window", "32", "--steps",
            str(steps), "--batch-size", "8", "--eval-every", "3", "--val-fraction", "0.2", "--no-progress"]


def test_train_writes_a_loadable_checkpoint_and_resumes(tmp_path: Path) -> None:
    data = write_toy_dataset(tmp_path / "d")
    out = tmp_path / "run"
    assert cli_main(["train", *_train_args(data, out, 4)]) == 0
    model, config, spec = load_checkpoint(out)
    assert config.context_window == 32 and spec == read_dataset(data).spec
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["val_loss"]) for r in log)
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 4
    # Without --resume an existing run is not overwritten; with it, training continues from step 4.
    assert cli_main(["train", *_train_args(data, out, 7)]) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert cli_main(["train", *_train_args(data, out, 7), "--resume"]) == 0
    assert json.loads((out / "train_state.json").read_text())["step"] == 7
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [3, 4, 6, 7]
    resumed, _, _ = load_checkpoint(out)
    assert any(not torch.equal(before[k], v) for k, v in resumed.state_dict().items())
    # A broken checkpoint gives a clear error naming the file.
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(out)


def test_torchrun_two_cpu_ranks(tmp_path: Path) -> None:
    data = write_toy_dataset(tmp_path / "d")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--standalone", "-m", "gato_ros.train",
           *_train_args(data, out, 3), "--threads", "1"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rank(s)" in result.stderr
    model, config, _ = load_checkpoint(out)
    assert json.loads((out / "train_state.json").read_text())["step"] == 3
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # only rank 0 writes


def test_resume_mid_run_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    data = write_toy_dataset(tmp_path / "d")
    args = ["--data", str(data), "--preset", "tiny", "--context-window", "32", "--batch-size", "8",
            "--steps", "10", "--eval-every", "100", "--val-fraction", "0.2", "--no-progress"]
    assert cli_main(["train", *args, "--out", str(tmp_path / "straight")]) == 0
    # --max-minutes 0 stops (and saves) after the first step; the resumed run crosses an epoch boundary.
    assert cli_main(["train", *args, "--out", str(tmp_path / "split"), "--max-minutes", "0"]) == 0
    assert json.loads((tmp_path / "split" / "train_state.json").read_text())["step"] == 1
    assert cli_main(["train", *args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    a, _, _ = load_checkpoint(tmp_path / "straight")
    b, _, _ = load_checkpoint(tmp_path / "split")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), name


def test_fine_tune_from_a_checkpoint_on_several_datasets(tmp_path: Path) -> None:
    """DAgger's loop: expert demos + on-policy data, starting from the last policy's weights."""
    demos, extra = write_toy_dataset(tmp_path / "demos"), write_toy_dataset(tmp_path / "extra")
    assert cli_main(["train", *_train_args(demos, tmp_path / "first", 2)]) == 0
    first, _, _ = load_checkpoint(tmp_path / "first")
    args = ["--data", str(demos), str(extra), "--out", str(tmp_path / "tuned"), "--init", str(tmp_path / "first"),
            "--steps", "1", "--lr", "0", "--eval-every", "1", "--no-progress"]
    assert cli_main(["train", *args]) == 0  # learning rate 0: the saved weights are exactly the initial ones
    tuned, config, _ = load_checkpoint(tmp_path / "tuned")
    assert config.context_window == 32  # from the checkpoint, not the preset default
    for x, y in zip(first.state_dict().values(), tuned.state_dict().values(), strict=True):
        assert torch.equal(x, y)
