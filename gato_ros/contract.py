"""The contract between the stages, written once: every stage imports it, it imports no stage.

Tokenizer, model, training, export, runtime, node and bench agree on these names and numbers; a
model file carries them in its metadata and the runtime refuses a file whose copy differs. This
module imports only the standard library (no numpy, no torch, no rclpy), so any stage can use it.

    token ids          the tokenizer's constants (Gato, Reed et al. 2022, section 2.1)
    GatoConfig         the model's hyperparameters and PRESETS, JSON in checkpoints and ONNX files
    EMPTY_POSITION     the absolute position of an empty cache slot
    metadata keys      `gato_ros.*` keys of an ONNX file's metadata_props, and what a file serves (Served)
    tensor names       the ONNX graph's inputs and outputs, cache tensors included
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

# ----------------------------------------------------------------------------------------------
# Token ids and tokenizer constants

MU = 100.0
M = 256.0
NUM_BINS = 1024
TEXT_VOCAB_SIZE = 32000
CONTINUOUS_OFFSET = TEXT_VOCAB_SIZE
DISCRETE_RANGE = 1024
SEPARATOR_TOKEN = CONTINUOUS_OFFSET + NUM_BINS
PATCH_TOKEN = SEPARATOR_TOKEN + 1
PAD_TOKEN = SEPARATOR_TOKEN + 2
VOCAB_SIZE = SEPARATOR_TOKEN + 3

PATCH_SIZE = 16
# Pixel scaling of a patch (Gato): uint8 to [-1, 1], then divided by sqrt(PATCH_SIZE) = 4.
PIXEL_HALF_RANGE = 127.5
PATCH_VALUE_DIVISOR = 4.0
PATCH_POSITION_INTERVALS = 128

# The local position of a token that gets no local position encoding: the separator and the action tokens of
# a model with `observation_local_positions_only` (Gato adds local positions to observation tokens only).
NO_LOCAL_POSITION = -1

TOKENIZER_CONSTANT_NAMES = ("MU", "M", "NUM_BINS", "TEXT_VOCAB_SIZE", "CONTINUOUS_OFFSET", "DISCRETE_RANGE",
                            "SEPARATOR_TOKEN", "PATCH_TOKEN", "PAD_TOKEN", "VOCAB_SIZE", "PATCH_SIZE",
                            "PATCH_POSITION_INTERVALS")


def tokenizer_constants() -> dict[str, float | int]:
    """The constants a model file is exported with (`gato_ros.tokenizer`); a runtime refuses a file that differs."""
    return {name: globals()[name] for name in TOKENIZER_CONSTANT_NAMES}


# ----------------------------------------------------------------------------------------------
# Cache

# Position of an empty cache slot: so far in the past that no query ever sees it.
EMPTY_POSITION = -(2**40)

# ----------------------------------------------------------------------------------------------
# ONNX metadata keys (metadata_props); docs/interfaces.md "ONNX file" says what each holds

META_CONFIG = "gato_ros.config"
META_SPEC = "gato_ros.spec"
META_TOKENIZER = "gato_ros.tokenizer"
META_CONTEXT_TOKENS = "gato_ros.context_tokens"
META_VARIANT = "gato_ros.variant"
META_EMPTY_POSITION = "gato_ros.empty_position"
META_CACHE_UPDATE = "gato_ros.cache_update"
META_LOGIT_IDS = "gato_ros.logit_ids"
# JSON list of cache capacities besides config.context_window that the model was trained for (absent: none).
META_TRAINED_CAPACITIES = "gato_ros.trained_capacities"
# How the graph keeps its cache (absent: ring). Both are rings of slots in any order, masked by `past_positions`.
# CACHE_LAYOUT_RING: present.* hold the new tokens' keys/values only; the runtime writes them into its ring.
# CACHE_LAYOUT_IN_PLACE: present.* are the whole ring (past's shape, L slots) with the new tokens written at slot
# position mod L; the runtime binds present to past's memory, so the write is in place and nothing is copied.
# The runtime keeps L = capacity + the most tokens it passes in one call, so no write evicts a visible token.
META_CACHE_LAYOUT = "gato_ros.cache_layout"
CACHE_LAYOUT_RING = "ring"
CACHE_LAYOUT_IN_PLACE = "ring-in-place"

REQUIRED_METADATA = (META_CONFIG, META_SPEC, META_TOKENIZER, META_CONTEXT_TOKENS)

# What a file serves: its bodies and tasks (issue 13, one file for several arms and tasks). Both optional.
# META_SPECS: JSON object, arm name -> that arm's spec (an EmbodimentSpec's JSON object), in the file's order;
#   META_SPEC is then the spec of one of them (the default arm, the first), so a reader that knows only
#   META_SPEC still serves a body the file was trained for.
# META_TASKS: JSON list of the task names the file was trained on (the names `--task` accepts).
# A file without them (every file before issue 13) serves LEGACY_ARM with META_SPEC and LEGACY_TASK.
META_SPECS = "gato_ros.specs"
META_TASKS = "gato_ros.tasks"
LEGACY_ARM = "panda"
LEGACY_TASK = "stack_red_on_blue"


# How a file trained with Gato prompting is conditioned (absent: not trained so; a prompt then simply rolls out
# of the cache). JSON object, `Conditioning` below. With it, the runtime pins the prefix (the demonstration
# prompt or the instruction's text tokens) at positions 0.. for the whole episode and rolls only the episode's
# tokens, which keep their true positions: training lays prompted windows out the same way.
META_CONDITIONING = "gato_ros.conditioning"
# Which tasks each arm was trained on: JSON object arm -> [task, ...] (absent: every arm was trained on every task,
# as in files written before it). A file serves an (arm, task) pair only if it was trained on it: an untrained
# pair would compute commands no demonstration ever taught, for a real arm.
META_TRAINED_PAIRS = "gato_ros.trained_pairs"


@dataclass(frozen=True)
class Conditioning:
    """What selects the task in a file trained with prompts (Gato section 3.3) and/or instructions."""

    prompt_steps: int = 0  # a demonstration prompt is the last this many timesteps of an episode; 0: none
    instructions: dict[str, str] = field(default_factory=dict)  # task name -> its instruction text
    instruction_model: str = ""  # base64 of the SentencePiece model proto (gato_ros.instructions); "": none

    def __post_init__(self) -> None:
        if self.prompt_steps < 0:
            raise ValueError(f"prompt_steps {self.prompt_steps} < 0")
        if bool(self.instructions) != bool(self.instruction_model):
            raise ValueError("instructions and the instruction model come together")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Conditioning:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"{META_CONDITIONING} must be a JSON object")
        return cls(prompt_steps=int(raw.get("prompt_steps", 0)), instructions=dict(raw.get("instructions", {})),
                   instruction_model=str(raw.get("instruction_model", "")))


@dataclass(frozen=True)
class Served:
    """The arms (each with its spec as a JSON object) and the tasks a model file serves."""

    specs: dict[str, dict]
    tasks: tuple[str, ...]
    conditioning: Conditioning | None = None  # a file trained with prompts / instructions (META_CONDITIONING)
    pairs: dict[str, tuple[str, ...]] | None = None  # arm -> the tasks trained on it (META_TRAINED_PAIRS); None: all

    def __post_init__(self) -> None:
        if self.pairs is None:
            return
        if set(self.pairs) != set(self.specs):
            raise ValueError(f"trained pairs name arms {sorted(self.pairs)}, the file serves {sorted(self.specs)}")
        for arm, tasks in self.pairs.items():
            if not tasks or set(tasks) - set(self.tasks):
                raise ValueError(f"trained pairs give arm {arm!r} tasks {list(tasks)}, not among the served "
                                 f"{list(self.tasks)}")

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def tasks_for(self, arm: str) -> tuple[str, ...]:
        """The tasks `arm` was trained on, in the file's task order (every task for a file without the record)."""
        if self.pairs is None:
            return self.tasks
        return tuple(t for t in self.tasks if t in self.pairs[arm])

    @property
    def default_arm(self) -> str:
        return self.arms[0]


