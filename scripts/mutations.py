"""Deliberate one-line bugs in the tokenizer, model and runtime: the test suite must fail on each.

    .venv/bin/python scripts/mutations.py [--only NAME ...] [--json runs/mutations.json]

Each mutation replaces one line of a copy of the repository (in a temporary directory; the checkout is never
touched) and runs the core tests there, stopping at the first failure. A mutation the tests do not catch is
reported as SURVIVED and makes the script exit 1. The unmutated copy runs first: it must pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("gato_ros", "sim", "tests", "models", "config", "launch", "resource", "package.xml", "setup.py",
          "setup.cfg", "pyproject.toml")
# Quick files first: pytest stops at the first failure.
TESTS = ("tests/test_tokenizer.py", "tests/test_model.py", "tests/test_runtime.py", "tests/test_export.py",
         "tests/test_shipped_model.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str  # exactly one line of `path` holds this text
    new: str


MUTATIONS = (
    Mutation("mu-law constant", "gato_ros/contract.py", "MU = 100.0", "MU = 99.0"),
    Mutation("bin rounding", "gato_ros/tokenizer.py", "bins = np.floor((y + 1.0) / 2.0 * NUM_BINS)",
             "bins = np.round((y + 1.0) / 2.0 * NUM_BINS)"),
    Mutation("separator placement", "gato_ros/tokenizer.py",
             "parts.append(np.array([SEPARATOR_TOKEN], dtype=np.int64))",
             "parts.insert(0, np.array([SEPARATOR_TOKEN], dtype=np.int64))"),
    Mutation("constrained range off by one", "gato_ros/tokenizer.py",
             "return CONTINUOUS_OFFSET, CONTINUOUS_OFFSET + NUM_BINS",
             "return CONTINUOUS_OFFSET, CONTINUOUS_OFFSET + NUM_BINS + 1"),
    Mutation("mask bound W-1", "gato_ros/model.py", "(delta < self.config.context_window)",
             "(delta < self.config.context_window - 1)"),
    Mutation("mask bound W+1", "gato_ros/model.py", "(delta < self.config.context_window)",
             "(delta <= self.config.context_window)"),
    Mutation("rope period", "gato_ros/model.py", "torch.remainder(position_ids, period)",
             "torch.remainder(position_ids, period - 1)"),
    Mutation("local positions on actions", "gato_ros/model.py", "return x + local * has_local", "return x + local"),
    Mutation("ring slot index", "gato_ros/runtime.py", "lo = start % slots",
             "lo = (start + 1) % slots"),
    Mutation("action columns off by one", "gato_ros/runtime.py",
             "first = lo if ids is None else int(np.searchsorted(ids, lo))",
             "first = lo if ids is None else int(np.searchsorted(ids, lo)) + 1"),
    Mutation("non-finite guard", "gato_ros/runtime.py", "if not np.isfinite(allowed).all():", "if False:"),
)


def copy_repo(dst: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", ".trt_cache"))
        elif src.exists():
            shutil.copy2(src, dst / name)


def apply(mutation: Mutation, repo: Path) -> None:
    path = repo / mutation.path
    lines = path.read_text().splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if mutation.old in line]
    if len(hits) != 1:
        raise SystemExit(f"{mutation.name}: {mutation.old!r} is on {len(hits)} lines of {mutation.path}, not one")
    lines[hits[0]] = lines[hits[0]].replace(mutation.old, mutation.new)
    path.write_text("".join(lines))


def run_tests(repo: Path, timeout_s: float) -> tuple[bool, str]:
    """(passed, first failing test or the last line of pytest's output)."""
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", *TESTS]
    try:
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:.0f} s"
    failed = [line.split(" ")[1] for line in out.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    return out.returncode == 0, failed[0] if failed else summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="mutation names to run (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per test run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="gato-ros-mutations-") as tmp:
        baseline = Path(tmp) / "baseline"
        copy_repo(baseline)
        passed, detail = run_tests(baseline, args.timeout)
        if not passed:
            print(f"the unmutated copy fails ({detail}): fix that first", file=sys.stderr)
            return 2
        for mutation in chosen:
            repo = Path(tmp) / mutation.name.replace(" ", "_")
            copy_repo(repo)
            apply(mutation, repo)
            start = time.perf_counter()
            passed, detail = run_tests(repo, args.timeout)
            verdict = "SURVIVED" if passed else "caught"
            results.append({"mutation": mutation.name, "file": mutation.path, "old": mutation.old,
                            "new": mutation.new, "verdict": verdict, "first_failure": "" if passed else detail,
                            "seconds": round(time.perf_counter() - start, 1)})
            print(f"{verdict:8s} {mutation.name:30s} {mutation.path:22s} {'' if passed else detail}", flush=True)
            shutil.rmtree(repo)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any(r["verdict"] == "SURVIVED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
