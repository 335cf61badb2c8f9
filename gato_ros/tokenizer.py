"""Gato's serialization (Reed et al. 2022, section 2.1), numpy only.

Token id space (the constants live in gato_ros.contract, imported here):
    [0, 32000)          text (SentencePiece in Gato); discrete values use [0, 1024) of it
    [32000, 33024)      continuous values: mu-law, clipped to [-1, 1], 1024 uniform bins
    33024               separator between observation and action of a timestep
    33025               image patch placeholder (its embedding comes from the patch pixels)
    33026               padding

A timestep is laid out as: image patches (keys sorted), tensors (keys sorted, flattened),
separator, action tokens (controller order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gato_ros import contract
from gato_ros.contract import (  # noqa: F401  (re-exported: callers use tok.NUM_BINS etc.)
    CONTINUOUS_OFFSET,
    DISCRETE_RANGE,
    MU,
    NO_LOCAL_POSITION,
    NUM_BINS,
    PAD_TOKEN,
    PATCH_POSITION_INTERVALS,
    PATCH_SIZE,
    PATCH_TOKEN,
    SEPARATOR_TOKEN,
    TEXT_VOCAB_SIZE,
    VOCAB_SIZE,
    M,
)
from gato_ros.spec import EmbodimentSpec, ObservationSpec


class ObservationError(ValueError):
    """An observation does not match the embodiment spec (key, shape, dtype or value)."""


def mu_law_encode(x: np.ndarray, mu: float = MU, m: float = M) -> np.ndarray:
    """F(x) = sign(x) log(|x| mu + 1) / log(M mu + 1). Not clipped: |F(x)| > 1 for |x| > M."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.log1p(np.abs(x) * mu) / np.log1p(m * mu)


def mu_law_decode(y: np.ndarray, mu: float = MU, m: float = M) -> np.ndarray:
    """Inverse of `mu_law_encode`."""
    y = np.asarray(y, dtype=np.float64)
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(m * mu)) / mu


def tokenize_continuous(x: np.ndarray) -> np.ndarray:
    """Continuous values → int64 tokens in [32000, 33024).

    Values beyond the mu-law range (|x| > 256) clip to the end bins, +inf and -inf included.
    NaN has no meaningful bin, so it raises ValueError: callers validate observations first.
    """
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("cannot tokenize NaN")
    y = np.clip(mu_law_encode(np.clip(x, -M, M)), -1.0, 1.0)
    bins = np.floor((y + 1.0) / 2.0 * NUM_BINS).astype(np.int64)
    return np.clip(bins, 0, NUM_BINS - 1) + CONTINUOUS_OFFSET


def continuous_bin_centres() -> np.ndarray:
    """Mu-law value of the centre of each of the 1024 bins, in [-1, 1]."""
    return (np.arange(NUM_BINS, dtype=np.float64) + 0.5) / NUM_BINS * 2.0 - 1.0


def detokenize_continuous(tokens: np.ndarray) -> np.ndarray:
    """Tokens → bin centres through the inverse mu-law. Ids outside the range clamp to the end bins,
    so any integer decodes to a finite value."""
    bins = np.clip(np.asarray(tokens, dtype=np.int64) - CONTINUOUS_OFFSET, 0, NUM_BINS - 1)
    return mu_law_decode(continuous_bin_centres()[bins])


def tokenize_discrete(x: np.ndarray) -> np.ndarray:
    """Non-negative integers below 1024 → the same integers as int64 tokens (row-major).
    Anything else raises ValueError."""
    x = np.asarray(x)
    if not np.all(np.isfinite(x)) or np.any(x < 0) or np.any(x >= DISCRETE_RANGE) or np.any(np.round(x) != x):
        raise ValueError(f"discrete values must be integers in [0, {DISCRETE_RANGE})")
    return x.astype(np.int64).reshape(-1)