def served_metadata(specs: dict[str, str], tasks: list[str] | tuple[str, ...],
                    conditioning: Conditioning | None = None,
                    pairs: dict[str, tuple[str, ...]] | None = None) -> dict[str, str]:
    """The metadata_props that say what a file serves: `specs` maps arm name -> spec JSON text (the first arm
    is the default, whose spec also goes under META_SPEC), `tasks` the task names, `conditioning` how a task is
    selected in a file trained with prompts or instructions, `pairs` the tasks each arm was trained on."""
    if not specs or not tasks:
        raise ValueError("a model file serves at least one arm and one task")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names: {list(tasks)}")
    objects = {arm: json.loads(text) for arm, text in specs.items()}
    if conditioning is not None and set(conditioning.instructions) - set(tasks):
        raise ValueError(f"instructions for tasks the file does not serve: "
                         f"{sorted(set(conditioning.instructions) - set(tasks))}")
    Served(specs=objects, tasks=tuple(tasks), pairs=pairs)  # the pairs must name these arms and tasks
    props = {META_SPECS: json.dumps(objects), META_TASKS: json.dumps(list(tasks)), META_SPEC: specs[next(iter(specs))]}
    if conditioning is not None:
        props[META_CONDITIONING] = conditioning.to_json()
    if pairs is not None:
        props[META_TRAINED_PAIRS] = json.dumps({arm: list(t) for arm, t in pairs.items()})
    return props


