"""rosbag2 MCAP bags without ROS: the layout rosbag2 reads, bounded memory, and reading cut-off files."""

from __future__ import annotations

import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mcap")
pytest.importorskip("mcap_ros2")
from gato_ros.rosbag import BagWriter, message_definition, open_bag, qos_yaml  # noqa: E402


def _joint_state_bytes(i: int) -> bytes:
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import JointState

    msg = JointState(name=["a", "b"], position=[0.5 * i, -1.0], velocity=[0.25, 1e-9 * i])
    msg.header.stamp.sec, msg.header.stamp.nanosec = i, 123
    return serialize_message(msg)


def _payload(i: int, size: int = 32) -> bytes:
    """A std_msgs/String CDR payload whose text carries its index (any bytes would do for the writer)."""
    text = f"{i:08d}".ljust(size, "x").encode()
    return b"\x00\x01\x00\x00" + struct.pack("<I", len(text) + 1) + text + b"\x00"


def _write_strings(out: Path, n: int, size: int = 32, **kwargs: object) -> BagWriter:
    writer = BagWriter(out, **kwargs)
    writer.add_topic("/t", "std_msgs/msg/String")
    for i in range(n):
        writer.write("/t", _payload(i, size), 1_000 + i, 900 + i)
    return writer


def test_bag_has_the_rosbag2_mcap_layout_and_decodes_without_ros(tmp_path: Path) -> None:
    pytest.importorskip("rclpy")
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    bag = tmp_path / "bag"
    writer = BagWriter(bag)
    writer.add_topic("/joint_states", "sensor_msgs/msg/JointState", qos_yaml([{"depth": 10, "reliability": 2}]))
    sent = [_joint_state_bytes(i) for i in range(5)]
    for i, data in enumerate(sent):
        writer.write("/joint_states", data, 2_000 + i, 1_990 + i)
    writer.close()

    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["version"] == 5 and info["storage_identifier"] == "mcap"
    assert info["relative_file_paths"] == ["bag_0.mcap"] and info["message_count"] == 5
    assert info["starting_time"]["nanoseconds_since_epoch"] == 2_000 and info["duration"]["nanoseconds"] == 4
    (topic,) = info["topics_with_message_count"]
    assert topic["message_count"] == 5 and topic["topic_metadata"]["type"] == "sensor_msgs/msg/JointState"
    assert topic["topic_metadata"]["serialization_format"] == "cdr"
    assert yaml.safe_load(topic["topic_metadata"]["offered_qos_profiles"])[0]["reliability"] == 2
    assert "&" not in (bag / "metadata.yaml").read_text(), "no YAML anchors: rosbag2 reads plain mappings"

    with open(bag / "bag_0.mcap", "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        assert reader.get_header().profile == "ros2"
        decoded = list(reader.iter_decoded_messages())
    schema, channel, message, msg = decoded[0]
    assert (schema.name, schema.encoding, channel.message_encoding) == ("sensor_msgs/msg/JointState", "ros2msg", "cdr")
    assert "MSG: std_msgs/Header" in schema.data.decode() and "MSG: builtin_interfaces/Time" in schema.data.decode()
    assert channel.metadata["offered_qos_profiles"] == topic["topic_metadata"]["offered_qos_profiles"]
    assert [m.data for _, _, m, _ in decoded] == sent, "the CDR bytes as given, never re-serialized"
    assert (message.log_time, message.publish_time) == (2_000, 1_990)
    assert list(msg.position) == [0.0, -1.0] and (msg.header.stamp.sec, msg.header.stamp.nanosec) == (0, 123)
    assert list(decoded[3][3].velocity) == [0.25, 1e-9 * 3], "float64 bit-exact"


def test_message_definition_lists_every_dependency_once() -> None:
    text = message_definition("sensor_msgs/msg/Image")
    assert text.count("MSG: std_msgs/Header") == 1 and text.count("MSG: builtin_interfaces/Time") == 1
    array = message_definition("std_msgs/msg/Float64MultiArray")
    assert "MSG: std_msgs/MultiArrayLayout" in array and "MSG: std_msgs/MultiArrayDimension" in array


def test_writer_memory_stays_flat_over_a_long_recording(tmp_path: Path) -> None:
    """64 MB of messages through a 256 KiB chunk: the writer holds about one chunk, never the recording."""
    writer = BagWriter(tmp_path / "bag", chunk_size=256 * 1024)
    writer.add_topic("/t", "std_msgs/msg/String")
    tracemalloc.start()
    try:
        for i in range(4_000):
            writer.write("/t", _payload(i, 16_000), 1_000 + i)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    writer.close()
    assert peak < 8 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB traced while writing 64 MB"
    bag = open_bag(tmp_path / "bag")
    assert sum(1 for _ in bag.messages()) == 4_000 and not bag.truncated


def test_a_cut_off_bag_reads_back_every_complete_chunk(tmp_path: Path) -> None:
    from mcap.reader import make_reader

    writer = _write_strings(tmp_path / "bag", 3_000, chunk_size=4 * 1024)
    writer.close()
    full = tmp_path / "bag" / "bag_0.mcap"
    with open(full, "rb") as f:
        chunks = make_reader(f).get_summary().chunk_indexes
    assert len(chunks) > 20
    sent = [_payload(i) for i in range(3_000)]
    size = full.stat().st_size
    cut_dir = tmp_path / "cut"
    for offset in [0, 5, 8, 100, chunks[3].chunk_start_offset + 7, size // 3, size // 2 + 1, size - 300, size - 1]:
        shutil.rmtree(cut_dir, ignore_errors=True)
        cut_dir.mkdir()
        (cut_dir / "cut_0.mcap").write_bytes(full.read_bytes()[:offset])
        bag = open_bag(cut_dir)  # no metadata.yaml: read from the .mcap, marked unfinished
        got = [m.data for m in bag.messages()]  # no exception escapes
        complete = sum(c.message_end_time - c.message_start_time + 1 for c in chunks
                       if c.chunk_start_offset + c.chunk_length <= offset)
        assert got == sent[: len(got)], f"offset {offset}: messages come back in order, unchanged"
        assert len(got) >= complete, f"offset {offset}: {len(got)} messages, {complete} in complete chunks"
        assert bag.truncated and not bag.complete and any("cut off" in p for p in bag.problems), bag.problems
    bag = open_bag(tmp_path / "bag")
    assert [m.data for m in bag.messages()] == sent and bag.complete and not bag.truncated and not bag.problems


def test_an_unfinished_recording_never_looks_finished(tmp_path: Path) -> None:
    """Until close() there is no metadata.yaml, and every chunk closed by the flush interval is on disk."""
    writer = _write_strings(tmp_path / "bag", 10, flush_interval_s=0.05)
    time.sleep(0.1)
    writer.write("/t", _payload(10), 2_000)  # the open chunk is now older than the interval: written out
    assert not (tmp_path / "bag" / "metadata.yaml").exists()
    bag = open_bag(tmp_path / "bag")
    assert not bag.complete and any("metadata.yaml" in p for p in bag.problems)
    assert [m.data for m in bag.messages()] == [_payload(i) for i in range(11)] and bag.truncated
    writer.close()
    assert open_bag(tmp_path / "bag").complete
    with pytest.raises(ValueError, match="not empty"):
        BagWriter(tmp_path / "bag")
