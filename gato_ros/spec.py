"""The embodiment spec: everything about one robot that the tokenizer, model file and node share.

It is a JSON-serializable dataclass so it can travel inside the ONNX metadata and beside a dataset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

ObservationKind = Literal["image", "continuous", "discrete"]
ActionKind = Literal["continuous", "discrete"]


@dataclass(frozen=True)
class ObservationSpec:
    """One observation key. Images are (H, W, 3) uint8; tensors are float arrays of `shape`.

    `offset` and `scale` normalize a continuous tensor before mu-law: value' = (value - offset) / scale.
    They are per element (flattened) or a single number; None means identity.
    """

    name: str
    shape: tuple[int, ...]
    kind: ObservationKind = "continuous"
    offset: tuple[float, ...] | None = None
    scale: tuple[float, ...] | None = None

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ActionSpec:
    """One action dimension, in controller order.

    Continuous: a torque in N·m (or N), tokenized with mu-law, clamped to [-limit, limit].
    Discrete: the command is one of `values` (for example gripper open/close forces); the token is
    the index of the chosen value.
    """

    name: str
    kind: ActionKind = "continuous"
    limit: float = 1.0
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class EmbodimentSpec:
    name: str
    observations: tuple[ObservationSpec, ...]
    actions: tuple[ActionSpec, ...]
    control_rate_hz: float = 20.0
    joint_names: tuple[str, ...] = field(default_factory=tuple)
    # What the continuous actions command (gato_ros.commands.MODES_FOR_ACTIONS): "effort" (torques, every
    # Panda spec), "velocity" (rad/s, the xArm6) or "position" (rad). Left out of the JSON when "effort",
    # so files and datasets written before the field read back equal.
    action_mode: str = "effort"

    def __post_init__(self) -> None:
        names = [o.name for o in self.observations]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate observation keys in spec {self.name!r}: {names}")
        for o in self.observations:
            if o.kind == "image" and (len(o.shape) != 3 or o.shape[2] != 3 or o.shape[0] % 16 or o.shape[1] % 16):
                raise ValueError(f"image {o.name!r} must be (H, W, 3) with H, W multiples of 16, got {o.shape}")
        for a in self.actions:
            if a.kind == "discrete" and len(a.values) < 2:
                raise ValueError(f"discrete action {a.name!r} needs at least two values")
            if a.limit <= 0:
                raise ValueError(f"action {a.name!r} needs a positive limit")

    @property
    def action_size(self) -> int:
        return len(self.actions)

    @property
    def image_keys(self) -> tuple[ObservationSpec, ...]:
        return tuple(sorted((o for o in self.observations if o.kind == "image"), key=lambda o: o.name))

    @property
    def tensor_keys(self) -> tuple[ObservationSpec, ...]:
        """Non-image keys in Gato's order: sorted by key."""
        return tuple(sorted((o for o in self.observations if o.kind != "image"), key=lambda o: o.name))

    @property
    def action_limits(self) -> tuple[float, ...]:
        return tuple(a.limit for a in self.actions)

    def observation(self, name: str) -> ObservationSpec:
        for o in self.observations:
            if o.name == name:
                return o
        raise KeyError(name)

    def to_json(self) -> str:
        raw = asdict(self)
        if raw["action_mode"] == "effort":
            del raw["action_mode"]
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EmbodimentSpec:
        raw = json.loads(text)
        return cls(
            name=raw["name"],
            observations=tuple(
                ObservationSpec(
                    name=o["name"],
                    shape=tuple(o["shape"]),
                    kind=o["kind"],
                    offset=None if o.get("offset") is None else tuple(o["offset"]),
                    scale=None if o.get("scale") is None else tuple(o["scale"]),
                )
                for o in raw["observations"]
            ),
            actions=tuple(
                ActionSpec(name=a["name"], kind=a["kind"], limit=a["limit"], values=tuple(a.get("values", ())))
                for a in raw["actions"]
            ),
            control_rate_hz=raw.get("control_rate_hz", 20.0),
            joint_names=tuple(raw.get("joint_names", ())),
            action_mode=raw.get("action_mode", "effort"),
        )
