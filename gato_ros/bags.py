"""`gato-ros dataset --from-bag`: recorded bags (gato-ros record, or ros2 bag record -s mcap) → training data.

One dataset step per control tick of the policy node (/gato_policy/tick, `gato_ros.ticks`): the
action is the command the node published on that tick, the observation is what the node held when
it ticked: for each input topic (joint states, camera, /gato/observations/<key>) the latest message
published before the tick record was (publish time = the publisher's source time, one machine's
clock). So camera and joints are sampled at the control rate, and each command is paired with the
observation it answered. Inputs are converted exactly as the node converts them (`gato_ros.ros_io`).

Episodes are cut at the episode topic's events (the sim bridge's ~/episode: {"event": "start" | "end"};
with another topic every message starts an episode), at a gap in the ticks longer than --gap-s, where
the tick sequence restarts or skips, and where the node's clock jumps. A tick is dropped (and counted
in the report) when it was a safe tick, an input is missing, older than --max-age-s or invalid, its
observation was already answered, or it lies outside an episode; a drop inside an episode cuts it.
An episode that is only part of what the events announce (cut, or recorded from the middle) is
dropped unless --keep-partial. Everything dropped or skipped is printed and written to
DIR/conversion_report.json; dataset.json comes last, only when at least one episode was written.

Reading needs only pip packages (`mcap`, `mcap-ros2-support`), no ROS install.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gato_ros import ros_io
from gato_ros.rosbag import Bag, BagError, BagMessage, open_bag
from gato_ros.spec import EmbodimentSpec
from gato_ros.ticks import TickError, parse_tick

TICK_TOPIC = "/gato_policy/tick"
EPISODE_TOPIC = "/sim_bridge/episode"
JOINT_KEYS = ("joint_positions", "joint_velocities")
EXPECTED_TYPES = {"joint_states": "sensor_msgs/msg/JointState", "image": "sensor_msgs/msg/Image",
                  "vector": "std_msgs/msg/Float64MultiArray", "tick": "std_msgs/msg/String",
                  "episode": "std_msgs/msg/String"}


@dataclass(frozen=True)
class Topics:
    """Where each input of the spec comes from (the node's defaults)."""

    joint_states: str = "/joint_states"
    image: str = "/camera/image_raw"
    observation_prefix: str = "/gato/observations/"
    tick: str = TICK_TOPIC
    episode: str = EPISODE_TOPIC


@dataclass
class Input:
    """One input topic: publish times (sorted) and, per message, the converted value or why it is invalid."""

    name: str
    topic: str
    times: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


@dataclass
class Step:
    observation: dict[str, np.ndarray]
    action: np.ndarray  # spec order
    tick: dict[str, Any]
    obs_time: int  # publish time of the primary input's message


@dataclass
class Episode:
    steps: list[Step]
    seed: Any = None
    success: Any = None
    announced_steps: int | None = None  # from the end event
    starts_at_first: bool = True  # the first step answers the episode's first observation
    bag: str = ""

    @property
    def complete(self) -> bool:
        return self.starts_at_first and (self.announced_steps is None or self.announced_steps == len(self.steps))


@dataclass
class BagReport:
    bag: str
    complete: bool
    truncated: bool
    problems: list[str]
    ticks: int = 0
    steps: int = 0
    dropped: Counter = field(default_factory=Counter)
    cuts: Counter = field(default_factory=Counter)
    episodes: list[dict[str, Any]] = field(default_factory=list)
    skipped_episodes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"bag": self.bag, "complete": self.complete, "truncated": self.truncated, "problems": self.problems,
                "ticks": self.ticks, "steps": self.steps, "dropped_ticks": dict(self.dropped),
                "cuts": dict(self.cuts), "episodes": self.episodes, "skipped_episodes": self.skipped_episodes}

    def lines(self) -> list[str]:
        out = [f"{self.bag}: {self.ticks} ticks -> {self.steps} steps in {len(self.episodes)} episode(s)"
               + ("" if self.complete else " [recording unfinished: no metadata.yaml]")
               + (" [file cut off: read up to its last complete chunk]" if self.truncated else "")]
        out += [f"  problem: {p}" for p in self.problems]
        out += [f"  dropped {n} tick(s): {reason}" for reason, n in self.dropped.most_common()]
        out += [f"  cut {n} time(s): {reason}" for reason, n in self.cuts.most_common()]
        out += [f"  skipped episode {e}" for e in self.skipped_episodes]
        return out


def _decoders(bag: Bag) -> dict[str, Any]:
    from mcap.records import Schema
    from mcap_ros2.decoder import DecoderFactory

    factory = DecoderFactory()  # caches by schema id: one id per type
    return {name: factory.decoder_for("cdr", Schema(id=i + 1, name=name, encoding="ros2msg", data=text.encode()))
            for i, (name, text) in enumerate(bag.definitions.items())}


