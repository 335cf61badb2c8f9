"""The package installs the way ROS 2 users expect, and the robot-side code needs no torch."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
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


# Import name → rosdep key, where they differ (ROS packages import under their own name).
ROSDEP_KEYS = {"numpy": "python3-numpy", "cv2": "python3-opencv", "onnxruntime": "python3-onnxruntime-pip",
               "yaml": "python3-yaml",
               "sentencepiece": "python3-sentencepiece"}
def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(third-party top-level modules, gato_ros modules) that `path` imports, lazily or not."""
    third, ours = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours.add(alias.name.split(".")[1]) if alias.name.startswith("gato_ros.")
                 else third.add(alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "gato_ros":
                ours |= {alias.name for alias in node.names}
            elif node.module.startswith("gato_ros."):
                ours.add(node.module.split(".")[1])
            else:
                third.add(node.module.split(".")[0])
    return third - set(sys.stdlib_module_names) - {"gato_ros"}, ours


def robot_side_imports() -> dict[str, set[str]]:
    """Third-party imports of what a robot runs: the launch file, the policy node and every gato_ros module
    they reach (the recording and training extras are pip extras, not reached from here)."""
    out: dict[str, set[str]] = {}
    todo = [("launch/policy.launch.py", ROOT / "launch" / "policy.launch.py"),
            ("node", ROOT / "gato_ros" / "node.py")]
    while todo:
        name, path = todo.pop()
        if name in out or not path.exists():
            continue
        out[name], ours = _imports(path)
        todo += [(m, ROOT / "gato_ros" / f"{m}.py") for m in ours]
    return out


def test_package_xml_lists_every_runtime_dependency_of_the_robot_side_code() -> None:
    declared = {e.text.strip() for e in ET.parse(ROOT / "package.xml").getroot()
                if e.tag in ("depend", "exec_depend") and e.text}
    imports = robot_side_imports()
    assert {"node", "control", "runtime", "ros_io", "commands"} <= set(imports), sorted(imports)
    missing = {f"{where}: {name} ({ROSDEP_KEYS.get(name, name)})" for where, names in imports.items()
               for name in names if ROSDEP_KEYS.get(name, name) not in declared}
    assert not missing, f"package.xml lacks {sorted(missing)}"
