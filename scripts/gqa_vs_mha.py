"""Which attention serves a 1024-token context fastest: one serving call of the tiny preset (CPU time, 1 thread)
for three graphs with the same weights, and each one's exactness against torch's sliding window.

    python scripts/gqa_vs_mha.py [--context 1024] [--calls 300]

- ring: MultiHeadAttention over Concat(ring, new keys/values), position mask (the graph before this change);
- ring-in-place: the new keys/values written into the ring in place (ScatterND; present bound to past's memory),
  MultiHeadAttention over the ring, position mask (what `gato-ros export` writes now);
- linear + GroupQueryAttention: a contiguous buffer (compacted by the runtime when full) that GQA writes in place
  and attends by index with local_window_size (rotary inside GQA). Built here only: measured, not shipped.
Both ring graphs compute the last layer for the last position only; GQA cannot (its queries are its new keys).
Prints the p50 CPU time per call for a decode call (1 token) and a tick's prefill (34 tokens).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from gato_ros import attention_graph as ag
from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.contract import GatoConfig
from gato_ros.export import action_vocab, builtin_spec, range_ids
from gato_ros.model import GatoModel
from gato_ros.runtime import _session_options

CACHE_LENGTH = "cache_length"  # linear graph: tokens already in the buffer (int64 [B])
LINEAR = "linear"
ACTION_COLUMNS = 1026


def rotary_table(g: ag._Graph, model: GatoModel, total: str) -> tuple[str, str, str]:
    """GroupQueryAttention's rotary inputs for this call's tokens: cos and sin tables [B*S, Dh/2] (row r: the
    r-th new token's angles, from the int64 phase as in `_rotary`) and position_ids [B, S] = row of each token.
    Only the new tokens are rotated (the cache holds rotated keys), so the table needs no row per position."""
    c, p = model.config, ag.ROTARY_PREFIX
    k = model.rope_k.cpu().numpy().astype(np.int64)
    period = g.const(p + "period", c.rope_period, np.int64)
    flat = g.op1("Reshape", [contract.POSITION_IDS, g.const(p + "flat", [-1, 1], np.int64)], p)
    phase = g.op1("Mod", [g.op1("Mul", [g.op1("Mod", [flat, period], p), g.const(p + "multipliers", k, np.int64)], p),
                          period], p)
    angle = g.op1("Mul", [g.op1("Cast", [phase], p, to=TensorProto.FLOAT),
                          g.const(p + "radians_per_step", 2 * math.pi / c.rope_period, np.float32)], p)
    cos, sin = g.op1("Cos", [angle], p), g.op1("Sin", [angle], p)
    if g.dtype is np.float16:
        cos, sin = (g.op1("Cast", [t], p, to=TensorProto.FLOAT16) for t in (cos, sin))
    shape = g.op1("Shape", [contract.POSITION_IDS], p)
    count = g.op1("ReduceProd", [shape], p, keepdims=0)
    rows = g.op1("Range", [g.const(p + "zero", 0, np.int64), count, g.const(p + "step", 1, np.int64)], p)
    # GroupQueryAttention wants at least total_sequence_length rows: zero rows below the used ones.
    missing = g.op1("Sub", [g.op1("Cast", [total], p, to=TensorProto.INT64), count], p)
    zero = g.const(p + "zero_1d", [0], np.int64)
    pads = g.op1("Concat", [zero, zero, g.op1("Max", [g.op1("Unsqueeze", [missing, zero], p), zero], p), zero], p,
                 axis=0)
    cos, sin = (g.op1("Pad", [t, pads], p) for t in (cos, sin))
    return cos, sin, g.op1("Reshape", [rows, shape], p)


def attention_linear(g: ag._Graph, i: int, model: GatoModel, h: str, rotary: tuple[str, str, str],
                      lengths: tuple[str, str]) -> str:
    """The attention output before its projection's bias, by GroupQueryAttention over the linear cache: it
    rotates the new q/k, writes the new keys/values at [cache_length, cache_length + S) of the buffer (in place
    when the runtime binds present to past's memory) and attends to the last `context_window` tokens by index."""
    c, attn = model.config, model.blocks[i].attn
    d, p = c.n_embd, f"/blocks.{i}/attn/"
    w, b = ag._np(attn.qkv.weight).T, ag._np(attn.qkv.bias)  # [D, 3D]: q, k, v
    scale = 1.0 / math.sqrt(c.head_dim)  # folded into q (rope is linear)
    w_qkv = np.concatenate([w[:, :d] * scale, w[:, d:]], 1)
    b_qkv = np.concatenate([b[:d] * scale, b[d:]])
    qkv = ag._matmul(g, h, w_qkv, f"blocks.{i}.attn.qkv")
    qkv = g.op1("Add", [qkv, g.const(f"model.blocks.{i}.attn.qkv.bias", b_qkv)], p)
    cos, sin, rows = rotary
    seqlens, total = lengths
    y = p + "GroupQueryAttention_out"
    g.nodes.append(helper.make_node(
        "GroupQueryAttention",
        [qkv, "", "", contract.past_key_name(i), contract.past_value_name(i), seqlens, total, cos, sin, rows],
        [y, contract.present_key_name(i), contract.present_value_name(i)], name=p + "GroupQueryAttention",
        domain=ag.ORT_DOMAIN, num_heads=c.n_head, kv_num_heads=c.n_head, scale=1.0, do_rotary=1,
        local_window_size=c.context_window))  # sees keys t - W + 1 .. t (measured: W - 1 hides one)
    return ag._matmul(g, y, ag._np(attn.proj.weight).T, f"blocks.{i}.attn.proj")


def sequence_lengths(g: ag._Graph) -> tuple[str, str]:
    """GroupQueryAttention's seqlens_k (int32 [B]: tokens in the cache after this call, minus one) and
    total_sequence_length (int32 scalar) from `cache_length` (int64 [B]) and the number of new tokens."""
    p = "/lengths/"
    new = g.op1("Gather", [g.op1("Shape", [contract.INPUT_IDS], p), g.const(p + "seq_axis", 1, np.int64)], p, axis=0)
    total = g.op1("Add", [CACHE_LENGTH, new], p)
    seqlens = g.op1("Cast", [g.op1("Sub", [total, g.const(p + "one", 1, np.int64)], p)], p, to=TensorProto.INT32)
    longest = g.op1("ReduceMax", [total], p, keepdims=0)
    return seqlens, g.op1("Cast", [longest], p, to=TensorProto.INT32)




def build_linear_graph(model: GatoModel, logit_ids: np.ndarray) -> onnx.ModelProto:
    """build_serving_graph's loop with GroupQueryAttention over a linear buffer (fp32)."""
    c, g = model.config, ag._Graph(np.float32)
    x = ag._embedding(g, model)
    lengths = sequence_lengths(g)
    rotary = rotary_table(g, model, lengths[1])
    h = ag._layer_norm(g, x, model.blocks[0].ln1, "blocks.0.ln1")
    for i, block in enumerate(model.blocks):
        last = i + 1 == c.n_layer
        attn_bias = (f"model.blocks.{i}.attn.proj.bias", ag._np(block.attn.proj.bias))
        h, x = ag._skip_norm(g, x, attention_linear(g, i, model, h, rotary, lengths), attn_bias, block.ln2,
                             f"blocks.{i}.ln2")
        after = model.ln_f if last else model.blocks[i + 1].ln1
        mlp_bias = (f"model.blocks.{i}.mlp.proj.bias", ag._np(block.mlp.proj.bias))
        h, x = ag._skip_norm(g, x, ag._mlp(g, i, model, h), mlp_bias, after, "ln_f" if last else f"blocks.{i + 1}.ln1")
    h = g.op1("Gather", [h, g.const("/head/last", -1, np.int64)], "/head/", axis=1)
    logits = g.op1("Gemm", [h, g.const("logit_table", ag._np(model.tokens.weight)[logit_ids])], "/head/", transB=1)
    g.nodes.append(helper.make_node("Unsqueeze", [logits, g.const("/head/axis", [1], np.int64)], [contract.LOGITS]))
    seq = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, s) for n, s in
              [(contract.INPUT_IDS, seq), (contract.POSITION_IDS, seq), (contract.LOCAL_POSITIONS, seq),
               (CACHE_LENGTH, ["batch"])]]
    cache = [TensorProto.FLOAT, ["batch", c.n_head, "buffer", c.head_dim]]
    inputs += [helper.make_tensor_value_info(n, *cache) for n in contract.past_names(c.n_layer)]
    outputs = [helper.make_tensor_value_info(contract.LOGITS, TensorProto.FLOAT, ["batch", 1, len(logit_ids)])]
    outputs += [helper.make_tensor_value_info(n, *cache) for n in contract.present_names(c.n_layer)]
    proto = helper.make_model(helper.make_graph(g.nodes, "linear", inputs, outputs, g.inits), opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid(ag.ORT_DOMAIN, 1)])
    proto.ir_version = 8
    return proto


