"""Export: the ONNX file's contract, parity with torch, the rolling cache, and the quantized variants.

Small random-init models (2 layers, d=32, window 64/96) keep the suite fast on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from gato_ros import tokenizer as tok
from gato_ros.export import action_vocab, builtin_spec, export, io_names
from gato_ros.model import EMPTY_POSITION, GatoConfig, GatoModel
from gato_ros.runtime import ModelLoadError, PolicyRuntime

torch.set_num_threads(1)


def small_model(window: int) -> GatoModel:
    torch.manual_seed(0)
    config = GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=window, patch_channels=8)
    return GatoModel(config).eval()


@pytest.fixture(scope="module")
def state_export(tmp_path_factory):
    model, spec = small_model(64), builtin_spec()
    paths = export(model, spec, tmp_path_factory.mktemp("state") / "policy.onnx",
                   ("int8", "int8-dynamic", "int4", "fp16"))
    return model, spec, paths


# The serving head's ids for the builtin spec: the gripper's 2 discrete values and the 1024 continuous bins.
ACTION_IDS = np.r_[0:2, tok.CONTINUOUS_OFFSET:tok.CONTINUOUS_OFFSET + tok.NUM_BINS]


@pytest.fixture(scope="module")
def full_head_export(tmp_path_factory):
    model, spec = small_model(64), builtin_spec()
    paths = export(model, spec, tmp_path_factory.mktemp("full") / "policy.onnx", ("int8",), full_vocab_head=True)
    return model, spec, paths


@pytest.fixture(scope="module")
def image_export(tmp_path_factory):
    model, spec = small_model(96), builtin_spec(images=True)
    return model, spec, export(model, spec, tmp_path_factory.mktemp("image") / "policy.onnx")


def random_observation(spec, rng):
    return {o.name: rng.integers(0, 256, o.shape).astype(np.uint8) if o.kind == "image" else rng.normal(size=o.shape)
            for o in spec.observations}


def test_file_contract(state_export, image_export):
    for model, spec, paths in (state_export, image_export):
        proto = onnx.load(str(paths["fp32"]))
        onnx.checker.check_model(proto)
        assert proto.opset_import[0].version >= 17
        inputs, outputs = io_names(model.config.n_layer, bool(spec.image_keys))
        assert [i.name for i in proto.graph.input] == inputs
        assert [o.name for o in proto.graph.output] == outputs
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        assert dims["input_ids"] == ["batch", "sequence"]
        assert dims["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]
        meta = {p.key: p.value for p in proto.metadata_props}
        assert GatoConfig.from_json(meta["gato_ros.config"]) == model.config
        assert meta["gato_ros.spec"] == spec.to_json()
        assert json.loads(meta["gato_ros.tokenizer"])["VOCAB_SIZE"] == tok.VOCAB_SIZE
        assert int(meta["gato_ros.context_tokens"]) == model.config.context_window
        assert meta["gato_ros.variant"] == "fp32"
        # The head scores the action vocabulary only, and the file says which ids its columns are.
        assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == \
            ["batch", 1, len(ACTION_IDS)]
        assert json.loads(meta["gato_ros.logit_ids"]) == [[0, 2], [tok.CONTINUOUS_OFFSET, tok.CONTINUOUS_OFFSET + 1024]]
    for variant, path in state_export[2].items():
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta["gato_ros.variant"] == variant
        assert "gato_ros.logit_ids" in meta


def test_action_vocab_is_the_union_of_action_ranges():
    from gato_ros.spec import ActionSpec, EmbodimentSpec, ObservationSpec

    assert action_vocab(builtin_spec()) == [(0, 2), (tok.CONTINUOUS_OFFSET, tok.CONTINUOUS_OFFSET + tok.NUM_BINS)]
    spec = EmbodimentSpec("d", (ObservationSpec("x", (2,)),),
                          (ActionSpec("a", kind="discrete", values=(1.0, 2.0, 3.0)),
                           ActionSpec("b", kind="discrete", values=(1.0, 2.0))), 10.0, ("a", "b"))
    assert action_vocab(spec) == [(0, 3)]


def test_full_vocab_head_option(full_head_export, state_export):
    """`--full-vocab-head`: logits over all 33k tokens, no logit_ids; the runtime serves both kinds of
    file and chooses the same tokens from them (the restricted head is the same columns)."""
    model, spec, paths = full_head_export
    for path in paths.values():
        proto = onnx.load(str(path))
        assert proto.graph.output[0].type.tensor_type.shape.dim[2].dim_value == tok.VOCAB_SIZE
        assert "gato_ros.logit_ids" not in {p.key for p in proto.metadata_props}
    rng = np.random.default_rng(4)
    episode = [random_observation(spec, rng) for _ in range(6)]
    for variant in ("fp32", "int8"):
        full = PolicyRuntime(str(paths[variant]), provider="cpu", threads=1)
        action = PolicyRuntime(str(state_export[2][variant]), provider="cpu", threads=1)
        assert full.info.logit_ids is None and len(action.info.logit_ids) == len(ACTION_IDS)
        assert np.array_equal(np.array([full.step_tokens(o) for o in episode]),
                              np.array([action.step_tokens(o) for o in episode]))


def test_runtime_refuses_a_head_that_misses_action_tokens(state_export, tmp_path):
    _, _, paths = state_export
    proto = onnx.load(str(paths["fp32"]))
    for p in proto.metadata_props:
        if p.key == "gato_ros.logit_ids":
            p.value = json.dumps([[0, 1], [tok.CONTINUOUS_OFFSET, tok.CONTINUOUS_OFFSET + 1025]])  # gripper id 1 gone
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelLoadError, match="do not cover"):
        PolicyRuntime(str(tmp_path / "bad.onnx"), provider="cpu", threads=1)


def test_int4_uses_matmulnbits_and_int8_is_quantized(state_export):
    model, _, paths = state_export
    ops = {v: {n.op_type for n in onnx.load(str(p)).graph.node} for v, p in paths.items()}
    assert "MatMulNBits" in ops["int4"]
    dynamic = onnx.load(str(paths["int8-dynamic"]))
    weights = {i.name: i for i in dynamic.graph.initializer}
    # int8-dynamic: int8 compute in the blocks: every qkv / attention-output / MLP projection is a
    # MatMulInteger on an int8 weight, its activation quantized per call.
    integer = [n for n in dynamic.graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == 4 * model.config.n_layer
    assert all(n.name.startswith("/blocks.") and weights[n.input[1]].data_type == onnx.TensorProto.INT8
               for n in integer)
    assert {n.input[0] for n in integer} <= {o for n in dynamic.graph.node if n.op_type == "DynamicQuantizeLinear"
                                             for o in n.output}
    # int8: the same projections stored int8 (rebuilt to fp32 at load), fp32 compute.
    proto = onnx.load(str(paths["int8"]))
    int8 = {i.name: i for i in proto.graph.initializer}
    assert "MatMulInteger" not in ops["int8"]
    projections = [n for n in proto.graph.node if n.op_type == "MatMul" and n.name.startswith("/blocks.")
                   and n.name.endswith(("qkv/MatMul", "proj/MatMul", "fc/MatMul"))]
    assert len(projections) == 4 * model.config.n_layer
    assert all(int8[n.input[1] + "_int8"].data_type == onnx.TensorProto.INT8 for n in projections)
    # The head stays a full-precision Gemm over the action rows of the tied table, whose text rows are
    # stored as int8.
    head = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert len(head) == 1 and head[0].input[1] == "logit_table"
    assert int8["logit_table"].data_type == onnx.TensorProto.FLOAT
    assert list(int8["logit_table"].dims) == [len(ACTION_IDS), model.config.n_embd]
    table = int8["model.tokens.weight.text_int8"]
    assert table.data_type == onnx.TensorProto.INT8
    assert list(table.dims) == [tok.CONTINUOUS_OFFSET - tok.DISCRETE_RANGE, model.config.n_embd]
    assert int8["model.tokens.weight.actions"].data_type == onnx.TensorProto.FLOAT
    assert paths["int8"].stat().st_size < 0.5 * paths["fp32"].stat().st_size


@pytest.mark.parametrize("which", ["action", "full"])
def test_token_table_is_stored_once(which, state_export, full_head_export):
    """One vocabulary-sized table, no transposed copy of it beside it. The full-vocabulary head shares it with
    the input Gather; the serving head stores its 1026 action rows (`logit_table`, a 3 % copy)."""
    model, _, paths = state_export if which == "action" else full_head_export
    proto = onnx.load(str(paths["fp32"]))
    tables = [i.name for i in proto.graph.initializer if tok.VOCAB_SIZE in i.dims]
    assert tables == ["model.tokens.weight"]
    readers = [n for n in proto.graph.node if tables[0] in n.input]
    if which == "full":
        assert sorted(n.op_type for n in readers) == ["Gather", "Gemm"]
    else:
        assert [n.op_type for n in readers] == ["Gather"]
        head = next(i for i in proto.graph.initializer if i.name == "logit_table")
        assert np.array_equal(onnx.numpy_helper.to_array(head), model.tokens.weight.detach().numpy()[ACTION_IDS])
    assert paths["fp32"].stat().st_size < 1.3 * 4 * model.num_params()


def test_one_graph_serves_prefill_and_decode_with_empty_cache(state_export):
    """A fresh run (a ring of empty slots; an in-place ring needs room for the new tokens, a plain one may have
    0 slots) and a partly empty ring must both match torch."""
    import onnxruntime as ort

    model, spec, paths = state_export
    session = ort.InferenceSession(str(paths["fp32"]), providers=["CPUExecutionProvider"])
    names, _ = io_names(model.config.n_layer, False)
    ids = torch.tensor([[32100, 32500, 32900, tok.SEPARATOR_TOKEN]])
    for cache in (len(ids[0]), 9):
        kv = [torch.randn(1, 2, cache, 16) for _ in range(4)]
        past_positions = torch.full((1, cache), EMPTY_POSITION)
        args = [ids, torch.arange(4).unsqueeze(0) + 3, torch.arange(4).unsqueeze(0), past_positions, *kv]
        with torch.no_grad():
            logits, _ = model(*args[:3], [(kv[0], kv[1]), (kv[2], kv[3])], past_positions, last_only=True)
        got = session.run(["logits"], {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]
        assert got.shape == (1, 1, len(ACTION_IDS))
        assert np.abs(got - logits.numpy()[..., ACTION_IDS]).max() < 1e-4


@pytest.mark.parametrize("which", ["state", "image"])
def test_rolling_cache_equals_full_forward(which, state_export, image_export):
    """Runtime steps through the ring buffer (stream >= 3x the window) give the logits of one torch
    forward over the whole stream with the sliding-window mask, at every action decision."""
    model, spec, paths = state_export if which == "state" else image_export
    window = model.config.context_window
    rt = PolicyRuntime(str(paths["fp32"]), provider="cpu", threads=1)
    seen: list[np.ndarray] = []
    choose = rt._choose
    rt._choose = lambda logits, i: (seen.append(logits.copy()), choose(logits, i))[1]  # record each decision
    rng = np.random.default_rng(0)
    n_obs, A = tok.observation_token_count(spec), spec.action_size
    steps = -(-3 * window // (n_obs + A)) + 2
    ids, local, patches, patch_pos = [], [], [], []
    for _ in range(steps):
        obs = random_observation(spec, rng)
        ts = tok.tokenize_observation(spec, obs)
        actions = rt.step_tokens(obs)
        ids += [ts.tokens, actions]
        local.append(tok.timestep_local_positions(spec, model.config.observation_local_positions_only))
        full = np.zeros((n_obs + A, 3, 16, 16), np.float32)
        pos = np.zeros((n_obs + A, 2), np.int64)
        full[: n_obs][ts.tokens == tok.PATCH_TOKEN] = ts.patches
        pos[: n_obs][ts.tokens == tok.PATCH_TOKEN] = ts.patch_positions
        patches.append(full)
        patch_pos.append(pos)
    stream = np.concatenate(ids)
    assert len(stream) >= 3 * window and rt.position < len(stream)  # last action token still pending
    with torch.no_grad():
        logits, _ = model(
            torch.from_numpy(stream)[None],
            torch.arange(len(stream))[None],
            torch.from_numpy(np.concatenate(local))[None],
            patches=torch.from_numpy(np.concatenate(patches))[None] if spec.image_keys else None,
            patch_positions=torch.from_numpy(np.concatenate(patch_pos))[None] if spec.image_keys else None,
        )
    decisions = [t * (n_obs + A) + n_obs - 1 + i for t in range(steps) for i in range(A)]
    expected = logits[0, decisions].numpy()[:, ACTION_IDS]  # the serving head's columns
    diff = np.abs(np.stack(seen) - expected).max()
    print(f"{which}: {len(stream)} tokens, window {window}, max abs logit diff {diff:.2e}")
    assert diff < 1e-4


def test_quantized_variants_agree_with_fp32(state_export):
    """Teacher-forced on the fp32 run's tokens over a synthetic episode: each variant's action tokens
    and torques vs fp32. Random-init weights give flat logits (small argmax margins), so the bounds
    are loose; a trained model agrees better."""
    _, spec, paths = state_export
    rng = np.random.default_rng(1)
    episode = [random_observation(spec, rng) for _ in range(30)]
    ref = PolicyRuntime(str(paths["fp32"]), provider="cpu", threads=1)
    reference = np.array([ref.step_tokens(o) for o in episode])
    torques = np.array([tok.detokenize_action(spec, t) for t in reference])
    bounds = {"fp16": (0.95, 0.5), "int8": (0.9, 0.5), "int4": (0.6, 5.0)}
    for variant, (min_agreement, max_error) in bounds.items():
        rt = PolicyRuntime(str(paths[variant]), provider="cpu", threads=1)
        got = np.array([rt.step_tokens(o, teacher=t) for o, t in zip(episode, reference, strict=True)])
        agreement = float((got == reference).mean())
        error = np.abs(np.array([tok.detokenize_action(spec, t) for t in got]) - torques)[:, :7]
        print(f"{variant}: token agreement {agreement:.3f}, "
              f"torque error mean {error.mean():.3f} max {error.max():.2f} N·m")
        assert agreement >= min_agreement
        assert error.mean() <= max_error


def test_cli_exports_a_training_checkpoint(tmp_path):
    """`gato-ros export --checkpoint DIR` on the training stage's checkpoint format."""
    from gato_ros.cli import main
    from gato_ros.train import save_checkpoint

    model, spec = small_model(64), builtin_spec()
    save_checkpoint(tmp_path / "ckpt", model, spec, None, {"step": 1})
    out = tmp_path / "policy.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--variants", "int8"]) == 0
    rt = PolicyRuntime(str(out.with_name("policy.int8.onnx")), provider="cpu", threads=1)
    assert rt.spec == spec and rt.info.variant == "int8" and rt.capacity == 64