def read_served(meta: dict[str, str]) -> Served:
    """What a file's metadata_props say it serves (the legacy defaults for a file without META_SPECS/META_TASKS).
    ValueError on unreadable or inconsistent entries."""
    default_spec = json.loads(meta[META_SPEC])
    specs = json.loads(meta[META_SPECS]) if META_SPECS in meta else {LEGACY_ARM: default_spec}
    tasks = json.loads(meta[META_TASKS]) if META_TASKS in meta else [LEGACY_TASK]
    if not isinstance(specs, dict) or not specs or not all(isinstance(v, dict) for v in specs.values()):
        raise ValueError(f"{META_SPECS} must be a non-empty JSON object of arm name -> spec")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{META_TASKS} must be a non-empty JSON list of task names")
    if default_spec not in specs.values():
        raise ValueError(f"{META_SPEC} is not one of the specs in {META_SPECS}")
    conditioning = Conditioning.from_json(meta[META_CONDITIONING]) if META_CONDITIONING in meta else None
    pairs = None
    if META_TRAINED_PAIRS in meta:
        raw = json.loads(meta[META_TRAINED_PAIRS])
        if not isinstance(raw, dict) or not all(isinstance(t, list) for t in raw.values()):
            raise ValueError(f"{META_TRAINED_PAIRS} must be a JSON object of arm name -> [task, ...]")
        pairs = {arm: tuple(t) for arm, t in raw.items()}
    return Served(specs=specs, tasks=tuple(tasks), conditioning=conditioning, pairs=pairs)

# ----------------------------------------------------------------------------------------------
# ONNX tensor names

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOCAL_POSITIONS = "local_positions"
PAST_POSITIONS = "past_positions"
PATCHES = "patches"
PATCH_POSITIONS = "patch_positions"
LOGITS = "logits"


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def past_names(n_layer: int) -> list[str]:
    """The cache inputs in graph order: layer 0 key, layer 0 value, layer 1 key, ..."""
    return [name(i) for i in range(n_layer) for name in (past_key_name, past_value_name)]


def present_names(n_layer: int) -> list[str]:
    """The new tokens' keys/values, outputs in the same order as `past_names`."""
    return [name(i) for i in range(n_layer) for name in (present_key_name, present_value_name)]


def is_past_name(name: str) -> bool:
    return name.startswith("past_key_values.")


def io_names(n_layer: int, images: bool) -> tuple[list[str], list[str]]:
    """The policy graph's input and output names, in order."""
    inputs = [INPUT_IDS, POSITION_IDS, LOCAL_POSITIONS, PAST_POSITIONS, *past_names(n_layer)]
    if images:
        inputs += [PATCHES, PATCH_POSITIONS]
    return inputs, [LOGITS, *present_names(n_layer)]


# The cache-update graph (`META_CACHE_UPDATE`): updated.{j} = cache.{j} with slots[s] <- new.{j}[:, :, s],
# j over `past_names` order.
CACHE_UPDATE_SLOTS = "slots"


def cache_update_names(j: int) -> tuple[str, str, str]:
    """(cache input, new-tokens input, updated output) of the j-th cache tensor in the cache-update graph."""
    return f"cache.{j}", f"new.{j}", f"updated.{j}"


# ----------------------------------------------------------------------------------------------
# Model configuration

