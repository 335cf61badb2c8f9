"""Task selection at the node (issue 13): the `task` parameter, the launch argument that sets it, text instructions
on `~/instruction`, and prompts recorded with another arm's spec, over real rclpy + Fast DDS with a real exported
ONNX model.

The model is test_node's micro model (its spec, `test_node.SPEC`), exported as a file that serves two tasks, so the
node here is the node those tests drive, with a `gato_ros.tasks` list to choose from; `instructed_model` is the same
file with an instruction model (`gato_ros.conditioning`) trained on those tasks' instructions (sim/tasks.py).
"""

from __future__ import annotations

import ast
import functools
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rclpy.parameter import Parameter
from std_msgs.msg import String
from std_srvs.srv import Trigger

from gato_ros import contract
from gato_ros.launch_params import parameter_overrides
from gato_ros.spec import ActionSpec, EmbodimentSpec, ObservationSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_node import PERIOD, SPEC, call, write_demo  # noqa: E402
from test_node import Robot as NodeRobot  # noqa: E402

# The robot's feed is a thread of this test process: on 2 shared cores it can pause past the node's default 0.25 s
# staleness, and the safe tick that follows would read as a failure here. Staleness has its own tests.
Robot = functools.partial(NodeRobot, stale_timeout_s=1.0)

torch = pytest.importorskip("torch", reason="exporting the test model needs torch")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["stack_red_on_blue", "lift_red"]
# Another arm's spec: six joints, velocity-commanded. A demonstration recorded with it is no prompt for SPEC's arm.
OTHER_ARM = EmbodimentSpec(
    "other-arm",
    (ObservationSpec("joint_positions", (7,)), ObservationSpec("joint_velocities", (7,)),
     ObservationSpec("task_state", (3,))),
    tuple(ActionSpec(f"j{i}", limit=3.0) for i in range(6)) + (ActionSpec("finger", kind="discrete", limit=1.0,
                                                                         values=(1.0, -1.0)),),
    20.0, tuple(f"j{i}" for i in range(7)), action_mode="velocity",
)


def micro_model():
    from gato_ros.model import GatoConfig, GatoModel

    torch.manual_seed(0)
    config = GatoConfig.from_preset("tiny", n_layer=1, n_embd=32, n_head=2, n_ff=64, patch_channels=8,
                                    context_window=128)
    return GatoModel(config).eval()


@pytest.fixture(scope="module")
def tasks_model(tmp_path_factory) -> str:
    """The micro model as a file serving two tasks for one arm."""
    from gato_ros.export import export

    out = tmp_path_factory.mktemp("model") / "tasks.onnx"
    served = contract.served_metadata({"panda": SPEC.to_json()}, TASKS)
    return str(export(micro_model(), SPEC, out, check=False, served=served)["fp32"])


@pytest.fixture(scope="module")
def instructed_model(tmp_path_factory) -> str:
    """The micro model as a file trained with instructions: the tasks' texts, pinned in the context."""
    from gato_ros.export import export
    from gato_ros.instructions import InstructionTokenizer, train_instruction_model
    from sim.tasks import get_task

    texts = {t: get_task(t).instruction for t in TASKS}
    words = InstructionTokenizer(train_instruction_model(texts.values())).to_base64()
    conditioning = contract.Conditioning(prompt_steps=2, instructions=texts, instruction_model=words)
    out = tmp_path_factory.mktemp("model") / "instructed.onnx"
    served = contract.served_metadata({"panda": SPEC.to_json()}, TASKS, conditioning)
    return str(export(micro_model(), SPEC, out, check=False, attention="plain", served=served)["fp32"])


@pytest.fixture(scope="module")
def partly_trained_model(tmp_path_factory) -> str:
    """The instructed file as two arms' file: this arm trained on stacking only, another arm on lifting. The file
    holds the lifting instruction, and this arm must not act on it."""
    from gato_ros.export import export
    from gato_ros.instructions import InstructionTokenizer, train_instruction_model
    from sim.tasks import get_task

    texts = {t: get_task(t).instruction for t in TASKS}
    words = InstructionTokenizer(train_instruction_model(texts.values())).to_base64()
    conditioning = contract.Conditioning(prompt_steps=2, instructions=texts, instruction_model=words)
    out = tmp_path_factory.mktemp("model") / "partly.onnx"
    served = contract.served_metadata({"panda": SPEC.to_json(), "other": OTHER_ARM.to_json()}, TASKS, conditioning,
                                      pairs={"panda": (TASKS[0],), "other": (TASKS[1],)})
    return str(export(micro_model(), SPEC, out, check=False, attention="plain", served=served)["fp32"])