def downstream_of_positions(proto: onnx.ModelProto) -> list[str]:
    """Every tensor computed from `position_ids`: the rotary angles and cos/sin, the mask, what follows."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen: list[str] = []
    todo = ["position_ids"]
    while todo:
        for node in consumers.get(todo.pop(), []):
            for out in node.output:
                if out not in seen:
                    seen.append(out)
                    todo.append(out)
    return seen


@pytest.fixture(scope="module")
def plain_fp16_export(tmp_path_factory):
    """The TorchScript graph (`attention="plain"`, as image specs get) and its converter-made fp16 variant."""
    model, spec = small_model(64), builtin_spec()
    return model, spec, export(model, spec, tmp_path_factory.mktemp("plain") / "policy.onnx", ("fp16",),
                               attention="plain")


@pytest.mark.parametrize("graph", ["fused", "plain"])
def test_fp16_rotary_angles_stay_finite_past_65520(graph, state_export, plain_fp16_export):
    """The rotary phase runs to 65535; fp16 holds at most 65504 (65520 and up round to inf: NaN cos/sin).

    ONNX Runtime's CPU provider runs fp16 nodes in fp32 and drops the cast pair around them, which hides a
    fp16 phase; keeping every tensor on the position path alive as a graph output stops that, as a GPU
    provider computing in fp16 would."""
    import onnxruntime as ort

    model, _, paths = state_export if graph == "fused" else plain_fp16_export
    proto = onnx.load(str(paths["fp16"]))
    typed = {v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    proto.graph.output.extend(typed[t] for t in downstream_of_positions(proto) if t in typed)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names, _ = io_names(model.config.n_layer, False)
    seq, cache = 8, 24
    for start in (65500, 65512, 65528, 65536 * 3 - 8):  # the phase k * p mod 65536 passes 65520 for k = 1
        kv = [np.random.default_rng(start).normal(size=(1, 2, cache, 16)).astype(np.float16) for _ in range(4)]
        feed = dict(zip(names, [np.full((1, seq), tok.CONTINUOUS_OFFSET + 300), np.arange(start, start + seq)[None],
                                np.arange(seq)[None], np.arange(start - cache, start)[None], *kv], strict=True))
        logits = session.run(["logits"], feed)[0]
        assert np.isfinite(logits).all(), f"non-finite fp16 logits at positions {start}..{start + seq - 1}"
