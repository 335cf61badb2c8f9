"""The fused serving graph (gato_ros/attention_graph.py): what it is made of, and where it could go wrong.

Its exactness against torch (prefill, decode, empty and partly empty caches, the ring over 3 windows) is
tested in tests/test_export.py, which exports this graph by default.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from gato_ros import contract
from gato_ros.contract import GatoConfig
from gato_ros.export import builtin_spec, export, parity
from gato_ros.model import GatoModel
from gato_ros.runtime import PolicyRuntime

torch.set_num_threads(1)
PERIOD = 65536


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    config = GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=64, patch_channels=8)
    model, spec = GatoModel(config).eval(), builtin_spec()
    tmp = tmp_path_factory.mktemp("fused")
    fused = export(model, spec, tmp / "fused" / "policy.onnx", ("fp16",))
    plain = export(model, spec, tmp / "plain" / "policy.onnx", attention="plain")
    return model, spec, fused, plain


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_attention_is_one_fused_op_per_layer(exported) -> None:
    model, spec, fused, plain = exported
    for variant in ("fp32", "fp16"):
        found = ops(fused[variant])
        assert found.count("MultiHeadAttention") == model.config.n_layer
        assert "Softmax" not in found
        # the new keys/values are written into the ring in place: nothing copies the cache
        readers = [n.op_type for n in onnx.load(str(fused[variant])).graph.node
                   if any(contract.is_past_name(i) for i in n.input)]
        assert readers == ["ScatterElements"] * 2 * model.config.n_layer
    assert "MultiHeadAttention" not in ops(plain["fp32"]) and "Softmax" in ops(plain["fp32"])
    assert parity(model, spec, fused["fp32"]) < 1e-4 and parity(model, spec, plain["fp32"]) < 1e-4


def test_wide_model_rotates_with_nodes_and_matches_torch(tmp_path) -> None:
    """Above ROTATE_BY_MATMUL_MAX_WIDTH rotate_half is built from nodes instead of extra qkv columns: the
    export's parity check (prefill and decode, <= 1e-4 vs torch) holds for that path too."""
    from gato_ros.attention_graph import ROTATE_BY_MATMUL_MAX_WIDTH

    torch.manual_seed(0)
    config = GatoConfig(n_layer=1, n_embd=2 * ROTATE_BY_MATMUL_MAX_WIDTH, n_head=4, n_ff=64, context_window=64)
    model, spec = GatoModel(config).eval(), builtin_spec()
    path = export(model, spec, tmp_path / "wide.onnx", check=False)["fp32"]
    assert "Neg" in ops(path)
    assert parity(model, spec, path) < 1e-4


def run_from(path, start: int, steps: int, device_cache: bool = False, capacity: int | None = None) -> np.ndarray:
    """Logits of every action decision over `steps` steps starting at absolute position `start`."""
    runtime = PolicyRuntime(str(path), provider="cpu", threads=1, device_cache=device_cache, context_tokens=capacity)
    runtime.position = start
    seen = []
    choose = runtime._choose
    runtime._choose = lambda logits, i: (seen.append(logits.copy()), choose(logits, i))[1]
    rng = np.random.default_rng(7)
    for _ in range(steps):
        runtime.step_tokens({o.name: rng.normal(size=o.shape) for o in runtime.spec.observations})
    return np.stack(seen)


def test_fp16_rotary_stays_finite_across_the_period(exported) -> None:
    """Positions run through 65 536 (the rotary period): an fp16 phase overflows to inf from 65 520 and turns
    cos/sin into NaN. The fp16 file keeps the phases in fp32 and follows the fp32 file there."""
    _, spec, fused, _ = exported
    start = PERIOD - 3 * 42
    half, full = run_from(fused["fp16"], start, 6), run_from(fused["fp32"], start, 6)
    assert np.isfinite(half).all()
    assert np.abs(half - full).max() < 0.05
    # and the period is exact: the same context shifted by a whole period decides the same
    np.testing.assert_allclose(run_from(fused["fp32"], start - PERIOD, 6), full, atol=1e-4)


def test_masked_slots_hide_whatever_memory_they_hold(tmp_path) -> None:
    """On the device-cache path the ring lives in ORT-allocated memory; its empty slots must not reach the
    logits (an additive mask cannot hide NaN left in that memory: the runtime zero-fills the ring). A ring of
    1024 slots, large enough for the allocator to hand out reused memory."""
    torch.manual_seed(0)
    model = GatoModel(GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=1024)).eval()
    path = export(model, builtin_spec(), tmp_path / "policy.onnx", check=False)["fp32"]
    host, device = run_from(path, 0, 3), run_from(path, 0, 3, device_cache=True)
    assert np.isfinite(device).all()
    np.testing.assert_allclose(device, host, atol=1e-5)


@pytest.mark.parametrize("capacity", [48, 64])
def test_in_place_ring_serves_any_capacity_as_the_plain_ring_does(tmp_path, capacity: int) -> None:
    """The in-place ring keeps more slots than the capacity (room for one call's tokens) and hides the older
    ones; a file trained for a 48-token cache under a 64-token window must decide as the plain ring of exactly
    48 slots does (there a query sees 48 past tokens, fewer than the window), on the host and device paths,
    over a stream of 4 windows."""
    torch.manual_seed(0)
    model = GatoModel(GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=64)).eval()
    with torch.no_grad():  # sharper attention, so a token more or less in view changes the logits
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                p.mul_(4.0)
    spec, declared = builtin_spec(), (48,)
    fused = export(model, spec, tmp_path / "fused.onnx", check=False, trained_capacities=declared)["fp32"]
    plain = export(model, spec, tmp_path / "plain.onnx", attention="plain", check=False,
                   trained_capacities=declared)["fp32"]
    expected = run_from(plain, 0, 6, capacity=capacity)
    for device_cache in (False, True):
        np.testing.assert_allclose(run_from(fused, 0, 6, device_cache, capacity), expected, atol=1e-4)
