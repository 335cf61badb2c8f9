"""Gato's tokenization as a user of the tokenizer sees it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gato_ros import contract
from gato_ros import tokenizer as tk
from gato_ros.spec import ActionSpec, EmbodimentSpec, ObservationSpec

SPEC = EmbodimentSpec(
    name="test-arm",
    observations=(
        ObservationSpec("joint_positions", (3,)),
        ObservationSpec("image", (32, 48, 3), kind="image"),
        ObservationSpec("a_state", (2,), offset=(1.0, 1.0), scale=(2.0, 2.0)),
    ),
    actions=(
        ActionSpec("j1", limit=87.0),
        ActionSpec("j2", limit=12.0),
        ActionSpec("grip", "discrete", 15, (15.0, -15.0)),
    ),
    joint_names=("j1", "j2", "grip"),
)


def bin_width_at(x: np.ndarray) -> np.ndarray:
    """Width in value space of the bin holding x (the round-trip error bound)."""
    bins = tk.tokenize_continuous(x) - tk.CONTINUOUS_OFFSET
    lo = tk.mu_law_decode(bins / tk.NUM_BINS * 2 - 1)
    hi = tk.mu_law_decode((bins + 1) / tk.NUM_BINS * 2 - 1)
    return hi - lo


def test_mu_law_matches_paper_formula() -> None:
    x = np.array([-256.0, -1.0, 0.0, 0.5, 256.0])
    expected = np.sign(x) * np.log(np.abs(x) * 100 + 1) / np.log(256 * 100 + 1)
    np.testing.assert_allclose(tk.mu_law_encode(x), expected)
    np.testing.assert_allclose(tk.mu_law_decode(tk.mu_law_encode(x)), x, atol=1e-9)


def test_each_value_lands_in_the_bin_whose_interval_holds_it() -> None:
    """Bin i of 1024 uniform bins over [-1, 1] holds mu-law values in [i/512 - 1, (i+1)/512 - 1) (the paper's
    formula, written here): on a dense grid every token is that bin, not a neighbour."""
    x = np.concatenate([np.linspace(-256.0, 256.0, 4001), np.linspace(-1.0, 1.0, 4001)])
    y = np.sign(x) * np.log(np.abs(x) * 100 + 1) / np.log(256 * 100 + 1)
    bins = tk.tokenize_continuous(x) - 32000
    inside = (bins / 512 - 1 <= y + 1e-12) & ((y < (bins + 1) / 512 - 1) | (bins == 1023))
    assert inside.all(), f"{(~inside).sum()} values outside their bin, e.g. x={x[~inside][:3]}"


@settings(max_examples=300, deadline=None)
@given(arrays(np.float64, st.integers(1, 64), elements=st.floats(-256, 256, allow_nan=False, allow_subnormal=False)))
def test_continuous_round_trip_within_bin_width(x: np.ndarray) -> None:
    tokens = tk.tokenize_continuous(x)
    assert tokens.dtype == np.int64
    assert np.all((tokens >= 32000) & (tokens < 33024))
    error = np.abs(tk.detokenize_continuous(tokens) - x)
    assert np.all(error <= bin_width_at(x) + 1e-9)


def test_out_of_range_and_infinite_values_clip_to_end_bins() -> None:
    tokens = tk.tokenize_continuous(np.array([-np.inf, -1e9, 1e9, np.inf]))
    assert tokens.tolist() == [32000, 32000, 33023, 33023]


def test_nan_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        tk.tokenize_continuous(np.array([0.0, np.nan]))


@given(st.integers(-(2**40), 2**40))
def test_any_token_decodes_to_a_finite_value(token: int) -> None:
    assert np.isfinite(tk.detokenize_continuous(np.array([token]))).all()


def test_discrete_tokens() -> None:
    assert tk.tokenize_discrete(np.array([[0, 3], [1023, 7]])).tolist() == [0, 3, 1023, 7]
    for bad in ([-1], [1024], [0.5], [np.nan]):
        with pytest.raises(ValueError):
            tk.tokenize_discrete(np.array(bad))


def test_image_patches_raster_order_and_scale() -> None:
    image = np.zeros((32, 48, 3), np.uint8)
    image[16:, 16:32] = 255  # patch at row 1, column 1 → raster index 1 * 3 + 1
    patches = tk.image_to_patches(image)
    assert patches.shape == (6, 3, 16, 16)
    assert np.allclose(patches[4], 0.25) and np.allclose(np.delete(patches, 4, 0), -0.25)
    intervals = tk.patch_intervals(32, 48)
    assert intervals[:, [0, 2]].min() == 0 and intervals[:, [1, 3]].max() == 128
    mean = tk.patch_positions(intervals)
    sampled = tk.patch_positions(intervals, np.random.default_rng(0))
    for pos in (mean, sampled):
        assert np.all((pos[:, 0] >= intervals[:, 0]) & (pos[:, 0] < intervals[:, 1]))
        assert np.all((pos[:, 1] >= intervals[:, 2]) & (pos[:, 1] < intervals[:, 3]))


def observation(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "joint_positions": rng.normal(size=3),
        "image": rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
        "a_state": rng.normal(size=2),
    }


def test_timestep_layout_images_then_sorted_tensors_then_separator() -> None:
    ts = tk.tokenize_observation(SPEC, observation(np.random.default_rng(0)))
    n_patches = 6
    assert ts.tokens.shape == (n_patches + 2 + 3 + 1,) == (tk.observation_token_count(SPEC),)
    assert np.all(ts.tokens[:n_patches] == tk.PATCH_TOKEN)
    assert ts.tokens[-1] == tk.SEPARATOR_TOKEN
    # Local positions on observation tokens only (Gato): the separator gets none; files from before: every token.
    assert ts.local_positions.tolist() == [*range(len(ts.tokens) - 1), tk.NO_LOCAL_POSITION]
    legacy = tk.tokenize_observation(SPEC, observation(np.random.default_rng(0)),
                                     observation_local_positions_only=False)
    assert legacy.local_positions.tolist() == list(range(len(ts.tokens)))
    # "a_state" sorts before "joint_positions" and is normalized (1 → 0 → the bin just above zero)
    obs = observation(np.random.default_rng(0)) | {"a_state": np.array([1.0, 1.0])}
    tokens = tk.tokenize_observation(SPEC, obs).tokens
    assert tokens[n_patches : n_patches + 2].tolist() == [32512, 32512]
    assert ts.patches.shape == (n_patches, 3, 16, 16) and ts.patch_positions.shape == (n_patches, 2)


def test_episode_stream_marks_action_tokens_for_the_loss() -> None:
    rng = np.random.default_rng(1)
    steps = 4
    obs = {k: np.stack([observation(rng)[k] for _ in range(steps)]) for k in observation(rng)}
    actions = np.tile([10.0, -3.0, -15.0], (steps, 1))
    stream = tk.tokenize_episode(SPEC, obs, actions)
    per_step = tk.timestep_token_count(SPEC)
    assert stream["tokens"].shape == (steps * per_step,)
    mask = stream["loss_mask"].reshape(steps, per_step)
    assert mask[:, -3:].all() and not mask[:, :-3].any()
    assert stream["tokens"].reshape(steps, per_step)[:, -1].tolist() == [1] * steps  # gripper index of -15
    local = stream["local_positions"].reshape(steps, per_step)
    n_obs = tk.observation_token_count(SPEC)
    assert (local[:, : n_obs - 1] == np.arange(n_obs - 1)).all()
    assert (local[:, n_obs - 1 :] == tk.NO_LOCAL_POSITION).all()
    legacy = tk.tokenize_episode(SPEC, obs, actions, observation_local_positions_only=False)["local_positions"]
    assert (legacy.reshape(steps, per_step) == np.arange(per_step)).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_an_episode_is_the_runtimes_timesteps_token_for_token(seed: int, steps: int) -> None:
    """Training tokenizes a whole episode at once; the runtime, one observation and one action at a time. Both
    must give the same stream, or the policy would be served other tokens than it was trained on."""
    rng = np.random.default_rng(seed)
    obs = {k: np.stack([observation(rng)[k] for _ in range(steps)]) for k in observation(rng)}
    obs["joint_positions"] *= 10.0 ** rng.integers(-3, 4, size=(steps, 3))  # past the mu-law range too
    actions = rng.normal(scale=40.0, size=(steps, 3))
    actions[0, 2] = 0.0  # halfway between the gripper's two values: the first wins, as in tokenize_action
    stream = tk.tokenize_episode(SPEC, obs, actions)
    for flag in (True, False):
        expected_tokens, expected_local = [], []
        for t in range(steps):
            ts = tk.tokenize_observation(SPEC, {k: v[t] for k, v in obs.items()}, observation_local_positions_only=flag)
            expected_tokens += [ts.tokens, tk.tokenize_action(SPEC, actions[t])]
            expected_local += [ts.local_positions, tk.timestep_local_positions(SPEC, flag)[len(ts.tokens):]]
        local = tk.tokenize_episode(SPEC, obs, actions, observation_local_positions_only=flag)["local_positions"]
        assert np.array_equal(stream["tokens"], np.concatenate(expected_tokens))
        assert np.array_equal(local, np.concatenate(expected_local))
    frames = [tk.tokenize_observation(SPEC, {k: v[t] for k, v in obs.items()}) for t in range(steps)]
    assert np.array_equal(stream["patches"], np.concatenate([f.patches for f in frames]))
    assert np.array_equal(stream["patch_positions"], np.concatenate([f.patch_positions for f in frames]))
    pixels = tk.tokenize_episode(SPEC, obs, actions, pixel_patches=True)["patches"]
    scaled = (pixels.astype(np.float32) / contract.PIXEL_HALF_RANGE - 1.0) / contract.PATCH_VALUE_DIVISOR
    assert pixels.dtype == np.uint8 and np.array_equal(scaled, stream["patches"])  # the same patches, unscaled


def test_a_bad_timestep_anywhere_in_an_episode_is_refused() -> None:
    rng = np.random.default_rng(2)
    obs = {k: np.stack([observation(rng)[k] for _ in range(3)]) for k in observation(rng)}
    obs["joint_positions"][2, 1] = np.nan
    with pytest.raises(tk.ObservationError, match="'joint_positions' holds NaN"):
        tk.tokenize_episode(SPEC, obs, np.zeros((3, 3)))
    obs["joint_positions"] = np.zeros((2, 3))
    with pytest.raises(tk.ObservationError, match="the episode needs \\(3, 3\\)"):
        tk.tokenize_episode(SPEC, obs, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        tk.tokenize_actions(SPEC, np.array([[0.0, np.inf, 0.0]]))


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, 3, elements=st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)))
def test_action_round_trip_is_finite_and_within_limits(action: np.ndarray) -> None:
    decoded = tk.detokenize_action(SPEC, tk.tokenize_action(SPEC, action))
    assert np.all(np.isfinite(decoded))
    assert np.all(np.abs(decoded) <= np.array(SPEC.action_limits))
    assert decoded[2] in (15.0, -15.0)
    assert tk.action_token_range(SPEC, 0) == (32000, 33024) and tk.action_token_range(SPEC, 2) == (0, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"joint_positions": np.zeros(4)}, "shape"),
        ({"joint_positions": np.array([0.0, np.nan, 0.0])}, "NaN or inf"),
        ({"joint_positions": np.array([0.0, np.inf, 0.0])}, "NaN or inf"),
        ({"image": np.zeros((32, 48, 3), np.float32)}, "uint8"),
        ({"extra": np.zeros(1)}, "unexpected"),
    ],
)
def test_bad_observations_raise_a_specific_error(change: dict[str, np.ndarray], message: str) -> None:
    obs = observation(np.random.default_rng(0)) | change
    with pytest.raises(tk.ObservationError, match=message):
        tk.tokenize_observation(SPEC, obs)


def test_spec_json_round_trip() -> None:
    assert EmbodimentSpec.from_json(SPEC.to_json()) == SPEC