def wait_steady(robot: Robot, ticks: int = 5) -> None:
    """Until the last `ticks` tick records ran the model: past the start-up, when an input may not have come yet."""
    robot.wait_running()
    assert robot.wait_for(lambda: len(robot.ticks) >= ticks and not any(rec["safe"] for _, rec in robot.ticks[-ticks:]),
                          10.0), robot.node.message


def diagnostic_values(robot: Robot) -> dict[str, str]:
    return {kv.key: kv.value for kv in robot.diagnostics[-1].status[0].values} if robot.diagnostics else {}


# ----------------------------------------------------------------------------- the task parameter


def test_an_unknown_task_fails_configure_naming_the_files_tasks_and_nothing_is_sent(tasks_model):
    r = Robot(tasks_model, task="push_green")
    try:
        assert r.node.state_label == "unconfigured" and r.node.runtime is None and r.node.loop is None
        assert "not task 'push_green'" in r.node.last_error, r.node.last_error
        assert "stack_red_on_blue, lift_red" in r.node.last_error, "the error names the file's tasks"
        assert r.wait_for(lambda: any("push_green" in d.status[0].message for d in list(r.diagnostics)), 3.0)
        time.sleep(5 * PERIOD)
        assert not r.ticks and not r.commands and not r.joint_commands, "no command for a task the file lacks"
        # Read only, as the arm: the task is chosen at startup, never swapped under a running episode.
        assert not r.node.set_parameters([Parameter("task", value="lift_red")])[0].successful
    finally:
        r.close()


@pytest.mark.parametrize("task, served", [("", "stack_red_on_blue"), ("lift_red", "lift_red")])
def test_a_served_task_configures_runs_and_is_reported(tasks_model, task, served):
    """Empty = the file's first task; a task the file serves runs, and the diagnostics name it."""
    r = Robot(tasks_model, task=task)
    try:
        r.wait_running()
        assert r.node.task == served
        assert r.wait_for(lambda: diagnostic_values(r).get("task") == served, 3.0), diagnostic_values(r)
    finally:
        r.close()


# ----------------------------------------------------------------------------- instructions


def send_instruction(robot: Robot, text: str) -> float:
    """Publish `text` on the node's ~/instruction once it listens; the time it was sent."""
    pub = robot.peer.create_publisher(String, "gato_policy/instruction", 10)
    assert robot.wait_for(lambda: pub.get_subscription_count() > 0, 5.0), "the node listens on ~/instruction"
    t = time.monotonic()
    pub.publish(String(data=text))
    return t


def test_activation_pins_the_tasks_instruction(instructed_model):
    """A file with an instruction model: each episode starts with the task's instruction pinned in the context."""
    from sim.tasks import get_task

    r = Robot(instructed_model, task="lift_red")
    try:
        r.wait_running()
        runtime, text = r.node.runtime, get_task("lift_red").instruction
        assert r.node.instruction == text
        assert runtime.pinned == len(runtime.instructions.encode(text)) > 0, runtime.pinned
        assert r.wait_for(lambda: diagnostic_values(r).get("instruction") == text, 3.0), diagnostic_values(r)
    finally:
        r.close()


