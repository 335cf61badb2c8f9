"""The Gato transformer (Reed et al. 2022), nanoGPT style: embedding function + pre-norm decoder.

Contract (docs/interfaces.md "Model"): `forward` takes explicit per-layer past keys/values with the
absolute positions of the cached keys, and returns the logits plus the NEW tokens' keys/values only.
A query at position q sees a key at position k iff 0 <= q - k < context_window, or 0 <= k < pinned_span
(a pinned prefix: a prompt or an instruction) and k <= q, in training and at run time alike; a pinned key is
scored without rotary positions, so the prefix reads the same from anywhere in an episode. With
step_local_attention a query also sees no further back than its local position (its own timestep). Position
enters only through rotary embeddings of `position_ids mod rope_period` whose frequencies are integer
multiples of 2*pi/rope_period, so the rotation is exactly periodic: a run of any length keeps exact relative
attention and the angles never lose precision. Keys are cached already rotated, so a rolling cache evicts the
oldest slot with no recompute.

Everything in `forward` is ONNX-exportable: no data-dependent Python control flow, no complex numbers,
masks from comparisons, plain matmul-softmax attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gato_ros import contract
from gato_ros.contract import EMPTY_POSITION, PRESETS, GatoConfig  # noqa: F401  (re-exported for callers)

KeyValue = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Rotary embeddings with exactly periodic angles


def rope_multipliers(config: GatoConfig) -> torch.Tensor:
    """Integer k_i per rotary pair: angle_i(p) = 2*pi * k_i * (p mod P) / P.

    k_i approximates the usual base^(-2i/d) frequencies, rounded to integers >= 1 so that a shift
    by the period P turns every pair by a whole number of turns.
    """
    head_dim = config.n_embd // config.n_head
    freqs = config.rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    k = torch.round(freqs * config.rope_period / (2 * math.pi)).clamp(min=1)
    return k.to(torch.int64)


def rope_cos_sin(position_ids: torch.Tensor, multipliers: torch.Tensor, period: int) -> tuple[torch.Tensor, ...]:
    """cos/sin [B, 1, S, Dh/2] of the angles, reduced mod the period in int64 so they stay exact."""
    phase = torch.remainder(torch.remainder(position_ids, period).unsqueeze(-1) * multipliers, period)
    angle = phase.to(torch.float32) * (2 * math.pi / period)
    return torch.cos(angle).unsqueeze(1), torch.sin(angle).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ----------------------------------------------------------------------------------------------
# Embedding function


class ValueEmbedding(nn.Module):
    """Continuous token -> vector computed from the value it stands for (no table).

    From the bin: the mu-law value y in [-1, 1] (bin centre) and the decoded value x (clipped).
    A linear term in x, one in y and Fourier features of y, mixed by one linear layer. Neighbouring
    bins get neighbouring embeddings, which lookup tables have to learn bin by bin.
    """

    def __init__(self, config: GatoConfig) -> None:
        super().__init__()
        self.n_freq = config.value_fourier_features
        self.value_clip = config.value_clip
        self.register_buffer("freqs", torch.arange(1, self.n_freq + 1, dtype=torch.float32) * math.pi, persistent=False)
        self.proj = nn.Linear(2 + 2 * self.n_freq, config.n_embd)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        bins = (input_ids - contract.CONTINUOUS_OFFSET).clamp(0, contract.NUM_BINS - 1).to(torch.float32)
        y = (bins + 0.5) / contract.NUM_BINS * 2.0 - 1.0
        # exp - 1 rather than expm1: the TorchScript ONNX exporter has no expm1 (and |y| >= 1/1024 here).
        x = torch.sign(y) * (torch.exp(y.abs() * math.log1p(contract.M * contract.MU)) - 1.0) / contract.MU
        x = x.clamp(-self.value_clip, self.value_clip) / self.value_clip
        angles = y.unsqueeze(-1) * self.freqs
        features = torch.cat([x.unsqueeze(-1), y.unsqueeze(-1), torch.sin(angles), torch.cos(angles)], dim=-1)
        return self.proj(features)


class PatchEmbedding(nn.Module):
    """One ResNet-v2 block (pre-activation: GroupNorm, GELU, conv) per 16x16 patch -> one vector.

    The stem is a 4x4 convolution with stride 4, so the residual block runs at 4x4: three 3x3
    convolutions at the full 16x16 made pixel training ~27x slower per step than state training
    (DESIGN.md, "Notes for the seeing policy"); at 4x4 they cost 16x less.
    """

    def __init__(self, config: GatoConfig) -> None:
        super().__init__()
        c = config.patch_channels
        groups = math.gcd(c, 8)
        self.stem = nn.Conv2d(3, c, 4, stride=4)  # 16x16 -> 4x4
        self.norm1 = nn.GroupNorm(groups, c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm_out = nn.GroupNorm(groups, c)
        self.proj = nn.Linear(c * 16, config.n_embd)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        lead = patches.shape[:-3]
        x = self.stem(patches.reshape(-1, 3, contract.PATCH_SIZE, contract.PATCH_SIZE))
        h = self.conv1(F.gelu(self.norm1(x)))
        x = x + self.conv2(F.gelu(self.norm2(h)))
        x = F.gelu(self.norm_out(x))
        return self.proj(x.flatten(1)).reshape(*lead, -1)


def embed_patch_tokens(patch_embed: PatchEmbedding, patches: torch.Tensor, is_patch: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, S, D]: the patch network's output at PATCH_TOKEN slots (rows elsewhere are meaningless).

    `patches` holds the tokenizer's scaled values (float, as the runtime feeds them) or raw uint8 pixels
    (training batches: a quarter of the bytes to load and copy), which are scaled here the same way.

    The network runs on the patch tokens only (gathered by index), never on the other tokens of the
    window, in training and in the exported graph alike. One zero patch is always appended so the
    network never sees an empty batch (an action token's forward pass holds no patch, and GroupNorm's
    exported Reshape cannot infer a dimension of an empty tensor).
    """
    B, S = is_patch.shape
    flat = is_patch.reshape(-1)
    index = torch.nonzero(flat).squeeze(1)
    selected = patches.reshape(B * S, 3, contract.PATCH_SIZE, contract.PATCH_SIZE).index_select(0, index)
    if selected.dtype == torch.uint8:
        selected = (selected.to(dtype) / contract.PIXEL_HALF_RANGE - 1.0) / contract.PATCH_VALUE_DIVISOR
    selected = selected.to(dtype)
    selected = torch.cat([selected, selected.new_zeros((1, 3, contract.PATCH_SIZE, contract.PATCH_SIZE))])
    vectors = patch_embed(selected)  # [P + 1, D]
    slot = (torch.cumsum(flat.to(torch.int64), 0) - 1).clamp(min=0)  # the k-th patch token -> row k
    return vectors.index_select(0, slot).reshape(B, S, -1)


