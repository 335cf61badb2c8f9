"""Print `gato-ros bench --json` results as the README's markdown table: p50 / p99 wall ms per control step,
then the p50 CPU ms of the calling thread, and the ratios."""

import json
import sys
from collections import defaultdict

COLUMNS = ("torch-nocache", "ort-nocache", "torch-kv", "ort-kv-fp32", "ort-kv-int8", "ort-kv-int8-dynamic",
           "ort-kv-fp16", "ort-kv-int4")


def main(path: str) -> None:
    with open(path) as f:
        bench = json.load(f)
    rows: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
    for case in bench["cases"]:
        rows[(case["preset"], case["context"])][case["name"]] = f"{case['p50_ms']:.1f} / {case['p99_ms']:.1f}"
    present = [c for c in COLUMNS if any(c in r for r in rows.values())]
    print("| preset | context | " + " | ".join(present) + " |")
    print("|---|---|" + "---|" * len(present))
    for (preset, context), cells in rows.items():
        print(f"| {preset} | {context} | " + " | ".join(cells.get(c, "–") for c in present) + " |")
    m = bench["machine"]
    print(f"\nMachine: {m['cpu']} ({m['cpu_count']} cores), {m['threads']} thread(s), onnxruntime {m['onnxruntime']}, "
          f"torch {m['torch']}, load average at start {m['load_average_at_start'][0]:.1f}.")
    print("\nCPU p50 ms (calling thread):")
    print("| preset | context | " + " | ".join(present) + " |")
    print("|---|---|" + "---|" * len(present))
    cpu: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
    for case in bench["cases"]:
        if "cpu_p50_ms" in case:
            cpu[(case["preset"], case["context"])][case["name"]] = f"{case['cpu_p50_ms']:.1f}"
    for (preset, context), cells in cpu.items():
        print(f"| {preset} | {context} | " + " | ".join(cells.get(c, "–") for c in present) + " |")
    print("\nRatios: " + json.dumps(bench["ratios"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench.json")
