"""int8 that keeps fp32's choices, and the checkpoint recovered from an int8 file.

A small random-init model (2 layers, d=32) goes through the path the shipped policy took: an int8 file with
MatMulInteger blocks (the TorchScript graph), a checkpoint recovered from it, and that checkpoint's fused
fp32 and int8 files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from gato_ros.contract import GatoConfig
from gato_ros.export import builtin_spec, export
from gato_ros.model import GatoModel
from gato_ros.recover import RecoveryError, recover_checkpoint
from gato_ros.runtime import PolicyRuntime
from gato_ros.train import load_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    torch.manual_seed(0)
    config = GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=64, patch_channels=8)
    model, spec = GatoModel(config).eval(), builtin_spec()
    with torch.no_grad():  # distinct values everywhere, as after training (the exporter merges equal tensors)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tmp = tmp_path_factory.mktemp("quantize")
    source = export(model, spec, tmp / "source" / "policy.onnx", ("int8-dynamic",), attention="plain")
    checkpoint = recover_checkpoint(source["int8-dynamic"], tmp / "checkpoint")
    again, _, _ = load_checkpoint(checkpoint)
    plain = export(again, spec, tmp / "again" / "policy.onnx", ("int8-dynamic",), attention="plain")
    fused = export(again, spec, tmp / "fused" / "policy.onnx", ("int8",))
    return model, again, source, plain, fused


def int8_weights(path) -> dict[str, np.ndarray]:
    """Each MatMulInteger's int8 weight and per-channel scale, keyed by the node name."""
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if n.op_type == "MatMulInteger":
            stem = n.input[1].removesuffix("_quantized")
            out[n.name] = (inits[n.input[1]], inits[stem + "_scale"])
    return out


def test_recovered_checkpoint_holds_the_int8_files_weights(recovered) -> None:
    """Re-quantizing the recovered checkpoint gives the int8 file it came from: the same int8 tensors and
    the same scales (to float rounding), node for node."""
    _, _, source, plain, _ = recovered
    before, after = int8_weights(source["int8-dynamic"]), int8_weights(plain["int8-dynamic"])
    assert sorted(before) == sorted(after) and len(before) == 4 * 2
    for name, (q, scale) in before.items():
        assert np.array_equal(q, after[name][0]), name
        np.testing.assert_allclose(scale, after[name][1], rtol=1e-6)


def test_recovered_checkpoint_keeps_unquantized_weights_exactly(recovered) -> None:
    model, again, _, _, _ = recovered
    original, got = model.state_dict(), again.state_dict()
    for key in ("local_positions.weight", "values.proj.weight", "blocks.1.ln2.bias", "ln_f.weight"):
        assert torch.equal(original[key], got[key]), key
    # The token table's action rows are fp32 in the file; its text rows are int8 per row.
    actions = slice(32000, 33027)
    assert torch.equal(original["tokens.weight"][actions], got["tokens.weight"][actions])
    text = (original["tokens.weight"][1024:32000] - got["tokens.weight"][1024:32000]).abs()
    assert 0 < text.max() <= original["tokens.weight"][1024:32000].abs().max() / 254 + 1e-7


def test_int8_of_int8_representable_weights_decides_as_fp32(recovered) -> None:
    """The int8 variant stores int8 weights and computes in fp32: on weights that are int8 already (the
    recovered model, like the shipped one), its logits are fp32's and every greedy choice is the same."""
    _, _, _, _, fused = recovered
    spec = builtin_spec()
    fp32 = PolicyRuntime(str(fused["fp32"]), provider="cpu", threads=1)
    int8 = PolicyRuntime(str(fused["int8"]), provider="cpu", threads=1)
    rng = np.random.default_rng(3)
    for _ in range(12):
        obs = {o.name: rng.normal(size=o.shape) for o in spec.observations}
        a, b = fp32.step_tokens(obs), int8.step_tokens(obs)
        assert np.array_equal(a, b)
        assert np.abs(fp32._logits - int8._logits).max() < 1e-5
    assert fused["int8"].stat().st_size < 0.5 * fused["fp32"].stat().st_size


def test_a_fused_int8_file_recovers_to_the_weights_it_was_exported_from(tmp_path, recovered) -> None:
    """The fused graph folds 1/sqrt(head_dim) into q, appends rotate-half columns and merges the value embedding
    into its input table; recovery undoes each (the source's weights are int8-representable: exact up to rounding)."""
    _, again, _, _, fused = recovered
    model, _, _ = load_checkpoint(recover_checkpoint(fused["int8"], tmp_path / "from_fused"))
    theirs = again.state_dict()
    for name, value in model.state_dict().items():
        assert torch.allclose(value, theirs[name], atol=1e-5), name


def test_recovery_refuses_a_file_it_cannot_map(tmp_path, recovered) -> None:
    _, _, source, _, _ = recovered
    proto = onnx.load(str(source["int8-dynamic"]))
    for node in proto.graph.node:  # a graph whose layers are not named as the exporter names them
        node.name = node.name.replace("qkv", "mixer")
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    with pytest.raises(RecoveryError, match="cannot find|matches no|has shape"):
        recover_checkpoint(tmp_path / "renamed.onnx", tmp_path / "from_renamed")


def test_the_shipped_policy_is_recovered_exactly(tmp_path) -> None:
    """models/stack_int8.onnx (fused attention: q pre-scaled, rotate-half columns; the value embedding merged into
    its input table) recovers to a checkpoint whose own export chooses the shipped file's tokens at every step of the
    recorded reference episodes: the starting point of a fine-tune (the generalist's recipe) is the shipped policy."""
    from gato_ros.runtime import teacher_forced_tokens

    models = Path(__file__).parents[1] / "models"
    checkpoint = recover_checkpoint(models / "stack_int8.onnx", tmp_path / "recovered")
    model, _, spec = load_checkpoint(checkpoint)
    path = export(model, spec, tmp_path / "recovered.onnx", ("fp32",), check=False)["fp32"]
    reference = dict(np.load(models / "stack_fp32_reference.npz"))
    shipped, _ = teacher_forced_tokens(PolicyRuntime(models / "stack_int8.onnx", provider="cpu", threads=1), reference)
    again, _ = teacher_forced_tokens(PolicyRuntime(path, provider="cpu", threads=1), reference)
    assert shipped.shape[0] > 100 and np.array_equal(shipped, again)