# ----------------------------------------------------------------------------------------------
# Decoder


class Attention(nn.Module):
    def __init__(self, config: GatoConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.fused = True  # F.scaled_dot_product_attention outside ONNX export

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor,
        past: KeyValue | None,
        pinned: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """`pinned` [B, C+S] bool marks the keys of a pinned prefix (GatoConfig.pinned_span): cached unrotated
        (cos/sin of angle 0 at their positions) and scored against the unrotated query, so a query weighs the
        prefix the same however far into the episode it is; every other key is scored with rotary positions."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        plain_q = q
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        present = (k, v)
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        if pinned is not None:  # one product gives q_rot.k for rotary keys and q.k for pinned ones
            on = pinned[:, None, :, None].to(k.dtype)
            q = torch.cat([q, plain_q], dim=-1)
            k = torch.cat([k * (1 - on), k * on], dim=-1)
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.fused and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            # Same math, fused kernel (several times faster in training); exports take the plain path.
            p = self.dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, scale=scale)
        else:
            att = (q @ k.transpose(-2, -1)) * scale
            att = att.masked_fill(~allowed, torch.finfo(att.dtype).min)
            att = self.dropout(torch.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).reshape(B, S, D)
        return self.proj(y), present


class MLP(nn.Module):
    def __init__(self, config: GatoConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.n_ff)
        self.proj = nn.Linear(config.n_ff, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GatoConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, allowed, past, pinned=None):  # type: ignore[no-untyped-def]
        a, present = self.attn(self.ln1(x), cos, sin, allowed, past, pinned)
        x = x + a
        return x + self.mlp(self.ln2(x)), present


class GatoModel(nn.Module):
    def __init__(self, config: GatoConfig) -> None:
        super().__init__()
        self.config = config
        d = config.n_embd
        self.tokens = nn.Embedding(config.vocab_size, d)
        self.values = ValueEmbedding(config) if config.value_embedding else None
        with torch.random.fork_rng(devices=[]):  # the patch network's shape never changes the other weights' init
            self.patch_embed = PatchEmbedding(config)
        self.patch_rows = nn.Embedding(contract.PATCH_POSITION_INTERVALS, d)
        self.patch_cols = nn.Embedding(contract.PATCH_POSITION_INTERVALS, d)
        self.local_positions = nn.Embedding(config.max_local_positions, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d)
        with torch.random.fork_rng(devices=[]):  # registered last: the other weights init as without it
            self.aux_head = nn.Linear(d, config.aux_size) if config.aux_size else None
        self.register_buffer("rope_k", rope_multipliers(config), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight") and ".blocks." in f".{name}":
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # The output head is tied to the token table (as in GPT-2/nanoGPT and the paper's counts).
    @property
    def head_weight(self) -> torch.Tensor:
        return self.tokens.weight

    def embed(
        self,
        input_ids: torch.Tensor,
        local_positions: torch.Tensor,
        patches: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.tokens(input_ids.clamp(0, self.config.vocab_size - 1))
        if self.values is not None:
            first = contract.CONTINUOUS_OFFSET
            continuous = (input_ids >= first) & (input_ids < first + contract.NUM_BINS)
            x = torch.where(continuous.unsqueeze(-1), self.values(input_ids), x)
        if patches is not None:
            is_patch = input_ids == contract.PATCH_TOKEN
            pe = embed_patch_tokens(self.patch_embed, patches, is_patch, x.dtype)
            is_patch = is_patch.unsqueeze(-1)
            if patch_positions is not None:
                pos = patch_positions.clamp(0, contract.PATCH_POSITION_INTERVALS - 1)
                pe = pe + self.patch_rows(pos[..., 0]) + self.patch_cols(pos[..., 1])
            x = torch.where(is_patch, pe, x)
        # A negative local position (contract.NO_LOCAL_POSITION: separator and action tokens) adds nothing.
        has_local = (local_positions >= 0).unsqueeze(-1).to(x.dtype)
        local = self.local_positions(local_positions.clamp(0, self.config.max_local_positions - 1))
        return x + local * has_local

    def hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        local_positions: torch.Tensor,
        past_key_values: list[KeyValue] | None = None,
        past_positions: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """Final-normed hidden states [B, S, D] and the new tokens' (rotated key, value) per layer."""
        x = self.drop(self.embed(input_ids, local_positions, patches, patch_positions))
        span = self.config.pinned_span
        # A pinned prefix's tokens are rotated by angle 0: their keys are cached as they are (see Attention).
        rotary_positions = torch.where(position_ids < span, 0, position_ids) if span else position_ids
        cos, sin = rope_cos_sin(rotary_positions, self.rope_k, self.config.rope_period)
        key_positions = position_ids if past_positions is None else torch.cat([past_positions, position_ids], dim=1)
        delta = position_ids.unsqueeze(-1) - key_positions.unsqueeze(1)  # [B, S, C+S]
        allowed = (delta >= 0) & (delta < self.config.context_window)  # [B, S, C+S]
        if self.config.step_local_attention:  # back to its timestep's first token, no further
            allowed = allowed & (delta <= local_positions.unsqueeze(-1))
        pinned = None
        if span:  # a pinned prefix stays in sight (empty slots have negative positions)
            pinned = (key_positions >= 0) & (key_positions < span)
            allowed = allowed | ((delta >= 0) & pinned.unsqueeze(1))
        allowed = allowed.unsqueeze(1)  # [B, 1, S, C+S]
        presents: list[KeyValue] = []
        for i, block in enumerate(self.blocks):
            past = None if past_key_values is None else past_key_values[i]
            x, present = block(x, cos, sin, allowed, past, pinned)
            presents.append(present)
        return self.ln_f(x), presents

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        local_positions: torch.Tensor,
        past_key_values: list[KeyValue] | None = None,
        past_positions: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        h, presents = self.hidden(
            input_ids, position_ids, local_positions, past_key_values, past_positions, patches, patch_positions
        )
        if last_only:
            h = h[:, -1:, :]
        return F.linear(h, self.head_weight), presents

    def empty_cache(self, batch: int = 1, capacity: int | None = None) -> tuple[list[KeyValue], torch.Tensor]:
        """A rolling cache of `capacity` (default context_window) empty slots."""
        c = self.config
        capacity = c.context_window if capacity is None else capacity
        shape = (batch, c.n_head, capacity, c.n_embd // c.n_head)
        device = self.tokens.weight.device
        kv = [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in range(c.n_layer)]
        return kv, torch.full((batch, capacity), EMPTY_POSITION, dtype=torch.int64, device=device)

    def action_loss(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        local_positions: torch.Tensor,
        targets: torch.Tensor,
        loss_mask: torch.Tensor,
        target_hi: torch.Tensor,
        patches: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        aux_targets: torch.Tensor | None = None,
        aux_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean action loss over positions where `loss_mask` is set (position t predicts token t+1).

        targets:   [B, S] the token to predict; loss_mask [B, S] bool
        target_hi: [B, S] upper end of the valid id range (`tokenizer.action_token_range`): continuous
                   targets use [32000, 33024), discrete ones [0, target_hi)
        Logits are restricted to the valid range, as constrained decoding does at run time, and the head
        runs only at loss positions. Continuous targets get Gaussian soft labels (config.label_sigma
        bins), discrete ones hard labels. The loss is the KL divergence to the label distribution
        (cross-entropy minus the label entropy: same gradients, and 0 for a perfect fit), the discrete tokens'
        weighted by config.discrete_weight.
        With `aux_targets` [B, S, aux_size] and `aux_mask` [B, S] (a model with an aux head), config.aux_weight
        times the aux head's mean squared error at the masked positions is added (linear beyond config.aux_huber).
        """
        hidden, _ = self.hidden(input_ids, position_ids, local_positions, patches=patches,
                                patch_positions=patch_positions)
        loss = self._action_loss(hidden, targets, loss_mask, target_hi)
        if aux_targets is not None and self.aux_head is not None and aux_mask is not None and bool(aux_mask.any()):
            loss = loss + self.config.aux_weight * self.aux_error(hidden, aux_targets, aux_mask)
        return loss

    def aux_error(self, hidden: torch.Tensor, aux_targets: torch.Tensor, aux_mask: torch.Tensor) -> torch.Tensor:
        """The aux head's mean error at the masked positions: squared, linear beyond config.aux_huber (a Huber
        loss scaled to equal the squared error below it)."""
        predicted, wanted = self.aux_head(hidden[aux_mask]).float(), aux_targets[aux_mask].float()
        delta = self.config.aux_huber
        return 2 * F.huber_loss(predicted, wanted, delta=delta) if delta > 0 else F.mse_loss(predicted, wanted)

    def _action_loss(self, h: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, target_hi: torch.Tensor
                     ) -> torch.Tensor:
        h, targets, target_hi = h[loss_mask], targets[loss_mask], target_hi[loss_mask]
        n = targets.shape[0]
        if n == 0:
            return h.sum() * 0.0
        continuous = targets >= contract.CONTINUOUS_OFFSET
        total = h.new_zeros((), dtype=torch.float32)
        if continuous.any():
            w = self.head_weight[contract.CONTINUOUS_OFFSET : contract.CONTINUOUS_OFFSET + contract.NUM_BINS]
            logp = F.log_softmax(F.linear(h[continuous], w).float(), dim=-1)
            labels, entropy = self._label_table(h.device)
            bins = targets[continuous] - contract.CONTINUOUS_OFFSET
            total = total - (labels[bins] * logp).sum() - entropy[bins].sum()
        discrete = ~continuous
        if discrete.any():
            width = int(target_hi[discrete].max())
            logits = F.linear(h[discrete], self.head_weight[:width]).float()
            valid = torch.arange(width, device=h.device) < target_hi[discrete].unsqueeze(-1)
            logits = logits.masked_fill(~valid, float("-inf"))
            total = total + self.config.discrete_weight * F.cross_entropy(logits, targets[discrete], reduction="sum")
        return total / n


    def _label_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft labels of every bin [1024, 1024] and their entropies, built once per device."""
        key = (str(device), self.config.label_sigma)
        if getattr(self, "_labels_key", None) != key:
            bins = torch.arange(contract.NUM_BINS, device=device)
            labels = soft_labels(bins, contract.NUM_BINS, self.config.label_sigma)
            entropy = -(labels * torch.log(labels.clamp_min(1e-30))).sum(-1)
            self._labels, self._labels_key = (labels, entropy), key
        return self._labels


def soft_labels(bins: torch.Tensor, num_bins: int, sigma: float) -> torch.Tensor:
    """[N, num_bins] Gaussian over bins centred on `bins`, renormalized at the edges (sigma 0: one-hot)."""
    if sigma <= 0:
        return F.one_hot(bins, num_bins).float()
    grid = torch.arange(num_bins, device=bins.device, dtype=torch.float32)
    p = torch.exp(-0.5 * ((grid - bins.unsqueeze(-1).float()) / sigma) ** 2)
    return p / p.sum(-1, keepdim=True)