def session(model: GatoModel, layout: str) -> ort.InferenceSession:
    ids = range_ids(action_vocab(builtin_spec()))
    proto = build_linear_graph(model, ids) if layout == LINEAR else ag.build_serving_graph(model, ids, layout=layout)
    return ort.InferenceSession(proto.SerializeToString(), _session_options(1), providers=["CPUExecutionProvider"])


def new_tokens(n: int, start: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {contract.INPUT_IDS: rng.integers(tok.CONTINUOUS_OFFSET, tok.CONTINUOUS_OFFSET + 1024, (1, n)),
            contract.POSITION_IDS: np.arange(start, start + n)[None], contract.LOCAL_POSITIONS: np.arange(n)[None] % 42}


def bound_call(sess: ort.InferenceSession, config: GatoConfig, feed: dict[str, np.ndarray], slots: int,
               new: int | None) -> Callable[[], object]:
    """A call with everything bound by pointer; present bound to past's memory unless `new` (presents of `new`
    tokens, the ring layout)."""
    rng = np.random.default_rng(0)
    caches = [rng.normal(size=(1, config.n_head, slots, config.head_dim)).astype(np.float32)
              for _ in contract.past_names(config.n_layer)]
    presents = caches if new is None else [np.zeros((1, config.n_head, new, config.head_dim), np.float32)
                                           for _ in caches]
    logits = np.zeros((1, 1, ACTION_COLUMNS), np.float32)
    io = sess.io_binding()
    for name, arr in [*feed.items(), *zip(contract.past_names(config.n_layer), caches, strict=True)]:
        io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
    for name, arr in [(contract.LOGITS, logits), *zip(contract.present_names(config.n_layer), presents, strict=True)]:
        io.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
    bound = (feed, caches, presents, logits)  # the binding holds raw pointers: keep the arrays alive with the call
    return lambda: (sess.run_with_iobinding(io), bound)


def timed_call(layout: str, sess: ort.InferenceSession, config: GatoConfig, n: int, context: int
               ) -> Callable[[], object]:
    """A call of n new tokens after `context` tokens (absolute position 5000 on)."""
    start, spare = 5000, 35  # the runtime's ring keeps one tick's prefill (34 + 1 tokens) beyond the capacity
    feed = new_tokens(n, start, np.random.default_rng(1))
    if layout == LINEAR:
        feed[CACHE_LENGTH] = np.array([context], np.int64)
        return bound_call(sess, config, feed, 2 * context, None)
    slots = context + spare if layout == contract.CACHE_LAYOUT_IN_PLACE else context
    held = np.arange(start - slots, start)
    feed[contract.PAST_POSITIONS] = held[np.argsort(held % slots)][None]  # slot = position mod slots
    return bound_call(sess, config, feed, slots, None if layout == contract.CACHE_LAYOUT_IN_PLACE else n)


def cpu_ms(runs: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """p50 CPU ms per call of each, the calls interleaved so that a shared machine's load falls on all alike."""
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(calls + 5):
        for name, run in runs.items():
            c0 = time.thread_time()
            run()
            if i >= 5:
                cpu[name].append(time.thread_time() - c0)
    return {k: float(np.median(v) * 1e3) for k, v in cpu.items()}


def stream_check(layout: str, calls: int = 40) -> float:
    """Largest |logit difference| between the graph fed a stream in prefill/decode calls, the cache kept as the
    runtime keeps it, and torch's one sliding-window forward over the stream (window 64, 2 layers)."""
    torch.manual_seed(0)
    config = GatoConfig(n_layer=2, n_embd=32, n_head=2, n_ff=64, context_window=64)
    model = GatoModel(config).eval()
    sess = session(model, layout)
    rng = np.random.default_rng(1)
    sizes = [int(s) for s in rng.choice([1, 1, 1, 7, 34], calls)]
    total, window = sum(sizes), config.context_window
    ids = rng.integers(tok.CONTINUOUS_OFFSET, tok.CONTINUOUS_OFFSET + 1024, total)
    local = np.arange(total) % 42
    with torch.no_grad():
        full, _ = model(torch.from_numpy(ids)[None], torch.arange(total)[None] + 300, torch.from_numpy(local)[None])
    full = full[0].numpy()[:, range_ids(action_vocab(builtin_spec()))]
    slots = 2 * window if layout == LINEAR else window + 35
    caches = [np.zeros((1, config.n_head, slots, config.head_dim), np.float32) for _ in range(2 * config.n_layer)]
    positions = np.full((1, slots), contract.EMPTY_POSITION, np.int64)
    used, start, worst = 0, 0, 0.0
    for n in sizes:
        feed = {contract.INPUT_IDS: ids[None, start:start + n], contract.LOCAL_POSITIONS: local[None, start:start + n],
                contract.POSITION_IDS: np.arange(start, start + n)[None] + 300}
        if layout == LINEAR:
            if used + n > slots:  # compact: the newest window - 1 tokens to the front
                for c in caches:
                    c[:, :, : window - 1] = c[:, :, used - (window - 1): used].copy()
                used = window - 1
            feed[CACHE_LENGTH] = np.array([used], np.int64)
        else:
            feed[contract.PAST_POSITIONS] = positions
        feed.update(dict(zip(contract.past_names(config.n_layer), caches, strict=True)))
        out = sess.run(None, feed)
        caches = [np.ascontiguousarray(a) for a in out[1:]]
        positions[0, (feed[contract.POSITION_IDS][0]) % slots] = feed[contract.POSITION_IDS][0]
        used, start = used + n, start + n
        worst = max(worst, float(np.abs(out[0][0, 0] - full[start - 1]).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    layouts = (contract.CACHE_LAYOUT_RING, contract.CACHE_LAYOUT_IN_PLACE, LINEAR)
    for layout in layouts[1:]:
        print(f"{layout}: max |logit - torch| over a stream of 3+ windows: {stream_check(layout):.1e}")
    torch.manual_seed(0)
    config = GatoConfig.from_preset("tiny", context_window=args.context)
    model = GatoModel(config).eval()
    sessions = {layout: session(model, layout) for layout in layouts}
    for n in (1, 34):
        times = cpu_ms({k: timed_call(k, s, config, n, args.context) for k, s in sessions.items()}, args.calls)
        print(f"context {args.context}, {n:>2} new tokens, CPU ms per call (p50): "
              + "  ".join(f"{k} {v:.3f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