def test_an_instruction_starts_a_new_episode_with_it_pinned_between_two_ticks(instructed_model):
    """~/instruction with a text of the vocabulary: the context is reset with that text pinned (a position back at
    the pinned prefix, as many pinned tokens as its text tokens), the ticks go on without a safe one, and ~/reset
    starts the next episode with the same instruction."""
    from sim.tasks import get_task

    r = Robot(instructed_model)  # the first task: stack_red_on_blue
    try:
        wait_steady(r)
        per_step = r.node.runtime.obs_tokens + r.node.runtime.spec.action_size
        assert r.wait_for(lambda: r.node.runtime.position > 20 * per_step, 10.0)
        text = get_task("lift_red").instruction
        tokens = len(r.node.runtime.instructions.encode(text))
        assert tokens != r.node.runtime.pinned, "the new instruction's tokens differ in number from the task's"
        before = r.node.runtime.position
        t = send_instruction(r, text)
        assert r.wait_for(lambda: r.node.instruction == text, 5.0), (r.node.instruction, r.node.instruction_error)
        runtime = r.node.runtime
        assert runtime.pinned == tokens and runtime.position < before, (runtime.pinned, runtime.position, before)
        assert r.node.instruction_error == ""
        time.sleep(5 * PERIOD)
        ticks = r.ticks_since(t)
        assert len(ticks) >= 4 and not any(rec["safe"] for rec in ticks), "the commands never stopped"
        resp = call(r.peer, Trigger, f"{r.ns}/gato_policy/reset", Trigger.Request())
        assert resp.success and text in resp.message, resp.message
        assert r.wait_for(lambda: r.node._loader.state == "idle" and r.node.runtime is not runtime, 5.0)
        assert r.node.runtime.pinned == tokens and r.node.instruction == text, "~/reset keeps the instruction"
    finally:
        r.close()


def test_an_instruction_before_activation_conditions_the_first_episode(instructed_model):
    """Unconfigured, an instruction is refused (no model to read it with); configured and inactive, it is kept for
    the activation, whose first episode starts with it pinned."""
    from sim.tasks import get_task

    text = get_task("lift_red").instruction
    r = Robot(instructed_model, start=False)
    try:
        send_instruction(r, text)
        assert r.wait_for(lambda: "not configured" in r.node.instruction_error, 5.0), r.node.instruction_error
        r.node.trigger_configure()
        assert r.node.instruction == get_task("stack_red_on_blue").instruction, "the task's, until told otherwise"
        send_instruction(r, text)
        assert r.wait_for(lambda: r.node.instruction == text, 5.0), r.node.instruction_error
        assert r.node.instruction_error == "" and not r.ticks, "inactive: nothing sent"
        r.node.trigger_activate()
        r.wait_running()
        assert r.node.runtime.pinned == len(r.node.runtime.instructions.encode(text))
    finally:
        r.close()


def test_a_prompt_replaces_the_instruction_and_clearing_it_restores_the_tasks(instructed_model, tmp_path):
    """~/load_prompt conditions the next episode on the demonstration instead (its last prompt_steps pinned), and with
    prompt_path emptied, on the task's instruction again: one or the other, never both."""
    write_demo(tmp_path / "demo", 10)
    r = Robot(instructed_model)
    try:
        r.wait_running()
        runtime, text = r.node.runtime, r.node.instruction
        per_step = runtime.obs_tokens + runtime.spec.action_size
        assert r.node.set_parameters([Parameter("prompt_path", value=str(tmp_path / "demo"))])[0].successful
        assert call(r.peer, Trigger, f"{r.ns}/gato_policy/load_prompt", Trigger.Request()).success
        assert r.wait_for(lambda: r.node.prompt is not None, 5.0), r.node._loader.state
        assert r.node.instruction is None and r.node.runtime.pinned == 2 * per_step, r.node.runtime.pinned
        assert r.node.set_parameters([Parameter("prompt_path", value="")])[0].successful
        resp = call(r.peer, Trigger, f"{r.ns}/gato_policy/load_prompt", Trigger.Request())
        assert resp.success and text in resp.message, resp.message
        assert r.wait_for(lambda: r.node.instruction == text, 5.0), r.node._loader.state
        assert r.node.prompt is None and r.node.runtime.pinned == len(runtime.instructions.encode(text))
        r.wait_running(timeout=3.0)
    finally:
        r.close()


