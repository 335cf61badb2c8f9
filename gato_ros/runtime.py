"""The policy runtime: ONNX Runtime + a rolling KV cache, numpy only (no torch, no rclpy).

One control tick (`PolicyRuntime.step`):
    observation → tokens (validated) → one prefill call that appends them to the cache
    → A action tokens decoded one at a time, each constrained to its token range → torques.

The cache is a ring buffer of fixed capacity C (the file's context, by default). Every call passes
the whole buffer plus `past_positions` (absolute position of each slot, EMPTY for unused slots);
the model masks by position, so slot order does not matter and the newest keys simply overwrite the
oldest slots: no recompute, no growth, memory flat for a run of any length.

Files exported now declare an in-place ring (`gato_ros.cache_layout` = ring-in-place): the graph writes the new
keys/values into the ring itself (slot = position mod L) and the runtime binds each present output to its past
input's memory, so nothing is copied. That ring has L = C + `max_call_tokens` slots (room for one call's
tokens, so a write never evicts a token the call may still see) and the runtime marks every slot older than
the newest C tokens empty after each call: the model sees exactly what a ring of C slots shows it. Longer calls
(a prompt) are split into pieces of at most `max_call_tokens`; causal attention makes that the same
computation. Files without the key (earlier exports, the TorchScript graphs) keep a ring of exactly C slots
that the runtime writes from the presents, as described below.

The last action token of a tick is not run on its own: nothing needs its logits, so it is prepended
to the next tick's prefill (one model call per step saved, the token stream is the same).

Two ways to keep the cache:
- host (CPU provider): numpy arrays bound to the session by pointer (IOBinding, no copies); with the
  earlier layout the ring write is a numpy slice assignment of the returned presents.
- device (CUDA / TensorRT): OrtValues on the GPU, so the cache never crosses PCIe. An in-place ring is
  bound as both input and output; with the earlier layout the OrtValues are double-buffered and a tiny
  scatter graph shipped in the file's metadata (`gato_ros.cache_update`) writes the presents into the ring
  on the device. It runs on the CPU provider too (`device_cache=True`), which is how the tests check it
  on a machine without a GPU.
"""

from __future__ import annotations

import base64
import ctypes
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.contract import GatoConfig
from gato_ros.instructions import InstructionError, InstructionTokenizer, instruction_tokenizer
from gato_ros.spec import EmbodimentSpec

log = logging.getLogger(__name__)

ObservationError = tok.ObservationError

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class ModelLoadError(RuntimeError):
    """The model file is missing, is not ONNX, or is not a gato_ros policy for this tokenizer."""


class ModelRuntimeError(RuntimeError):
    """A loaded model failed during a step; the command of that step must not reach the arm."""


class NonFiniteLogitsError(ModelRuntimeError):
    """The model produced NaN or inf logits for an action (argmax would pick bin 0: full -limit torque).
    The context holds the failed tick's tokens: reset() before stepping again."""


