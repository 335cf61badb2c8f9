"""int8 graph rewrites (ONNX protos in, ONNX protos out) and why the int8 variant computes in fp32.

Measured on the shipped stacking policy (scripts/quant_agreement.py, teacher-forced on two expert
episodes, against the fp32 model of the same weights): quantizing *activations* to 8 bits at any place
in the blocks flips action tokens. Dynamic int8 (MatMulInteger) on every projection kept 88.8 % of
tokens within one bin; on the MLPs only 92.0 %, on the attention only 92.8 %, on the four attention
output projections alone (the smallest share) still only 95.6 %. Soft-label
training leaves neighbouring bins near-tied and the policy acts on the argmax, so 8-bit activation noise
moves actions that the weights alone would not.

So the int8 variant stores every block projection as int8 (symmetric, one scale per output channel) and
the table's text rows as int8 (one scale per row), and rebuilds them with Cast·Mul nodes that read
initializers only: ORT folds them into fp32 weights at session load, and every call runs the fp32 graph.
The file is a third of fp32's size and its choices are fp32's on a model whose weights are already
int8-representable (as the shipped one is, being recovered from an int8 file: gato_ros/recover.py). For
the tiny preset fp32 and int8 compute run at the same speed (per-call overhead dominates, README
"Runtime and latency"); `int8-dynamic` keeps the MatMulInteger body for large models, where int8 compute
is about twice as fast.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gato_ros import tokenizer as tok


def table_name(model: onnx.ModelProto) -> str:
    """The token table: the one initializer with a vocabulary-sized first axis (Gather and head share it)."""
    return next(i.name for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] == tok.VOCAB_SIZE)


def int8_weight(name: str, w: np.ndarray, axis: int) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Symmetric int8 copy of `w` with one scale per slice along `axis`, and the nodes that turn it back
    into fp32 under `name`. They read initializers only, so ORT folds them at session load: the file
    holds int8, the session computes in fp32 at fp32 speed."""
    reduce = tuple(d for d in range(w.ndim) if d != axis)
    scale = np.abs(w).max(axis=reduce) / 127.0
    scale[scale == 0] = 1.0
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(q, name + "_int8"),
             numpy_helper.from_array(scale.reshape(shape).astype(np.float32), name + "_scale")]
    # Cast + Mul rather than DequantizeLinear: ORT keeps DequantizeLinear out of constant folding (for its
    # QDQ fusions), which would dequantize the table on every call.
    nodes = [helper.make_node("Cast", [name + "_int8"], [name + "_cast"], to=TensorProto.FLOAT, name=name + "_cast"),
             helper.make_node("Mul", [name + "_cast", name + "_scale"], [name], name=name + "_dequantize")]
    return inits, nodes


def body_matmuls(model: onnx.ModelProto) -> list[str]:
    """The attention and MLP projections of the transformer blocks (MatMul with a constant weight). The
    attention's own MatMuls (Q·Kᵀ, softmax·V) read two activations and the value embedding encodes every
    observation value: they stay fp32, like the head."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.name.startswith("/blocks.") and n.input[1] in weights]


def store_body_int8(proto: onnx.ModelProto) -> int:
    """Replace each block projection's fp32 weight initializer by int8 + per-output-channel scale, rebuilt
    under the same name at load. Returns how many weights were rewritten."""
    graph = proto.graph
    names = set(body_matmuls(proto))
    weights = {n.input[1] for n in graph.node if n.name in names}
    inits = {i.name: i for i in graph.initializer}
    shared = [w for w in weights if sum(w in n.input for n in graph.node) > 1]
    if shared:
        raise RuntimeError(f"weights {shared} have several consumers; cannot rewrite them in place")
    dequantize: list[onnx.NodeProto] = []
    for name in sorted(weights):
        w = numpy_helper.to_array(inits[name])  # MatMul weight [in, out]: one scale per output column
        new_inits, nodes = int8_weight(name, w, axis=1)
        graph.initializer.remove(inits[name])
        graph.initializer.extend(new_inits)
        dequantize.extend(nodes)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*dequantize, *body])
    return len(weights)


def store_text_rows_int8(proto: onnx.ModelProto) -> None:
    """The 31k text rows of the token table (never gathered nor chosen by a control policy, whose actions
    are constrained to their ranges) stored int8 per row and rebuilt to fp32 at session load. Every row an
    action can take -- discrete ids [0, DISCRETE_RANGE), the continuous bins, the special tokens -- stays
    fp32, and the Gather and the head still share one table."""
    graph, table = proto.graph, table_name(proto)
    init = next(i for i in graph.initializer if i.name == table)
    w = numpy_helper.to_array(init)
    lo, hi = tok.DISCRETE_RANGE, tok.CONTINUOUS_OFFSET
    text, dequantize = int8_weight(table + ".text", w[lo:hi], axis=0)  # one scale per row (token)
    graph.initializer.remove(init)
    graph.initializer.extend(text + [numpy_helper.from_array(w[:lo], table + ".discrete"),
                                     numpy_helper.from_array(w[hi:], table + ".actions")])
    concat = helper.make_node("Concat", [table + ".discrete", table + ".text", table + ".actions"], [table], axis=0,
                              name=table + "_concat")
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*dequantize, concat, *body])  # these read initializers only: ORT folds them at load