def image_to_patches(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (N, 3, 16, 16) float32 patches in raster order, pixels in [-1, 1] / 4."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] % PATCH_SIZE or image.shape[1] % PATCH_SIZE:
        raise ObservationError(f"image must be (H, W, 3) with H, W multiples of {PATCH_SIZE}, got {image.shape}")
    return images_to_patches(image[None])[0]


def patch_intervals(height: int, width: int) -> np.ndarray:
    """(N, 4) int64 [row_lo, row_hi, col_lo, col_hi): each patch's normalized row/column span
    quantized into 128 intervals (Gato's patch position encoding)."""
    gh, gw = height // PATCH_SIZE, width // PATCH_SIZE
    rows = np.arange(gh)
    cols = np.arange(gw)
    row_lo = np.floor(rows / gh * PATCH_POSITION_INTERVALS).astype(np.int64)
    row_hi = np.maximum(np.floor((rows + 1) / gh * PATCH_POSITION_INTERVALS).astype(np.int64), row_lo + 1)
    col_lo = np.floor(cols / gw * PATCH_POSITION_INTERVALS).astype(np.int64)
    col_hi = np.maximum(np.floor((cols + 1) / gw * PATCH_POSITION_INTERVALS).astype(np.int64), col_lo + 1)
    rr, cc = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    rr, cc = rr.reshape(-1), cc.reshape(-1)
    return np.stack([row_lo[rr], row_hi[rr], col_lo[cc], col_hi[cc]], axis=1)


def patch_positions(intervals: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """(N, 2) row/column position indices: sampled inside each interval when `rng` is given
    (training), the interval mean otherwise (evaluation)."""
    if rng is None:
        rows = (intervals[:, 0] + intervals[:, 1] - 1) // 2
        return np.stack([rows, (intervals[:, 2] + intervals[:, 3] - 1) // 2], 1)
    return np.stack([rng.integers(intervals[:, 0], intervals[:, 1]), rng.integers(intervals[:, 2], intervals[:, 3])], 1)


def normalize(obs_spec: ObservationSpec, value: np.ndarray) -> np.ndarray:
    return normalize_rows(obs_spec, np.asarray(value, dtype=np.float64).reshape(-1))


def validate_observation(spec: EmbodimentSpec, observation: dict[str, np.ndarray]) -> None:
    """Raise ObservationError naming the key if the observation does not match the spec."""
    expected = {o.name for o in spec.observations}
    missing = expected - observation.keys()
    extra = observation.keys() - expected
    if missing or extra:
        raise ObservationError(
            f"observation keys differ from spec: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for o in spec.observations:
        value = np.asarray(observation[o.name])
        if value.shape != tuple(o.shape):
            raise ObservationError(f"observation {o.name!r} has shape {value.shape}, spec says {tuple(o.shape)}")
        if o.kind == "image":
            if value.dtype != np.uint8:
                raise ObservationError(f"image {o.name!r} must be uint8, got {value.dtype}")
        elif not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
            raise ObservationError(f"observation {o.name!r} must be real numbers, got {value.dtype}")
        elif not np.all(np.isfinite(value)):
            raise ObservationError(f"observation {o.name!r} holds NaN or inf")


@dataclass
class Timestep:
    """One tokenized timestep's observation part (plus the separator), ready for the model.

    tokens:          (N,) int64, PATCH_TOKEN where an image patch goes
    local_positions: (N,) int64, index inside the timestep (NO_LOCAL_POSITION for the separator when
                     observation tokens alone get local positions)
    patches:         (P, 3, 16, 16) float32, in order of the PATCH_TOKEN slots
    patch_positions: (P, 2) int64 row/column position indices
    """

    tokens: np.ndarray
    local_positions: np.ndarray
    patches: np.ndarray
    patch_positions: np.ndarray


def observation_token_count(spec: EmbodimentSpec) -> int:
    """Tokens of one timestep's observation, separator included."""
    n = sum((o.shape[0] // PATCH_SIZE) * (o.shape[1] // PATCH_SIZE) for o in spec.image_keys)
    return n + sum(o.size for o in spec.tensor_keys) + 1


def timestep_token_count(spec: EmbodimentSpec) -> int:
    return observation_token_count(spec) + spec.action_size


def timestep_local_positions(spec: EmbodimentSpec, observation_local_positions_only: bool = True) -> np.ndarray:
    """Local position of every token of a timestep (observation, separator, actions): its index inside the
    timestep, or NO_LOCAL_POSITION for the separator and the actions when observation tokens alone get one
    (Gato; `GatoConfig.observation_local_positions_only`, False for files written before that field)."""
    local = np.arange(timestep_token_count(spec), dtype=np.int64)
    if observation_local_positions_only:
        local[observation_token_count(spec) - 1 :] = NO_LOCAL_POSITION
    return local


def tokenize_observation(
    spec: EmbodimentSpec,
    observation: dict[str, np.ndarray],
    rng: np.random.Generator | None = None,
    observation_local_positions_only: bool = True,
) -> Timestep:
    """Observation → tokens in Gato's order, ending with the separator. Validates first."""
    validate_observation(spec, observation)
    parts: list[np.ndarray] = []
    patches: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    for o in spec.image_keys:
        image = np.asarray(observation[o.name])
        patches.append(image_to_patches(image))
        positions.append(patch_positions(patch_intervals(image.shape[0], image.shape[1]), rng))
        parts.append(np.full(len(patches[-1]), PATCH_TOKEN, dtype=np.int64))
    for o in spec.tensor_keys:
        value = observation[o.name]
        if o.kind == "discrete":
            parts.append(tokenize_discrete(value))
        else:
            parts.append(tokenize_continuous(normalize(o, value)))
    parts.append(np.array([SEPARATOR_TOKEN], dtype=np.int64))
    tokens = np.concatenate(parts)
    return Timestep(
        tokens=tokens,
        local_positions=timestep_local_positions(spec, observation_local_positions_only)[: len(tokens)],
        patches=np.concatenate(patches) if patches else np.zeros((0, 3, PATCH_SIZE, PATCH_SIZE), np.float32),
        patch_positions=np.concatenate(positions) if positions else np.zeros((0, 2), np.int64),
    )


def tokenize_action(spec: EmbodimentSpec, action: np.ndarray) -> np.ndarray:
    """Command vector (controller order) → action tokens. Continuous values are clamped to their
    limit; a discrete value maps to the index of the nearest listed value."""
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape[0] != spec.action_size:
        raise ValueError(f"action has {action.shape[0]} values, spec says {spec.action_size}")
    return tokenize_actions(spec, action[None])[0]


def detokenize_action(spec: EmbodimentSpec, tokens: np.ndarray) -> np.ndarray:
    """Action tokens → command vector, always finite and inside the limits."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    out = np.empty(spec.action_size, dtype=np.float64)
    for i, a in enumerate(spec.actions):
        if a.kind == "discrete":
            out[i] = a.values[int(np.clip(tokens[i], 0, len(a.values) - 1))]
        else:
            out[i] = np.clip(detokenize_continuous(tokens[i]), -a.limit, a.limit)
    return out


def action_token_range(spec: EmbodimentSpec, index: int) -> tuple[int, int]:
    """[lo, hi) of the token ids allowed for action dimension `index` (constrained decoding)."""
    a = spec.actions[index]
    if a.kind == "discrete":
        return 0, len(a.values)
    return CONTINUOUS_OFFSET, CONTINUOUS_OFFSET + NUM_BINS


def tokenize_episode(
    spec: EmbodimentSpec,
    observations: dict[str, np.ndarray],
    actions: np.ndarray,
    rng: np.random.Generator | None = None,
    observation_local_positions_only: bool = True,
    pixel_patches: bool = False,
) -> dict[str, np.ndarray]:
    """A whole episode → the flat token stream the model trains on: for every timestep, what
    `tokenize_observation` and `tokenize_action` give the runtime, computed for all timesteps at once (a
    per-timestep loop cost more than a training step on an image episode; tests/test_tokenizer.py holds both
    equal token for token).

    Returns tokens, local_positions, loss_mask (True on action tokens), patches, patch_positions. Patches are
    float32 as `image_to_patches` scales them, or with `pixel_patches` the uint8 pixels they hold (what training
    batches carry: the model scales them on its device). With `rng`, patch positions are drawn inside their
    intervals, patch by patch in stream order.
    """
    actions = np.asarray(actions, dtype=np.float64)
    steps = actions.shape[0]
    validate_episode(spec, observations, steps)
    blocks: list[np.ndarray] = []  # (steps, k) token blocks, in a timestep's order
    patches: list[np.ndarray] = []
    intervals: list[np.ndarray] = []
    for o in spec.image_keys:
        frames = np.asarray(observations[o.name])
        patches.append(images_to_pixel_patches(frames) if pixel_patches else images_to_patches(frames))
        intervals.append(patch_intervals(o.shape[0], o.shape[1]))
        blocks.append(np.full((steps, patches[-1].shape[1]), PATCH_TOKEN, dtype=np.int64))
    for o in spec.tensor_keys:
        value = np.asarray(observations[o.name]).reshape(steps, -1)
        if o.kind == "discrete":
            blocks.append(tokenize_discrete(value).reshape(steps, -1))
        else:
            blocks.append(tokenize_continuous(normalize_rows(o, value)))
    blocks.append(np.full((steps, 1), SEPARATOR_TOKEN, dtype=np.int64))
    blocks.append(tokenize_actions(spec, actions))
    per_step = timestep_token_count(spec)
    in_step = np.arange(per_step)
    dtype = np.uint8 if pixel_patches else np.float32
    return {
        "tokens": np.concatenate(blocks, axis=1).reshape(-1),
        "local_positions": np.tile(timestep_local_positions(spec, observation_local_positions_only), steps),
        "loss_mask": np.tile(in_step >= observation_token_count(spec), steps),
        "patches": (np.concatenate(patches, axis=1).reshape(-1, 3, PATCH_SIZE, PATCH_SIZE) if patches
                    else np.zeros((0, 3, PATCH_SIZE, PATCH_SIZE), dtype)),
        "patch_positions": (patch_positions(np.tile(np.concatenate(intervals), (steps, 1)), rng) if intervals
                            else np.zeros((0, 2), np.int64)),
    }


def validate_episode(spec: EmbodimentSpec, observations: dict[str, np.ndarray], steps: int) -> None:
    """`validate_observation` for every timestep of an episode at once (ObservationError naming the key)."""
    per_step = {k: np.asarray(v)[0] if np.ndim(v) and len(v) else np.asarray(v) for k, v in observations.items()}
    if steps:
        validate_observation(spec, per_step)  # keys, per-timestep shapes and dtypes, as the runtime checks them
    for o in spec.observations:
        value = np.asarray(observations[o.name])
        if value.shape != (steps, *o.shape):
            raise ObservationError(f"observation {o.name!r} has shape {value.shape}, the episode needs "
                                   f"{(steps, *o.shape)}")
        if o.kind != "image" and not np.all(np.isfinite(value)):
            raise ObservationError(f"observation {o.name!r} holds NaN or inf")


def images_to_patches(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 → (T, N, 3, 16, 16) float32 patches in raster order, pixels in [-1, 1] / 4."""
    x = (frames.astype(np.float32) / contract.PIXEL_HALF_RANGE - 1.0) / contract.PATCH_VALUE_DIVISOR
    return _cut_patches(x)


def images_to_pixel_patches(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 → (T, N, 3, 16, 16) uint8: the pixels of each patch, unscaled."""
    return _cut_patches(np.asarray(frames, dtype=np.uint8))


def _cut_patches(x: np.ndarray) -> np.ndarray:
    t, h, w = x.shape[0], x.shape[1] // PATCH_SIZE, x.shape[2] // PATCH_SIZE
    x = x.reshape(t, h, PATCH_SIZE, w, PATCH_SIZE, 3).transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(x.reshape(t, h * w, 3, PATCH_SIZE, PATCH_SIZE))


def normalize_rows(obs_spec: ObservationSpec, values: np.ndarray) -> np.ndarray:
    """A spec's offset and scale applied to each row of (T, size) values (or to one flat (size,) value)."""
    x = np.asarray(values, dtype=np.float64)
    if obs_spec.offset is not None:
        x = x - np.asarray(obs_spec.offset, dtype=np.float64)
    if obs_spec.scale is not None:
        x = x / np.asarray(obs_spec.scale, dtype=np.float64)
    return x


def tokenize_actions(spec: EmbodimentSpec, actions: np.ndarray) -> np.ndarray:
    """(T, A) commands → (T, A) tokens. Continuous values are clamped to their limit; a discrete value maps to
    the index of the nearest listed value (the first of two as near)."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != spec.action_size:
        raise ValueError(f"actions have shape {actions.shape}, spec says (T, {spec.action_size})")
    if not np.all(np.isfinite(actions)):
        raise ValueError("action holds NaN or inf")
    out = np.empty(actions.shape, dtype=np.int64)
    for i, a in enumerate(spec.actions):
        if a.kind == "discrete":
            out[:, i] = np.argmin(np.abs(np.asarray(a.values)[None, :] - actions[:, i : i + 1]), axis=1)
        else:
            out[:, i] = tokenize_continuous(np.clip(actions[:, i], -a.limit, a.limit))
    return out