def cuda_device_count() -> int:
    """GPUs visible through the driver API, without loading any CUDA runtime; 0 when there is no driver."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime reads from the file's metadata and graph signature."""

    config: GatoConfig
    spec: EmbodimentSpec  # the served arm's
    arm: str  # the arm served (one of the file's `gato_ros.specs`, the default one unless asked)
    arms: tuple[str, ...]  # every arm the file serves, the default first
    context_tokens: int
    variant: str
    empty_position: int
    num_layers: int
    num_heads: int
    head_dim: int
    cache_dtype: np.dtype
    has_images: bool  # the graph takes patches (some spec the file serves has an image key)
    cache_update: bytes | None
    logit_ids: np.ndarray | None  # token id of each logits column; None: column i is token i (full vocabulary)
    trained_capacities: tuple[int, ...]  # cache capacities besides config.context_window the model was trained for
    cache_layout: str  # contract.CACHE_LAYOUT_*: who writes the new keys/values into the ring
    tasks: tuple[str, ...] = (contract.LEGACY_TASK,)  # the tasks the file was trained on for this arm
    conditioning: contract.Conditioning | None = None  # prompts/instructions pinned in the cache (see reset)

    def accepts_capacity(self, capacity: int) -> bool:
        """A cache of `capacity` slots serves the model as trained: its window, or one the file declares."""
        return capacity == self.config.context_window or capacity in self.trained_capacities


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def read_model_info(session: ort.InferenceSession, path: str, arm: str | None = None) -> ModelInfo:
    """What the file says about itself, checked against this runtime's contract (ModelLoadError naming the field).
    `arm`: which of the file's arms to serve (its spec is `spec`); None: the default arm."""
    meta = session.get_modelmeta().custom_metadata_map
    config, _, context, trained_capacities = read_metadata(meta, path)
    arm, served, spec, has_images = choose_arm(meta, arm, path)
    key = check_signature(session, config, has_images, path)
    heads, head_dim = key.shape[1], key.shape[3]
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        heads, head_dim = config.n_head, config.head_dim
    cache_dtype = _ORT_TYPES.get(key.type)
    if cache_dtype is None:
        raise ModelLoadError(f"{path}: unsupported cache type {key.type}")
    update = meta.get(contract.META_CACHE_UPDATE)
    layout = meta.get(contract.META_CACHE_LAYOUT, contract.CACHE_LAYOUT_RING)
    if layout not in (contract.CACHE_LAYOUT_RING, contract.CACHE_LAYOUT_IN_PLACE):
        raise ModelLoadError(f"{path}: unknown {contract.META_CACHE_LAYOUT} {layout!r}")
    if served.conditioning is not None and layout == contract.CACHE_LAYOUT_IN_PLACE:
        raise ModelLoadError(f"{path}: a pinned prompt needs a ring the runtime writes; this graph writes its ring "
                             f"in place (export it with --attention plain)")
    info = ModelInfo(
        config=config,
        spec=spec,
        arm=arm,
        arms=served.arms,
        context_tokens=context,
        variant=meta.get(contract.META_VARIANT, "fp32"),
        empty_position=int(meta.get(contract.META_EMPTY_POSITION, contract.EMPTY_POSITION)),
        num_layers=config.n_layer,
        num_heads=int(heads),
        head_dim=int(head_dim),
        cache_dtype=np.dtype(cache_dtype),
        has_images=has_images,
        cache_update=base64.b64decode(update) if update else None,
        logit_ids=read_logit_ids(meta, spec, session.get_outputs()[0].shape[-1], path),
        trained_capacities=trained_capacities,
        cache_layout=layout,
        tasks=served.tasks_for(arm),
        conditioning=served.conditioning,
    )
    if not info.accepts_capacity(context):
        raise ModelLoadError(f"{path}: {contract.META_CONTEXT_TOKENS}={context} disagrees with the window the model "
                             f"was trained with (config context_window={config.context_window}) and "
                             f"{contract.META_TRAINED_CAPACITIES} does not list it")
    return info