def _inputs(spec: EmbodimentSpec, topics: Topics) -> list[tuple[str, str, str]]:
    """(input name, topic, expected type) the spec needs, in the node's order."""
    keys = {o.name for o in spec.observations}
    needed = []
    if keys & set(JOINT_KEYS):
        needed.append(("joint_states", topics.joint_states, EXPECTED_TYPES["joint_states"]))
    if any(o.kind == "image" for o in spec.observations):
        needed.append(("image", topics.image, EXPECTED_TYPES["image"]))
    for o in spec.observations:
        if o.kind != "image" and o.name not in JOINT_KEYS:
            needed.append((o.name, topics.observation_prefix + o.name, EXPECTED_TYPES["vector"]))
    return needed


def _convert(spec: EmbodimentSpec, name: str, msg: Any) -> dict[str, np.ndarray]:
    """A decoded message → the observation entries it fills (ros_io, as the node does); InputError if invalid."""
    keys = {o.name for o in spec.observations}
    if name == "joint_states":
        pos, vel = ros_io.joint_state_arrays(msg, spec.joint_names, "joint_velocities" in keys)
        return {k: v for k, v in (("joint_positions", pos), ("joint_velocities", vel)) if k in keys}
    if name == "image":
        return {o.name: ros_io.image_to_observation(msg, o.shape) for o in spec.observations if o.kind == "image"}
    return {name: ros_io.vector_observation(msg.data, spec.observation(name).shape)}


def _check_types(bag: Bag, wanted: dict[str, str]) -> None:
    wrong = [f"{topic} is {bag.topics[topic]}, expected {expected}" for topic, expected in wanted.items()
             if topic in bag.topics and bag.topics[topic] != expected]
    if wrong:
        raise BagError(f"{bag.path}: wrong message types: {'; '.join(wrong)}")


def _load(bag: Bag, spec: EmbodimentSpec, topics: Topics) -> tuple[list[Input], list[BagMessage], list[BagMessage]]:
    needed = _inputs(spec, topics)
    wanted = {topic: expected for _, topic, expected in needed}
    wanted[topics.tick] = EXPECTED_TYPES["tick"]
    wanted[topics.episode] = EXPECTED_TYPES["episode"]
    messages = list(bag.messages(wanted))  # also fills bag.topics and bag.definitions
    _check_types(bag, wanted)
    missing = [topic for topic in wanted if topic != topics.episode and topic not in bag.topics]
    if missing:
        raise BagError(f"{bag.path}: no {', '.join(missing)} in the bag (the spec {spec.name!r} needs "
                       f"{', '.join(name for name, _, _ in needed)} and the node's tick records); it holds "
                       f"{sorted(bag.topics)}")
    decoders = _decoders(bag)
    inputs = {topic: Input(name, topic) for name, topic, _ in needed}
    ticks, events = [], []
    for m in sorted(messages, key=lambda m: m.publish_time_ns):
        if m.topic == topics.tick:
            ticks.append(m)
        elif m.topic == topics.episode:
            events.append(m)
        else:
            entry = inputs[m.topic]
            try:
                value, error = _convert(spec, entry.name, decoders[m.type_name](m.data)), None
            except (ros_io.InputError, ValueError, TypeError, AttributeError) as err:
                value, error = None, f"invalid {entry.name}: {err}"
            entry.times.append(m.publish_time_ns)
            entry.values.append(value)
            entry.errors.append(error)
    decode_string = decoders.get("std_msgs/msg/String")
    for m in ticks + events:
        m.data = decode_string(m.data).data  # type: ignore[misc]
    return list(inputs.values()), ticks, events


def _event(text: str) -> dict[str, Any]:
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return {"event": "start"}
    return event if isinstance(event, dict) else {"event": "start"}


