"""How closely quantized variants follow the fp32 policy: teacher-forced action tokens and torques.

    python scripts/quant_agreement.py FP32.onnx REFERENCE.npz [VARIANT.onnx ...] [--nbits8]

REFERENCE.npz is what scripts/write_fp32_reference.py records from FP32.onnx (observations and the fp32
greedy tokens). Each variant decodes the same stream teacher-forced on those tokens, so every step is
compared in the same context. --nbits8 also builds and measures the alternative to the shipped int8
scheme: weight-only 8-bit blocks (MatMulNBits, fp32 compute) for the same transformer projections.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

from gato_ros import tokenizer as tk
from gato_ros.export import save
from gato_ros.quantize import body_matmuls, store_text_rows_int8
from gato_ros.runtime import PolicyRuntime, teacher_forced_tokens


def weight_only_8bit(fp32: Path, out: Path, block_size: int = 32) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(str(fp32))
    quant = MatMulNBitsQuantizer(proto, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=0,
                                 nodes_to_include=body_matmuls(proto))
    quant.process()
    proto = quant.model.model
    store_text_rows_int8(proto)
    save(proto, out)
    return out


def agreement(path: Path, reference: dict[str, np.ndarray]) -> dict[str, float]:
    runtime = PolicyRuntime(str(path), provider="cpu", threads=1)
    expected = reference["tokens"]
    got, latency = teacher_forced_tokens(runtime, reference)
    err = np.abs([tk.detokenize_action(runtime.spec, g) - tk.detokenize_action(runtime.spec, r)
                  for g, r in zip(got, expected, strict=True)])[:, :-1]  # torques; the gripper is counted apart
    return {"identical": float((got == expected).mean()),
            "within_1_bin": float((np.abs(got - expected) <= 1).mean()),
            "within_3_bins": float((np.abs(got - expected) <= 3).mean()),
            "gripper": float((got[:, -1] == expected[:, -1]).mean()), "torque_err_mean": float(err.mean()),
            "torque_err_p99": float(np.percentile(err, 99)), "step_p50_ms": float(np.median(latency) * 1e3),
            "size_mib": path.stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("variants", type=Path, nargs="*")
    parser.add_argument("--nbits8", action="store_true", help="also measure weight-only 8-bit MatMulNBits")
    args = parser.parse_args()
    reference = dict(np.load(args.reference))
    with tempfile.TemporaryDirectory() as tmp:
        paths = [args.fp32, *args.variants]
        if args.nbits8:
            paths.append(weight_only_8bit(args.fp32, Path(tmp) / "weight_only_8bit.onnx"))
        for path in paths:
            m = agreement(path, reference)
            print(f"{path.name}: {m['size_mib']:.2f} MiB, tokens identical {m['identical']:.1%}, within 1 bin "
                  f"{m['within_1_bin']:.1%}, within 3 bins "
                  f"{m['within_3_bins']:.1%}, gripper {m['gripper']:.1%}, torque error mean "
                  f"{m['torque_err_mean']:.4f} / p99 {m['torque_err_p99']:.3f} N·m, step p50 {m['step_p50_ms']:.2f} ms")


if __name__ == "__main__":
    main()
