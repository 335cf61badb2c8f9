"""Bags → datasets: each command paired with the observation it answered; bad input reported, never hidden."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mcap_ros2")
pytest.importorskip("rclpy")
pytest.importorskip("pybullet")
from rclpy.serialization import serialize_message  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray, String  # noqa: E402

from gato_ros.bags import bags_to_dataset, convert_bag  # noqa: E402
from gato_ros.cli import main as cli_main  # noqa: E402
from gato_ros.data import read_dataset  # noqa: E402
from gato_ros.rosbag import BagError, BagWriter  # noqa: E402
from gato_ros.ticks import tick_json  # noqa: E402
from sim.spec import stacking_spec  # noqa: E402

SPEC = stacking_spec()
MS = 1_000_000
PERIOD = 50 * MS
T0 = 1_700_000_000 * 1_000_000_000


class RunWriter:
    """A recording as the sim bridge, the node and the recorder make it, with exact expected values."""

    def __init__(self, out: Path, joint_topic_type: str = "sensor_msgs/msg/JointState", task_state: bool = True,
                 seed: int = 0, flush_interval_s: float = 1.0) -> None:
        self.writer = BagWriter(out, flush_interval_s=flush_interval_s)
        self.writer.add_topic("/joint_states", joint_topic_type)
        self.task_state = task_state
        if task_state:
            self.writer.add_topic("/gato/observations/task_state", "std_msgs/msg/Float64MultiArray")
        self.writer.add_topic("/gato_policy/tick", "std_msgs/msg/String")
        self.writer.add_topic("/sim_bridge/episode", "std_msgs/msg/String")
        self.rng = np.random.default_rng(seed)
        self.time = T0
        self.sim_ns = 0
        self.seq = 0
        self.joint_type = joint_topic_type

    def _write(self, topic: str, msg: object, at: int) -> None:
        self.writer.write(topic, serialize_message(msg), at + 200_000, at)  # received 0.2 ms after publishing

    def event(self, **payload: object) -> None:
        self.time += MS
        self._write("/sim_bridge/episode", String(data=json.dumps(payload)), self.time)

    def observation(self) -> dict[str, np.ndarray]:
        """Publish one observation (joint names in reverse order: the node maps them by name)."""
        self.time += MS
        obs = {"joint_positions": self.rng.normal(size=8), "joint_velocities": self.rng.normal(size=8),
               "task_state": self.rng.normal(size=17)}
        if self.joint_type.endswith("JointState"):
            msg = JointState(name=list(reversed(SPEC.joint_names)), position=obs["joint_positions"][::-1].tolist(),
                             velocity=obs["joint_velocities"][::-1].tolist())
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(self.sim_ns, 1_000_000_000)
        else:
            msg = String(data="not a joint state")
        self._write("/joint_states", msg, self.time)
        if self.task_state:
            self._write("/gato/observations/task_state", Float64MultiArray(data=obs["task_state"].tolist()),
                        self.time + 100_000)
        return obs

    def tick(self, safe: bool = False, stamp_jump_ns: int = 0, delay_ns: int = 5 * MS) -> np.ndarray:
        """The node's tick answering the latest observation, `delay_ns` after it; then the clock moves on."""
        self.seq += 1
        self.sim_ns += stamp_jump_ns
        command = np.zeros(8) if safe else np.r_[self.rng.uniform(-5, 5, size=7), self.rng.choice([-15.0, 15.0])]
        record = tick_json(self.seq, self.sim_ns, "m.onnx", [] if safe else [1] * 8, None if safe else 2.0, safe,
                           "safe command: stale ['joint_states']" if safe else "", command)
        self._write("/gato_policy/tick", String(data=record), self.time + delay_ns)
        self.time += PERIOD
        self.sim_ns += PERIOD
        return command

    def episode(self, seed: int, steps: int, events: bool = True, safe_at: int | None = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A whole episode: start event, steps observations each answered, end event, the final observation
        (answered too, but after the end: not a step)."""
        if events:
            self.event(event="start", seed=seed)
        observations, actions = [], []
        for t in range(steps):
            observations.append(self.observation())
            actions.append(self.tick(safe=t == safe_at))
        if events:
            self.event(event="end", seed=seed, steps=steps, success=seed % 2 == 0, nan=False)
        self.observation()
        self.tick()
        self.time += 300 * MS  # the supervisor's pause between episodes
        return {k: np.stack([o[k] for o in observations]) for k in observations[0]}, np.stack(actions)


def test_each_command_is_paired_with_the_observation_it_answered(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "bag")
    expected = [run.episode(seed=10, steps=12), run.episode(seed=11, steps=7)]
    run.writer.close()
    summary = bags_to_dataset([tmp_path / "bag"], tmp_path / "ds", SPEC)
    data = read_dataset(tmp_path / "ds", spec=SPEC)
    assert len(data) == 2 and summary["steps"] == 19
    for i, (observations, actions) in enumerate(expected):
        got_obs, got_actions = data.episode(i)
        for key, value in observations.items():
            np.testing.assert_array_equal(got_obs[key], value, err_msg=key)  # bit-exact
        np.testing.assert_array_equal(got_actions, actions.astype(np.float32))
    assert [(e["seed"], e["success"], e["complete"]) for e in data.episodes] == [(10, True, True), (11, False, True)]
    report = json.loads((tmp_path / "ds" / "conversion_report.json").read_text())["bags"][0]
    assert report["ticks"] == 21 and report["dropped_ticks"] == {
        "outside an episode (before its start event or after its end)": 2}


def test_a_tick_without_a_fresh_input_is_dropped_and_cuts_its_episode(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "bag")
    run.episode(seed=1, steps=6, safe_at=3)  # the node sent its safe command on step 3
    run.event(event="start", seed=2)
    run.observation()
    run.tick()
    run.tick(delay_ns=0)  # no new observation by the next tick: the same one answered twice
    run.time += 400 * MS  # the next observation is late: the node ticks on a 0.4 s old one
    run.tick(delay_ns=0)
    run.observation()
    run.tick()
    run.event(event="end", seed=2, steps=3, success=False, nan=False)
    run.writer.close()
    episodes, report = convert_bag(tmp_path / "bag", SPEC)
    assert episodes == [] and report.steps == 0
    assert report.dropped["safe tick: safe command"] == 1
    assert report.dropped["joint_states older than 0.25 s"] == 1
    assert report.dropped["observation already answered by the previous tick"] == 1
    assert [e["why"].split(":")[0] for e in report.skipped_episodes] == ["partial"] * 4
    kept, _ = convert_bag(tmp_path / "bag", SPEC, keep_partial=True)
    assert [len(e.steps) for e in kept] == [3, 2, 1, 1]
    with pytest.raises(BagError, match="no episode to write"):
        bags_to_dataset([tmp_path / "bag"], tmp_path / "ds", SPEC)
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_without_episode_events_runs_are_cut_at_clock_jumps_and_gaps(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "bag")
    run.episode(seed=0, steps=5, events=False)
    run.observation()
    run.tick(stamp_jump_ns=-10 * PERIOD)  # the node's clock went back (a restarted sim)
    for _ in range(3):
        run.observation()
        run.tick()
    run.time += 2_000 * MS  # two seconds without ticks
    for _ in range(4):
        run.observation()
        run.tick()
    run.writer.close()
    episodes, report = convert_bag(tmp_path / "bag", SPEC, gap_s=1.0)
    assert [len(e.steps) for e in episodes] == [6, 4, 4]
    assert report.cuts["the node's clock jumped back"] == 1 and report.cuts["no tick for more than 1.0 s"] == 1
    assert any("no episode events" in p for p in report.problems)


def test_bad_bags_give_clear_errors(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "no-task", task_state=False)
    run.episode(seed=0, steps=3)
    run.writer.close()
    with pytest.raises(BagError, match="no /gato/observations/task_state in the bag"):
        convert_bag(tmp_path / "no-task", SPEC)
    run = RunWriter(tmp_path / "wrong", joint_topic_type="std_msgs/msg/String")
    run.episode(seed=0, steps=3)
    run.writer.close()
    with pytest.raises(BagError, match="/joint_states is std_msgs/msg/String, expected sensor_msgs/msg/JointState"):
        convert_bag(tmp_path / "wrong", SPEC)
    with pytest.raises(BagError, match="no such bag"):
        convert_bag(tmp_path / "missing", SPEC)
    assert cli_main(["dataset", "--from-bag", str(tmp_path / "wrong"), "--out", str(tmp_path / "ds")]) == 1


def test_a_cut_off_recording_keeps_its_whole_episodes_and_says_so(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "bag", flush_interval_s=0.0)  # every message its own chunk, on disk at once
    first = run.episode(seed=4, steps=10)
    size = (tmp_path / "bag" / "bag_0.mcap").stat().st_size
    run.episode(seed=5, steps=10)
    run.writer.close()
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tmp_path / "bag" / "bag_0.mcap", cut / "cut_0.mcap")
    with open(cut / "cut_0.mcap", "r+b") as f:
        f.truncate(size + 4000)  # killed while writing the second episode
    summary = bags_to_dataset([cut], tmp_path / "ds", SPEC)
    report = summary["bags"][0]
    assert report["truncated"] and not report["complete"]
    assert summary["episodes"] == 1 and [e["seed"] for e in report["episodes"]] == [4]
    (partial,) = report["skipped_episodes"]  # the second episode's first steps made it to disk, not its end
    assert partial["seed"] == 5 and partial["steps"] >= 1 and "no end event" in partial["why"]
    observations, actions = read_dataset(tmp_path / "ds").episode(0)
    np.testing.assert_array_equal(observations["task_state"], first[0]["task_state"])
    np.testing.assert_array_equal(actions, first[1].astype(np.float32))


def test_tick_records_keep_their_contract() -> None:
    from gato_ros.ticks import TickError, parse_tick

    record = parse_tick(tick_json(3, 5_000_000_000, "m.onnx", [32001, 1], float("nan"), True, "stale", [0.0, -0.5]))
    assert record == {"seq": 3, "stamp_ns": 5_000_000_000, "model": "m.onnx", "tokens": [32001, 1], "step_ms": None,
                      "safe": True, "reason": "stale", "command": [0.0, -0.5]}
    for bad, why in (("[1]", "not a JSON object"), ("{", "not JSON"), ('{"seq": 1}', "lacks field 'stamp_ns'"),
                     (json.dumps({**record, "safe": 1}), "field 'safe' is int")):
        with pytest.raises(TickError, match=why):
            parse_tick(bad)
