"""`gato-ros info`: what a file serves, from the metadata the runtime reads; the served arms and tasks decide
what `gato-ros eval` accepts (issue 13: one file, several arms and tasks, never a command for the wrong arm)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from gato_ros import contract
from gato_ros.cli import main
from sim.spec import stacking_spec
from sim.xarm import xarm_spec

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "stack_int8.onnx"
pytestmark = pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped model")


def info_json(path: Path, capsys: pytest.CaptureFixture) -> dict:
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def with_metadata(tmp_path: Path, props: dict[str, str]) -> Path:
    """The shipped file with some metadata_props replaced or added."""
    model = onnx.load(str(SHIPPED))
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    out = tmp_path / "served.onnx"
    onnx.save(model, str(out))
    return out


def test_a_file_from_before_issue_13_serves_the_panda_stacking(capsys):
    d = info_json(SHIPPED, capsys)
    assert d["arms"] == ["panda"] and d["tasks"] == ["stack_red_on_blue"]
    assert d["variant"] == "int8" and d["window"] == 42 and d["trained_capacities"] == [42]
    assert d["specs"]["panda"]["name"] == "panda_stack" and d["tokens_per_timestep"] == {"panda": 42}
    assert d["action_modes"] == {"panda": "effort"}
    assert main(["info", str(SHIPPED)]) == 0
    text = capsys.readouterr().out
    assert "arms: panda" in text and "tasks: stack_red_on_blue" in text and "window: 42 tokens" in text


def test_a_multi_spec_file_lists_every_arm_and_task(tmp_path, capsys):
    panda, xarm = stacking_spec(), xarm_spec()
    tasks = ["stack_red_on_blue", "stack_blue_on_red", "lift_red"]
    path = with_metadata(tmp_path, contract.served_metadata({"panda": panda.to_json(), "xarm6": xarm.to_json()},
                                                            tasks))
    d = info_json(path, capsys)
    assert d["arms"] == ["panda", "xarm6"] and d["default_arm"] == "panda" and d["tasks"] == tasks
    assert d["tokens_per_timestep"] == {"panda": 42, "xarm6": 7 + 7 + 17 + 1 + 7}
    assert d["action_modes"] == {"panda": "effort", "xarm6": "velocity"}
    assert type(xarm).from_json(json.dumps(d["specs"]["xarm6"])) == xarm


def test_eval_refuses_an_arm_or_task_the_file_does_not_serve(tmp_path):
    path = with_metadata(tmp_path, contract.served_metadata(
        {"panda": stacking_spec().to_json(), "xarm6": xarm_spec().to_json()}, ["stack_red_on_blue"]))
    with pytest.raises(SystemExit, match="not --arm panda --task lift_red"):
        main(["eval", "--policy", str(path), "--task", "lift_red", "--episodes", "1"])
    with pytest.raises(SystemExit, match="serves arm\\(s\\) panda and task\\(s\\) stack_red_on_blue"):
        main(["eval", "--policy", str(SHIPPED), "--arm", "xarm6", "--episodes", "1"])


def test_inconsistent_or_missing_files_are_refused_with_the_reason(tmp_path, capsys):
    other = xarm_spec().to_json()
    path = with_metadata(tmp_path, {contract.META_SPECS: json.dumps({"xarm6": json.loads(other)})})
    assert main(["info", str(path)]) == 2
    assert "gato_ros.spec is not one of the specs" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "absent.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_served_metadata_is_checked_when_written():
    with pytest.raises(ValueError, match="duplicate"):
        contract.served_metadata({"panda": stacking_spec().to_json()}, ["lift_red", "lift_red"])
    with pytest.raises(ValueError, match="at least one"):
        contract.served_metadata({}, ["lift_red"])
    panda = {"panda": stacking_spec().to_json()}
    with pytest.raises(ValueError, match="tasks \\['lift_blue'\\], not among the served"):
        contract.served_metadata(panda, ["lift_red"], pairs={"panda": ("lift_blue",)})
    with pytest.raises(ValueError, match="name arms \\['xarm6'\\], the file serves \\['panda'\\]"):
        contract.served_metadata(panda, ["lift_red"], pairs={"xarm6": ("lift_red",)})


def test_export_writes_the_arm_and_tasks_into_every_variant(tmp_path, capsys):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(xarm_spec().to_json())
    out = tmp_path / "xarm.onnx"
    common = ["export", "--random-init", "--preset", "tiny", "--spec", str(spec_file), "--out", str(out), "--no-check"]
    with pytest.raises(SystemExit, match="--arm needs --tasks"):
        main([*common, "--arm", "xarm6"])
    assert main([*common, "--variants", "fp32,int8", "--arm", "xarm6", "--tasks", "lift_red,lift_blue"]) == 0
    capsys.readouterr()
    for path in (out, out.with_name("xarm.int8.onnx")):
        d = info_json(path, capsys)
        assert d["arms"] == ["xarm6"] and d["tasks"] == ["lift_red", "lift_blue"]
        assert d["action_modes"] == {"xarm6": "velocity"}