def convert_bag(path: str | Path, spec: EmbodimentSpec, topics: Topics = Topics(), gap_s: float = 1.0,
                max_age_s: float = 0.25, joint_names: list[str] | None = None, min_steps: int = 1,
                keep_partial: bool = False) -> tuple[list[Episode], BagReport]:
    """The episodes of one bag, and the report of what was dropped or cut."""
    bag = open_bag(path)
    inputs, tick_msgs, event_msgs = _load(bag, spec, topics)
    report = BagReport(str(path), bag.complete, bag.truncated, list(bag.problems), ticks=len(tick_msgs))
    controller = list(joint_names or spec.joint_names)
    if sorted(controller) != sorted(spec.joint_names):
        raise BagError(f"--joint-names {controller} is not a permutation of the spec's {list(spec.joint_names)}")
    order = np.array([spec.joint_names.index(n) for n in controller])
    event_times = [m.publish_time_ns for m in event_msgs]
    events = [_event(m.data) for m in event_msgs]  # type: ignore[arg-type]
    if not event_msgs:
        report.problems.append(f"no episode events on {topics.episode}: episodes are cut at gaps and restarts only")
    episodes: list[Episode] = []
    current: Episode | None = None
    segment: Any = None
    previous: dict[str, Any] | None = None
    last_obs: int | None = None
    models: Counter = Counter()

    def cut(reason: str | None) -> None:
        nonlocal current
        if reason and current is not None and current.steps:
            report.cuts[reason] += 1
        if current is not None and current.steps:
            episodes.append(current)
        current = None

    for m in tick_msgs:
        try:
            tick = parse_tick(m.data)  # type: ignore[arg-type]
        except TickError as err:
            report.dropped[f"unreadable tick record ({err})"] += 1
            cut("unreadable tick record")
            continue
        models[tick["model"]] += 1
        tick_time = m.publish_time_ns
        if previous is not None:
            if tick["seq"] <= previous["seq"]:
                cut("the tick sequence restarted (the node restarted)")
            elif tick["seq"] != previous["seq"] + 1:
                report.dropped["tick records missing from the bag (lost before recording)"] += (
                    tick["seq"] - previous["seq"] - 1)
                cut("tick records missing")
            if tick["stamp_ns"] < previous["stamp_ns"]:
                cut("the node's clock jumped back")
            elif tick["stamp_ns"] - previous["stamp_ns"] > gap_s * 1e9:
                cut(f"the node's clock jumped forward more than {gap_s} s")
            if tick_time - previous["_time"] > gap_s * 1e9:
                cut(f"no tick for more than {gap_s} s")
        previous = {**tick, "_time": tick_time}
        if tick["safe"]:
            report.dropped[f"safe tick: {tick['reason'].split(':')[0] or 'no reason'}"] += 1
            cut("safe tick")
            continue
        observation: dict[str, np.ndarray] = {}
        reason, obs_time = None, None
        for entry in inputs:
            i = bisect.bisect_left(entry.times, tick_time) - 1
            if i < 0:
                reason = f"no {entry.name} before the tick"
                break
            if tick_time - entry.times[i] > max_age_s * 1e9:
                reason = f"{entry.name} older than {max_age_s} s"
                break
            if entry.errors[i] is not None:
                reason = entry.errors[i]
                break
            observation.update(entry.values[i])
            obs_time = entry.times[i] if obs_time is None else obs_time
        if reason is None and obs_time == last_obs:
            reason = "observation already answered by the previous tick"
        command = np.asarray(tick["command"], dtype=np.float64)
        if reason is None and command.shape != (spec.action_size,):
            reason = f"command has {command.size} values, the spec {spec.action_size}"
        if reason is None and not np.all(np.isfinite(command)):
            reason = "command holds NaN or inf"
        key, event = None, None
        if reason is None and event_msgs:
            k = bisect.bisect_left(event_times, obs_time) - 1
            event = events[k] if k >= 0 else None
            if event is None or event.get("event") == "end":
                reason = "outside an episode (before its start event or after its end)"
            key = k
        if reason is not None:
            report.dropped[reason] += 1
            cut(None if reason.startswith("outside an episode") else reason)  # an episode's natural end
            continue
        last_obs = obs_time
        if event_msgs and key != segment:
            cut(None)
        if current is None:
            segment = key
            current = Episode([], bag=str(path))
            if event is not None:
                current.seed = event.get("seed")
                first_obs = bisect.bisect_right(inputs[0].times, event_times[key])  # first after the start event
                current.starts_at_first = first_obs < len(inputs[0].times) and inputs[0].times[first_obs] == obs_time
                end = events[key + 1] if key + 1 < len(events) else None
                if end is not None and end.get("event") == "end":
                    current.success, current.announced_steps = end.get("success"), end.get("steps")
        action = np.empty(spec.action_size)
        action[order] = command
        current.steps.append(Step(observation, action, tick, obs_time))
    cut(None)
    if len(models) > 1:
        report.problems.append(f"ticks from several models: {dict(models)}")
    kept = []
    for ep in episodes:
        info = {"seed": ep.seed, "steps": len(ep.steps), "first_seq": ep.steps[0].tick["seq"],
                "last_seq": ep.steps[-1].tick["seq"]}
        if len(ep.steps) < min_steps:
            report.skipped_episodes.append({**info, "why": f"fewer than {min_steps} steps"})
        elif not ep.complete and not keep_partial:
            why = ("starts after the episode's first observation" if not ep.starts_at_first else
                   f"{len(ep.steps)} of the {ep.announced_steps} steps the end event announces")
            report.skipped_episodes.append({**info, "why": f"partial: {why} (--keep-partial keeps it)"})
        elif event_msgs and ep.announced_steps is None and not keep_partial:
            report.skipped_episodes.append({**info, "why": "no end event (the recording stopped mid-episode; "
                                                           "--keep-partial keeps it)"})
        else:
            kept.append(ep)
            report.episodes.append({**info, "success": ep.success, "complete": ep.complete})
    report.steps = sum(len(ep.steps) for ep in kept)
    return kept, report


