"""The model's contract: a rolling KV cache reproduces one full sliding-window forward pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gato_ros import tokenizer as tok
from gato_ros.model import EMPTY_POSITION, PRESETS, GatoConfig, GatoModel, apply_rope, rope_cos_sin, soft_labels
from gato_ros.sequences import patches_from_pixels

torch.set_num_threads(1)

WINDOW = 16


def small_model(**overrides: object) -> GatoModel:
    torch.manual_seed(0)
    config = GatoConfig(n_layer=2, n_embd=32, n_head=4, n_ff=64, context_window=WINDOW, patch_channels=8,
                        max_local_positions=32, **overrides)
    return GatoModel(config).eval()


def random_stream(n: int, with_patches: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    """A token stream with timesteps of 7 tokens: [2 patches], continuous values, separator, actions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(tok.CONTINUOUS_OFFSET, tok.CONTINUOUS_OFFSET + tok.NUM_BINS, (1, n), generator=g)
    local = (torch.arange(n) % 7).unsqueeze(0)
    ids[local == 4] = tok.SEPARATOR_TOKEN
    ids[local == 6] = torch.randint(0, 2, (int((local == 6).sum()),), generator=g)  # a discrete action
    out = {"input_ids": ids, "local_positions": local}
    if with_patches:
        ids[local < 2] = tok.PATCH_TOKEN
        patches = torch.rand(1, n, 3, 16, 16, generator=g) * 0.5 - 0.25
        patches[ids != tok.PATCH_TOKEN] = 0.0
        out["patches"] = patches
        out["patch_positions"] = torch.randint(0, tok.PATCH_POSITION_INTERVALS, (1, n, 2), generator=g)
    return out


def full_forward(model: GatoModel, stream: dict[str, torch.Tensor], offset: int = 0) -> torch.Tensor:
    n = stream["input_ids"].shape[1]
    with torch.no_grad():
        logits, _ = model(position_ids=torch.arange(n).unsqueeze(0) + offset, **stream)
    return logits


def rolling_forward(model: GatoModel, stream: dict[str, torch.Tensor], chunk: int, offset: int = 0) -> torch.Tensor:
    """Decode `chunk` tokens per call through a fixed ring buffer of context_window slots, overwriting
    the oldest slots, as the runtime does."""
    n = stream["input_ids"].shape[1]
    cache, past_positions = model.empty_cache(batch=1)
    capacity = past_positions.shape[1]
    outputs = []
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        inputs = {k: v[:, sl] for k, v in stream.items()}
        positions = torch.arange(sl.start, sl.stop).unsqueeze(0) + offset
        with torch.no_grad():
            logits, presents = model(position_ids=positions, past_key_values=cache,
                                     past_positions=past_positions, **inputs)
        outputs.append(logits)
        slots = torch.argsort(past_positions[0])[: sl.stop - sl.start]  # the oldest (or empty) slots
        for (k, v), (pk, pv) in zip(cache, presents, strict=True):
            k[:, :, slots] = pk
            v[:, :, slots] = pv
        past_positions[:, slots] = positions
        assert past_positions.shape[1] == capacity
    return torch.cat(outputs, dim=1)


