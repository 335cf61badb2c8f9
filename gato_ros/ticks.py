"""The per-tick record: what the policy node decided on each control tick, for recording and replay.

The node publishes one std_msgs/String per tick on `~/tick` (`/gato_policy/tick`) holding one JSON
object; `gato-ros record` stores it in the bag and `gato-ros dataset` / `gato-ros replay` read it back.
The builder and the parser live here (numpy only), imported by both sides.

    seq       int, +1 per tick over the node's life
    stamp_ns  int, the node's clock at the tick (sim time on /clock, else wall time)
    model     str, the ONNX file's name
    tokens    list of int, the action tokens of the command ([] on a safe tick)
    step_ms   float or null, the runtime's step time (null on a safe tick)
    safe      bool, True when the node published the safe (zero) command instead of the policy's
    reason    str, why the tick was safe ("" when the policy ran)
    command   list of float, the published command in controller joint order
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

TICK_TOPIC = "~/tick"  # relative to the node: /gato_policy/tick
TICK_FIELDS: dict[str, tuple[type, ...]] = {
    "seq": (int,), "stamp_ns": (int,), "model": (str,), "tokens": (list,), "step_ms": (float, int, type(None)),
    "safe": (bool,), "reason": (str,), "command": (list,),
}


class TickError(ValueError):
    """A tick record that is not JSON or lacks a field of the contract."""


def tick_json(seq: int, stamp_ns: int, model: str, tokens: Sequence[int], step_ms: float | None, safe: bool,
              reason: str, command: Sequence[float]) -> str:
    """One tick record as the JSON text the node publishes."""
    return json.dumps({
        "seq": int(seq), "stamp_ns": int(stamp_ns), "model": str(model), "tokens": [int(t) for t in tokens],
        "step_ms": None if step_ms is None or not math.isfinite(step_ms) else round(float(step_ms), 4),
        "safe": bool(safe), "reason": str(reason), "command": [float(c) for c in command],
    })


def parse_tick(text: str) -> dict[str, Any]:
    """The record of one tick, checked against the contract (TickError names what is wrong)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise TickError(f"tick record is not JSON ({err})") from err
    if not isinstance(record, dict):
        raise TickError(f"tick record is {type(record).__name__}, not a JSON object")
    for name, types in TICK_FIELDS.items():
        if name not in record:
            raise TickError(f"tick record lacks field {name!r}")
        value = record[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise TickError(f"tick record field {name!r} is {type(value).__name__}, expected {types[0].__name__}")
    return record
