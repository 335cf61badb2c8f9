"""Latency per control step (observation in → action out), same machine, same model for every case.

    gato-ros bench --json runs/bench.json [--quick]

Cases per preset and context fill (128 / 512 / 1024 tokens):
    torch-nocache   torch eager, full re-forward over the context for every action token
    ort-nocache     the same graph in ONNX Runtime with an empty cache (full re-forward)
    torch-kv        torch eager with the runtime's algorithm: a KV cache of `context` tokens (oldest
                    dropped), one forward for the observation and one per further action token
    ort-kv-fp32     PolicyRuntime: rolling KV cache of `context` tokens, full (an in-place ring: the graph writes the
                    new keys/values into it, gato_ros/attention_graph.py)
    ort-kv-int8     the same with the int8 file (int8 weights, fp32 compute: the shipped scheme)
    ort-kv-int8-dynamic   the same with int8 compute (MatMulInteger on per-call quantized activations)
    ort-kv-fp16 / ort-kv-int4   CUDA only (gato-1.18b, when a GPU is present)
Weights are random (latency does not depend on them); the spec is the builtin Panda state spec
(33 observation values + separator + 8 action tokens = 42 tokens per step). The ONNX files are what
`gato-ros export` writes by default: the fused serving graph (gato_ros/attention_graph.py) with the head over
the 1026 action ids only. Each case records the wall-clock p50 / p99 and the p50 of the calling thread's CPU
time (with --threads 1 both engines compute on that thread; on a shared machine the CPU time is the fairer
comparison of the engines, the wall time what a robot would see).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from gato_ros import tokenizer as tok
from gato_ros.contract import CACHE_LAYOUT_IN_PLACE, EMPTY_POSITION, GatoConfig, io_names
from gato_ros.export import builtin_spec, export
from gato_ros.model import GatoModel
from gato_ros.runtime import PolicyRuntime, cuda_device_count, open_session, read_model_info

CONTEXTS = (128, 512, 1024)


def machine_info(threads: int) -> dict[str, object]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        model = platform.processor()
    return {"cpu": model, "cpu_count": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "torch": torch.__version__,
            "gpus": cuda_device_count(), "providers": ort.get_available_providers(),
            "load_average_at_start": os.getloadavg()}


def measure(fn, steps: int, budget_s: float, warmup: int = 2, at_least: int = 3) -> dict[str, float]:
    """p50 / p99 wall ms of `fn()` over up to `steps` calls, stopping early after `budget_s` (but at least
    `at_least` calls), and the p50 of the calling thread's CPU ms: with one intra-op thread torch and ORT
    compute on the calling thread, so on a machine shared with other jobs the CPU time still compares the
    engines' work when the wall time also counts waiting for a core."""
    for _ in range(warmup):
        fn()
    wall: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(wall) < steps and (len(wall) < at_least or time.perf_counter() - start < budget_s):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(wall, 50)), "p99_ms": float(np.percentile(wall, 99)),
            "cpu_p50_ms": float(np.percentile(cpu, 50)), "steps": len(wall)}


def synthetic(spec, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{o.name: rng.normal(size=o.shape) for o in spec.observations} for _ in range(n)]


