"""GPU check (issue 9 item 6): fp16 / int4 on CUDA without NaN, and gato-1.18b's step time at 1024 tokens.

    PYTHONPATH=. python3 scripts/gpu_check.py --out $OUT            # on a CUDA machine (~3-6 min)
    PYTHONPATH=. python3 scripts/gpu_check.py --out /tmp/g --smoke  # CPU, tiny sizes: checks the script itself

(a) tiny preset, random init, builtin Panda spec, exported fp16 and int4; each served by PolicyRuntime on the
    CUDA provider with the KV cache on the device, for 10^5 positions (past the rotary period 65 536, where an
    fp16 rotary phase would overflow): every call's logits must be finite and every action finite.
(b) gato-1.18b, random init, exported fp16 straight from the model (gato_ros/attention_graph.py; weights in
    external data, > 2 GB; the torch parity check is skipped: it would need an fp32 ORT session of 4.7 GB on
    the CPU), PolicyRuntime on CUDA with a filled 1024-token ring: step p50 / p99 over >= 200 steps after
    warm-up; then the same algorithm in torch eager on CUDA (fp16, `gato-ros bench`'s torch-kv case).
(c) one JSON (`gpu_check.json` under --out) with every figure, the device and the versions; a table at the end.

Needs torch, onnx, onnxruntime(-gpu), numpy, safetensors only; nothing here imports the simulator or ROS.
Exported files go to a temporary folder, not to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from gato_ros.bench import ort_kv, synthetic, torch_kv
from gato_ros.contract import SEPARATOR_TOKEN, GatoConfig
from gato_ros.export import builtin_spec, export, export_fused
from gato_ros.model import GatoModel
from gato_ros.runtime import PolicyRuntime


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "steps": len(ms)}


def finite_run(path: Path, provider: str, positions: int) -> dict[str, Any]:
    """Serve `path` for `positions` tokens; raise on the first non-finite logits or action."""
    runtime = PolicyRuntime(str(path), provider=provider, device_cache=True, threads=None)
    forward = runtime.forward

    def checked(*args: Any, **kwargs: Any) -> np.ndarray:
        logits = forward(*args, **kwargs)
        if not np.isfinite(logits).all():
            raise FloatingPointError(f"{path.name}: non-finite logits at position {runtime.position}")
        return logits

    runtime.forward = checked  # type: ignore[method-assign]
    observations = synthetic(runtime.spec, 64, seed=5)
    ms: list[float] = []
    while runtime.position < positions:
        start = time.perf_counter()
        action = runtime.step(observations[len(ms) % len(observations)])
        ms.append((time.perf_counter() - start) * 1e3)
        if not np.isfinite(action).all():
            raise FloatingPointError(f"{path.name}: non-finite action at position {runtime.position}")
    return {"file": path.name, "provider": runtime.provider, "device_cache": runtime.device_cache,
            "positions": int(runtime.position), "all_finite": True, **percentiles(ms[10:])}


def timed(step, warmup: int, steps: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        step()
    ms = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        ms.append((time.perf_counter() - start) * 1e3)
    out = percentiles(ms)
    out["hz_at_p50"] = round(1e3 / out["p50_ms"], 1)
    return out


def check_small_variants(work: Path, provider: str, positions: int) -> dict[str, Any]:
    spec = builtin_spec()
    torch.manual_seed(0)
    model = GatoModel(GatoConfig.from_preset("tiny")).eval()
    paths = export(model, spec, work / "tiny" / "policy.onnx", ("fp16", "int4"))
    results: dict[str, Any] = {}
    for variant in ("fp16", "int4"):
        try:
            results[variant] = finite_run(paths[variant], provider, positions)
        except Exception as e:  # noqa: BLE001 -- record and go on: one failure must not hide the other figures
            results[variant] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        print(f"(a) tiny {variant}: {results[variant]}", flush=True)
    return results


def check_large(work: Path, preset: str, context: int, provider: str, steps: int) -> dict[str, Any]:
    spec = builtin_spec()
    device = torch.device("cuda" if provider == "cuda" else "cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        model = GatoModel(GatoConfig.from_preset(preset, context_window=context)).eval()
    result: dict[str, Any] = {"preset": preset, "context": context, "params": model.num_params()}
    path = export_fused(model, spec, work / preset / "policy.fp16.onnx", context, half=True)
    result["export_s"] = round(time.perf_counter() - t0, 1)
    result["file_bytes"] = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    result["parity_check"] = "skipped (an fp32 CPU session of the whole model would take minutes)"
    print(f"(b) exported {preset} fp16 in {result['export_s']} s ({result['file_bytes'] / 2**30:.2f} GiB)", flush=True)
    try:
        t0 = time.perf_counter()
        step = ort_kv(path, spec, context, threads=None, provider=provider)  # ring filled by a prompt
        result["session_load_s"] = round(time.perf_counter() - t0, 1)
        result["ort_fp16"] = timed(step, warmup=20, steps=steps)
    except Exception as e:  # noqa: BLE001
        result["ort_fp16"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    print(f"(b) ORT {preset} fp16: {result['ort_fp16']}", flush=True)
    try:
        # One decode call (S = 1) on its own: the per-call cost that a step pays once per action token.
        runtime = PolicyRuntime(str(path), provider=provider, device_cache=True)
        one, zero = np.array([SEPARATOR_TOKEN]), np.array([0])
        for _ in range(10):
            runtime.forward(one, zero)
        ms = []
        for _ in range(100):
            t0 = time.perf_counter()
            runtime.forward(one, zero)
            ms.append((time.perf_counter() - t0) * 1e3)
        result["ort_decode_call"] = percentiles(ms)
        del runtime
    except Exception as e:  # noqa: BLE001
        result["ort_decode_call"] = {"error": f"{type(e).__name__}: {e}"}
    print(f"(b) ORT {preset} one decode call: {result['ort_decode_call']}", flush=True)
    try:
        # fp16 autocast over the fp32 module (the value embedding builds its features in fp32).
        autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            result["torch_kv"] = timed(torch_kv(model, spec, context), warmup=10, steps=steps)
        result["torch_kv"]["dtype"] = "float16 autocast" if device.type == "cuda" else "float32"
    except Exception as e:  # noqa: BLE001
        result["torch_kv"] = {"error": f"{type(e).__name__}: {e}"}
    print(f"(b) torch-kv {preset}: {result['torch_kv']}", flush=True)
    return result


def table(report: dict[str, Any]) -> str:
    rows = ["| case | p50 ms | p99 ms | steps | note |", "|---|---|---|---|---|"]
    for variant, r in report.get("small", {}).items():
        note = r.get("error", f"{r.get('positions')} positions, all finite")
        rows.append(f"| tiny {variant} | {r.get('p50_ms', '–')} | {r.get('p99_ms', '–')} | {r.get('steps', '–')} | "
                    f"{note[:80]} |")
    large = report["large"]
    for name in ("ort_fp16", "torch_kv"):
        r = large.get(name, {})
        note = r.get("error", f"{r.get('hz_at_p50', '–')} Hz at p50")
        rows.append(f"| {large['preset']} {name} @ {large['context']} | {r.get('p50_ms', '–')} | "
                    f"{r.get('p99_ms', '–')} | {r.get('steps', '–')} | {note[:80]} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU provider, tiny sizes (tests the script)")
    parser.add_argument("--large-only", action="store_true", help="skip (a), the small variants")
    parser.add_argument("--positions", type=int, help="positions per small variant (default 100000; smoke 3000)")
    args = parser.parse_args()
    provider = "cpu" if args.smoke else "cuda"
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"no CUDAExecutionProvider in this onnxruntime: {ort.get_available_providers()}")
    positions = args.positions or (3000 if args.smoke else 100_000)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if provider == "cuda" else "cpu (smoke)",
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                     "providers": ort.get_available_providers()},
        "method": "PolicyRuntime.step wall time (observation in, 8 action tokens out), KV cache on the device; "
                  "fp16 and int4 from random init, builtin Panda spec (42 tokens per step)",
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.large_only:
            report["small"] = check_small_variants(Path(tmp), provider, positions)
        if args.smoke:
            report["large"] = check_large(Path(tmp), "tiny", 128, provider, steps=30)
        else:
            report["large"] = check_large(Path(tmp), "gato-1.18b", 1024, provider, steps=300)
    report["total_s"] = round(time.perf_counter() - start, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"device: {report['device']}; total {report['total_s']} s; wrote {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
