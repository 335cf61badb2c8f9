"""PolicyRuntime: errors a caller can act on, provider choice, cache paths, reset/prompt, no torch."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.export import builtin_spec, export
from gato_ros.model import GatoConfig, GatoModel
from gato_ros.runtime import (
    ModelLoadError,
    ModelRuntimeError,
    NonFiniteLogitsError,
    ObservationError,
    PolicyRuntime,
    cuda_device_count,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    model = GatoModel(GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=64)).eval()
    return str(export(model, builtin_spec(), tmp_path_factory.mktemp("rt") / "policy.onnx")["fp32"])


@pytest.fixture(scope="module")
def context_runtime(tmp_path_factory):
    """A random model whose actions depend on its context: block weights 4x the init's (at std 0.02 attention is
    nearly uniform and a random model answers every context alike)."""
    torch.manual_seed(0)
    model = GatoModel(GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=128)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                p.mul_(4.0)
    path = export(model, builtin_spec(), tmp_path_factory.mktemp("ctx") / "policy.onnx", check=False)["fp32"]
    return PolicyRuntime(str(path), provider="cpu", threads=1)


@pytest.fixture(scope="module")
def runtime(model_path):
    return PolicyRuntime(model_path, provider="cpu", threads=1)


def observations(spec, n, seed=0):
    rng = np.random.default_rng(seed)
    return [{o.name: rng.normal(size=o.shape) for o in spec.observations} for _ in range(n)]


def test_step_returns_finite_command_within_limits(runtime):
    spec = runtime.spec
    runtime.reset()
    for obs in observations(spec, 20):
        action = runtime.step(obs)
        assert action.dtype == np.float64 and action.shape == (spec.action_size,)
        assert np.all(np.isfinite(action))
        assert np.all(np.abs(action) <= np.array(spec.action_limits))
        assert action[-1] in (15.0, -15.0)  # the gripper is one of its discrete values
    assert runtime.last_step_ms > 0 and runtime.provider == "cpu"


def test_ring_buffer_is_fixed_and_positions_stay_absolute(runtime):
    runtime.reset()
    cache_ids = [id(c) for c in runtime.cache]
    for obs in observations(runtime.spec, 10):  # 10 x 42 tokens through a 64-slot ring
        runtime.step(obs)
    # an in-place ring keeps room for one call's tokens beyond the capacity (the model sees the newest 64 only)
    assert [id(c) for c in runtime.cache] == cache_ids and runtime.cache[0].shape[2] == 64 + runtime.max_call_tokens
    held = np.sort(runtime.past_positions[0][runtime.past_positions[0] != runtime.info.empty_position])
    assert np.array_equal(held, np.arange(runtime.position - 64, runtime.position))  # the newest 64


def test_reset_forgets_and_is_deterministic(runtime):
    episode = observations(runtime.spec, 5)
    runtime.reset()
    first = [runtime.step(o) for o in episode]
    runtime.reset()
    second = [runtime.step(o) for o in episode]
    assert np.array_equal(np.array(first), np.array(second))
    assert runtime.position > 0
    runtime.reset()
    assert runtime.position == 0 and np.all(runtime.past_positions == runtime.info.empty_position)


def demonstration(spec, steps: int, seed: int) -> dict[str, np.ndarray]:
    """One recorded episode (observations and torques, gripper closing halfway) as a prompt or dataset holds it."""
    demo = observations(spec, steps, seed=seed)
    rng = np.random.default_rng(seed)
    torques = rng.normal(scale=5.0, size=(steps, spec.action_size - 1))
    gripper = np.where(np.arange(steps) < steps // 2, 15.0, -15.0)[:, None]
    return {"observations": {k: np.stack([o[k] for o in demo]) for k in demo[0]},
            "actions": np.concatenate([torques, gripper], axis=1)}


def test_prompt_preloads_the_context_and_changes_the_action(context_runtime):
    runtime = context_runtime
    spec = runtime.spec
    prompt = demonstration(spec, 2, seed=3)
    episode = observations(spec, 4, seed=4)
    runtime.reset()
    plain = np.array([runtime.step_tokens(o) for o in episode])
    runtime.reset(prompt)
    assert runtime.position == 2 * tok.timestep_token_count(spec)
    prompted = np.array([runtime.step_tokens(o) for o in episode])
    assert (prompted != plain).any(), "the prompt in the context had no effect on any action token"
    runtime.reset(demonstration(spec, 2, seed=5))
    assert (np.array([runtime.step_tokens(o) for o in episode]) != prompted).any(), "another prompt, same actions"


def test_runtime_prompt_lays_out_tokens_as_training_does(tmp_path, runtime):
    """The stream the runtime feeds for reset(prompt) + steps is, token for token, the training window that starts
    with the same demonstration as prompt: ids, local positions and positions."""
    from gato_ros.data import EpisodeWriter, read_dataset
    from gato_ros.sequences import SequenceDataset

    spec, prompt_steps, steps = runtime.spec, 2, 2
    per_step = tok.timestep_token_count(spec)
    prompt, episode = demonstration(spec, prompt_steps, seed=6), demonstration(spec, steps, seed=7)
    with EpisodeWriter(tmp_path / "data", spec) as writer:
        for e in (prompt, episode):
            writer.add_episode(e["observations"], e["actions"], {})
    stored = read_dataset(tmp_path / "data")
    windows = SequenceDataset(stored, (prompt_steps + steps) * per_step, prompt_prob=1.0,
                              prompt_tokens=prompt_steps * per_step, train=False,
                              observation_local_positions_only=runtime.info.config.observation_local_positions_only)
    window = windows[windows.index.index((1, 0))]  # episode 1 from its start, prompted with episode 0

    fed: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    forward = runtime.forward

    def recording_forward(ids, local, *rest):
        fed.append((np.array(ids), np.array(local), runtime.position + np.arange(len(ids))))
        return forward(ids, local, *rest)

    runtime.forward = recording_forward
    try:
        stored_prompt, stored_episode = stored.episode(0), stored.episode(1)
        runtime.reset({"observations": stored_prompt[0], "actions": stored_prompt[1]})
        for t in range(steps):
            obs = {k: v[t] for k, v in stored_episode[0].items()}
            runtime.step_tokens(obs, teacher=tok.tokenize_action(spec, stored_episode[1][t]))
    finally:
        del runtime.forward
    ids, local, positions = (np.concatenate(parts) for parts in zip(*fed, strict=True))
    n = len(ids)
    assert n == (prompt_steps + steps) * per_step - 1  # the last action token waits for the next tick
    assert np.array_equal(ids, window["input_ids"][:n].numpy())
    assert np.array_equal(local, window["local_positions"][:n].numpy())
    assert np.array_equal(positions, window["position_ids"][:n].numpy())
    assert window["loss_mask"][: prompt_steps * per_step - 1].sum() == 0  # no loss on the prompt


def test_device_cache_path_matches_host_path(model_path, runtime):
    """The IOBinding + on-device scatter path (used on CUDA) run on the CPU provider."""
    device = PolicyRuntime(model_path, provider="cpu", threads=1, device_cache=True)
    episode = observations(runtime.spec, 8, seed=5)
    runtime.reset()
    host = [runtime.step_tokens(o) for o in episode]
    dev = [device.step_tokens(o) for o in episode]
    assert np.array_equal(np.array(host), np.array(dev))


def test_temperature_sampling_is_seeded_and_in_range(model_path):
    a = PolicyRuntime(model_path, provider="cpu", temperature=1.0, seed=7, threads=1)
    b = PolicyRuntime(model_path, provider="cpu", temperature=1.0, seed=7, threads=1)
    episode = observations(a.spec, 4)
    ta, tb = [a.step_tokens(o) for o in episode], [b.step_tokens(o) for o in episode]
    assert np.array_equal(np.array(ta), np.array(tb))
    for tokens in ta:
        for i, t in enumerate(tokens):
            lo, hi = tok.action_token_range(a.spec, i)
            assert lo <= t < hi


@pytest.mark.parametrize(
    "change",
    ["missing", "extra", "shape", "dtype", "nan", "inf"],
)
def test_bad_observations_raise_observation_error(runtime, change):
    obs = observations(runtime.spec, 1)[0]
    if change == "missing":
        del obs["joint_velocities"]
    elif change == "extra":
        obs["unknown"] = np.zeros(3)
    elif change == "shape":
        obs["joint_positions"] = np.zeros(7)
    elif change == "dtype":
        obs["task_state"] = np.array(["a"] * 17)
    elif change == "nan":
        obs["joint_positions"][2] = np.nan
    else:
        obs["joint_velocities"][0] = np.inf
    position = runtime.position
    with pytest.raises(ObservationError):
        runtime.step(obs)
    assert runtime.position == position  # a rejected observation leaves the context untouched


def test_missing_corrupt_and_mismatched_files(tmp_path, model_path):
    with pytest.raises(ModelLoadError, match="not found"):
        PolicyRuntime(str(tmp_path / "nope.onnx"))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 100)
    with pytest.raises(ModelLoadError, match="cannot load"):
        PolicyRuntime(str(corrupt), provider="cpu")
    proto = onnx.load(model_path)
    plain = tmp_path / "plain.onnx"
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.metadata_props[:]
    onnx.save(bare, str(plain))
    with pytest.raises(ModelLoadError, match="not a gato_ros policy"):
        PolicyRuntime(str(plain), provider="cpu")
    other = tmp_path / "other_tokenizer.onnx"
    for p in proto.metadata_props:
        if p.key == "gato_ros.tokenizer":
            p.value = p.value.replace('"NUM_BINS": 1024', '"NUM_BINS": 512')
    onnx.save(proto, str(other))
    with pytest.raises(ModelLoadError, match="tokenizer constants"):
        PolicyRuntime(str(other), provider="cpu")
    wrong_graph = tmp_path / "wrong_graph.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    wrong = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    wrong.ir_version = 8
    for p in onnx.load(model_path).metadata_props:  # valid gato_ros metadata on the wrong graph
        wrong.metadata_props.add(key=p.key, value=p.value)
    onnx.save(wrong, str(wrong_graph))
    with pytest.raises(ModelLoadError, match="signature"):
        PolicyRuntime(str(wrong_graph), provider="cpu")


def test_runtime_imports_and_runs_without_torch(model_path):
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['rclpy'] = None\n"
        "import numpy as np\n"
        "from gato_ros.runtime import PolicyRuntime\n"
        f"rt = PolicyRuntime({model_path!r}, provider='auto', threads=1)\n"
        "obs = rt.zero_observation()\n"
        "a = rt.step(obs)\n"
        "assert np.all(np.isfinite(a))\n"
        "print('provider', rt.provider)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert out.returncode == 0, out.stderr
    if cuda_device_count() == 0:
        # onnxruntime-gpu lists CUDA/TensorRT here, but "auto" must settle on CPU without noise.
        assert "provider cpu" in out.stdout
        assert "error" not in out.stderr.lower(), out.stderr


@pytest.mark.slow
def test_memory_flat_over_1e5_steps(model_path):
    rt = PolicyRuntime(model_path, provider="cpu", threads=1)
    obs = observations(rt.spec, 1)[0]

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    for _ in range(2000):
        rt.step(obs)
    before = rss_mib()
    for _ in range(100_000 - 2000):
        rt.step(obs)
    after = rss_mib()
    print(f"RSS {before:.1f} -> {after:.1f} MiB over 1e5 steps (peak {resource.getrusage(0).ru_maxrss / 1024:.1f})")
    assert after - before < 20.0
    assert rt.position == 100_000 * tok.timestep_token_count(rt.spec) - 1  # last action token pending


def with_metadata(src: str, dst, **changes: str):
    """A copy of the model file at `dst` with metadata keys set (a value of None removes the key)."""
    proto = onnx.load(src)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(changes)
    del proto.metadata_props[:]
    for k, v in props.items():
        if v is not None:
            proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(dst))
    return str(dst)


def test_non_finite_logits_raise_instead_of_choosing_bin_zero(tmp_path):
    """NaN logits must not become a command: argmax over NaN is bin 0, every joint at -limit."""
    torch.manual_seed(0)
    model = GatoModel(GatoConfig(n_layer=1, n_embd=32, n_head=2, n_ff=64, context_window=64)).eval()
    with torch.no_grad():
        model.ln_f.weight.fill_(float("nan"))
    path = export(model, builtin_spec(), tmp_path / "nan.onnx", check=False)["fp32"]
    rt = PolicyRuntime(str(path), provider="cpu", threads=1, warmup=False)
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits") as caught:
        rt.step(rt.zero_observation())
    assert isinstance(caught.value, ModelRuntimeError)


def test_cache_capacity_must_be_the_trained_window(tmp_path, model_path):
    """The fixture's model was trained (exported) with a 64-token window: 43 or 5000 slots would serve it a
    context it never saw, unless the file declares it was trained for that capacity."""
    for capacity in (43, 5000):
        with pytest.raises(ModelLoadError, match="context_window=64"):
            PolicyRuntime(model_path, provider="cpu", context_tokens=capacity, threads=1, warmup=False)
    assert PolicyRuntime(model_path, provider="cpu", context_tokens=64, threads=1, warmup=False).capacity == 64
    declared = with_metadata(model_path, tmp_path / "declared.onnx", **{contract.META_TRAINED_CAPACITIES: "[43]"})
    assert PolicyRuntime(declared, provider="cpu", context_tokens=43, threads=1, warmup=False).capacity == 43
    with pytest.raises(ModelLoadError, match="context_window=64"):
        PolicyRuntime(declared, provider="cpu", context_tokens=44, threads=1, warmup=False)


def test_export_writes_declared_capacities_and_refuses_undeclared_ones(tmp_path):
    torch.manual_seed(0)
    model = GatoModel(GatoConfig(n_layer=1, n_embd=32, n_head=2, n_ff=64, context_window=64)).eval()
    with pytest.raises(ValueError, match="context_window=64"):
        export(model, builtin_spec(), tmp_path / "a.onnx", context=43, check=False)
    path = export(model, builtin_spec(), tmp_path / "b.onnx", context=43, trained_capacities=(43, 96), check=False)
    rt = PolicyRuntime(str(path["fp32"]), provider="cpu", threads=1, warmup=False)
    assert rt.capacity == 43 and rt.info.trained_capacities == (43, 96)
    assert PolicyRuntime(str(path["fp32"]), provider="cpu", context_tokens=64, threads=1, warmup=False).capacity == 64


@pytest.mark.parametrize("field", ["window", "tokenizer", "cache names"])
def test_a_file_that_disagrees_with_the_runtime_is_refused_naming_the_field(tmp_path, model_path, field):
    if field == "window":  # the default capacity the file names is not the window its config was trained with
        bad = with_metadata(model_path, tmp_path / "window.onnx", **{contract.META_CONTEXT_TOKENS: "48"})
        named = "gato_ros.context_tokens=48"
    elif field == "tokenizer":
        constants = {**contract.tokenizer_constants(), "SEPARATOR_TOKEN": 40000}
        bad = with_metadata(model_path, tmp_path / "tok.onnx", **{contract.META_TOKENIZER: json.dumps(constants)})
        named = "SEPARATOR_TOKEN"
    else:  # a graph whose cache inputs are named another way than the contract's
        proto = onnx.load(model_path)
        old, new = contract.past_value_name(1), "past.1.v"
        next(i for i in proto.graph.input if i.name == old).name = new
        for node in proto.graph.node:
            node.input[:] = [new if i == old else i for i in node.input]
        onnx.save(proto, str(tmp_path / "names.onnx"))
        bad, named = str(tmp_path / "names.onnx"), old
    with pytest.raises(ModelLoadError, match=re.escape(named)):
        PolicyRuntime(bad, provider="cpu", threads=1, warmup=False)


def test_partial_teacher_feeds_the_chosen_tokens_where_it_has_none(model_path, runtime):
    """`step_tokens(teacher=...)` with -1 entries: the context holds the teacher's tokens where given and the chosen
    ones elsewhere, as a full teacher of those same tokens would (scripts/seeing_phases.py --expert-on)."""
    episode = observations(runtime.spec, 8, seed=11)
    rng = np.random.default_rng(3)
    A = runtime.spec.action_size
    partial = []
    for _ in episode:
        t = np.full(A, -1, np.int64)
        t[:3] = [int(rng.integers(*tok.action_token_range(runtime.spec, i))) for i in range(3)]
        partial.append(t)
    runtime.reset()
    chosen = [runtime.step_tokens(o, teacher=t) for o, t in zip(episode, partial, strict=True)]
    full = [np.where(t >= 0, t, c) for t, c in zip(partial, chosen, strict=True)]
    other = PolicyRuntime(model_path, provider="cpu", threads=1)
    again = [other.step_tokens(o, teacher=f) for o, f in zip(episode, full, strict=True)]
    assert np.array_equal(np.array(chosen), np.array(again))
    other.reset()
    free = [other.step_tokens(o) for o in episode]
    assert not np.array_equal(np.array(chosen)[:, 3:], np.array(free)[:, 3:]), "the teacher's tokens steered the rest"
