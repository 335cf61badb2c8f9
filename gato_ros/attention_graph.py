"""The serving graph written node by node: fused attention, no shape arithmetic, one call per step's tokens.

The TorchScript exporter turns GatoModel's forward into ~310 nodes after ORT's optimizations, most of them
shape arithmetic (Shape/Gather/Unsqueeze/Concat for every view) and per-layer rotary slicing; at the tiny
preset's size each node costs about as much as its arithmetic, so per-call overhead dominated the step.
This module writes the same function directly with onnx.helper (action-vocabulary head; image specs too):

- embedding: one Gather from a table whose continuous rows hold the value embedding of each bin
  (ValueEmbedding is a function of the token id alone, so it is precomputed), plus the local positions;
- patches (image specs): the patch network on the PATCH_TOKEN slots only, gathered by index (Conv, GroupNorm
  as LayerNormalization rows, Gelu; fp32 inside an fp16 graph), scattered back by slot with the patch
  row/column encodings, as GatoModel.embed does;
- rotary: cos/sin of every q/k column computed once per call, in int64 phases (exact, as in the model) and
  fp32 angles; rope is q * cos + rotate_half(q) * sin, with rotate_half(q) and rotate_half(k) from extra
  columns of the qkv MatMul (the projection's columns permuted and negated) on narrow models, from five
  nodes on wide ones;
- mask: one additive bias [B, 1, S, K] from positions (0 <= q - k < window), shared by every layer. It
  masks by position, not slot order, which is what the ring cache (slots in arbitrary order) needs;
- cache: an in-place ring (`contract.CACHE_LAYOUT_IN_PLACE`, the default): each layer writes its new keys/values
  into the ring with ScatterElements at slot position mod L, and the runtime binds present to past's memory, so
  ORT writes S slots instead of copying the cache; MultiHeadAttention then reads the ring itself (K = L). The
  earlier layout (`CACHE_LAYOUT_RING`: MultiHeadAttention over Concat(cache, new keys), presents = the new
  tokens, K = C + S) copied the whole cache twice per layer per call. Measured by scripts/gqa_vs_mha.py (tiny,
  1024 tokens, CPU ms per call, 1 thread, calls interleaved, 2-core machine shared with other jobs): a decode
  call 0.318 (concat) vs 0.269 (in place), a 34-token prefill 1.170 vs 1.135. ORT's GroupQueryAttention
  (contiguous buffer written in place, attended by index with local_window_size = the window, rotary inside;
  the runtime would compact the buffer when full) decodes in 0.250 but prefills in 1.487: it cannot compute
  the last layer for the last position only (its queries are its new keys), so a tick (1 prefill + 7 decodes)
  costs 3.24 ms against 3.02 for the in-place ring. Both are exact (≤ 1.2e-7 against torch over 3 windows);
- last layer: only the last position's output is read, so the last layer attends, projects and runs its MLP
  for that position alone (its keys/values are still written for every new token);
- attention: com.microsoft MultiHeadAttention per layer with that bias. Measured against the same math in plain
  nodes (MatMul with the cache read in place, one softmax over the cache's and the new tokens' scores): per
  control step of the tiny preset (CPU time, 1 thread, shared 2-core machine) 2.2 vs 2.3 ms at 128 tokens, 3.0
  vs 3.3 ms at 512, 4.3 vs 4.6 ms at 1024 (with the concatenating ring): the fused op wins;
- residual + norm: com.microsoft SkipLayerNormalization (residual add, projection bias and LayerNorm in one);
- head: final norm on the last position only, Gemm against the action rows of the tied table.

The inputs, outputs and metadata are the export contract (gato_ros/export.py); the file's
`gato_ros.cache_layout` tells the runtime what the presents hold, and the export's parity check (≤ 1e-4 vs
torch) applies to both graphs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.model import GatoModel

ORT_DOMAIN = "com.microsoft"
MASKED = {np.float32: -1e9, np.float16: -65504.0}  # additive bias of a hidden key: exp() of it is exactly 0
ROTARY_PREFIX = "/rope/"
RING_INDICES = "/slots/ring_indices"
ROTATE_BY_MATMUL_MAX_WIDTH = 128  # see _attention  # nodes that must stay fp32 (phases up to the period overflow fp16)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def table_device(model: GatoModel) -> torch.device:
    return model.tokens.weight.device


def merged_input_table(model: GatoModel) -> np.ndarray:
    """The token table with each continuous id's row replaced by its value embedding (what `embed` gathers)."""
    table = _np(model.tokens.weight).copy()
    if model.values is not None:
        bins = torch.arange(tok.CONTINUOUS_OFFSET, tok.CONTINUOUS_OFFSET + tok.NUM_BINS, device=table_device(model))
        with torch.no_grad():
            table[tok.CONTINUOUS_OFFSET:tok.CONTINUOUS_OFFSET + tok.NUM_BINS] = _np(model.values(bins))
    return table


