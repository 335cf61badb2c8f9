"""The package installs the way ROS 2 users expect, and the robot-side code needs no torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gato_ros.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where `import torch` fails, as on a robot without it."""
    guard = "import sys; sys.modules['torch'] = None\n"
    return subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, cwd=ROOT)


def test_tokenizer_imports_without_torch() -> None:
    result = run_without_torch("import gato_ros.tokenizer, gato_ros.spec, gato_ros.data; print('ok')")
    assert result.returncode == 0, result.stderr
    assert run_without_torch("import torch").returncode != 0  # the guard really blocks torch


def test_cli_lists_every_job() -> None:
    result = subprocess.run([str(BIN / "gato-ros"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("demo", "node", "sim", "collect", "train", "export", "eval", "bench"):
        assert name in SUBCOMMANDS and name in result.stdout


@pytest.mark.skipif(shutil.which("colcon", path=str(BIN)) is None, reason="colcon is not installed in this venv")
def test_colcon_build_installs_the_ros_layout(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    cmd = [str(BIN / "colcon"), "--log-base", str(tmp_path / "log"), "build", "--base-paths", str(ROOT),
           "--build-base", str(tmp_path / "build"), "--install-base", str(tmp_path / "install")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = tmp_path / "install" / "gato_ros"
    assert (prefix / "share/gato_ros/package.xml").is_file()
    assert (prefix / "share/ament_index/resource_index/packages/gato_ros").is_file()
    assert (prefix / "share/gato_ros/launch/policy.launch.py").is_file()
    assert (prefix / "share/gato_ros/config/policy.yaml").is_file()
    for script in ("policy_node", "policy_watchdog", "sim_bridge", "gato-ros"):
        assert os.access(prefix / "lib/gato_ros" / script, os.X_OK), script
