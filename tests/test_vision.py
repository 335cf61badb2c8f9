"""Foundations of the seeing policy: named cameras, compressed image datasets, a cheap patch network."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from gato_ros import tokenizer as tok
from gato_ros.data import read_dataset
from gato_ros.model import GatoConfig, GatoModel
from gato_ros.runtime import PolicyRuntime
from sim import collect
from sim.env import StackingEnv
from sim.expert import ScriptedExpert, run_episode
from sim.spec import env_overrides, stacking_spec

CAMERAS = ("scene", "wrist")


class RecordingRuntime(PolicyRuntime):
    """The runtime, keeping every call's logits: the observation prefill and each decode (warm-up included:
    reset `calls` after construction)."""

    calls: list[np.ndarray] = []

    def forward(self, *args, **kwargs):
        logits = super().forward(*args, **kwargs)
        self.calls = [*self.calls, np.array(logits, copy=True)]
        return logits


def test_cameras_are_named_observation_keys():
    env = StackingEnv(image_size=64, cameras=CAMERAS)
    obs, _ = env.reset(seed=0)
    assert {"camera_scene", "camera_wrist"} <= obs.keys() and "image" not in obs
    assert all(obs[k].shape == (64, 64, 3) and obs[k].dtype == np.uint8 for k in ("camera_scene", "camera_wrist"))
    assert not np.array_equal(obs["camera_scene"], obs["camera_wrist"])
    assert "image" in StackingEnv(image_size=64).reset(seed=0)[0]  # the legacy single camera stays
    spec = stacking_spec(64, privileged=False, cameras=CAMERAS)
    names = [o.name for o in spec.observations]
    assert names == ["joint_positions", "joint_velocities", "camera_scene", "camera_wrist"]
    assert env_overrides(spec) == {"image_size": 64, "cameras": CAMERAS}  # what evaluation builds from a model
    with pytest.raises(ValueError, match="unknown camera"):
        StackingEnv(image_size=64, cameras=("ceiling",))


def red_pixels(frame: np.ndarray) -> np.ndarray:
    r, g, b = (frame[..., i].astype(int) for i in range(3))
    return (r > 120) & (g < 80) & (b < 80)


def test_wrist_camera_sees_the_grasp():
    """When the fingers close on the red cube, it fills a large, central part of the wrist image;
    in the scene camera it is a few pixels."""
    env, expert = StackingEnv(image_size=64, cameras=CAMERAS), ScriptedExpert()
    episode = run_episode(env, expert, seed=3)
    closing = int(np.argmax(episode.actions[:, 7] < 0))  # the first close command: the cube is between the fingers
    assert closing > 0
    wrist = red_pixels(episode.observations["camera_wrist"][closing])
    scene = red_pixels(episode.observations["camera_scene"][closing])
    assert wrist.mean() > 0.05 > scene.mean() > 0
    cols = np.nonzero(wrist)[1]
    assert abs(cols.mean() - 31.5) < 8  # between the fingers: centred left-right


def test_image_dataset_round_trips_bit_exact_and_compressed(tmp_path):
    parser = argparse.ArgumentParser()
    collect.add_arguments(parser)
    out = tmp_path / "seeing"
    args = parser.parse_args(["--episodes", "2", "--workers", "1", "--out", str(out), "--seed", "4", "--image-size",
                              "64", "--cameras", *CAMERAS, "--no-task-state", "--noise-fraction", "0"])
    assert collect.run(args) == 0
    dataset = read_dataset(out, stacking_spec(64, privileged=False, cameras=CAMERAS))
    env, expert = StackingEnv(image_size=64, cameras=CAMERAS), ScriptedExpert()
    raw_bytes = 0
    for meta, (observations, actions) in zip(dataset.episodes, dataset, strict=True):
        assert "task_state" not in observations
        again = run_episode(env, expert, meta["seed"])  # the same seed renders the same frames
        for key in ("camera_scene", "camera_wrist"):
            assert observations[key].dtype == np.uint8
            np.testing.assert_array_equal(observations[key], again.observations[key])
            raw_bytes += again.observations[key].nbytes
        np.testing.assert_array_equal(actions, again.actions)
    stored = sum(p.stat().st_size for p in out.glob("shard-*.npz"))
    print(f"{raw_bytes / 1e6:.1f} MB of frames stored in {stored / 1e6:.2f} MB")
    assert stored < raw_bytes / 4


def test_patch_network_runs_on_patch_tokens_only():
    """Training cost: the patch ResNet sees the window's patch tokens (+1 constant pad patch), never
    every token; and its output reaches exactly the patch tokens."""
    torch.manual_seed(0)
    model = GatoModel(GatoConfig(n_layer=1, n_embd=32, n_head=2, n_ff=64, context_window=64, patch_channels=8))
    B, S = 3, 40
    ids = torch.full((B, S), tok.CONTINUOUS_OFFSET + 500)
    ids[:, ::5] = tok.PATCH_TOKEN
    ids[2] = tok.CONTINUOUS_OFFSET + 7  # a window without patches
    patches = torch.rand(B, S, 3, 16, 16) - 0.5
    positions = torch.zeros(B, S, 2, dtype=torch.int64)
    seen: list[int] = []
    model.patch_embed.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    local = torch.arange(S).expand(B, S)
    x = model.embed(ids, local, patches, positions)
    assert seen == [int((ids == tok.PATCH_TOKEN).sum()) + 1]
    other = patches.clone()
    other[ids != tok.PATCH_TOKEN] = 9.0  # pixels at non-patch tokens are ignored
    other[0, 5] = 0.3  # one patch token's pixels change: only its own embedding moves
    changed = (model.embed(ids, local, other, positions) - x).abs().amax(-1) > 0
    assert changed.nonzero().tolist() == [[0, 5]]


def test_int8_export_of_an_image_model_agrees_with_fp32(tmp_path):
    """The shipped variant is int8: an image model quantizes in both int8 schemes (the patch network's
    Conv/GroupNorm/Gemm sit in the graph beside the blocks) and, teacher-forced on fp32's tokens, picks
    the same action tokens."""
    from gato_ros.export import export

    spec = stacking_spec(64, privileged=False, cameras=CAMERAS)
    torch.manual_seed(0)
    config = GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=2 * tok.timestep_token_count(spec),
                        patch_channels=8)
    paths = export(GatoModel(config).eval(), spec, tmp_path / "seeing.onnx", ("fp32", "int8", "int8-dynamic"))
    env = StackingEnv(image_size=64, cameras=CAMERAS)
    obs, _ = env.reset(seed=2)
    episode = []
    for _ in range(6):
        episode.append({o.name: obs[o.name] for o in spec.observations})
        obs, *_ = env.step(np.zeros(8))
    fp32 = PolicyRuntime(str(paths["fp32"]), provider="cpu", threads=1)
    reference = np.array([fp32.step_tokens(o) for o in episode])
    for variant in ("int8", "int8-dynamic"):
        quantized = PolicyRuntime(str(paths[variant]), provider="cpu", threads=1)
        got = np.array([quantized.step_tokens(o, teacher=t) for o, t in zip(episode, reference, strict=True)])
        assert (got == reference).mean() >= 0.9, variant


@pytest.fixture(scope="module")
def seeing_policy(tmp_path_factory):
    """A random-init tiny seeing policy (scene + wrist cameras, joints, no task_state), exported."""
    from gato_ros.export import export

    spec = stacking_spec(64, privileged=False, cameras=CAMERAS)
    torch.manual_seed(0)
    config = GatoConfig(n_layer=1, n_embd=32, n_head=2, n_ff=64, context_window=2 * tok.timestep_token_count(spec),
                        patch_channels=8)
    return export(GatoModel(config).eval(), spec, tmp_path_factory.mktemp("seeing") / "seeing.onnx")["fp32"]


def test_eval_and_dagger_drive_a_seeing_policy(seeing_policy, tmp_path):
    """`gato-ros eval` and DAgger collection build the env the policy's spec needs (its cameras) and hand
    it only the keys it knows (the env also gives task_state, which the runtime refuses)."""
    from sim import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    out = tmp_path / "eval.json"
    args = parser.parse_args(["--policy", str(seeing_policy), "--episodes", "1", "--max-steps", "4", "--provider",
                              "cpu", "--json", str(out)])
    assert evaluate.run(args) == 0
    assert json.loads(out.read_text())["per_episode"][0]["steps"] == 4
    collect._worker.clear()
    collect._init_worker({"image_size": 64, "cameras": CAMERAS, "max_steps": 4}, str(seeing_policy), 0.0)
    job, episode, _ = collect._run_job(collect.Job(0, seed=9, noisy=False))
    assert episode.steps == 4 and {"camera_scene", "camera_wrist", "task_state"} <= episode.observations.keys()
    collect._worker.clear()


def test_fused_serving_graph_with_images_matches_the_plain_graph(tmp_path):
    """Image specs export the fused serving graph (patch network, fused attention, in-place ring) by
    default; over real camera frames and a ring that evicts, it gives the plain TorchScript graph's
    logits at every call of a step."""
    import onnx

    from gato_ros import contract
    from gato_ros.export import export

    spec = stacking_spec(64, privileged=False, cameras=("scene",))
    torch.manual_seed(0)
    config = GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=2 * tok.timestep_token_count(spec),
                        patch_channels=8)
    model = GatoModel(config).eval()
    fused = export(model, spec, tmp_path / "fused.onnx")["fp32"]
    plain = export(model, spec, tmp_path / "plain.onnx", attention="plain")["fp32"]
    layout = {p.key: p.value for p in onnx.load(str(fused), load_external_data=False).metadata_props}
    assert layout[contract.META_CACHE_LAYOUT] == contract.CACHE_LAYOUT_IN_PLACE
    env = StackingEnv(image_size=64, cameras=("scene",))
    obs, _ = env.reset(seed=4)
    runtimes = [RecordingRuntime(str(p), provider="cpu", threads=1) for p in (fused, plain)]
    for r in runtimes:
        r.calls = []
    for _ in range(5):  # 5 timesteps through a 2-timestep window
        observation = {o.name: obs[o.name] for o in spec.observations}
        tokens = [r.step_tokens(observation) for r in runtimes]
        assert np.array_equal(*tokens)
        obs, *_ = env.step(np.zeros(8))
    got, expected = (np.stack(r.calls) for r in runtimes)
    assert got.shape == expected.shape and got.shape[0] == 5 * spec.action_size
    assert np.abs(got - expected).max() <= 1e-4


def test_privileged_state_is_an_auxiliary_target_never_an_input(tmp_path):
    """`collect --aux-keys task_state` keeps the cube/hand state beside a seeing policy's observations;
    `train --aux-key` fits a head that predicts it (normalized) at each timestep's separator, adding its
    squared error to the action loss (linear beyond --aux-huber, so a far-off state cannot swamp the action
    loss); the exported file serves without it, from camera + joints alone."""
    import onnx

    from gato_ros.cli import main as cli_main
    from gato_ros.export import export
    from gato_ros.sequences import SequenceDataset
    from gato_ros.train import load_checkpoint

    parser = argparse.ArgumentParser()
    collect.add_arguments(parser)
    data_dir = tmp_path / "aux"
    args = parser.parse_args(["--episodes", "2", "--workers", "1", "--out", str(data_dir), "--seed", "5",
                              "--image-size", "64", "--cameras", "scene", "--no-task-state",
                              "--aux-keys", "task_state"])
    assert collect.run(args) == 0
    spec = stacking_spec(64, privileged=False, cameras=("scene",))
    data = read_dataset(data_dir, spec)
    assert "task_state" not in {o.name for o in data.spec.observations}
    meta = data.episodes[0]
    again = run_episode(StackingEnv(**env_overrides(spec)), ScriptedExpert(), meta["seed"], noisy=meta["noisy"])
    stored = data.aux_values(0, "task_state")
    np.testing.assert_array_equal(stored, again.observations["task_state"].astype(np.float32))

    step = tok.timestep_token_count(spec)
    item = SequenceDataset(data, seq_len=3 * step, stride_steps=1, aux_key="task_state", train=False)[2]
    separators = (item["input_ids"] == tok.SEPARATOR_TOKEN).numpy()
    assert separators.sum() == 3 and np.array_equal(item["aux_mask"].numpy(), separators)
    normalized = data.aux["task_state"].normalize(stored[2:5])
    np.testing.assert_array_equal(item["aux_targets"].numpy()[separators], normalized)

    out = tmp_path / "ckpt"
    assert cli_main(["train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--context-window",
                     str(2 * step), "--seq-len", str(3 * step), "--steps", "2", "--batch-size", "4", "--threads", "1",
                     "--val-fraction", "0", "--aux-key", "task_state", "--aux-weight", "0.5", "--no-progress"]) == 0
    model, config, _ = load_checkpoint(out)
    assert (config.aux_size, config.aux_weight, config.aux_huber) == (17, 0.5, 0.1)
    batch = {k: v.unsqueeze(0) for k, v in item.items()}
    far_off = dict(batch, aux_targets=batch["aux_targets"] + 50.0)  # a state far outside the data: the arm flung away
    with torch.no_grad():
        action_only = model.action_loss(**{k: v for k, v in batch.items() if not k.startswith("aux_")})
        with_aux, with_far_aux = model.action_loss(**batch), model.action_loss(**far_off)
        predicted = model.aux_head(model.hidden(batch["input_ids"], batch["position_ids"], batch["local_positions"],
                                                patches=batch["patches"], patch_positions=batch["patch_positions"])[0]
                                   [batch["aux_mask"]])
    error = (predicted - batch["aux_targets"][batch["aux_mask"]]).abs()
    squared_below_linear_above = torch.where(error <= 0.1, error ** 2, 0.2 * error - 0.01).mean()
    assert float(error.max()) > 0.1 and abs(float(with_aux - action_only - 0.5 * squared_below_linear_above)) < 1e-5
    # 50 normalization scales off adds ~0.5 * 0.2 * 50 = 5, not the squared error's ~0.5 * 2 500
    assert 4 < float(with_far_aux - action_only) < 6

    path = export(model, spec, tmp_path / "aux.onnx")["fp32"]  # parity-checked against torch
    assert not [t.name for t in onnx.load(str(path)).graph.initializer if "aux" in t.name]
    runtime = PolicyRuntime(str(path), provider="cpu", threads=1)
    obs, _ = StackingEnv(**env_overrides(spec)).reset(seed=5)
    assert runtime.step({o.name: obs[o.name] for o in spec.observations}).shape == (8,)


def test_checkpoint_recovered_from_a_seeing_int8_file_serves_as_the_file(tmp_path):
    """A seeing policy trained with an auxiliary head, shipped int8 (fused graph): the checkpoint recovered from
    the file has no aux head (training-only, never exported), and its fp32 export gives the file's logits over
    real frames, so a fine-tune can start from a shipped file."""
    from gato_ros.export import export
    from gato_ros.recover import recover_checkpoint
    from gato_ros.train import load_checkpoint

    spec = stacking_spec(64, privileged=False, cameras=("scene",))
    torch.manual_seed(0)
    config = GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=2 * tok.timestep_token_count(spec),
                        patch_channels=8, aux_size=17)
    model = GatoModel(config).eval()
    with torch.no_grad():  # distinct values everywhere, as after training (the exporter merges equal tensors)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    shipped = export(model, spec, tmp_path / "shipped" / "see.onnx", ("int8",))["int8"]
    again, _, _ = load_checkpoint(recover_checkpoint(shipped, tmp_path / "recovered"))
    assert again.aux_head is None and again.config.aux_size == 0
    served = export(again, spec, tmp_path / "again" / "see.onnx")["fp32"]
    env = StackingEnv(image_size=64, cameras=("scene",))
    obs, _ = env.reset(seed=5)
    runtimes = [RecordingRuntime(str(p), provider="cpu", threads=1) for p in (shipped, served)]
    for r in runtimes:
        r.calls = []
    for _ in range(4):  # through a 2-timestep window: the ring evicts
        observation = {o.name: obs[o.name] for o in spec.observations}
        assert np.array_equal(*(r.step_tokens(observation) for r in runtimes))
        obs, *_ = env.step(np.zeros(8))
    got, expected = (np.stack(r.calls) for r in runtimes)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-3