def window_stream(spec, context: int) -> tuple[np.ndarray, np.ndarray]:
    """The last `context` tokens of a synthetic run: ids and local positions (no-cache cases)."""
    per = tok.timestep_token_count(spec)
    steps = -(-context // per) + 1
    ids = np.concatenate([np.concatenate([tok.tokenize_observation(spec, o).tokens,
                                          np.full(spec.action_size, tok.CONTINUOUS_OFFSET + 512)])
                          for o in synthetic(spec, steps)])
    local = np.tile(np.arange(per), steps)
    return ids[-context:], local[-context:]


def ort_nocache(path: Path, spec, config: GatoConfig, context: int, threads: int):
    session, _ = open_session(str(path), "cpu", threads)  # the runtime's session options
    info = read_model_info(session, str(path))
    logit_ids = info.logit_ids  # None: a full-vocabulary head
    first = tok.CONTINUOUS_OFFSET if logit_ids is None else int(np.searchsorted(logit_ids, tok.CONTINUOUS_OFFSET))
    ids, local = window_stream(spec, context)
    names, _ = io_names(config.n_layer, False)
    head = config.n_embd // config.n_head
    slots = context if info.cache_layout == CACHE_LAYOUT_IN_PLACE else 0  # an in-place ring holds the new tokens
    empty = np.zeros((1, config.n_head, slots, head), np.float32)
    feed = {"input_ids": ids[None], "position_ids": np.arange(context, dtype=np.int64)[None] + 10_000,
            "local_positions": local[None], "past_positions": np.full((1, slots), EMPTY_POSITION, np.int64)}
    feed.update({n: empty for n in names if n.startswith("past_key_values.")})

    def step() -> None:  # one forward over the whole window per action token
        for _ in range(spec.action_size):
            logits = session.run(["logits"], feed)[0]
            bins = logits[0, 0, first:first + tok.NUM_BINS]
            feed["input_ids"][0, -1] = int(np.argmax(bins)) + tok.CONTINUOUS_OFFSET

    return step


def torch_nocache(model: GatoModel, spec, context: int):
    ids, local = window_stream(spec, context)
    ids_t, local_t = torch.from_numpy(ids)[None].clone(), torch.from_numpy(local)[None]
    pos_t = torch.arange(context)[None] + 10_000

    @torch.inference_mode()
    def step() -> None:
        for _ in range(spec.action_size):
            logits, _ = model(ids_t, pos_t, local_t, last_only=True)
            ids_t[0, -1] = int(torch.argmax(logits[0, 0, tok.CONTINUOUS_OFFSET:])) + tok.CONTINUOUS_OFFSET

    return step


def torch_kv(model: GatoModel, spec, context: int):
    """What serving the policy from torch would cost: PolicyRuntime's calls, in torch eager (on the model's
    device; a CUDA step ends with a synchronize so the time covers its kernels)."""
    device = model.tokens.weight.device
    ids, local = window_stream(spec, context)
    first = 10_000
    with torch.inference_mode():
        _, past = model(torch.from_numpy(ids)[None].to(device), torch.arange(context, device=device)[None] + first,
                        torch.from_numpy(local)[None].to(device), last_only=True)
    cache = {"past": past, "positions": torch.arange(context, device=device)[None] + first, "next": first + context}
    per = tok.timestep_token_count(spec)
    observations = [torch.from_numpy(tok.tokenize_observation(spec, o).tokens).to(device)
                    for o in synthetic(spec, 64, seed=2)]
    lo, hi = tok.CONTINUOUS_OFFSET, tok.CONTINUOUS_OFFSET + tok.NUM_BINS
    i = 0

    def forward(new_ids: torch.Tensor, new_local: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(new_ids.numel(), device=device)[None] + cache["next"]
        logits, presents = model(new_ids[None], positions, new_local[None], cache["past"], cache["positions"],
                                 last_only=True)
        cache["past"] = [(torch.cat([k, nk], 2)[:, :, -context:], torch.cat([v, nv], 2)[:, :, -context:])
                         for (k, v), (nk, nv) in zip(cache["past"], presents, strict=True)]
        cache["positions"] = torch.cat([cache["positions"], positions], 1)[:, -context:]
        cache["next"] += new_ids.numel()
        return logits[0, -1, lo:hi]

    @torch.inference_mode()
    def step() -> None:
        nonlocal i
        obs = observations[i % len(observations)]
        i += 1
        # the previous step's last action token, then this observation (as the runtime prefills them)
        last = torch.tensor([lo + 512], device=device)
        local_ids = torch.cat([torch.tensor([per - 1]), torch.arange(obs.numel())]).to(device)
        logits = forward(torch.cat([last, obs]), local_ids)
        for a in range(1, spec.action_size):
            token = torch.argmax(logits).reshape(1) + lo
            logits = forward(token, torch.tensor([obs.numel() + a - 1], device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def ort_kv(path: Path, spec, context: int, threads: int, provider: str = "cpu"):
    rt = PolicyRuntime(str(path), provider=provider, context_tokens=context, threads=threads)
    per = tok.timestep_token_count(spec)
    demo = synthetic(spec, -(-context // per) + 1, seed=1)
    rt.reset({"observations": {k: np.stack([o[k] for o in demo]) for k in demo[0]},
              "actions": np.zeros((len(demo), spec.action_size))})  # the ring is full from the first timed step
    assert int((rt.past_positions != EMPTY_POSITION).sum()) == context
    observations = synthetic(spec, 64, seed=2)
    i = 0

    def step() -> None:
        nonlocal i
        rt.step(observations[i % len(observations)])
        i += 1

    return step


def int8_agreement(paths: dict[str, Path], spec, variant: str = "int8", steps: int = 50) -> float:
    """Teacher-forced token agreement of an int8 file with fp32 on a synthetic episode (random weights: not
    int8-representable, so this includes the weights' rounding)."""
    ref = PolicyRuntime(str(paths["fp32"]), provider="cpu", threads=1)
    q = PolicyRuntime(str(paths[variant]), provider="cpu", threads=1)
    episode = synthetic(spec, steps, seed=3)
    reference = [ref.step_tokens(o) for o in episode]
    got = [q.step_tokens(o, teacher=t) for o, t in zip(episode, reference, strict=True)]
    return float((np.array(got) == np.array(reference)).mean())


def run_preset(preset: str, out_dir: Path, threads: int, quick: bool, gpu: bool, cases: list[dict]) -> dict:
    spec = builtin_spec()
    torch.manual_seed(0)
    model = GatoModel(GatoConfig.from_preset(preset, context_window=max(CONTEXTS))).eval()
    variants = ("fp16", "int4") if gpu else ("int8", "int8-dynamic")
    # Random weights, timed only: the file declares every benchmarked cache size so the runtime serves it.
    paths = export(model, spec, out_dir / preset / "policy.onnx", variants, trained_capacities=CONTEXTS)
    steps, budget = (30, 10.0) if quick else (200, 30.0)
    slow_budget = 5.0 if quick else 20.0
    for context in CONTEXTS:
        todo = []
        if gpu:
            todo += [(f"ort-kv-{v}", ort_kv(paths[v], spec, context, threads, "cuda"), steps, budget)
                     for v in ("fp32", "fp16", "int4")]
        elif quick and preset != "tiny" and context > 128:
            # a full re-forward of gato-79m over 512+ tokens takes minutes per step on 2 cores
            todo += [("torch-kv", torch_kv(model, spec, context), steps, budget),
                     *[(f"ort-kv-{v}", ort_kv(paths[v], spec, context, threads), steps, budget)
                       for v in ("fp32", "int8", "int8-dynamic")]]
        else:
            todo += [("torch-nocache", torch_nocache(model, spec, context), steps, slow_budget),
                     ("ort-nocache", ort_nocache(paths["fp32"], spec, model.config, context, threads), steps,
                      slow_budget),
                     ("torch-kv", torch_kv(model, spec, context), steps, budget),
                     *[(f"ort-kv-{v}", ort_kv(paths[v], spec, context, threads), steps, budget)
                       for v in ("fp32", "int8", "int8-dynamic")]]
        for name, fn, n, b in todo:
            slow = "nocache" in name
            m = measure(fn, n, b, warmup=(0 if quick else 1) if slow else 3, at_least=2 if quick and slow else 3)
            case = {"name": name, "preset": preset, "context": context, "p50_ms": round(m["p50_ms"], 3),
                    "p99_ms": round(m["p99_ms"], 3), "cpu_p50_ms": round(m["cpu_p50_ms"], 3), "steps": m["steps"]}
            print(f"{preset:>10} {context:>5} {name:<14} p50 {m['p50_ms']:9.2f} ms  p99 {m['p99_ms']:9.2f} ms  "
                  f"cpu p50 {m['cpu_p50_ms']:9.2f} ms  ({m['steps']} steps)")
            cases.append(case)
    if gpu:
        return {}
    return {"int8_action_agreement": int8_agreement(paths, spec),
            "int8_dynamic_action_agreement": int8_agreement(paths, spec, "int8-dynamic")}


def ratio(cases: list[dict], preset: str, context: int, a: str, b: str, key: str = "p50_ms") -> float | None:
    get = {(c["preset"], c["context"], c["name"]): c[key] for c in cases}
    if (preset, context, a) in get and (preset, context, b) in get:
        return round(get[(preset, context, a)] / get[(preset, context, b)], 2)
    return None


def ratios(cases: list[dict], preset: str) -> dict[str, float | None]:
    """p50 ratios: KV cache vs none (ORT); ORT vs torch eager on the same cached algorithm, by wall time and by
    CPU time, per context; the same no-cache work in both engines; int8 variants vs fp32."""
    out: dict[str, float | None] = {"kv_vs_nocache_1024": ratio(cases, preset, 1024, "ort-nocache", "ort-kv-fp32")}
    for context in CONTEXTS:
        out[f"ort_vs_torch_{context}"] = ratio(cases, preset, context, "torch-kv", "ort-kv-fp32")
        out[f"ort_vs_torch_cpu_{context}"] = ratio(cases, preset, context, "torch-kv", "ort-kv-fp32", "cpu_p50_ms")
    out["ort_vs_torch_nocache_128"] = ratio(cases, preset, 128, "torch-nocache", "ort-nocache")
    out["int8_vs_fp32_1024"] = ratio(cases, preset, 1024, "ort-kv-int8", "ort-kv-fp32")
    out["int8_dynamic_vs_fp32_1024"] = ratio(cases, preset, 1024, "ort-kv-int8-dynamic", "ort-kv-fp32")
    return out


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted({c["preset"] for c in cases})
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4.5), squeeze=False)
    for ax, preset in zip(axes[0], presets, strict=True):
        for name in sorted({c["name"] for c in cases if c["preset"] == preset}):
            rows = sorted((c for c in cases if c["preset"] == preset and c["name"] == name), key=lambda c: c["context"])
            ax.plot([c["context"] for c in rows], [c["p50_ms"] for c in rows], "o-", label=f"{name} p50")
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms per control step", title=preset)
        ax.set_xticks(list(CONTEXTS), [str(c) for c in CONTEXTS])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="runs/bench.json", help="where to write the results (PNG beside it)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps per case; gato-79m no-cache cases at 128 tokens only")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ORT")
    parser.add_argument("--presets", default="tiny,gato-79m", help="CPU presets")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / "bench_models"
    cases: list[dict] = []
    extra: dict[str, float] = {}
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        found = run_preset(preset, work, args.threads, args.quick, gpu=False, cases=cases)
        if preset == "tiny":
            extra.update(found)
    if cuda_device_count() > 0:
        run_preset("gato-1.18b", work, args.threads, args.quick, gpu=True, cases=cases)
    result = {
        "machine": machine_info(args.threads),
        "weights": "random init (latency only)",
        "spec": builtin_spec().name,
        "cases": cases,
        "ratios": {preset: ratios(cases, preset) for preset in sorted({c["preset"] for c in cases})},
        **extra,
    }
    out.write_text(json.dumps(result, indent=2))
    plot(cases, out.with_suffix(".png"))
    print(json.dumps(result["ratios"], indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0