def episode_arrays(spec: EmbodimentSpec, episode: Episode) -> tuple[dict[str, np.ndarray], np.ndarray]:
    observations = {o.name: np.stack([s.observation[o.name] for s in episode.steps]) for o in spec.observations}
    return observations, np.stack([s.action for s in episode.steps])


def load_spec(model: str | None, spec_path: str | None) -> EmbodimentSpec:
    """The spec from an ONNX model's metadata or a spec.json (a dataset's, or `--spec`)."""
    if spec_path:
        return EmbodimentSpec.from_json(Path(spec_path).read_text())
    if model:
        from gato_ros.runtime import open_session, read_model_info

        session, _ = open_session(model, "cpu", threads=1)
        return read_model_info(session, model).spec
    raise BagError("pass --model PATH.onnx (the policy the recording ran) or --spec spec.json")


def bags_to_dataset(bags: list[str | Path], out: str | Path, spec: EmbodimentSpec, **options: Any) -> dict[str, Any]:
    """Convert bags into one dataset at `out`; returns the report (also DIR/conversion_report.json).
    Raises BagError, leaving no dataset.json, when no episode survives."""
    from gato_ros.data import EpisodeWriter

    start = time.perf_counter()
    converted = [convert_bag(path, spec, **options) for path in bags]
    episodes = [ep for eps, _ in converted for ep in eps]
    reports = [r.to_dict() for _, r in converted]
    summary = {"bags": reports, "episodes": len(episodes), "steps": sum(len(e.steps) for e in episodes),
               "seconds": round(time.perf_counter() - start, 3)}
    out = Path(out)
    if not episodes:
        raise BagError("no episode to write: " + "; ".join(
            line for _, r in converted for line in r.lines()))
    writer = EpisodeWriter(out, spec)
    for ep in episodes:
        observations, actions = episode_arrays(spec, ep)
        writer.add_episode(observations, actions, {
            "seed": ep.seed, "success": ep.success, "steps": len(ep.steps), "complete": ep.complete,
            "source": "bag", "bag": ep.bag, "first_seq": ep.steps[0].tick["seq"],
            "last_seq": ep.steps[-1].tick["seq"], "model": ep.steps[0].tick["model"]})
    (out / "conversion_report.json").write_text(json.dumps(summary, indent=2))
    writer.close()  # dataset.json last
    summary["lines"] = [line for _, r in converted for line in r.lines()]
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-bag", dest="bags", nargs="+", required=True, help="bag directories or .mcap files")
    parser.add_argument("--out", required=True, help="dataset directory to create")
    parser.add_argument("--model", default=None, help="the ONNX policy the recording ran (its spec is used)")
    parser.add_argument("--spec", default=None, help="a spec.json instead of --model")
    parser.add_argument("--episode-topic", default=EPISODE_TOPIC,
                        help="episode events (std_msgs/String; JSON {'event': 'start'|'end'} or any text = start)")
    parser.add_argument("--tick-topic", default=TICK_TOPIC)
    parser.add_argument("--joint-states-topic", default="/joint_states")
    parser.add_argument("--image-topic", default="/camera/image_raw")
    parser.add_argument("--gap-s", type=float, default=1.0, help="cut an episode where ticks pause this long")
    parser.add_argument("--max-age-s", type=float, default=0.25, help="drop a tick whose input is older (the node's "
                        "stale_timeout_s)")
    parser.add_argument("--joint-names", nargs="+", default=None, help="the command's joint order, if the node's "
                        "joint_names parameter differed from the model's")
    parser.add_argument("--min-steps", type=int, default=1)
    parser.add_argument("--keep-partial", action="store_true", help="also write episodes cut short")


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.model, args.spec)
        topics = Topics(joint_states=args.joint_states_topic, image=args.image_topic, tick=args.tick_topic,
                        episode=args.episode_topic)
        summary = bags_to_dataset(args.bags, args.out, spec, topics=topics, gap_s=args.gap_s,
                                  max_age_s=args.max_age_s, joint_names=args.joint_names, min_steps=args.min_steps,
                                  keep_partial=args.keep_partial)
    except (BagError, OSError, ValueError) as err:
        print(f"gato-ros dataset: {err}", file=sys.stderr)
        return 1
    for line in summary["lines"]:
        print(line)
    print(f"gato-ros dataset: {summary['episodes']} episode(s), {summary['steps']} steps written to {args.out} in "
          f"{summary['seconds']:.2f} s (report: {Path(args.out) / 'conversion_report.json'})")
    return 0
