"""scripts/cube_precision.py: the shipped state policy with the cube positions it reads moved off the truth, the
measurement behind the README's "How precise must a seeing policy be?"."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_script():  # noqa: ANN201 - the module scripts/cube_precision.py
    spec = importlib.util.spec_from_file_location("cube_precision", ROOT / "scripts" / "cube_precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_misplaced_cubes_keep_the_relative_vectors_consistent() -> None:
    script = load_script()
    hand, red, blue = np.array([0.5, 0.0, 0.3]), np.array([0.55, 0.05, 0.02]), np.array([0.45, -0.1, 0.02])
    task_state = np.concatenate([hand, red, blue, red - hand, blue - red, [0.3, 0.95]])
    red_error, blue_error = np.array([0.01, -0.02, 0.0]), np.array([0.0, 0.005, 0.003])
    moved = script.misplace_cubes(task_state, red_error, blue_error)
    np.testing.assert_allclose(moved[0:3], hand)
    np.testing.assert_allclose(moved[3:6], red + red_error)
    np.testing.assert_allclose(moved[6:9], blue + blue_error)
    np.testing.assert_allclose(moved[9:12], red + red_error - hand)
    np.testing.assert_allclose(moved[12:15], blue + blue_error - red - red_error)
    np.testing.assert_allclose(moved[15:], task_state[15:])
    np.testing.assert_allclose(task_state[3:6], red)  # the observation itself is left as it was


def test_the_shipped_policy_stacks_with_true_cubes_and_misses_them_three_centimetres_off(tmp_path: Path) -> None:
    out = tmp_path / "precision.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "cube_precision.py"), "--sigma-mm", "0", "30",
                    "--modes", "episode", "--episodes", "2", "--workers", "1", "--json", str(out)],
                   cwd=ROOT, check=True, timeout=300)
    rows = {row["sigma_mm"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows[0.0]["successes"] == 2
    assert rows[30.0]["successes"] == 0
    assert rows[30.0]["episodes"] == 2 and rows[30.0]["mode"] == "episode"
