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
    for script in ("policy_node", "sim_bridge", "gato-ros"):
        assert os.access(prefix / "lib/gato_ros" / script, os.X_OK), script


# Import name → rosdep key, where they differ (ROS packages import under their own name).
ROSDEP_KEYS = {"numpy": "python3-numpy", "cv2": "python3-opencv", "onnxruntime": "python3-onnxruntime-pip",
               "yaml": "python3-yaml"}
TRAINING_STACK = {"torch", "onnx", "matplotlib", "safetensors", "tqdm", "sim"}  # not on a robot


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


def robot_side_imports() -> dict[str, set[str]]:
    """Third-party imports of every gato_ros module that a robot runs (no training stack, even indirectly),
    and of the launch file."""
    modules = {p.stem: _imports(p) for p in (ROOT / "gato_ros").glob("*.py")}

    def robot_side(name: str, seen: frozenset[str] = frozenset()) -> bool:
        own = {m for m in modules[name] if m != "gato_ros"}
        uses = {m for m in _gato_ros_modules(ROOT / "gato_ros" / f"{name}.py") if m in modules} - seen - {name}
        return not own & TRAINING_STACK and all(robot_side(m, seen | {name}) for m in uses)

    out = {n: imports - {"gato_ros"} for n, imports in modules.items() if robot_side(n)}
    out["launch/policy.launch.py"] = _imports(ROOT / "launch" / "policy.launch.py") - {"gato_ros"}
    return out


def _gato_ros_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "gato_ros":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gato_ros."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gato_ros.")}
    return names


def test_package_xml_lists_every_runtime_dependency_of_the_robot_side_code() -> None:
    declared = {e.text.strip() for e in ET.parse(ROOT / "package.xml").getroot()
                if e.tag in ("depend", "exec_depend") and e.text}
    imports = robot_side_imports()
    assert {"node", "control", "runtime", "ros_io", "commands"} <= set(imports), sorted(imports)
    missing = {f"{where}: {name} ({ROSDEP_KEYS.get(name, name)})" for where, names in imports.items()
               for name in names if ROSDEP_KEYS.get(name, name) not in declared}
    assert not missing, f"package.xml lacks {sorted(missing)}"