def read_metadata(meta: dict[str, str], path: str) -> tuple[GatoConfig, EmbodimentSpec, int, tuple[int, ...]]:
    """(config, spec, default capacity, declared capacities); refuses a file without gato_ros metadata or with
    other tokenizer constants than `gato_ros.contract`'s."""
    missing = [k for k in contract.REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelLoadError(f"{path} is ONNX but not a gato_ros policy: metadata lacks {missing}")
    try:
        config = GatoConfig.from_json(meta[contract.META_CONFIG])
        spec = EmbodimentSpec.from_json(meta[contract.META_SPEC])
        constants = json.loads(meta[contract.META_TOKENIZER])
        context = int(meta[contract.META_CONTEXT_TOKENS])
        trained_capacities = tuple(int(c) for c in json.loads(meta.get(contract.META_TRAINED_CAPACITIES, "[]")))
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: unreadable gato_ros metadata ({e})") from e
    differ = {k: (constants.get(k), v) for k, v in contract.tokenizer_constants().items() if constants.get(k) != v}
    if differ:
        raise ModelLoadError(f"{path} was exported with other tokenizer constants (file, ours): {differ}")
    return config, spec, context, trained_capacities


def choose_arm(meta: dict[str, str], arm: str | None, path: str
               ) -> tuple[str, contract.Served, EmbodimentSpec, bool]:
    """(arm, what the file serves, that arm's spec, whether any served spec has images) from `gato_ros.specs`
    (a file without it serves contract.LEGACY_ARM with `gato_ros.spec`). An arm the file does not serve is a
    ModelLoadError naming the arms it does: never a command computed for another body."""
    try:
        served = contract.read_served(meta)
        specs = {name: EmbodimentSpec.from_json(json.dumps(raw)) for name, raw in served.specs.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: unreadable {contract.META_SPECS}/{contract.META_TASKS}/"
                             f"{contract.META_CONDITIONING} ({e})") from e
    arm = served.default_arm if arm is None else arm
    if arm not in specs:
        raise ModelLoadError(f"{path} serves arm(s) {', '.join(served.arms)}, not arm {arm!r}")
    return arm, served, specs[arm], any(s.image_keys for s in specs.values())


def check_signature(session: ort.InferenceSession, config: GatoConfig, images: bool, path: str) -> Any:
    """Every input and output name the contract gives for the config's n_layer is in the graph; returns the first
    cache input's description (its shape and type set the cache's)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    required, wanted_out = contract.io_names(config.n_layer, images)
    lacking = [n for n in required if n not in inputs] + [n for n in wanted_out if n not in outputs]
    if lacking:
        raise ModelLoadError(f"{path}: graph signature does not match the gato_ros contract for "
                             f"n_layer={config.n_layer} (missing {lacking})")
    return inputs[contract.past_key_name(0)]


def read_logit_ids(meta: dict[str, str], spec: EmbodimentSpec, width: Any, path: str) -> np.ndarray | None:
    """The ids behind the logits columns (`gato_ros.logit_ids`: sorted [lo, hi) ranges); None when the
    key is absent (a full-vocabulary head). A head that cannot score every action token is refused."""
    if contract.META_LOGIT_IDS not in meta:
        return None
    try:
        ranges = [(int(lo), int(hi)) for lo, hi in json.loads(meta[contract.META_LOGIT_IDS])]
        ids = np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in ranges])
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: unreadable gato_ros.logit_ids ({e})") from e
    if np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= tok.VOCAB_SIZE:
        raise ModelLoadError(f"{path}: gato_ros.logit_ids must be sorted, disjoint token ranges")
    if isinstance(width, int) and width != len(ids):
        raise ModelLoadError(f"{path}: logits has {width} columns but gato_ros.logit_ids lists {len(ids)} ids")
    for i in range(spec.action_size):
        lo, hi = tok.action_token_range(spec, i)
        if not np.isin(np.arange(lo, hi), ids).all():
            raise ModelLoadError(f"{path}: the head's logit_ids do not cover action {spec.actions[i].name!r} "
                                 f"(tokens [{lo}, {hi}))")
    return ids


def _session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: a provider that cannot start is handled below, not printed
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    # No busy-waiting between calls: the runtime shares the CPU with the ROS executor, the DDS threads
    # and the robot's other processes; spinning ORT workers starved the control timer on 2 cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Masked attention scores exp() to denormals, which the CPU computes ~8x slower: flushing them to zero
    # made the tiny policy's softmax over a masked window 8x faster (values below 1e-38 change nothing).
    # ORT applies it process-wide from the first session a process creates (scripts/graph_numbers.py).
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return so


def _provider_chain(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider == "auto":
        chain = [p for p in ("tensorrt", "cuda") if PROVIDER_NAMES[p] in available]
        # onnxruntime-gpu lists the GPU providers even without a GPU: ask the driver first, quietly.
        if chain and cuda_device_count() == 0:
            chain = []
        return chain + ["cpu"]
    if provider not in PROVIDER_NAMES:
        raise ValueError(f"provider must be auto, cpu, cuda or tensorrt, got {provider!r}")
    if PROVIDER_NAMES[provider] not in available:
        raise ModelLoadError(f"provider {provider!r} is not available in this onnxruntime ({available})")
    return [provider]


def _provider_entry(name: str, model_path: str) -> str | tuple[str, dict[str, Any]]:
    if name == "tensorrt":
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(model_path)), ".trt_cache")
        return (PROVIDER_NAMES[name], {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir,
                                       "trt_fp16_enable": True})
    return PROVIDER_NAMES[name]


def open_session(model_path: str, provider: str = "auto", threads: int | None = None
                 ) -> tuple[ort.InferenceSession, str]:
    """Create a session on the first provider of the chain that really starts. Returns (session, short name)."""
    if not os.path.isfile(model_path):
        raise ModelLoadError(f"model file not found: {model_path}")
    errors = []
    for name in _provider_chain(provider):
        providers = [_provider_entry(name, model_path)]
        if name != "cpu":
            providers.append("CPUExecutionProvider")  # nodes the GPU provider lacks
        try:
            session = ort.InferenceSession(model_path, _session_options(threads), providers=providers)
        except Exception as e:  # noqa: BLE001 -- ORT raises several unrelated types for a bad file
            errors.append(f"{name}: {e}")
            if name == "cpu":
                raise ModelLoadError(f"cannot load {model_path} as ONNX: {e}") from e
            log.warning("provider %s failed to start, trying the next one: %s", name, e)
            continue
        if session.get_providers()[0] != PROVIDER_NAMES[name]:
            errors.append(f"{name}: session fell back to {session.get_providers()}")
            if provider != "auto":
                raise ModelLoadError(f"provider {provider!r} could not start for {model_path}")
            continue
        return session, name
    raise ModelLoadError(f"no provider could load {model_path}: {errors}")


def ring_slices(start: int, count: int, slots: int) -> list[tuple[slice, slice]]:
    """Positions start .. start + count - 1 go to slots position mod `slots`: as (ring slots, index among the
    positions) slice pairs, at most two since the positions are contiguous (none when count <= 0)."""
    if count <= 0:
        return []
    lo = start % slots
    first = min(count, slots - lo)
    pieces = [(slice(lo, lo + first), slice(0, first))]
    if first < count:
        pieces.append((slice(0, count - first), slice(first, count)))
    return pieces


class PolicyRuntime:
    """Serve one gato_ros ONNX policy: `reset()`, then `step(observation)` once per control tick.

    A file of several arms (`gato_ros.specs`) is served for one of them, `arm` (default: the file's first)."""

    def __init__(
        self,
        model_path: str,
        provider: str = "auto",
        context_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
        threads: int | None = None,
        device_cache: bool | None = None,
        warmup: bool = True,
        arm: str | None = None,
    ) -> None:
        self.model_path = str(model_path)
        self.session, self.provider = open_session(self.model_path, provider, threads)
        # The arm's spec sets the observations, the action decoding, the limits and the action mode.
        self.info = read_model_info(self.session, self.model_path, arm)
        self.arm = self.info.arm
        self.spec = self.info.spec
        self.capacity = int(context_tokens or self.info.context_tokens)
        if not self.info.accepts_capacity(self.capacity):
            raise ModelLoadError(
                f"{self.model_path}: a cache of {self.capacity} tokens differs from the window the model was trained "
                f"with (context_window={self.info.config.context_window}; also trained for "
                f"{list(self.info.trained_capacities)} per {contract.META_TRAINED_CAPACITIES}): it would see another "
                f"context than in training. Leave context_tokens unset, or export with --trained-capacities.")
        self.obs_tokens = tok.observation_token_count(self.spec)
        self.local_only_observations = self.info.config.observation_local_positions_only
        # Local position of each token of a timestep, as training laid them out (the tokenizer's rule).
        self._local = tok.timestep_local_positions(self.spec, self.local_only_observations)
        if self.capacity < self.obs_tokens + self.spec.action_size:
            raise ModelLoadError(f"context of {self.capacity} tokens cannot hold one timestep "
                                 f"({self.obs_tokens + self.spec.action_size} tokens)")
        self.temperature = float(temperature)
        self.rng = np.random.default_rng(seed)
        self.in_place = self.info.cache_layout == contract.CACHE_LAYOUT_IN_PLACE
        # Most tokens one model call takes: a tick's prefill (the pending action token + the observation). An
        # in-place ring keeps that many slots beyond the capacity, so a call never overwrites a token it may see.
        self.max_call_tokens = self.obs_tokens + 1 if self.in_place else self.capacity
        self.ring_slots = self.capacity + self.max_call_tokens if self.in_place else self.capacity
        self.device_cache = self.provider != "cpu" if device_cache is None else bool(device_cache)
        if self.device_cache and not self.in_place and self.info.cache_update is None:
            log.warning("%s has no cache-update graph: keeping the KV cache on the host", self.model_path)
            self.device_cache = False
        self.last_step_ms = float("nan")
        self.steps = 0
        self.pinned = 0  # tokens at the start of the context that never roll out (a prompt or an instruction)
        self._instructions: InstructionTokenizer | None = None
        self._ranges = [self._columns(*tok.action_token_range(self.spec, i)) for i in range(self.spec.action_size)]
        self._allocate()
        self.reset()
        if warmup:
            self.warmup()

    def _columns(self, lo: int, hi: int) -> tuple[int, int, int]:
        """Token range [lo, hi) → (first column, last column + 1, token id of the first column). The ids
        are sorted and cover the range (checked at load), so its columns are contiguous."""
        ids = self.info.logit_ids
        first = lo if ids is None else int(np.searchsorted(ids, lo))
        return first, first + hi - lo, lo

    # ----------------------------------------------------------------------------------- buffers
    def _past_names(self) -> list[str]:
        return contract.past_names(self.info.num_layers)

    def _present_names(self) -> list[str]:
        return contract.present_names(self.info.num_layers)

    def _allocate(self) -> None:
        info, C = self.info, self.ring_slots
        shape = (1, info.num_heads, C, info.head_dim)
        self.past_positions = np.full((1, C), info.empty_position, dtype=np.int64)
        width = self.session.get_outputs()[0].shape[-1]
        ids = info.logit_ids
        self._vocab = int(width) if isinstance(width, int) else (tok.VOCAB_SIZE if ids is None else len(ids))
        self._logits = np.zeros((1, 1, self._vocab), dtype=np.float32)
        self._io: dict[int, tuple[ort.IOBinding, dict[str, np.ndarray], list[Any]]] = {}
        if self.device_cache:
            device = "cuda" if self.provider in ("cuda", "tensorrt") else "cpu"
            self._device = device
            # Zero-filled, not left uninitialized: an empty slot is hidden by its position, but a NaN left in its
            # memory would still poison the attention (0 weight × NaN value = NaN; an additive mask adds to it).
            # (One array each: on the CPU an OrtValue wraps its numpy array instead of copying it.)
            self._caches = [[ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, info.cache_dtype), device, 0)
                             for _ in self._past_names()] for _ in range(1 if self.in_place else 2)]
            self._current = 0
            if self.in_place:  # the graph writes the ring itself
                return
            so = _session_options(None)
            providers = ["CPUExecutionProvider"]
            if device == "cuda":
                providers.insert(0, "CUDAExecutionProvider")
            self._scatter = ort.InferenceSession(info.cache_update, so, providers=providers)
        else:
            self._device = "cpu"
            self.cache = [np.zeros(shape, dtype=info.cache_dtype) for _ in self._past_names()]

    def _binding(self, S: int) -> tuple[ort.IOBinding, dict[str, np.ndarray], list[Any]]:  # noqa: N803
        """Inputs and outputs for a call of S new tokens, allocated once per S and bound by pointer."""
        if S in self._io:
            return self._io[S]
        info = self.info
        feeds = {
            contract.INPUT_IDS: np.zeros((1, S), np.int64),
            contract.POSITION_IDS: np.zeros((1, S), np.int64),
            contract.LOCAL_POSITIONS: np.zeros((1, S), np.int64),
        }
        if info.has_images:
            feeds[contract.PATCHES] = np.zeros((1, S, 3, tok.PATCH_SIZE, tok.PATCH_SIZE), np.float32)
            feeds[contract.PATCH_POSITIONS] = np.zeros((1, S, 2), np.int64)
        io = self.session.io_binding()
        for name, arr in [*feeds.items(), (contract.PAST_POSITIONS, self.past_positions)]:
            io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        io.bind_output(contract.LOGITS, "cpu", 0, np.float32, list(self._logits.shape), self._logits.ctypes.data)
        shape = (1, info.num_heads, S, info.head_dim)
        if self.in_place:  # present is the ring itself: bound to past's memory, written in place
            rings = self._caches[0] if self.device_cache else self.cache
            for past, present, ring in zip(self._past_names(), self._present_names(), rings, strict=True):
                if self.device_cache:
                    io.bind_ortvalue_input(past, ring)
                    io.bind_ortvalue_output(present, ring)
                else:
                    io.bind_input(past, "cpu", 0, ring.dtype, list(ring.shape), ring.ctypes.data)
                    io.bind_output(present, "cpu", 0, ring.dtype, list(ring.shape), ring.ctypes.data)
            presents = []
        elif self.device_cache:
            presents = [ort.OrtValue.ortvalue_from_shape_and_type(shape, info.cache_dtype, self._device, 0)
                        for _ in self._present_names()]
            for name, value in zip(self._present_names(), presents, strict=True):
                io.bind_ortvalue_output(name, value)
        else:
            presents = [np.zeros(shape, info.cache_dtype) for _ in self._present_names()]
            for name, arr in zip(self._present_names(), presents, strict=True):
                io.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            for name, arr in zip(self._past_names(), self.cache, strict=True):
                io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        self._io[S] = (io, feeds, presents)
        return self._io[S]

    # ----------------------------------------------------------------------------------- forward
    def forward(self, ids: np.ndarray, local: np.ndarray, patches: np.ndarray | None = None,
                patch_pos: np.ndarray | None = None) -> np.ndarray:
        """Append S tokens to the context and return the logits after the last one (a view of a buffer
        the next call overwrites): [V], or [K] over `info.logit_ids` for a head restricted to the actions.
        `patches` / `patch_pos` are per token (S, 3, 16, 16) / (S, 2)."""
        S = len(ids)
        if self.capacity - self.pinned < S:
            raise ValueError(f"{S} tokens in one call exceed the context capacity {self.capacity}"
                             + (f" less the {self.pinned} pinned tokens" if self.pinned else ""))
        logits = self._logits[0, 0]
        for lo in range(0, S, self.max_call_tokens):  # in pieces: causal attention makes that the same computation
            piece = slice(lo, lo + self.max_call_tokens)
            images = (None if a is None else a[piece] for a in (patches, patch_pos))
            logits = self._call(ids[piece], local[piece], *images)
        return logits

    def _call(self, ids: np.ndarray, local: np.ndarray, patches: np.ndarray | None, patch_pos: np.ndarray | None
              ) -> np.ndarray:
        """One model call over at most `max_call_tokens` tokens: forward's work."""
        S = len(ids)
        io, feeds, presents = self._binding(S)
        start = self.position
        feeds[contract.INPUT_IDS][0] = ids
        feeds[contract.POSITION_IDS][0] = np.arange(start, start + S)
        feeds[contract.LOCAL_POSITIONS][0] = local
        if self.info.has_images:
            if patches is None:
                feeds[contract.PATCHES].fill(0.0)
                feeds[contract.PATCH_POSITIONS].fill(0)
            else:
                feeds[contract.PATCHES][0] = patches
                feeds[contract.PATCH_POSITIONS][0] = patch_pos
        if self.device_cache and not self.in_place:
            for name, value in zip(self._past_names(), self._caches[self._current], strict=True):
                io.bind_ortvalue_input(name, value)
        self.session.run_with_iobinding(io)
        pieces = self._ring_slices(start, S)
        if self.device_cache and not self.in_place:
            self._write_device(presents, np.concatenate([np.arange(slots.start, slots.stop) for slots, _ in pieces]))
        elif not self.in_place:
            self._write_host(presents, pieces)
        positions = self.past_positions[0]
        for slots, taken in pieces:
            positions[slots] = feeds[contract.POSITION_IDS][0, taken]
        self.position = start + S
        reach = self.info.config.context_window
        if self.pinned and not self.info.config.pinned_span and self.position > reach >= start:
            log.warning("%s: the episode has passed the model's attention reach of %d tokens: the pinned prompt or "
                        "instruction is no longer seen", self.model_path, reach)
        if self.in_place:  # the ring holds more slots than the capacity: hide what falls out of the newest C
            expired = max(0, start - self.capacity)
            for slots, _ in ring_slices(expired, self.position - self.capacity - expired, self.ring_slots):
                positions[slots] = self.info.empty_position
        return self._logits[0, 0]

    def _ring_slices(self, start: int, count: int) -> list[tuple[slice, slice]]:
        """The ring slots of positions start .. start + count - 1, as `ring_slices` pairs. A pinned prefix keeps
        slots [0, pinned) (it was written before it was pinned); later positions roll over the other slots."""
        p = self.pinned
        return [(slice(slots.start + p, slots.stop + p), taken)
                for slots, taken in ring_slices(start - p, count, self.ring_slots - p)]

    def _write_host(self, presents: list[np.ndarray], pieces: list[tuple[slice, slice]]) -> None:
        for slots, taken in pieces:
            for cache, new in zip(self.cache, presents, strict=True):
                cache[:, :, slots] = new[:, :, taken]

    def _write_device(self, presents: list[ort.OrtValue], slots: np.ndarray) -> None:
        source, target = self._caches[self._current], self._caches[1 - self._current]
        io = self._scatter.io_binding()
        for i, (old, new, out) in enumerate(zip(source, presents, target, strict=True)):
            cache_name, new_name, updated_name = contract.cache_update_names(i)
            io.bind_ortvalue_input(cache_name, old)
            io.bind_ortvalue_input(new_name, new)
            io.bind_ortvalue_output(updated_name, out)
        io.bind_cpu_input(contract.CACHE_UPDATE_SLOTS, slots.astype(np.int64))
        self._scatter.run_with_iobinding(io)
        self._current = 1 - self._current

    # ----------------------------------------------------------------------------------- policy
    def reset(self, prompt: dict[str, Any] | None = None, instruction: str | None = None) -> None:
        """Forget the context and start an episode, optionally conditioned as Gato conditions on a task:

        - `prompt` = {"observations": {key: (T, ...)}, "actions": (T, A)}: a demonstration preloaded into the cache;
        - `instruction`: text (e.g. "lift the red cube"), read with the file's instruction model into text tokens
          (InstructionError for words outside its vocabulary, or a file without one).

        A file trained with prompts (`info.conditioning`) keeps the last `prompt_steps` timesteps of the
        demonstration, and pins the prefix: it stays in the cache for the whole episode while the episode's own
        tokens roll, as training showed it (a file with a pinned span starts the episode at that position, prefix
        or not). Other files take the whole demonstration, which rolls out of the cache like any tokens."""
        if prompt is not None and instruction is not None:
            raise ValueError("condition on a demonstration prompt or an instruction, not both")
        ids, local, patches, patch_pos = self._prefix(prompt, instruction)
        conditioning = self.info.conditioning
        if conditioning is not None and len(ids) > self.capacity - tok.timestep_token_count(self.spec):
            raise ValueError(f"a prefix of {len(ids)} tokens leaves no room for a timestep in the context of "
                             f"{self.capacity} tokens")
        span = self.info.config.pinned_span
        if span and len(ids) > span:
            raise ValueError(f"a prefix of {len(ids)} tokens overflows the {span} positions {self.model_path} "
                             f"reserves for one")
        self.position = 0
        self.pinned = 0
        self.past_positions.fill(self.info.empty_position)  # empty slots are masked by position
        self._pending: tuple[int, int] | None = None  # (token, local position) of the last action token
        chunk = max(1, min(self.capacity, 256))
        for s in range(0, len(ids), chunk):
            e = s + chunk
            self.forward(ids[s:e], local[s:e], None if patches is None else patches[s:e],
                         None if patch_pos is None else patch_pos[s:e])
        if conditioning is not None:
            self.pinned = self.position
        self.position = max(self.position, span)  # a pinned span: the episode starts after it, as in training

    def _prefix(self, prompt: dict[str, Any] | None, instruction: str | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The tokens (ids, local positions, patches, patch positions) that condition an episode; validated before
        the context is touched, so a refused prompt or instruction leaves the current episode as it was."""
        empty = np.zeros(0, np.int64)
        if instruction is not None:
            ids = self.instructions.encode(instruction)
            return ids, np.full(len(ids), contract.NO_LOCAL_POSITION, np.int64), None, None
        if prompt is None:
            return empty, empty, None, None
        observations, actions = prompt["observations"], np.asarray(prompt["actions"])
        conditioning = self.info.conditioning
        if conditioning is not None and not conditioning.prompt_steps:
            raise ValueError(f"{self.model_path} was trained with instructions only, not demonstration prompts")
        if conditioning is not None:
            keep = conditioning.prompt_steps  # its end: the goal it reached, as Gato prompts at evaluation
            observations, actions = {k: np.asarray(v)[-keep:] for k, v in observations.items()}, actions[-keep:]
        stream = tok.tokenize_episode(self.spec, observations, actions,
                                      observation_local_positions_only=self.local_only_observations)
        ids, local = stream["tokens"], stream["local_positions"]
        return ids, local, *self._patch_inputs(ids, stream["patches"], stream["patch_positions"])

    def _patch_inputs(self, ids: np.ndarray, patches: np.ndarray, positions: np.ndarray
                      ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per-token patches and patch positions for a graph that takes images (the patch tokens' own, zeros
        elsewhere); (None, None) for one that does not."""
        if not self.info.has_images:
            return None, None
        is_patch = ids == tok.PATCH_TOKEN
        per_token = np.zeros((len(ids), 3, tok.PATCH_SIZE, tok.PATCH_SIZE), np.float32)
        per_token_pos = np.zeros((len(ids), 2), np.int64)
        per_token[is_patch] = patches
        per_token_pos[is_patch] = positions
        return per_token, per_token_pos

    @property
    def instructions(self) -> InstructionTokenizer:
        """The file's instruction tokenizer (InstructionError when it has none)."""
        if self._instructions is None:
            self._instructions = instruction_tokenizer(self.info.conditioning)
        return self._instructions

    def instruction_for(self, task: str) -> str:
        """The instruction text of one of the file's tasks (InstructionError when the file has none for it)."""
        texts = {} if self.info.conditioning is None else self.info.conditioning.instructions
        if task not in texts:
            raise InstructionError(f"{self.model_path} has no instruction for task {task!r} "
                                   f"(instructions for: {', '.join(texts) or 'none'})")
        return texts[task]

    def _choose(self, logits: np.ndarray, index: int) -> int:
        first, last, token = self._ranges[index]  # the action's columns and the token id of the first
        allowed = logits[first:last]
        if not np.isfinite(allowed).all():
            raise NonFiniteLogitsError(f"{self.model_path}: non-finite logits for action "
                                       f"{self.spec.actions[index].name!r} at position {self.position}")
        if self.temperature <= 0.0:
            return token + int(np.argmax(allowed))
        z = allowed.astype(np.float64) / self.temperature
        p = np.exp(z - z.max())
        return token + int(self.rng.choice(len(p), p=p / p.sum()))

    def step_tokens(self, observation: dict[str, np.ndarray], teacher: np.ndarray | None = None) -> np.ndarray:
        """One control tick, returning the A chosen action tokens (int64).

        `teacher` (A tokens): feed these into the context instead of the chosen ones (teacher forcing,
        to compare variants of a model on the same token stream); the chosen tokens are still returned. A
        negative entry feeds the chosen token there: the context then holds what an arm executed when some of
        its commands came from elsewhere (scripts/seeing_phases.py --expert-on)."""
        ts = tok.tokenize_observation(self.spec, observation,  # validates: ObservationError
                                      observation_local_positions_only=self.local_only_observations)
        ids, local = ts.tokens, ts.local_positions
        patches, patch_pos = self._patch_inputs(ids, ts.patches, ts.patch_positions)
        if self._pending is not None:
            token, lp = self._pending
            ids = np.concatenate([[token], ids])
            local = np.concatenate([[lp], local])
            if patches is not None:
                patches = np.concatenate([np.zeros((1, *patches.shape[1:]), np.float32), patches])
                patch_pos = np.concatenate([np.zeros((1, 2), np.int64), patch_pos])
        logits = self.forward(ids, local, patches, patch_pos)
        A = self.spec.action_size
        tokens = np.empty(A, dtype=np.int64)
        one_id, one_local = np.empty(1, np.int64), np.empty(1, np.int64)
        fed = np.empty(A, dtype=np.int64)
        for i in range(A):
            tokens[i] = self._choose(logits, i)
            fed[i] = tokens[i] if teacher is None or teacher[i] < 0 else teacher[i]
            if i < A - 1:
                one_id[0], one_local[0] = fed[i], self._local[self.obs_tokens + i]
                logits = self.forward(one_id, one_local)
        self._pending = (int(fed[-1]), int(self._local[self.obs_tokens + A - 1]))
        return tokens

    def step(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        """Observation (dict key → array, as the spec says) → float64 (A,) command, finite, within limits."""
        t0 = time.perf_counter()
        action = tok.detokenize_action(self.spec, self.step_tokens(observation))
        self.last_step_ms = (time.perf_counter() - t0) * 1e3
        self.steps += 1
        return action

    def zero_observation(self) -> dict[str, np.ndarray]:
        """A valid observation of zeros (mid-grey images): for warm-up and smoke tests."""
        obs: dict[str, np.ndarray] = {}
        for o in self.spec.observations:
            obs[o.name] = np.full(o.shape, 128, np.uint8) if o.kind == "image" else np.zeros(o.shape, np.float64)
        return obs

    def warmup(self, steps: int = 2) -> None:
        """Run a few ticks so first-call allocations (and TensorRT engine builds) happen at load, then reset."""
        for _ in range(steps):
            self.step(self.zero_observation())
        self.reset()
        self.steps = 0


def teacher_forced_tokens(runtime: PolicyRuntime, reference: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The action tokens `runtime` chooses along a recorded stream while it is fed the recorded ones
    (teacher forcing, so every step is compared in the same context), and each step's seconds.

    `reference` holds `episode` (T,), `tokens` (T, A) and `obs.<key>` (T, ...), as
    scripts/write_fp32_reference.py records them; each episode starts from a reset."""
    episodes, recorded = reference["episode"], reference["tokens"]
    chosen, seconds = [], []
    for e in np.unique(episodes):
        runtime.reset()
        for t in np.flatnonzero(episodes == e):
            obs = {o.name: reference[f"obs.{o.name}"][t] for o in runtime.spec.observations}
            start = time.perf_counter()
            chosen.append(runtime.step_tokens(obs, teacher=recorded[t]))
            seconds.append(time.perf_counter() - start)
    return np.array(chosen), np.array(seconds)
