"""One model, several bodies (issue 13): datasets of the Panda and the xArm6 (different tokens per timestep, different
action kinds) train one network; its checkpoint and every exported variant serve both arms; the runtime, `gato-ros
eval` and the node pick one by name and refuse an arm the file does not serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from gato_ros import tokenizer as tok
from gato_ros.cli import main
from gato_ros.data import EpisodeWriter, read_spec_groups
from gato_ros.sequences import MixedSpecWindows, SequenceDataset
from gato_ros.spec import EmbodimentSpec
from gato_ros.train import load_checkpoint, load_served
from sim.spec import stacking_spec
from sim.xarm import xarm_spec

torch.set_num_threads(1)
PANDA, XARM = stacking_spec(), xarm_spec()
WINDOW = 96  # two Panda timesteps (42 tokens) or two xArm6 ones (39) and some


def write_episodes(root: Path, spec: EmbodimentSpec, arm: str, tasks: list[str], episodes: int = 4,
                   steps: int = 6) -> Path:
    """Random episodes of `spec`, recorded as `gato-ros collect` records them (arm and task in the metadata)."""
    rng = np.random.default_rng(len(spec.actions))
    with EpisodeWriter(root, spec) as writer:
        for e in range(episodes):
            obs = {o.name: rng.normal(size=(steps, *o.shape)).astype(np.float32) for o in spec.observations}
            actions = np.stack([rng.choice(a.values, steps) if a.kind == "discrete"
                                else rng.uniform(-a.limit, a.limit, steps) for a in spec.actions], 1)
            writer.add_episode(obs, actions, {"seed": e, "arm": arm, "task": tasks[e % len(tasks)]})
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return (write_episodes(root / "panda", PANDA, "panda", ["stack_red_on_blue", "lift_red"]),
            write_episodes(root / "xarm6", XARM, "xarm6", ["lift_red", "place_red_at_marker"]))


@pytest.fixture(scope="module")
def checkpoint(datasets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "generalist"
    assert main(["train", "--data", *map(str, datasets), "--out", str(out), "--preset", "tiny", "--context-window",
                 str(WINDOW), "--steps", "3", "--batch-size", "8", "--eval-every", "3", "--val-fraction", "0.25",
                 "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def exported(checkpoint) -> Path:
    out = checkpoint.parent / "generalist.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--variants", "fp32,int8"]) == 0
    return out


def test_windows_of_each_spec_are_tokenized_with_their_own_spec_and_batch_together(datasets) -> None:
    groups = read_spec_groups(list(datasets))
    assert [g.arm for g in groups] == ["panda", "xarm6"] and [g.spec for g in groups] == [PANDA, XARM]
    parts = [SequenceDataset(g, WINDOW, train=False) for g in groups]
    mixed = MixedSpecWindows(parts)
    assert len(mixed) == sum(len(p) for p in parts)
    for k, (group, first) in enumerate(zip(groups, (0, len(parts[0])), strict=True)):
        obs, actions = group.episode(0)
        stream = tok.tokenize_episode(group.spec, obs, actions)
        item = mixed[first]
        assert torch.equal(item["input_ids"], torch.from_numpy(stream["tokens"][:WINDOW])), groups[k].arm
        # 6 steps of 42 (Panda) or 39 (xArm6) tokens: a window from the last step is padded, with no loss there
        last = mixed[first + 5]
        real = tok.timestep_token_count(group.spec)
        assert (last["input_ids"][real:] == tok.PAD_TOKEN).all() and not last["loss_mask"][real:].any()
    batch = default_collate([mixed[0], mixed[len(parts[0])]])  # one window of each spec in one batch
    assert batch["input_ids"].shape == (2, WINDOW)


def test_two_specs_train_one_checkpoint_that_records_both_arms_and_every_task(checkpoint) -> None:
    log = [json.loads(line) for line in (checkpoint / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and np.isfinite(log[-1]["loss"]) and np.isfinite(log[-1]["val_loss"])
    served = load_served(checkpoint)
    assert list(served.specs) == ["panda", "xarm6"]
    assert [EmbodimentSpec.from_json(json.dumps(s)) for s in served.specs.values()] == [PANDA, XARM]
    assert served.tasks == ("stack_red_on_blue", "lift_red", "place_red_at_marker")
    assert served.pairs == {"panda": ("stack_red_on_blue", "lift_red"), "xarm6": ("lift_red", "place_red_at_marker")}
    _, config, spec = load_checkpoint(checkpoint)
    assert spec == PANDA  # spec.json: the default arm's, for readers that know only it
    assert config.max_local_positions >= tok.timestep_token_count(PANDA)


def test_every_exported_variant_serves_both_arms(exported, capsys) -> None:
    capsys.readouterr()
    for path in (exported, exported.with_name("generalist.int8.onnx")):
        assert main(["info", str(path), "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["arms"] == ["panda", "xarm6"] and d["default_arm"] == "panda"
        assert d["tasks"] == ["stack_red_on_blue", "lift_red", "place_red_at_marker"]
        assert d["action_modes"] == {"panda": "effort", "xarm6": "velocity"}
        assert d["trained_tasks"] == {"panda": ["stack_red_on_blue", "lift_red"],
                                      "xarm6": ["lift_red", "place_red_at_marker"]}
        assert main(["info", str(path)]) == 0
        text = capsys.readouterr().out
        assert "arms: panda, xarm6" in text and "trained tasks: lift_red, place_red_at_marker" in text


@pytest.mark.parametrize("variant", ["generalist.onnx", "generalist.int8.onnx"])
def test_the_runtime_serves_the_arm_it_is_asked_for(exported, variant) -> None:
    from gato_ros.runtime import ModelLoadError, PolicyRuntime

    path = str(exported.with_name(variant))
    xarm = PolicyRuntime(path, provider="cpu", threads=1, arm="xarm6")
    assert xarm.arm == "xarm6" and xarm.spec == XARM and xarm.info.tasks == ("lift_red", "place_red_at_marker")
    velocities = [xarm.step(xarm.zero_observation()) for _ in range(3)]
    for command in velocities:  # 6 joint velocities within the xArm6's ±3.14 rad/s, then a finger target
        assert command.shape == (7,) and np.all(np.abs(command[:6]) <= 3.14) and command[6] in (0.04, 0.0)
    panda = PolicyRuntime(path, provider="cpu", threads=1)  # the default arm
    assert panda.arm == "panda" and panda.spec == PANDA
    torques = panda.step(panda.zero_observation())
    assert torques.shape == (8,) and torques[7] in PANDA.actions[7].values
    with pytest.raises(ModelLoadError, match="serves arm\\(s\\) panda, xarm6, not arm 'ur5'"):
        PolicyRuntime(path, provider="cpu", threads=1, arm="ur5")
    with pytest.raises(ValueError, match="shape \\(7,\\), spec says \\(8,\\)"):  # an xArm6 observation: not a Panda one
        panda.step(xarm.zero_observation())


def test_eval_runs_the_xarm6_in_process(exported, tmp_path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--policy", str(exported), "--arm", "xarm6", "--task", "lift_red", "--episodes", "1",
                 "--max-steps", "3", "--provider", "cpu", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["arm"] == "xarm6" and summary["episodes"] == 1 and summary["per_episode"][0]["steps"] == 3
    with pytest.raises(SystemExit, match="not --arm xarm6 --task lift_blue"):
        main(["eval", "--policy", str(exported), "--arm", "xarm6", "--task", "lift_blue", "--episodes", "1"])
    # A task the file serves, but trained on the Panda only: no xArm6 command was ever taught for it.
    with pytest.raises(SystemExit, match="trained on arm xarm6 for task\\(s\\) lift_red, place_red_at_marker only"):
        main(["eval", "--policy", str(exported), "--arm", "xarm6", "--task", "stack_red_on_blue", "--episodes", "1"])


def test_the_node_serves_the_arm_parameter_and_refuses_another_at_configure(exported, datasets) -> None:
    import rclpy
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from gato_ros.node import PolicyNode

    context = rclpy.Context()
    rclpy.init(context=context)
    nodes = []

    def node(**params: object) -> PolicyNode:
        overrides = [Parameter(k, value=v) for k, v in {"model_path": str(exported), "threads": 1, "provider": "cpu",
                                                         "autostart": False, **params}.items()]
        nodes.append(PolicyNode(context=context, parameter_overrides=overrides))
        return nodes[-1]

    try:
        unknown = node(arm="ur5")
        unknown.trigger_configure()
        assert unknown.runtime is None and unknown.loop is None, "no runtime, so no command, for an unknown arm"
        assert "not arm 'ur5'" in unknown.last_error and "panda, xarm6" in unknown.last_error
        # The xArm6 is velocity-commanded: an effort output is refused rather than sent to it.
        effort = node(arm="xarm6", output_mode="effort", hold_stiffness=[20.0], hold_damping=[2.0])
        effort.trigger_configure()
        assert effort.loop is None and "velocity" in effort.last_error, effort.last_error
        # By default the node drives the arm in its model's own mode; the torque hold's gains (the Panda's 7x7 by
        # default) are not asked of it: a velocity hold sends zeros.
        untrained = node(arm="xarm6", task="stack_red_on_blue")  # served, but trained on the Panda only
        untrained.trigger_configure()
        assert untrained.runtime is None and "lift_red, place_red_at_marker on arm xarm6" in untrained.last_error
        xarm = node(arm="xarm6")
        assert xarm.trigger_configure() == TransitionCallbackReturn.SUCCESS, xarm.last_error
        assert xarm.loop.mode == "velocity" and xarm.task == "lift_red", "its own first trained task by default"
        assert xarm.runtime.spec == XARM and list(xarm.loop.layout.arm_names) == list(XARM.joint_names[:6])
        xarm_gains = {"hold_stiffness": [20.0], "hold_damping": [2.0]}
        assert not xarm.set_parameters([Parameter("arm", value="panda")])[0].successful  # read only
        # A prompt is a demonstration of the served arm: a Panda episode is refused for the xArm6.
        prompted = node(arm="xarm6", output_mode="velocity", prompt_path=str(datasets[0]), **xarm_gains)
        prompted.trigger_configure()
        assert prompted.runtime is None and "does not match the expected spec 'xarm6_stack'" in prompted.last_error
        prompted = node(arm="xarm6", output_mode="velocity", prompt_path=str(datasets[1]), **xarm_gains)
        assert prompted.trigger_configure() == TransitionCallbackReturn.SUCCESS, prompted.last_error
    finally:
        for n in nodes:
            n.destroy_node()
        rclpy.shutdown(context=context)


def test_the_head_scores_the_actions_of_every_arm(tmp_path) -> None:
    """A file's restricted head covers the union of its arms' action tokens: an arm whose gripper has three
    settings needs token 2, which the Panda's two-valued gripper never produces."""
    from dataclasses import replace

    from gato_ros import contract
    from gato_ros.export import export
    from gato_ros.model import GatoConfig, GatoModel
    from gato_ros.runtime import PolicyRuntime

    gripper = replace(XARM.actions[6], values=(0.04, 0.02, 0.0))
    three = replace(XARM, name="xarm6_three_settings", actions=(*XARM.actions[:6], gripper))
    served = contract.served_metadata({"panda": PANDA.to_json(), "xarm6": three.to_json()}, ["lift_red"])
    torch.manual_seed(0)
    model = GatoModel(GatoConfig.from_preset("tiny", n_layer=1, context_window=WINDOW)).eval()
    path = export(model, PANDA, tmp_path / "three.onnx", check=False, served=served)["fp32"]
    runtime = PolicyRuntime(str(path), provider="cpu", threads=1, arm="xarm6")
    assert runtime.step(runtime.zero_observation())[6] in gripper.values