def rotate_half_columns(w: np.ndarray, n_head: int) -> np.ndarray:
    """Columns c of `w` ([in, D], heads of Dh side by side) such that x @ result = rotate_half(x @ w) per
    head, with rotate_half([a, b]) = [-b, a]: apply_rope(x) = x * [cos, cos] + rotate_half(x) * [sin, sin]."""
    d = w.shape[-1] // n_head
    heads = w.reshape(*w.shape[:-1], n_head, d)
    out = np.concatenate([-heads[..., d // 2:], heads[..., : d // 2]], axis=-1)
    return out.reshape(w.shape)


class _Graph:
    """Accumulates nodes and initializers; every name is prefixed so a layer's nodes group in profiles."""

    def __init__(self, dtype: type) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.dtype = dtype
        self.count = 0

    def const(self, name: str, value: np.ndarray, dtype: type | None = None) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str, outputs: int = 1, domain: str = "",
           **attrs: object) -> list[str]:
        self.count += 1
        name = f"{prefix}{op_type}_{self.count}"
        outs = [f"{name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], prefix: str, **attrs: object) -> str:
        return self.op(op_type, inputs, prefix, **attrs)[0]


def _embedding(g: _Graph, model: GatoModel, images: bool = False) -> str:
    c = model.config
    table = g.const("model.tokens.weight", merged_input_table(model))  # text/discrete rows: the tied table's
    lo, hi = g.const("/embed/zero", 0, np.int64), g.const("/embed/vocab_max", c.vocab_size - 1, np.int64)
    ids = g.op1("Clip", [contract.INPUT_IDS, lo, hi], "/embed/")
    x = g.op1("Gather", [table, ids], "/embed/", axis=0)
    if images:
        is_patch, patch_vectors = _patch_embedding(g, model)
        x = g.op1("Where", [is_patch, patch_vectors, x], "/embed/")
    local_max = g.const("/embed/local_max", c.max_local_positions - 1, np.int64)
    # A negative local position (contract.NO_LOCAL_POSITION) adds nothing, as in GatoModel.embed: it clips to -1,
    # which Gather reads as the last row, a zero row appended to the table (folded by ORT at load).
    none = g.const("/embed/no_local", contract.NO_LOCAL_POSITION, np.int64)
    local = g.op1("Clip", [contract.LOCAL_POSITIONS, none, local_max], "/embed/")
    local_table = g.const("model.local_positions.weight", _np(model.local_positions.weight))
    zero_row = g.const("/embed/no_local_row", np.zeros((1, c.n_embd)))
    with_zero = g.op1("Concat", [local_table, zero_row], "/embed/", axis=0)
    return g.op1("Add", [x, g.op1("Gather", [with_zero, local], "/embed/", axis=0)], "/embed/")


def _conv(g: _Graph, x: str, conv: torch.nn.Conv2d, name: str) -> str:
    return g.op1("Conv", [x, g.const(f"model.{name}.weight", _np(conv.weight), np.float32),
                          g.const(f"model.{name}.bias", _np(conv.bias), np.float32)], f"/{name}/",
                 strides=list(conv.stride), pads=[conv.padding[0], conv.padding[1]] * 2)


def _group_norm_gelu(g: _Graph, x: str, norm: torch.nn.GroupNorm, name: str) -> str:
    """GELU(GroupNorm(x)) on [N, C, 4, 4]: each group normalized as one LayerNormalization row, then the
    per-channel affine (ONNX's GroupNormalization is not in opset 17)."""
    p, c = f"/{name}/", norm.num_channels
    width = c // norm.num_groups * 16
    rows = g.op1("Reshape", [x, g.const(p + "groups", [-1, norm.num_groups, width], np.int64)], p)
    normed = g.op1("LayerNormalization", [rows, g.const(p + "ones", np.ones(width), np.float32),
                                         g.const(p + "zeros", np.zeros(width), np.float32)], p,
                   axis=-1, epsilon=norm.eps)
    y = g.op1("Reshape", [normed, g.const(p + "channels", [-1, c, 4, 4], np.int64)], p)
    y = g.op1("Mul", [y, g.const(f"model.{name}.weight", _np(norm.weight).reshape(c, 1, 1), np.float32)], p)
    y = g.op1("Add", [y, g.const(f"model.{name}.bias", _np(norm.bias).reshape(c, 1, 1), np.float32)], p)
    return g.op1("Gelu", [y], p, domain=ORT_DOMAIN)


def _patch_embedding(g: _Graph, model: GatoModel) -> tuple[str, str]:
    """(is_patch [B, S, 1], vectors [B, S, D]) as GatoModel.embed computes them: the patch network runs on
    the PATCH_TOKEN slots only (gathered by index, one zero patch appended so an action token's call never
    has an empty batch), its output scattered back by slot, plus the patch row/column encodings. The
    network stays fp32 in an fp16 graph (ORT's CPU provider has no fp16 Conv)."""
    p, pe, size = "/patch/", model.patch_embed, contract.PATCH_SIZE
    is_patch = g.op1("Equal", [contract.INPUT_IDS, g.const(p + "patch_token", contract.PATCH_TOKEN, np.int64)], p)
    flat = g.op1("Reshape", [is_patch, g.const(p + "flat", [-1], np.int64)], p)
    index = g.op1("Squeeze", [g.op1("NonZero", [flat], p), g.const(p + "axis0", [0], np.int64)], p)
    pixels = g.op1("Reshape", [contract.PATCHES, g.const(p + "patch_rows", [-1, 3, size, size], np.int64)], p)
    selected = g.op1("Gather", [pixels, index], p, axis=0)
    selected = g.op1("Concat", [selected, g.const(p + "pad_patch", np.zeros((1, 3, size, size)), np.float32)], p,
                     axis=0)
    x = _conv(g, selected, pe.stem, "patch_embed.stem")
    h = _conv(g, _group_norm_gelu(g, x, pe.norm1, "patch_embed.norm1"), pe.conv1, "patch_embed.conv1")
    x = g.op1("Add", [x, _conv(g, _group_norm_gelu(g, h, pe.norm2, "patch_embed.norm2"), pe.conv2,
                                "patch_embed.conv2")], p)
    x = g.op1("Flatten", [_group_norm_gelu(g, x, pe.norm_out, "patch_embed.norm_out")], p, axis=1)
    vectors = g.op1("Gemm", [x, g.const("model.patch_embed.proj.weight", _np(pe.proj.weight), np.float32),
                             g.const("model.patch_embed.proj.bias", _np(pe.proj.bias), np.float32)], p, transB=1)
    slot = g.op1("Sub", [g.op1("CumSum", [g.op1("Cast", [flat], p, to=TensorProto.INT64),
                                          g.const(p + "cumsum_axis", 0, np.int64)], p),
                         g.const(p + "one", 1, np.int64)], p)
    slot = g.op1("Max", [slot, g.const(p + "zero", 0, np.int64)], p)
    per_slot = g.op1("Gather", [vectors, slot], p, axis=0)
    shape = g.op1("Concat", [g.op1("Shape", [contract.INPUT_IDS], p), g.const(p + "width", [-1], np.int64)], p, axis=0)
    per_slot = g.op1("Reshape", [per_slot, shape], p)
    top = g.const(p + "interval_max", contract.PATCH_POSITION_INTERVALS - 1, np.int64)
    pos = g.op1("Clip", [contract.PATCH_POSITIONS, g.const(p + "interval_min", 0, np.int64), top], p)
    row, col = g.op("Split", [pos], p, outputs=2, axis=-1)
    rows = g.op1("Gather", [g.const("model.patch_rows.weight", _np(model.patch_rows.weight), np.float32),
                            g.op1("Squeeze", [row, g.const(p + "last", [-1], np.int64)], p)], p, axis=0)
    cols = g.op1("Gather", [g.const("model.patch_cols.weight", _np(model.patch_cols.weight), np.float32),
                            g.op1("Squeeze", [col, g.const(p + "last_", [-1], np.int64)], p)], p, axis=0)
    vectors = g.op1("Add", [g.op1("Add", [per_slot, rows], p), cols], p)
    if g.dtype is np.float16:
        vectors = g.op1("Cast", [vectors], p, to=TensorProto.FLOAT16)
    return g.op1("Unsqueeze", [is_patch, g.const(p + "feature_axis", [-1], np.int64)], p), vectors


def _rotary(g: _Graph, model: GatoModel) -> tuple[str, str]:
    """cos and sin [B, S, 2D] for the [q | k] columns: phase = ((p mod P) * k_i) mod P in int64, angle in fp32."""
    c, p = model.config, ROTARY_PREFIX
    k = model.rope_k.cpu().numpy().astype(np.int64)  # one multiplier per rotary pair of a head
    per_column = np.tile(np.concatenate([k, k]), 2 * c.n_head)  # [q heads | k heads], each [first, second half]
    period = g.const(p + "period", c.rope_period, np.int64)
    pos = g.op1("Mod", [contract.POSITION_IDS, period], p)
    phase = g.op1("Mul", [g.op1("Unsqueeze", [pos, g.const(p + "last", [-1], np.int64)], p),
                          g.const(p + "multipliers", per_column, np.int64)], p)
    phase = g.op1("Mod", [phase, period], p)
    angle = g.op1("Mul", [g.op1("Cast", [phase], p, to=TensorProto.FLOAT),
                          g.const(p + "radians_per_step", 2 * math.pi / c.rope_period, np.float32)], p)
    cos, sin = g.op1("Cos", [angle], p), g.op1("Sin", [angle], p)
    if g.dtype is np.float16:
        cos, sin = (g.op1("Cast", [t], p, to=TensorProto.FLOAT16) for t in (cos, sin))
    return cos, sin


def _ring_slots(g: _Graph) -> tuple[str, str]:
    """Where this call's tokens go in an in-place ring of L slots (L = the cache input's length): slot
    position mod L. Returns the slots [B, S] and the same as [B, 1, S, 1], to expand to the keys' shape."""
    p = "/slots/"
    ring = g.op1("Gather", [g.op1("Shape", [contract.PAST_POSITIONS], p), g.const(p + "axis1", 1, np.int64)], p, axis=0)
    slots = g.op1("Mod", [contract.POSITION_IDS, ring], p)
    return slots, g.op1("Unsqueeze", [slots, g.const(p + "axes", [1, 3], np.int64)], p)


def _mask_bias(g: _Graph, model: GatoModel, slots: str | None = None) -> str:
    """[B, 1, S, K]: 0 where 0 <= q - k < window, MASKED elsewhere (empty slots sit at -2^40). Keys: the ring
    after this call's write (in place, K = L) or the ring followed by the new tokens (K = C + S)."""
    p = "/mask/"
    if slots is not None:
        keys = g.op1("ScatterElements", [contract.PAST_POSITIONS, slots, contract.POSITION_IDS], p, axis=1)
    else:
        keys = g.op1("Concat", [contract.PAST_POSITIONS, contract.POSITION_IDS], p, axis=1)
    delta = g.op1("Sub", [g.op1("Unsqueeze", [contract.POSITION_IDS, g.const(p + "last", [-1], np.int64)], p),
                          g.op1("Unsqueeze", [keys, g.const(p + "middle", [1], np.int64)], p)], p)
    ahead = g.op1("Less", [delta, g.const(p + "zero", 0, np.int64)], p)
    too_old = g.op1("Less", [g.const(p + "window_minus_one", model.config.context_window - 1, np.int64), delta], p)
    hidden = g.op1("Or", [ahead, too_old], p)
    bias = g.op1("Where", [hidden, g.const(p + "masked", MASKED[g.dtype]), g.const(p + "visible", 0.0)], p)
    return g.op1("Unsqueeze", [bias, g.const(p + "heads", [1], np.int64)], p)


def _layer_norm(g: _Graph, x: str, norm: torch.nn.LayerNorm, name: str) -> str:
    return g.op1("LayerNormalization", [x, g.const(f"model.{name}.weight", _np(norm.weight)),
                                        g.const(f"model.{name}.bias", _np(norm.bias))], f"/{name}/",
                 axis=-1, epsilon=norm.eps)


def _heads(g: _Graph, x: str, n_head: int, head_dim: int, prefix: str, out: str) -> str:
    """[B, S, D] -> [B, H, S, Dh], written to `out`."""
    shape = g.const(prefix + f"heads_shape_{g.count}", [0, 0, n_head, head_dim], np.int64)
    g.nodes.append(helper.make_node("Transpose", [g.op1("Reshape", [x, shape], prefix)], [out],
                                    name=prefix + out, perm=[0, 2, 1, 3]))
    return out


def _skip_norm(g: _Graph, x: str, skip: str, bias: tuple[str, np.ndarray], norm: torch.nn.LayerNorm, name: str
               ) -> tuple[str, str]:
    """(LayerNorm(x + skip + bias), x + skip + bias): the residual add with the projection's bias and the next
    norm in one node."""
    node = f"/{name}/SkipLayerNormalization"
    normed, residual = node + "_output", node + "_sum"
    inputs = [x, skip, g.const(f"model.{name}.weight", _np(norm.weight)), g.const(f"model.{name}.bias", _np(norm.bias)),
              g.const(*bias)]
    # outputs 1 and 2 (mean, inverse std) left out: the CUDA kernel does not produce them
    g.nodes.append(helper.make_node("SkipLayerNormalization", inputs, [normed, "", "", residual], name=node,
                                    domain=ORT_DOMAIN, epsilon=norm.eps))
    return normed, residual


def _matmul(g: _Graph, x: str, weight: np.ndarray, name: str) -> str:
    """x @ weight, named as the TorchScript export names it (/blocks.0/attn/qkv/MatMul for blocks.0.attn.qkv):
    the quantizers and checkpoint recovery select the transformer projections by these names."""
    block, index, *rest = name.split(".")
    prefix = f"/{block}.{index}/{'/'.join(rest)}/"
    product = prefix + "MatMul_output_0"
    g.nodes.append(helper.make_node("MatMul", [x, g.const(f"model.{name}.weight.T", weight)], [product],
                                    name=prefix + "MatMul"))
    return product


def _rotate_half(g: _Graph, x: str, n_head: int, head_dim: int, prefix: str) -> str:
    """rotate_half per head of [B, S, n_head * head_dim]: [a, b] -> [-b, a] (five cheap nodes)."""
    split = g.op1("Reshape", [x, g.const(prefix + f"halves_{g.count}", [0, 0, n_head, 2, head_dim // 2], np.int64)],
                  prefix)
    first, second = g.op("Split", [split], prefix, outputs=2, axis=3)
    turned = g.op1("Concat", [g.op1("Neg", [second], prefix), first], prefix, axis=3)
    return g.op1("Reshape", [turned, g.const(prefix + f"merged_{g.count}", [0, 0, n_head * head_dim], np.int64)],
                 prefix)


def _last_position(g: _Graph, x: str, axis: int, prefix: str) -> str:
    """x's last entry along `axis`, the axis kept (length 1)."""
    return g.op1("Slice", [x, g.const(prefix + f"last_start_{g.count}", [-1], np.int64),
                           g.const(prefix + f"last_end_{g.count}", [2**62], np.int64),
                           g.const(prefix + f"last_axis_{g.count}", [axis], np.int64)], prefix)


def _attention(g: _Graph, i: int, model: GatoModel, h: str, cos: str, sin: str, bias: str,
               last_query_only: bool = False, indices: str | None = None) -> str:
    """The attention output before its projection's bias (added by the next SkipLayerNormalization).

    rotate_half(q), rotate_half(k) come from extra columns of the qkv MatMul up to ROTATE_BY_MATMUL_MAX_WIDTH
    (one wider MatMul beats five small nodes when per-node overhead dominates) and from nodes above it (the
    columns add 2/3 to the qkv product: gato-79m fp32 was 15 % slower with them, 200 vs 172 ms CPU per step)."""
    c, attn = model.config, model.blocks[i].attn
    d, heads = c.n_embd, c.n_head
    dh, p = d // heads, f"/blocks.{i}/attn/"
    w, b = _np(attn.qkv.weight).T, _np(attn.qkv.bias)  # [D, 3D]: q, k, v
    scale = 1.0 / math.sqrt(dh)  # folded into q (rope is linear)
    w_qkv = np.concatenate([w[:, :d] * scale, w[:, d:]], 1)
    b_qkv = np.concatenate([b[:d] * scale, b[d:]])
    by_matmul = d <= ROTATE_BY_MATMUL_MAX_WIDTH
    if by_matmul:
        w_qkv = np.concatenate([w_qkv, rotate_half_columns(w_qkv[:, :2 * d], 2 * heads)], 1)
        b_qkv = np.concatenate([b_qkv, rotate_half_columns(b_qkv[:2 * d], 2 * heads)])
    qkv = _matmul(g, h, w_qkv, f"blocks.{i}.attn.qkv")
    qkv = g.op1("Add", [qkv, g.const(f"model.blocks.{i}.attn.qkv.bias", b_qkv)], p)
    if by_matmul:
        sizes = g.const(p + "split_qkv", [2 * d, d, 2 * d], np.int64)
        qk, v, qk_rot = g.op("Split", [qkv, sizes], p, outputs=3, axis=-1)
    else:
        qk, v = g.op("Split", [qkv, g.const(p + "split_qkv", [2 * d, d], np.int64)], p, outputs=2, axis=-1)
        qk_rot = _rotate_half(g, qk, 2 * heads, dh, p)
    qk = g.op1("Add", [g.op1("Mul", [qk, cos], p), g.op1("Mul", [qk_rot, sin], p)], p)  # apply_rope
    q, k = g.op("Split", [qk, g.const(p + "split_qk", [d, d], np.int64)], p, outputs=2, axis=-1)
    if indices is None:
        present_k = _heads(g, k, heads, dh, p, contract.present_key_name(i))
        present_v = _heads(g, v, heads, dh, p, contract.present_value_name(i))
        keys = g.op1("Concat", [contract.past_key_name(i), present_k], p, axis=2)
        values = g.op1("Concat", [contract.past_value_name(i), present_v], p, axis=2)
    else:  # written into the ring in place (present is bound to past's memory), attended there
        keys, values = (contract.present_key_name(i), contract.present_value_name(i))
        new_k, new_v = _heads(g, k, heads, dh, p, keys + "_new"), _heads(g, v, heads, dh, p, values + "_new")
        if i == 0:  # the slot of each new key element [B, H, S, Dh], shared by the layers
            g.nodes.append(helper.make_node("Expand", [indices, g.op1("Shape", [new_k], p)], [RING_INDICES],
                                            name=p + RING_INDICES))
        for past, new, present in ((contract.past_key_name(i), new_k, keys), (contract.past_value_name(i), new_v,
                                                                                values)):
            g.nodes.append(helper.make_node("ScatterElements", [past, RING_INDICES, new], [present], name=p + present,
                                            axis=2))
    if last_query_only:  # every new token's keys/values are cached, only the last one's output is read
        q, bias = _last_position(g, q, 1, p), _last_position(g, bias, 2, p)
    y = g.op1("MultiHeadAttention", [q, keys, values, "", "", bias], p, domain=ORT_DOMAIN, num_heads=heads,
              scale=1.0)  # q carries the 1/sqrt(Dh)
    return _matmul(g, y, _np(attn.proj.weight).T, f"blocks.{i}.attn.proj")


def _mlp(g: _Graph, i: int, model: GatoModel, h: str) -> str:
    """The MLP output before its projection's bias."""
    mlp = model.blocks[i].mlp
    fc = g.op1("Add", [_matmul(g, h, _np(mlp.fc.weight).T, f"blocks.{i}.mlp.fc"),
                       g.const(f"model.blocks.{i}.mlp.fc.bias", _np(mlp.fc.bias))], f"/blocks.{i}/mlp/")
    gelu = g.op1("Gelu", [fc], f"/blocks.{i}/mlp/", domain=ORT_DOMAIN)  # exact (erf) GELU, as F.gelu
    return _matmul(g, gelu, _np(mlp.proj.weight).T, f"blocks.{i}.mlp.proj")


def build_serving_graph(model: GatoModel, logit_ids: np.ndarray, dtype: type = np.float32,
                        layout: str = contract.CACHE_LAYOUT_IN_PLACE, images: bool = False) -> onnx.ModelProto:
    """The serving graph of `model` with logits over `logit_ids`, weights and cache in `dtype` (np.float32 or
    np.float16; logits always fp32). `images`: the spec has image keys, so the graph takes patches."""
    c = model.config
    g = _Graph(dtype)
    x = _embedding(g, model, images)
    in_place = layout == contract.CACHE_LAYOUT_IN_PLACE
    slots, indices = _ring_slots(g) if in_place else (None, None)
    (cos, sin), bias = _rotary(g, model), _mask_bias(g, model, slots)
    h = _layer_norm(g, x, model.blocks[0].ln1, "blocks.0.ln1")
    for i, block in enumerate(model.blocks):
        last = i + 1 == c.n_layer
        attn_bias = (f"model.blocks.{i}.attn.proj.bias", _np(block.attn.proj.bias))
        y = _attention(g, i, model, h, cos, sin, bias, last_query_only=last, indices=indices)
        if last:  # only the last position's output is read (the head): the rest of the layer runs for it alone
            x = _last_position(g, x, 1, f"/blocks.{i}/")
        h, x = _skip_norm(g, x, y, attn_bias, block.ln2, f"blocks.{i}.ln2")
        after = model.ln_f if last else model.blocks[i + 1].ln1
        mlp_bias = (f"model.blocks.{i}.mlp.proj.bias", _np(block.mlp.proj.bias))
        h, x = _skip_norm(g, x, _mlp(g, i, model, h), mlp_bias, after, "ln_f" if last else f"blocks.{i + 1}.ln1")
    h = g.op1("Gather", [h, g.const("/head/last", -1, np.int64)], "/head/", axis=1)  # [B, D], normed
    head = g.const("logit_table", _np(model.tokens.weight)[logit_ids])  # the tied table's action rows
    logits = g.op1("Gemm", [h, head], "/head/", transB=1)
    if dtype is np.float16:
        logits = g.op1("Cast", [logits], "/head/", to=TensorProto.FLOAT)
    g.nodes.append(helper.make_node("Unsqueeze", [logits, g.const("/head/axis", [1], np.int64)], [contract.LOGITS],
                                    name="/head/logits"))
    elem = TensorProto.FLOAT16 if dtype is np.float16 else TensorProto.FLOAT
    dh = c.n_embd // c.n_head
    batch_seq, batch_past = ["batch", "sequence"], ["batch", "past_sequence"]
    ints = [(contract.INPUT_IDS, batch_seq), (contract.POSITION_IDS, batch_seq), (contract.LOCAL_POSITIONS, batch_seq),
            (contract.PAST_POSITIONS, batch_past)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, s) for n, s in ints]
    outputs = [helper.make_tensor_value_info(contract.LOGITS, TensorProto.FLOAT, ["batch", 1, len(logit_ids)])]
    cache_in = [elem, ["batch", c.n_head, "past_sequence", dh]]
    cache_out = cache_in if in_place else [elem, ["batch", c.n_head, "sequence", dh]]
    inputs += [helper.make_tensor_value_info(n, *cache_in) for n in contract.past_names(c.n_layer)]
    if images:
        inputs += [helper.make_tensor_value_info(contract.PATCHES, TensorProto.FLOAT,
                                                 [*batch_seq, 3, contract.PATCH_SIZE, contract.PATCH_SIZE]),
                   helper.make_tensor_value_info(contract.PATCH_POSITIONS, TensorProto.INT64, [*batch_seq, 2])]
    outputs += [helper.make_tensor_value_info(n, *cache_out) for n in contract.present_names(c.n_layer)]
    graph = helper.make_graph(g.nodes, "gato_ros_policy", inputs, outputs, g.inits)
    proto = helper.make_model(graph, producer_name="gato_ros", opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid(ORT_DOMAIN, 1)])
    proto.ir_version = 8
    return proto