def reference_logits(model: GatoModel, stream: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits with attention written out from scratch: float64, a loop over every query q and key k,
    k visible iff 0 <= q - k < W, softmax by hand. Only the layers around attention (embedding, projections,
    rotary, norms, MLP) are the model's own; the mask and the softmax are not."""
    window, n_head = model.config.context_window, model.config.n_head
    n = stream["input_ids"].shape[1]
    positions = torch.arange(n).unsqueeze(0)
    with torch.no_grad():
        x = model.embed(stream["input_ids"], stream["local_positions"], stream.get("patches"),
                        stream.get("patch_positions"))
        cos, sin = rope_cos_sin(positions, model.rope_k, model.config.rope_period)
        for block in model.blocks:
            attn = block.attn
            q, k, v = attn.qkv(block.ln1(x)).view(1, n, 3, n_head, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = apply_rope(q, cos, sin).double(), apply_rope(k, cos, sin).double()
            v = v.double()
            y = torch.zeros_like(q)
            for h in range(n_head):
                for i in range(n):
                    seen = [j for j in range(n) if 0 <= i - j < window]
                    scores = [float(q[0, h, i] @ k[0, h, j]) / math.sqrt(attn.head_dim) for j in seen]
                    top = max(scores)
                    weights = [math.exp(s - top) for s in scores]
                    total = sum(weights)
                    for j, w in zip(seen, weights, strict=True):
                        y[0, h, i] += (w / total) * v[0, h, j]
            x = x + attn.proj(y.float().transpose(1, 2).reshape(1, n, -1))
            x = x + block.mlp(block.ln2(x))
        return F.linear(model.ln_f(x), model.head_weight)


def test_sliding_window_attention_matches_a_from_scratch_reference() -> None:
    """Full forward and the rolling ring cache both equal the loop reference; a mask of W - 1 or W + 1 does not
    (checked by editing the mask bound in GatoModel.hidden: both fail here)."""
    model = small_model()
    stream = random_stream(3 * WINDOW + 2)
    expected = reference_logits(model, stream)
    assert (full_forward(model, stream) - expected).abs().max().item() <= 1e-4
    assert (rolling_forward(model, stream, chunk=1) - expected).abs().max().item() <= 1e-4
    assert (rolling_forward(model, stream, chunk=5) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("chunk", [1, 5])
def test_rolling_cache_equals_full_sliding_window_forward(chunk: int) -> None:
    model = small_model()
    stream = random_stream(4 * WINDOW + 3)  # > 3x the window: the cache wraps several times
    full = full_forward(model, stream)
    rolled = rolling_forward(model, stream, chunk)
    assert (full - rolled).abs().max().item() <= 1e-4


def test_rolling_cache_with_image_patches() -> None:
    model = small_model()
    stream = random_stream(3 * WINDOW + 5, with_patches=True)
    full = full_forward(model, stream)
    assert (full - rolling_forward(model, stream, chunk=1)).abs().max().item() <= 1e-4
    assert (full - rolling_forward(model, stream, chunk=7)).abs().max().item() <= 1e-4
    # The patches matter: other pixels give other logits.
    other = dict(stream, patches=stream["patches"] * -1.0)
    assert (full - full_forward(model, other)).abs().max().item() > 1e-3


def test_raw_pixel_patches_embed_like_the_runtimes_scaled_patches() -> None:
    """Training batches carry uint8 pixels; the runtime feeds the tokenizer's float patches. Both must give
    the model the same logits, or the served policy would see other inputs than it was trained on."""
    model = small_model()
    stream = random_stream(2 * WINDOW, with_patches=True)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, stream["patches"].shape, dtype=torch.uint8, generator=g)
    pixels[stream["input_ids"] != tok.PATCH_TOKEN] = 0
    floats = torch.from_numpy(patches_from_pixels(pixels.numpy()))
    raw = full_forward(model, dict(stream, patches=pixels))
    assert (raw - full_forward(model, dict(stream, patches=floats))).abs().max().item() <= 1e-6
    assert (raw - full_forward(model, stream)).abs().max().item() > 1e-3  # other pixels, other logits


def test_attention_is_relative_for_huge_positions() -> None:
    model = small_model()
    stream = random_stream(3 * WINDOW)
    base = full_forward(model, stream)
    for offset in (10**9, 2**40 + 12345, 65536 * 7 - 3):
        assert (base - full_forward(model, stream, offset)).abs().max().item() <= 1e-4
        assert (base - rolling_forward(model, stream, 4, offset)).abs().max().item() <= 1e-4


def test_rotary_turns_by_the_same_angle_at_every_step_across_the_wrap() -> None:
    """From any position to the next, every rotary pair turns by the same angle 2π k / P, over three whole
    periods: at the wrap of `position mod P` too, so attention stays relative for a run of any length."""
    model = small_model()
    period = model.config.rope_period
    positions = torch.arange(3 * period + 1).unsqueeze(0)
    cos, sin = rope_cos_sin(positions, model.rope_k, period)
    z = torch.complex(cos[0, 0].double(), sin[0, 0].double())  # [positions, pairs]
    turn = z[1:] * z[:-1].conj()
    expected = torch.exp(1j * 2 * math.pi * model.rope_k.double() / period)
    assert (turn - expected).abs().max().item() < 1e-5


def test_window_limits_what_a_query_sees() -> None:
    model = small_model()
    stream = random_stream(3 * WINDOW)
    base = full_forward(model, stream)
    changed = {k: v.clone() for k, v in stream.items()}
    changed["input_ids"][0, 0] = tok.SEPARATOR_TOKEN + 1 if changed["input_ids"][0, 0] != tok.PATCH_TOKEN else 5
    other = full_forward(model, changed)
    diff = (base - other).abs().amax(dim=-1)[0]
    # Token 0 reaches position p through the layers only while p < n_layer * (window - 1) + 1.
    reach = model.config.n_layer * (WINDOW - 1)
    assert diff[: WINDOW].max() > 1e-4
    assert diff[reach + 1 :].max() == 0.0


def test_empty_slots_are_invisible_and_presents_hold_new_tokens_only() -> None:
    model = small_model()
    stream = random_stream(6)
    cache, past_positions = model.empty_cache(batch=1)
    for k, v in cache:  # garbage in empty slots must not leak into the output
        k.normal_()
        v.normal_()
    with torch.no_grad():
        logits, presents = model(position_ids=torch.arange(6).unsqueeze(0), past_key_values=cache,
                                 past_positions=past_positions, **stream)
    assert (logits - full_forward(model, stream)).abs().max().item() <= 1e-5
    assert past_positions.eq(EMPTY_POSITION).all()
    head_dim = model.config.n_embd // model.config.n_head
    assert [tuple(k.shape) for k, _ in presents] == [(1, model.config.n_head, 6, head_dim)] * model.config.n_layer
    last, _ = model(position_ids=torch.arange(6).unsqueeze(0), last_only=True, **stream)
    assert last.shape == (1, 1, tok.VOCAB_SIZE)
    assert (last[0, 0] - logits[0, -1]).abs().max().item() <= 1e-5


def test_value_embedding_is_smooth_and_lookup_is_not() -> None:
    ids = torch.tensor([[tok.CONTINUOUS_OFFSET + 500, tok.CONTINUOUS_OFFSET + 501, tok.CONTINUOUS_OFFSET + 900]])
    local = torch.zeros_like(ids)
    with torch.no_grad():
        e = small_model().embed(ids, local)[0]
        near, far = (e[0] - e[1]).norm(), (e[0] - e[2]).norm()
        assert near < 0.2 * far
        lookup = small_model(value_embedding=False).embed(ids, local)[0]
        assert (lookup[0] - lookup[1]).norm() > 0.5 * (lookup[0] - lookup[2]).norm()


def action_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two timesteps of `random_stream`: the stream, next-token targets, the next token's local position, the
    loss mask on action targets (a continuous one at 5, a discrete one at 6) and each target's valid id range."""
    stream = random_stream(2 * 7)
    targets = torch.roll(stream["input_ids"], -1, dims=1)
    local_next = torch.roll(stream["local_positions"], -1, dims=1)
    mask = local_next >= 5
    mask[:, -1] = False
    hi = torch.where(local_next == 6, 2, tok.CONTINUOUS_OFFSET + tok.NUM_BINS)
    return stream, targets, local_next, mask, hi


def test_action_loss_uses_valid_ranges_and_soft_labels() -> None:
    model = small_model()
    stream, targets, _, mask, hi = action_batch()
    ids = stream["input_ids"]
    loss = model.action_loss(ids, torch.arange(ids.shape[1]).unsqueeze(0), stream["local_positions"], targets, mask, hi)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.values.proj.weight.grad.abs().sum() > 0
    labels = soft_labels(torch.tensor([0, 500]), tok.NUM_BINS, 2.5)
    assert torch.allclose(labels.sum(-1), torch.ones(2))
    assert labels[1].argmax() == 500 and labels[0].argmax() == 0


def test_discrete_weight_scales_the_gripper_tokens_loss_only() -> None:
    """`discrete_weight` multiplies the discrete action tokens' cross-entropy and leaves the continuous tokens' KL:
    at weight 0 the loss is the continuous tokens' alone (their sum over all masked positions)."""
    stream, targets, local_next, mask, hi = action_batch()
    ids = stream["input_ids"]
    positions = torch.arange(ids.shape[1]).unsqueeze(0)

    def loss(weight: float, where: torch.Tensor) -> float:
        model = small_model(discrete_weight=weight)
        with torch.no_grad():
            return model.action_loss(ids, positions, stream["local_positions"], targets, where, hi).item()

    continuous, discrete = mask & (local_next == 5), mask & (local_next == 6)
    n, n_continuous, n_discrete = int(mask.sum()), int(continuous.sum()), int(discrete.sum())
    assert n_continuous and n_discrete
    assert loss(0.0, mask) * n == pytest.approx(loss(1.0, continuous) * n_continuous, rel=1e-5)
    gripper = loss(1.0, discrete) * n_discrete
    assert loss(4.0, mask) * n == pytest.approx(loss(0.0, mask) * n + 4 * gripper, rel=1e-5)


def test_config_json_round_trip_and_overrides() -> None:
    config = GatoConfig.from_preset("tiny", context_window=64, value_embedding=False)
    assert config.context_window == 64 and not config.value_embedding
    assert GatoConfig.from_json(config.to_json()) == config
    with pytest.raises(KeyError):
        GatoConfig.from_preset("gato-9000")
    with pytest.raises(ValueError):
        GatoConfig(context_window=70000)


@pytest.mark.parametrize("name,paper", [("gato-79m", 79e6), ("gato-364m", 364e6), ("gato-1.18b", 1.18e9)])
def test_presets_have_the_papers_sizes(name: str, paper: float) -> None:
    config = PRESETS[name]
    with torch.device("meta"):
        n = GatoModel(config).num_params()
    assert 0.9 * paper < n < 1.15 * paper, f"{name}: {n / 1e6:.1f}M parameters"


def test_tiny_preset_is_small() -> None:
    n = GatoModel(PRESETS["tiny"]).num_params()
    assert n < 3e6


def test_fused_attention_matches_the_exported_plain_path() -> None:
    model = small_model()
    stream = random_stream(3 * WINDOW, with_patches=True)
    fused = full_forward(model, stream)
    for block in model.blocks:
        block.attn.fused = False
    assert (fused - full_forward(model, stream)).abs().max().item() <= 1e-5


def perfect_fit_model(target_bin: int, sigma: float) -> GatoModel:
    """A model whose continuous-action distribution is exactly the soft label of `target_bin`, whatever the input.

    The log of a Gaussian over bins is quadratic in the bin: with head rows [u_i, u_i^2, 0, 0] (u_i = (i - 512)/64)
    and a constant hidden state h = [2 A u_t, -A, 0, 0], A = 64^2 / (2 sigma^2), the logits are log label + const.
    ln_f with weight 0 and bias h makes the hidden state that constant; n_layer = 0 keeps nothing else."""
    torch.manual_seed(0)
    model = GatoModel(GatoConfig(n_layer=0, n_embd=4, n_head=2, n_ff=8, context_window=WINDOW, patch_channels=8,
                                 max_local_positions=32, label_sigma=sigma)).eval()
    u = (torch.arange(tok.NUM_BINS, dtype=torch.float64) - 512) / 64
    a = 64**2 / (2 * sigma**2)
    with torch.no_grad():
        rows = model.tokens.weight[tok.CONTINUOUS_OFFSET : tok.CONTINUOUS_OFFSET + tok.NUM_BINS]
        rows.zero_()
        rows[:, 0], rows[:, 1] = u.float(), (u * u).float()
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(torch.tensor([2 * a * float(u[target_bin]), -a, 0.0, 0.0]))
    return model


def action_loss_on(model: GatoModel, target_bin: int) -> float:
    """The action loss of `model` on one continuous action token whose recorded bin is `target_bin`."""
    ids = torch.tensor([[tok.CONTINUOUS_OFFSET + 10, tok.SEPARATOR_TOKEN]])
    targets = torch.tensor([[tok.SEPARATOR_TOKEN, tok.CONTINUOUS_OFFSET + target_bin]])
    mask = torch.tensor([[False, True]])
    hi = torch.full((1, 2), tok.CONTINUOUS_OFFSET + tok.NUM_BINS)
    with torch.no_grad():
        return model.action_loss(ids, torch.arange(2)[None], torch.arange(2)[None], targets, mask, hi).item()


def test_action_loss_is_zero_only_for_a_perfect_fit() -> None:
    """The loss is KL to the label distribution: 0 when the model predicts the soft labels exactly, and about
    1 / (2 sigma^2) nats when its Gaussian sits one bin off."""
    sigma = 2.5
    model = small_model(label_sigma=sigma)
    labels, entropy = model._label_table(torch.device("cpu"))
    assert torch.allclose(labels, soft_labels(torch.arange(tok.NUM_BINS), tok.NUM_BINS, sigma))
    assert entropy[500].item() == pytest.approx(math.log(sigma * math.sqrt(2 * math.pi * math.e)), rel=1e-3)
    for target in (500, 3, 1020):  # the middle and both renormalized edges
        fit = perfect_fit_model(target, sigma)
        assert abs(action_loss_on(fit, target)) < 1e-3
        assert action_loss_on(fit, target + (1 if target < 1000 else -1)) > 0.5 / (2 * sigma**2)
    assert action_loss_on(perfect_fit_model(500, sigma), 520) > 10.0


def test_local_positions_reach_observation_tokens_only() -> None:
    """Gato adds local position encodings to observation tokens only: in a new model an action token embeds
    the same at every action slot of a timestep; a config read from a file without the field (the shipped
    model) keeps the old layout, where every token of a timestep got its index."""
    from gato_ros.export import builtin_spec

    spec = builtin_spec()
    n_obs, per_step = tok.observation_token_count(spec), tok.timestep_token_count(spec)
    token = torch.full((1, per_step), tok.CONTINUOUS_OFFSET + 700)  # one id in every slot of a timestep
    new = GatoConfig(n_layer=1, n_embd=32, n_head=4, n_ff=64, context_window=WINDOW, max_local_positions=64)
    legacy_json = {k: v for k, v in new.to_dict().items() if k != "observation_local_positions_only"}
    for config, only_observations in ((new, True), (GatoConfig.from_dict(legacy_json), False)):
        assert config.observation_local_positions_only is only_observations
        torch.manual_seed(0)
        model = GatoModel(config).eval()
        local = torch.from_numpy(tok.timestep_local_positions(spec, config.observation_local_positions_only))[None]
        with torch.no_grad():
            e = model.embed(token, local)[0]
        observation_spread = (e[: n_obs - 1] - e[0]).abs().amax()
        action_spread = (e[n_obs:] - e[n_obs]).abs().amax()
        assert observation_spread > 1e-3  # observation tokens still tell their slot apart
        assert bool(action_spread == 0.0) is only_observations
        if only_observations:  # no local encoding at all, not the one of slot 0: the value embedding alone
            with torch.no_grad():
                assert (e[n_obs:] - model.values(token)[0, n_obs:]).abs().max() < 1e-6


SPAN = 8  # a pinned prefix of up to 8 tokens at positions 0..7


def pinned_forward(model: GatoModel, prefix: dict[str, torch.Tensor], stream: dict[str, torch.Tensor], chunk: int,
                   offset: int, plain: bool = False) -> torch.Tensor:
    """The prefix at positions 0.., then `stream` at SPAN + offset.. through a ring of prefix + WINDOW slots that
    never overwrites the prefix, as the runtime pins it; the stream's logits."""
    for block in model.blocks:
        block.attn.fused = not plain
    n = prefix["input_ids"].shape[1]
    cache, past_positions = model.empty_cache(batch=1, capacity=n + WINDOW + chunk)
    with torch.no_grad():
        _, presents = model(position_ids=torch.arange(n).unsqueeze(0), **prefix)
    for (k, v), (pk, pv) in zip(cache, presents, strict=True):
        k[:, :, :n], v[:, :, :n] = pk, pv
    past_positions[:, :n] = torch.arange(n)
    outputs = []
    for start in range(0, stream["input_ids"].shape[1], chunk):
        sl = slice(start, min(start + chunk, stream["input_ids"].shape[1]))
        positions = torch.arange(sl.start, sl.stop).unsqueeze(0) + SPAN + offset
        with torch.no_grad():
            logits, presents = model(position_ids=positions, past_key_values=cache, past_positions=past_positions,
                                     **{k: v[:, sl] for k, v in stream.items()})
        outputs.append(logits)
        slots = n + torch.argsort(past_positions[0, n:])[: sl.stop - sl.start]
        for (k, v), (pk, pv) in zip(cache, presents, strict=True):
            k[:, :, slots], v[:, :, slots] = pk, pv
        past_positions[:, slots] = positions
    return torch.cat(outputs, dim=1)


def test_a_pinned_prefix_reads_the_same_from_anywhere_in_the_episode() -> None:
    """With a pinned span the prefix is attended without rotary positions: the episode's logits are the same at
    any offset in the episode (the episode's own tokens are relative), in the fused and the exported plain path,
    and they depend on the prefix."""
    model = small_model(pinned_span=SPAN)
    prefix = {k: v[:, :5] for k, v in random_stream(5, seed=3).items()}
    stream = random_stream(4 * WINDOW)
    base = pinned_forward(model, prefix, stream, 7, offset=0)
    for offset in (WINDOW * 3 + 1, 5000, 65536 * 3 - 7):
        assert (base - pinned_forward(model, prefix, stream, 7, offset)).abs().max().item() <= 1e-4, offset
    assert (base - pinned_forward(model, prefix, stream, 7, 5000, plain=True)).abs().max().item() <= 1e-4
    other = {k: v[:, :5] for k, v in random_stream(5, seed=4).items()}
    assert (base - pinned_forward(model, other, stream, 7, offset=0)).abs().max().item() > 1e-3
    # One forward pass over prefix + stream (training's layout) gives the same logits as the pinned ring.
    n, m = 5, stream["input_ids"].shape[1]
    joined = {k: torch.cat([prefix[k], stream[k]], dim=1) for k in stream}
    positions = torch.cat([torch.arange(n), SPAN + 5000 + torch.arange(m)]).unsqueeze(0)
    with torch.no_grad():
        full, _ = model(position_ids=positions, **joined)
    assert (full[:, n:] - base).abs().max().item() <= 1e-4


def test_step_local_attention_sees_its_own_timestep_and_the_pinned_prefix_only() -> None:
    """A query's logits depend on the tokens of its timestep and of the pinned prefix, not on earlier timesteps (the
    previous actions cannot be copied); the rolling cache gives what one forward pass gives."""
    model = small_model(pinned_span=SPAN, step_local_attention=True, observation_local_positions_only=False)
    prefix = {k: v[:, :5] for k, v in random_stream(5, seed=3).items()}
    stream = random_stream(4 * 7)
    base = pinned_forward(model, prefix, stream, 7, offset=0)
    changed = {k: v.clone() for k, v in stream.items()}
    changed["input_ids"][:, 7:14] = torch.flip(changed["input_ids"][:, 7:14], dims=[1])  # timestep 1 only
    after = pinned_forward(model, prefix, changed, 7, offset=0)
    assert (base[:, 14:] - after[:, 14:]).abs().max().item() == 0.0, "later timesteps do not see timestep 1"
    assert (base[:, 7:14] - after[:, 7:14]).abs().max().item() > 1e-3
    other = {k: v[:, :5] for k, v in random_stream(5, seed=4).items()}
    assert (base[:, 14:] - pinned_forward(model, other, stream, 7, offset=0)[:, 14:]).abs().max().item() > 1e-3
    assert (base - pinned_forward(model, prefix, stream, 3, offset=0, plain=True)).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="local position on every token"):
        GatoConfig(step_local_attention=True)
