"""The launch file and the parameter file.

`launch` / `launch_ros` are not pip-installable here, so the launch file is checked by construction
(it compiles; `ast` finds the declared arguments and the nodes it starts, whose executables must be
this package's console scripts) and run for real only where launch_ros imports. What it passes to the
nodes comes from gato_ros.launch_params, tested here; the YAML and those overrides are loaded by rclpy
itself into a real node, which rejects unknown types.
"""

from __future__ import annotations

import ast
import importlib.metadata
import py_compile
from pathlib import Path

import pytest
import rclpy
import yaml

from gato_ros.launch_params import LAUNCH_PARAMETERS, parameter_overrides

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
    arguments = {c.args[0].value: _kwargs(c) for c in _calls(tree, "DeclareLaunchArgument")}
    assert {"model", "rate", "autostart", "output_mode", "params_file", "namespace", "use_sim"} <= set(arguments)
    used = {c.args[0].value for c in _calls(tree, "LaunchConfiguration")}
    assert set(arguments) == used, "every declared argument is used, and only declared ones"
    for name in LAUNCH_PARAMETERS:  # empty by default: the params file's value stands unless one is given
        assert ast.literal_eval(arguments[name]["default_value"]) == "", name


def test_launch_file_starts_a_lifecycle_policy_node_its_watchdog_and_the_sim():
    tree = ast.parse(LAUNCH.read_text())
    started = {ast.literal_eval(_kwargs(c)["executable"]): (getattr(c.func, "id", ""), _kwargs(c))
               for c in _calls(tree, "Node") + _calls(tree, "LifecycleNode")}
    assert set(started) == {"policy_node", "policy_watchdog", "sim_bridge"}
    assert started["policy_node"][0] == "LifecycleNode", "the policy node is a lifecycle node"
    assert ast.literal_eval(started["policy_node"][1]["name"]) == "gato_policy"
    for _, kw in started.values():
        assert ast.literal_eval(kw["package"]) == "gato_ros" and "namespace" in kw
    assert ast.unparse(started["policy_node"][1]["parameters"]) == ast.unparse(
        started["policy_watchdog"][1]["parameters"]), "the watchdog reads the same parameters"
    assert "condition" in started["sim_bridge"][1], "the sim starts only with use_sim"
    bridge = ast.unparse(started["sim_bridge"][1]["parameters"])
    for name in ("arm", "task"):  # the sim simulates the arm the node serves and judges its task
        assert f"'{name}': LaunchConfiguration('{name}')" in bridge, bridge
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("policy_node") == "gato_ros.node:main"
    assert scripts.get("sim_bridge") == "sim.bridge:main"
    if (ROOT / "gato_ros" / "watchdog.py").exists():  # the watchdog process lands with issue 11's watchdog work
        assert scripts.get("policy_watchdog") == "gato_ros.watchdog:main"


def test_launch_arguments_pass_only_what_was_given():
    assert parameter_overrides({"model": "", "rate": "", "autostart": "", "use_sim": "false"}) == {}
    assert parameter_overrides({"model": "/m.onnx", "rate": "50", "output_mode": "trajectory"}) == {
        "model_path": "/m.onnx", "control_rate_hz": 50.0, "output_mode": "trajectory"}
    assert parameter_overrides({"use_sim": "true"}) == {"use_sim_time": True, "autostart": True}
    assert parameter_overrides({"use_sim": "True", "autostart": "false"}) == {"use_sim_time": True,
                                                                             "autostart": False}
    with pytest.raises(ValueError, match="autostart"):
        parameter_overrides({"autostart": "yes"})


def test_setup_installs_launch_and_config():
    setup = (ROOT / "setup.py").read_text()
    assert 'glob("launch/*.launch.py")' in setup and 'glob("config/*.yaml")' in setup


def _declared_by_the_launched_nodes() -> set[str]:
    from gato_ros.node import PARAMETERS

    names = set(PARAMETERS)
    try:  # the watchdog reads the same file (its parameters land with gato_ros/watchdog.py)
        from gato_ros import watchdog

        names |= set(getattr(watchdog, "PARAMETERS", {}))
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("given", [{}, {"rate": "50", "use_sim": "true"}])
def test_params_file_wins_unless_a_launch_argument_is_given(given):
    """rclpy loads config/policy.yaml into a real PolicyNode, then the launch file's overrides (as launch_ros
    passes them: after the file): every key is a declared parameter of the right type, and only a given launch
    argument changes a value."""
    from gato_ros.node import PolicyNode

    raw = yaml.safe_load(PARAMS.read_text())
    params = raw["/**"]["ros__parameters"]
    assert set(params) <= _declared_by_the_launched_nodes(), set(params) - _declared_by_the_launched_nodes()
    assert params["autostart"] is False, "the real-robot path does not start the arm by itself"
    overrides = parameter_overrides(given)
    args = ["test", "--ros-args", "--params-file", str(PARAMS)]
    for key, value in overrides.items():
        args += ["-p", f"{key}:={str(value).lower() if isinstance(value, bool) else value}"]
    context = rclpy.Context()
    rclpy.init(args=args, context=context)
    try:
        node = PolicyNode(context=context)
        assert not node.refused_overrides, node.refused_overrides
        for key, value in {**params, **overrides}.items():
            if key != "use_sim_time":
                assert node.get_parameter(key).value == value, key
        assert node.get_parameter("use_sim_time").value is bool(overrides.get("use_sim_time"))
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
    assert {"model", "rate", "autostart", "params_file", "namespace", "use_sim"} <= names