def test_every_specs_timestep_must_fit_the_models_local_positions() -> None:
    """The longest timestep of any spec, not only the default arm's, must have local positions to index."""
    import argparse
    from dataclasses import replace

    from gato_ros.spec import ObservationSpec
    from gato_ros.train import SetupError, choose_config

    wide = replace(XARM, name="xarm6_wide", observations=(ObservationSpec("joint_positions", (600,)),))
    args = argparse.Namespace(init=None, out="unused", preset="tiny", context_window=WINDOW, label_sigma=None,
                              no_value_embedding=False, pinned_span=None,
                              step_local_attention=False)
    assert choose_config(args, [PANDA, XARM], resuming=False).max_local_positions == 512
    with pytest.raises(SetupError, match="xarm6_wide.*608 tokens.*512 local positions"):
        choose_config(args, [PANDA, wide], resuming=False)


def test_two_specs_of_one_arm_are_refused(datasets, tmp_path) -> None:
    seeing = write_episodes(tmp_path / "seeing", stacking_spec(image_size=32, privileged=False), "panda", ["lift_red"],
                            episodes=1, steps=2)
    with pytest.raises(ValueError, match="arm 'panda' were recorded with 2 different specs"):
        read_spec_groups([datasets[0], datasets[1], seeing])


def test_a_file_whose_other_arm_sees_serves_both(tmp_path) -> None:
    """The graph takes patches when any arm's spec has a camera; an arm without one is fed none."""
    from gato_ros import contract
    from gato_ros.export import export
    from gato_ros.model import GatoConfig, GatoModel
    from gato_ros.runtime import PolicyRuntime

    seeing = xarm_spec(image_size=32)
    served = contract.served_metadata({"panda": PANDA.to_json(), "xarm6": seeing.to_json()}, ["lift_red"])
    torch.manual_seed(0)
    model = GatoModel(GatoConfig.from_preset("tiny", n_layer=1, context_window=WINDOW)).eval()
    path = str(export(model, PANDA, tmp_path / "seeing.onnx", served=served)["fp32"])  # with the parity check
    for arm, spec, size in (("panda", PANDA, 8), ("xarm6", seeing, 7)):
        runtime = PolicyRuntime(path, provider="cpu", threads=1, arm=arm)
        assert runtime.spec == spec and runtime.step(runtime.zero_observation()).shape == (size,)


def test_dagger_collection_drives_the_xarm6_with_the_generalist(exported, tmp_path) -> None:
    from gato_ros.data import read_dataset

    out = tmp_path / "dagger"
    assert main(["collect", "--arm", "xarm6", "--task", "lift_red", "--episodes", "1", "--workers", "1",
                 "--policy", str(exported), "--beta", "0", "--out", str(out)]) == 0
    dataset = read_dataset(out)
    assert dataset.spec == XARM and dataset.episodes[0]["arm"] == "xarm6" and len(dataset) == 1
