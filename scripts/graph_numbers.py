"""The figures README "Runtime and latency" quotes about the serving graph itself (CPU, one thread).

    python scripts/graph_numbers.py

1. nodes after ORT's optimizations: the fused graph vs the TorchScript export of the same tiny model;
2. ORT Softmax over masked scores (-1e9), with and without `session.set_denormal_as_zero`;
3. the share of a decode call at 1024 tokens spent concatenating the cache with the new keys:
   MultiHeadAttention over pre-joined keys vs Concat + MultiHeadAttention (tiny's shapes);
4. per-step CPU time, fused vs TorchScript graph, tiny and gato-79m at 128 tokens (PolicyRuntime).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from gato_ros.bench import measure, ort_kv
from gato_ros.contract import GatoConfig
from gato_ros.export import builtin_spec, export
from gato_ros.model import GatoModel


def session(nodes: list[onnx.NodeProto], inputs: list[str], denormal_as_zero: bool = True) -> ort.InferenceSession:
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs]
    graph = helper.make_graph(nodes, "probe", values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if denormal_as_zero:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def cpu_us(run: Callable[[], object], calls: int = 500) -> float:
    for _ in range(20):
        run()
    start = time.thread_time()
    for _ in range(calls):
        run()
    return (time.thread_time() - start) / calls * 1e6


def masked_softmax_us(denormal_as_zero: bool) -> float:
    scores = np.random.default_rng(0).normal(size=(1, 4, 34, 1058)).astype(np.float32)
    scores[..., :529] = -1e9
    softmax = session([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], ["x"], denormal_as_zero)
    return cpu_us(lambda: softmax.run(None, {"x": scores}))


def optimized_nodes(path: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return len(onnx.load(so.optimized_model_filepath).graph.node)


def main() -> None:
    torch.set_num_threads(1)
    spec, rng = builtin_spec(), np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for preset in ("tiny", "gato-79m"):
            torch.manual_seed(0)
            model = GatoModel(GatoConfig.from_preset(preset, context_window=128)).eval()
            files[preset] = {a: export(model, spec, Path(tmp) / preset / a / "p.onnx", check=False,
                                       attention=a)["fp32"] for a in ("fused", "plain")}
        print("1. nodes after ORT optimization (tiny): fused "
              f"{optimized_nodes(files['tiny']['fused'])}, TorchScript {optimized_nodes(files['tiny']['plain'])}")

        # ORT applies the flag process-wide from a process's first session: each case in a fresh process.
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for flag in (False, True):
                print(f"2. Softmax [1, 4, 34, 1058], half masked (-1e9), denormal_as_zero={flag}: "
                      f"{pool.apply(masked_softmax_us, (flag,)):.0f} us")

        heads, head_dim, cache = 4, 16, 1024
        feeds = {"q": rng.normal(size=(1, 1, heads * head_dim)), "pk": rng.normal(size=(1, heads, cache, head_dim)),
                 "pv": rng.normal(size=(1, heads, cache, head_dim)), "k": rng.normal(size=(1, heads, 1, head_dim)),
                 "v": rng.normal(size=(1, heads, 1, head_dim)), "bias": np.zeros((1, 1, 1, cache + 1))}
        feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
        joined = {"q": feeds["q"], "bias": feeds["bias"], "K": np.concatenate([feeds["pk"], feeds["k"]], 2),
                  "V": np.concatenate([feeds["pv"], feeds["v"]], 2)}
        mha = helper.make_node("MultiHeadAttention", ["q", "K", "V", "", "", "bias"], ["y"], domain="com.microsoft",
                               num_heads=heads)
        alone = session([mha], ["q", "K", "V", "bias"])
        with_concat = session([helper.make_node("Concat", ["pk", "k"], ["K"], axis=2),
                               helper.make_node("Concat", ["pv", "v"], ["V"], axis=2), mha], list(feeds))
        a, b = cpu_us(lambda: alone.run(None, joined)), cpu_us(lambda: with_concat.run(None, feeds))
        print(f"3. one layer, decode at {cache} tokens: MultiHeadAttention {a:.1f} us, with the two Concats "
              f"{b:.1f} us (x 4 layers x 8 calls = {(b - a) * 32 / 1e3:.2f} ms per step in Concat)")

        for preset, pair in files.items():
            ms = {a: measure(ort_kv(path, spec, 128, 1), 30, 10.0)["cpu_p50_ms"] for a, path in pair.items()}
            print(f"4. {preset} at 128 tokens, CPU ms per step: fused {ms['fused']:.1f}, TorchScript {ms['plain']:.1f}")


if __name__ == "__main__":
    main()
