"""The launch file and the parameter file.

`launch` / `launch_ros` are not pip-installable here, so the launch file is checked by construction
(it compiles; `ast` finds the declared arguments and the nodes it starts, whose executables must be
this package's console scripts) and run for real only where launch_ros imports. The YAML is loaded
by rclpy itself into a real node, which rejects unknown types.
"""

from __future__ import annotations

import ast
import importlib.metadata
import py_compile
from pathlib import Path

import pytest
import rclpy
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch" / "policy.launch.py"
PARAMS = ROOT / "config" / "policy.yaml"


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]


def _kwargs(call: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in call.keywords if k.arg}


def test_launch_file_compiles_and_declares_its_arguments(tmp_path):
    py_compile.compile(str(LAUNCH), cfile=str(tmp_path / "launch.pyc"), doraise=True)
    tree = ast.parse(LAUNCH.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    declared = {c.args[0].value for c in _calls(tree, "DeclareLaunchArgument")}
    assert {"model", "rate", "params_file", "use_sim"} <= declared
    used = {c.args[0].value for c in _calls(tree, "LaunchConfiguration")}
    assert declared == used, "every declared argument is used, and only declared ones"


def test_launch_file_starts_this_packages_console_scripts():
    tree = ast.parse(LAUNCH.read_text())
    nodes = {ast.literal_eval(_kwargs(c)["executable"]): _kwargs(c) for c in _calls(tree, "Node")}
    assert set(nodes) == {"policy_node", "sim_bridge"}
    for kw in nodes.values():
        assert ast.literal_eval(kw["package"]) == "gato_ros"
    assert ast.literal_eval(nodes["policy_node"]["name"]) == "gato_policy"
    assert "condition" in nodes["sim_bridge"], "the sim starts only with use_sim"
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("policy_node") == "gato_ros.node:main"
    assert scripts.get("sim_bridge") == "sim.bridge:main"


def test_setup_installs_launch_and_config():
    setup = (ROOT / "setup.py").read_text()
    assert 'glob("launch/*.launch.py")' in setup and 'glob("config/*.yaml")' in setup


def test_params_file_is_accepted_by_the_node():
    """rclpy loads config/policy.yaml into a real PolicyNode: every key is a declared parameter of the right type."""
    from gato_ros.node import PARAMETERS, PolicyNode

    raw = yaml.safe_load(PARAMS.read_text())
    params = raw["/**"]["ros__parameters"]
    assert set(params) <= set(PARAMETERS), set(params) - set(PARAMETERS)
    context = rclpy.Context()
    rclpy.init(args=["test", "--ros-args", "--params-file", str(PARAMS), "-p", "stale_timeout_s:=0.5"],
               context=context)
    try:
        node = PolicyNode(context=context)
        for key, value in params.items():
            expected = 0.5 if key == "stale_timeout_s" else value
            assert node.get_parameter(key).value == expected, key
        assert node._param("joint_names") is None and node._param("torque_limits") is None  # the model's
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def test_generate_launch_description_where_launch_ros_exists(tmp_path, monkeypatch):
    pytest.importorskip("launch_ros", reason="launch_ros is not pip-installable; runs on a ROS 2 install")
    # An ament prefix holding this package's share folder, as `colcon build` installs it.
    (tmp_path / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    (tmp_path / "share" / "ament_index" / "resource_index" / "packages" / "gato_ros").touch()
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    namespace: dict = {}
    exec(compile(LAUNCH.read_text(), str(LAUNCH), "exec"), namespace)
    description = namespace["generate_launch_description"]()
    names = {a.name for a in description.get_launch_arguments()}
    assert {"model", "rate", "params_file", "use_sim"} <= names