# Fields added after files were first shipped, with the value that reproduces a file written before them:
# a config read from JSON without the field behaves as it was trained.
LEGACY_DEFAULTS: dict[str, object] = {"observation_local_positions_only": False}


@dataclass
class GatoConfig:
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_ff: int = 256
    vocab_size: int = VOCAB_SIZE
    context_window: int = 1024  # tokens a query can see, itself included (the runtime's cache size)
    max_local_positions: int = 512  # tokens per timestep (observation + separator + actions)
    rope_period: int = 65536  # positions are taken mod this; must exceed context_window
    rope_base: float = 10000.0
    value_embedding: bool = True  # embed continuous tokens from their value (False: plain lookup)
    value_fourier_features: int = 16
    value_clip: float = 8.0  # decoded values are clipped to +-value_clip for the linear term
    patch_channels: int = 32  # width of the per-patch ResNet-v2 block
    dropout: float = 0.0
    label_sigma: float = 2.5  # Gaussian soft labels over continuous bins, in bins (0: hard labels)
    # Local position encodings on observation tokens only, as in the paper: the separator and the action tokens
    # get NO_LOCAL_POSITION. False: every token of a timestep gets its index (files written before this field).
    observation_local_positions_only: bool = True
    # A training-only head that predicts privileged state (for example the cube positions a seeing policy
    # must find in its image) from each timestep's separator token: width of that state (0: none). It shapes
    # what the transformer learns to extract; the serving graph never contains it.
    aux_size: int = 0
    aux_weight: float = 1.0  # its squared error's weight beside the action loss
    # Errors beyond this many normalization scales count linearly, not squared (a Huber loss, scaled to equal the
    # squared error below it): the states a DAgger round's policy wanders into (the arm flung far from the table,
    # a cube knocked off) would otherwise dominate the gradient and, through clipping, starve the action loss.
    # 0: the plain squared error at any size (files written before this field).
    aux_huber: float = 0.0
    # Training only: the weight of the discrete action tokens' cross-entropy beside the continuous tokens' KL. The
    # gripper is one token of eight a step and changes in a handful of steps an episode, where the whole task turns.
    discrete_weight: float = 1.0
    # Positions [0, pinned_span) hold a pinned prefix (a prompt or an instruction): every later query sees those
    # keys, however far back, while the episode's own tokens (from position pinned_span on) are seen within
    # context_window. So a conditioned policy keeps a short reach and its prefix alike. 0: no such region.
    pinned_span: int = 0
    # A query sees only the tokens of its own timestep (keys at most its local position back), besides a pinned
    # prefix: the policy acts on the current observation and cannot copy the previous timestep's actions, a
    # shortcut that teacher forcing rewards and closed loop punishes. Needs a local position on every token.
    step_local_attention: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")
        if not 0 < self.context_window < self.rope_period:
            raise ValueError(f"context_window {self.context_window} must be in (0, rope_period={self.rope_period})")
        if self.step_local_attention and self.observation_local_positions_only:
            raise ValueError("step_local_attention needs a local position on every token "
                             "(observation_local_positions_only=False)")
        if not 0 <= self.pinned_span < self.rope_period:
            raise ValueError(f"pinned_span {self.pinned_span} must be in [0, rope_period={self.rope_period})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> GatoConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**asdict(PRESETS[name]), **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict) -> GatoConfig:
        """A config from JSON; a field the JSON lacks takes its LEGACY_DEFAULTS value, else the default."""
        known = {f.name for f in fields(cls)}
        return cls(**{**LEGACY_DEFAULTS, **{k: v for k, v in raw.items() if k in known}})

    @classmethod
    def from_json(cls, text: str) -> GatoConfig:
        return cls.from_dict(json.loads(text))


PRESETS: dict[str, GatoConfig] = {
    "tiny": GatoConfig(n_layer=4, n_embd=64, n_head=4, n_ff=256),
    # The paper's three sizes (Gato table 1: layers, width, feedforward, heads).
    "gato-79m": GatoConfig(n_layer=8, n_embd=768, n_head=24, n_ff=3072, patch_channels=96),
    "gato-364m": GatoConfig(n_layer=12, n_embd=1536, n_head=12, n_ff=6144, patch_channels=128),
    "gato-1.18b": GatoConfig(n_layer=24, n_embd=2048, n_head=16, n_ff=8192, patch_channels=128),
}