@pytest.mark.parametrize("model, text, cause", [
    ("instructed_model", "stack the purple cube on the blue cube", "'purple' not in the policy's vocabulary"),
    ("tasks_model", "lift the red cube", "no instruction model"),
    ("partly_trained_model", "lift the red cube", "'lift_red''s, which this file was not trained on for arm panda"),
])
def test_an_instruction_the_file_cannot_take_is_reported_and_changes_nothing(request, model, text, cause):
    """A word outside the vocabulary, a file without an instruction model, or the instruction of a task the file
    was not trained on for this arm: the diagnostics' `instruction_error` says why, and the running episode goes on
    as it was (the same context, its position still growing, the same instruction, no safe tick)."""
    r = Robot(request.getfixturevalue(model))
    try:
        wait_steady(r)
        runtime, instruction = r.node.runtime, r.node.instruction
        position = runtime.position
        t = send_instruction(r, text)
        assert r.wait_for(lambda: cause in diagnostic_values(r).get("instruction_error", ""), 5.0), \
            (r.node.instruction_error, diagnostic_values(r))
        time.sleep(3 * PERIOD)
        assert r.node.runtime is runtime and runtime.position > position, "the context was never reset"
        assert r.node.instruction == instruction and r.node._loader.state == "idle"
        ticks = r.ticks_since(t)
        assert ticks and not any(rec["safe"] for rec in ticks), "the commands go on"
    finally:
        r.close()


# ----------------------------------------------------------------------------- prompts of another spec


def write_other_arm_demo(root: Path, steps: int = 20) -> None:
    from gato_ros.data import EpisodeWriter

    rng = np.random.default_rng(0)
    with EpisodeWriter(root, OTHER_ARM) as writer:
        obs = {o.name: rng.normal(size=(steps, *o.shape)) for o in OTHER_ARM.observations}
        actions = np.zeros((steps, OTHER_ARM.action_size), np.float32)
        actions[:, -1] = 1.0
        writer.add_episode(obs, actions, {"seed": 0, "arm": "other", "task": "lift_red"})


def test_load_prompt_recorded_with_another_spec_is_refused_and_the_context_kept(tasks_model, tmp_path):
    """~/load_prompt with a demonstration of another arm: the service answers with the reason, and the running
    context (the same runtime, its position still growing) and the commands go on untouched."""
    write_other_arm_demo(tmp_path / "other")
    r = Robot(tasks_model)
    try:
        wait_steady(r)
        runtime = r.node.runtime
        assert r.node.set_parameters([Parameter("prompt_path", value=str(tmp_path / "other"))])[0].successful
        position = runtime.position
        resp = call(r.peer, Trigger, f"{r.ns}/gato_policy/load_prompt", Trigger.Request())
        assert not resp.success, resp.message
        assert "other-arm" in resp.message and "node-test" in resp.message, resp.message
        assert "arm panda" in resp.message, "the answer names the arm served"
        assert r.node._loader.state == "idle", "nothing was started"
        t = time.monotonic()
        time.sleep(5 * PERIOD)
        assert r.node.runtime is runtime and runtime.position > position, "the context was never reset"
        assert r.node.prompt is None
        ticks = r.ticks_since(t)
        assert ticks and not any(rec["safe"] for rec in ticks), "commands go on"
    finally:
        r.close()


# ----------------------------------------------------------------------------- launch


def test_launch_passes_the_task_argument_to_the_node():
    """`ros2 launch gato_ros policy.launch.py task:=T` declares `task` (empty by default: the params file's),
    and hands it to the node's `task` parameter only when given."""
    tree = ast.parse((ROOT / "launch" / "policy.launch.py").read_text())
    declared = {c.args[0].value: {k.arg: k.value for k in c.keywords} for c in ast.walk(tree)
                if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "DeclareLaunchArgument"}
    assert "task" in declared and ast.literal_eval(declared["task"]["default_value"]) == ""
    given = [n for n in ast.walk(tree) if isinstance(n, ast.Dict)
             and any(isinstance(k, ast.Constant) and k.value == "model" for k in n.keys)]
    assert len(given) == 1 and "task" in [k.value for k in given[0].keys], "the launch file reads task:= for the node"
    assert parameter_overrides({"task": "lift_red", "arm": ""}) == {"task": "lift_red"}
    assert parameter_overrides({"task": ""}) == {}, "not given: the params file's task stands"
    import yaml

    params = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())["/**"]["ros__parameters"]
    assert params["task"] == "", "the params file serves the model's first task"
