"""int8 with fp32's choices: int8 weights on disk, fp32 arithmetic in the session.

Measured on the shipped stacking policy (scripts/quant_agreement.py, teacher-forced on two expert
episodes, against the fp32 model of the same weights): quantizing *activations* to 8 bits at any place
in the blocks flips action tokens. Dynamic int8 (MatMulInteger) on every projection kept 88.8 % of
tokens within one bin; on the MLPs only 92.0 %, on the attention only 92.8 %, on the four attention
output projections alone (the smallest share) still only 95.6 %, with 100 % nowhere in between. Soft-label
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

from pathlib import Path

import onnx
from onnx import numpy_helper


def store_body_int8(proto: onnx.ModelProto) -> int:
    """Replace each block projection's fp32 weight initializer by int8 + per-output-channel scale, rebuilt
    under the same name at load. Returns how many weights were rewritten."""
    from gato_ros.export import body_matmuls, int8_weight

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


def quantize_int8_weights(src: Path, dst: Path) -> None:
    """int8 storage of the block weights and the table's text rows; fp32 compute."""
    import tempfile

    from gato_ros.export import compress_text_rows, save

    proto = onnx.load(str(src))
    if store_body_int8(proto) == 0:
        raise RuntimeError(f"{src}: no transformer projections found to store as int8")
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.onnx"
        save(proto, body)
        compress_text_rows(body, dst)
