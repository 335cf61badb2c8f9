"""rosbag2 bags in MCAP storage, written and read without a ROS install (the `mcap` package only).

The layout is what `ros2 bag record -s mcap` writes and what `ros2 bag info` / `ros2 bag play` read:

    BAG/metadata.yaml     rosbag2_bagfile_information (version 5, the Humble format later distros read)
    BAG/BAG_0.mcap        profile "ros2"; per topic a channel (message encoding "cdr", user data
                          "offered_qos_profiles") and a schema (encoding "ros2msg", the full message
                          definition text: the type's .msg, then every dependency after a "MSG:" line)

Messages are the serialized CDR bytes as received (never re-serialized); `log_time` is the receive
time, `publish_time` the publisher's source time when the middleware gives it (as rosbag2 does on
Jazzy). The writer keeps one open chunk in memory (closed at `chunk_size` bytes or after
`flush_interval_s`), so memory stays flat over any recording and a crash loses at most that chunk.
`metadata.yaml` is written last, through a temporary name: a bag without it is unfinished.

The reader streams records and stops cleanly at a cut-off file: it returns the messages of every
complete chunk and reports the truncation (`Bag.truncated`, `Bag.problems`); no exception escapes.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

METADATA_FILE = "metadata.yaml"
PROFILE = "ros2"
SCHEMA_ENCODING = "ros2msg"
MESSAGE_ENCODING = "cdr"
METADATA_VERSION = 5
LIBRARY = "gato_ros.rosbag (mcap python)"
DEFINITION_SEPARATOR = "=" * 80
PRIMITIVE_TYPES = {"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
                   "uint32", "int64", "uint64", "string", "wstring"}
# rmw's "unset" duration, as rosbag2 writes it for infinite deadline / lifespan / lease
INFINITE_DURATION = {"sec": 2147483647, "nsec": 4294967295}


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases (rosbag2's parsers expect every mapping written out)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False)


class BagError(ValueError):
    """A bag that cannot be read: no MCAP file, not MCAP, unknown message type definition, ..."""


# ----------------------------------------------------------------------------- message definitions


def _definition_search_paths() -> list[Path]:
    """Install prefixes holding share/<package>/msg/*.msg: a sourced ROS (AMENT_PREFIX_PATH), then this venv."""
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    return [Path(p) for p in [*prefixes, sys.prefix]]


def _msg_file(package: str, name: str) -> Path:
    for prefix in _definition_search_paths():
        path = prefix / "share" / package / "msg" / f"{name}.msg"
        if path.is_file():
            return path
    raise BagError(f"no definition of {package}/msg/{name} (looked for share/{package}/msg/{name}.msg under "
                   f"{[str(p) for p in _definition_search_paths()]}; install the message package)")


def split_type_name(type_name: str) -> tuple[str, str]:
    """'sensor_msgs/msg/JointState' or 'sensor_msgs/JointState' -> ('sensor_msgs', 'JointState')."""
    parts = type_name.split("/")
    if len(parts) == 3 and parts[1] == "msg":
        return parts[0], parts[2]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise BagError(f"not a ROS 2 message type name: {type_name!r} (expected package/msg/Type)")


def _field_types(text: str, package: str) -> list[tuple[str, str]]:
    """The (package, Type) of every non-primitive field of a .msg text, in order."""
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        type_token = line.split()[0]
        base = re.sub(r"\[.*\]$", "", type_token)  # arrays: T[], T[N], T[<=N]
        base = base.split("<=", 1)[0]  # bounded strings: string<=N
        if base in PRIMITIVE_TYPES:
            continue
        if "/" in base:
            found.append(split_type_name(base))
        elif base == "Header":  # legacy shorthand
            found.append(("std_msgs", "Header"))
        else:
            found.append((package, base))
    return found


def message_definition(type_name: str) -> str:
    """The full ros2msg definition rosbag2 stores as the schema: the type's .msg text, then each
    dependency (depth first, once) after a separator line and `MSG: package/Type`."""
    package, name = split_type_name(type_name)
    text = _msg_file(package, name).read_text()
    parts, seen = [text.rstrip("\n")], {(package, name)}
    stack = list(reversed(_field_types(text, package)))
    while stack:
        dep = stack.pop()
        if dep in seen:
            continue
        seen.add(dep)
        dep_text = _msg_file(*dep).read_text()
        parts.append(f"{DEFINITION_SEPARATOR}\nMSG: {dep[0]}/{dep[1]}\n{dep_text.rstrip(chr(10))}")
        stack.extend(reversed(_field_types(dep_text, dep[0])))
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- QoS as rosbag2 writes it


def qos_yaml(profiles: Iterable[dict[str, Any]]) -> str:
    """rosbag2's `offered_qos_profiles` string (a YAML list) from dicts with the rmw enum values
    history, depth, reliability, durability, liveliness (1 = keep last, 1 = reliable / 2 = best effort,
    1 = transient local / 2 = volatile, 1 = automatic)."""
    entries = [{"history": int(p.get("history", 1)), "depth": int(p.get("depth", 0)),
                "reliability": int(p.get("reliability", 1)), "durability": int(p.get("durability", 2)),
                "deadline": INFINITE_DURATION, "lifespan": INFINITE_DURATION,
                "liveliness": int(p.get("liveliness", 1)), "liveliness_lease_duration": INFINITE_DURATION,
                "avoid_ros_namespace_conventions": False} for p in profiles]
    return _dump_yaml(entries) if entries else ""


# ----------------------------------------------------------------------------- writing


@dataclass
class _Topic:
    channel_id: int
    type_name: str
    offered_qos_profiles: str
    count: int = 0


class BagWriter:
    """One rosbag2 MCAP bag: `add_topic` once per topic, `write` each message, `close` to finish it."""

    def __init__(self, out_dir: str | Path, chunk_size: int = 1024 * 1024, flush_interval_s: float = 1.0) -> None:
        from mcap.writer import CompressionType, Writer

        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()):
            raise BagError(f"{self.out_dir}: exists and is not empty (a bag directory must be new)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.file_name = f"{self.out_dir.name}_0.mcap"
        self._file: IO[bytes] = open(self.out_dir / self.file_name, "wb")  # noqa: SIM115 - closed in close()
        self._writer = Writer(self._file, chunk_size=chunk_size, compression=CompressionType.ZSTD)
        self._writer.start(profile=PROFILE, library=LIBRARY)
        self.flush_interval_s = float(flush_interval_s)
        self._chunk_opened: float | None = None  # monotonic time of the open chunk's first message
        self._schemas: dict[str, int] = {}
        self.topics: dict[str, _Topic] = {}
        self.start_ns: int | None = None
        self.end_ns: int | None = None
        self.closed = False

    def add_topic(self, name: str, type_name: str, offered_qos_profiles: str = "") -> None:
        if name in self.topics:
            if self.topics[name].type_name != type_name:
                raise BagError(f"topic {name} is already recorded as {self.topics[name].type_name}, not {type_name}")
            return
        package, short = split_type_name(type_name)
        type_name = f"{package}/msg/{short}"
        if type_name not in self._schemas:
            self._schemas[type_name] = self._writer.register_schema(
                name=type_name, encoding=SCHEMA_ENCODING, data=message_definition(type_name).encode())
        channel = self._writer.register_channel(
            topic=name, message_encoding=MESSAGE_ENCODING, schema_id=self._schemas[type_name],
            metadata={"offered_qos_profiles": offered_qos_profiles})
        self.topics[name] = _Topic(channel, type_name, offered_qos_profiles)

    def write(self, topic: str, data: bytes, log_time_ns: int, publish_time_ns: int | None = None) -> None:
        """One serialized message, as received; log_time_ns is its receive time."""
        entry = self.topics[topic]
        self._writer.add_message(channel_id=entry.channel_id, log_time=int(log_time_ns), data=bytes(data),
                                 publish_time=int(publish_time_ns if publish_time_ns else log_time_ns),
                                 sequence=entry.count)
        entry.count += 1
        self.start_ns = log_time_ns if self.start_ns is None else min(self.start_ns, log_time_ns)
        self.end_ns = log_time_ns if self.end_ns is None else max(self.end_ns, log_time_ns)
        if self._chunk_opened is None:
            self._chunk_opened = time.monotonic()
        else:
            self.flush_if_due()

    def flush_if_due(self) -> None:
        """Close the open chunk once it is `flush_interval_s` old (a recorder calls this from a timer, so a
        quiet topic's last messages reach the disk too)."""
        if self._chunk_opened is not None and time.monotonic() - self._chunk_opened >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Close the open chunk and hand it to the OS: a crash after this keeps everything so far."""
        self._writer.flush()
        self._chunk_opened = None

    def message_count(self) -> int:
        return sum(t.count for t in self.topics.values())

    def close(self) -> Path:
        """Finish the MCAP file (summary, footer), then write metadata.yaml: the bag is complete."""
        if self.closed:
            return self.out_dir
        self._writer.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.closed = True
        tmp = self.out_dir / (METADATA_FILE + ".tmp")
        tmp.write_text(_dump_yaml(self.metadata()))
        os.replace(tmp, self.out_dir / METADATA_FILE)
        return self.out_dir

    def metadata(self) -> dict[str, Any]:
        start = self.start_ns or 0
        duration = (self.end_ns or 0) - start
        count = self.message_count()
        return {"rosbag2_bagfile_information": {
            "version": METADATA_VERSION,
            "storage_identifier": "mcap",
            "duration": {"nanoseconds": duration},
            "starting_time": {"nanoseconds_since_epoch": start},
            "message_count": count,
            "topics_with_message_count": [
                {"topic_metadata": {"name": name, "type": t.type_name, "serialization_format": MESSAGE_ENCODING,
                                    "offered_qos_profiles": t.offered_qos_profiles},
                 "message_count": t.count} for name, t in self.topics.items()],
            "compression_format": "",
            "compression_mode": "",
            "relative_file_paths": [self.file_name],
            "files": [{"path": self.file_name, "starting_time": {"nanoseconds_since_epoch": start},
                       "duration": {"nanoseconds": duration}, "message_count": count}],
        }}


# ----------------------------------------------------------------------------- reading


@dataclass
class BagMessage:
    topic: str
    type_name: str
    data: bytes  # serialized CDR
    log_time_ns: int  # receive time
    publish_time_ns: int  # the publisher's source time (log time when unknown)
    sequence: int


@dataclass
class Bag:
    """What a bag directory (or a lone .mcap file) holds; `messages()` streams it."""

    path: Path
    files: list[Path]
    complete: bool  # metadata.yaml present: the recorder finished
    metadata: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)  # truncation and other read problems, filled while reading
    truncated: bool = False
    topics: dict[str, str] = field(default_factory=dict)  # topic -> type, filled while reading
    definitions: dict[str, str] = field(default_factory=dict)  # type -> ros2msg definition text

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[BagMessage]:
        """Every message of every complete chunk, in file order. A cut-off or corrupt file ends the
        stream at its last complete record and sets `truncated` and `problems` instead of raising."""
        wanted = set(topics) if topics is not None else None
        for path in self.files:
            yield from self._read_file(path, wanted)

    def _read_file(self, path: Path, wanted: set[str] | None) -> Iterator[BagMessage]:
        from mcap.records import Channel, Message, Schema
        from mcap.stream_reader import StreamReader

        schemas: dict[int, Schema] = {}
        channels: dict[int, Channel] = {}
        with open(path, "rb") as stream:
            reader = StreamReader(stream, validate_crcs=True, record_size_limit=1 << 30)
            try:
                for record in reader.records:
                    if isinstance(record, Schema):
                        schemas[record.id] = record
                    elif isinstance(record, Channel):
                        channels[record.id] = record
                        schema = schemas.get(record.schema_id)
                        type_name = schema.name if schema is not None else ""
                        self.topics.setdefault(record.topic, type_name)
                        if schema is not None:
                            self.definitions.setdefault(type_name, schema.data.decode(errors="replace"))
                    elif isinstance(record, Message):
                        channel = channels.get(record.channel_id)
                        if channel is None:
                            self.problems.append(f"{path.name}: message on unknown channel {record.channel_id}")
                            continue
                        if wanted is not None and channel.topic not in wanted:
                            continue
                        schema = schemas.get(channel.schema_id)
                        yield BagMessage(channel.topic, schema.name if schema else "", record.data, record.log_time,
                                         record.publish_time or record.log_time, record.sequence)
            except Exception as err:  # EndOfFile, bad CRC, garbage lengths: the file ends here for us
                self.truncated = True
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                self.problems.append(f"{path.name}: cut off or corrupt after its last complete chunk ({reason})")
                return


def open_bag(path: str | Path) -> Bag:
    """A bag directory (metadata.yaml + .mcap files) or one .mcap file. A directory without
    metadata.yaml is read from its .mcap files and marked incomplete (`complete` False, a problem noted)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".mcap":
            raise BagError(f"{path}: not an .mcap file or a bag directory")
        sidecar = path.parent / METADATA_FILE
        bag = Bag(path, [path], sidecar.is_file(), None)
        if not bag.complete:
            bag.problems.append(f"{path.parent}: no {METADATA_FILE} (the recording did not finish)")
        return bag
    if not path.is_dir():
        raise BagError(f"{path}: no such bag (expected a directory with {METADATA_FILE} and .mcap files)")
    meta_path = path / METADATA_FILE
    if meta_path.is_file():
        try:
            metadata = yaml.safe_load(meta_path.read_text())
            info = metadata["rosbag2_bagfile_information"]
            files = [path / name for name in info["relative_file_paths"]]
        except (yaml.YAMLError, KeyError, TypeError) as err:
            raise BagError(f"{meta_path}: not rosbag2 metadata ({type(err).__name__}: {err})") from err
        if info.get("storage_identifier") != "mcap":
            raise BagError(f"{meta_path}: storage {info.get('storage_identifier')!r}; only mcap bags are read here")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise BagError(f"{meta_path}: lists files that are missing: {missing}")
        return Bag(path, files, True, metadata)
    files = sorted(path.glob("*.mcap"))
    if not files:
        raise BagError(f"{path}: neither {METADATA_FILE} nor any .mcap file")
    bag = Bag(path, files, False, None)
    bag.problems.append(f"{path}: no {METADATA_FILE} (the recording did not finish); reading the .mcap files")
    return bag
