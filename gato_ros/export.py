"""Checkpoint → self-describing ONNX policy (fp32, int8, int4, fp16), checked against torch.

    gato-ros export --checkpoint checkpoints/run --out models/policy.onnx --variants fp32,int8
    gato-ros export --preset tiny --random-init --spec builtin --out runs/tiny.onnx

One graph serves prefill (S observation tokens) and decode (S = 1): inputs are the new tokens, their
absolute and local positions, the rolling cache (`past_key_values.{i}.key/value` [B, H, C, Dh]) and
the absolute positions of its slots; outputs are the last position's logits and `present.{i}.*`: the new
tokens' keys/values, or, in the fused graph (`gato_ros.cache_layout` = ring-in-place), the whole ring with
them written at slot position mod C. Everything the runtime needs travels in `metadata_props`.
The serving head is restricted to the action vocabulary (the ids any action dimension can take, listed
in `gato_ros.logit_ids`): `logits` is [B, 1, K] over those ids, K = 1026 for the Panda spec instead of
33027 (`--full-vocab-head` keeps the whole vocabulary, and leaves the key out).
Variants are written beside the fp32 file as `<stem>.<variant>.onnx`: int8 = dynamic int8 transformer
blocks (MatMulInteger) + int8-stored text rows of the token table, fp32 head; int4 = MatMulNBits weights;
fp16 = half weights and cache.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.attention_graph import build_serving_graph
from gato_ros.contract import EMPTY_POSITION, GatoConfig, io_names
from gato_ros.model import GatoModel
from gato_ros.quantize import body_matmuls, store_body_int8, store_text_rows_int8, table_name
from gato_ros.spec import ActionSpec, EmbodimentSpec, ObservationSpec

OPSET = 17
VARIANTS = ("fp32", "int8", "int8-dynamic", "int4", "fp16")
TWO_GB = 2**31 - 2**24  # protobuf's hard limit, with headroom for the graph itself


# ------------------------------------------------------------------------------------------ specs
def builtin_spec(images: bool = False) -> EmbodimentSpec:
    """A Panda-like spec for tests and benchmarks: 7 joint torques (limits 87 / 12 N·m) and a
    discrete gripper force, joint state, a 17-value task state and optionally a 64×64 camera."""
    joints = tuple(f"panda_joint{i}" for i in range(1, 8)) + ("panda_finger_joint1",)
    observations = [
        ObservationSpec("joint_positions", (8,)),
        ObservationSpec("joint_velocities", (8,)),
        ObservationSpec("task_state", (17,)),
    ]
    if images:
        observations.append(ObservationSpec("camera", (64, 64, 3), kind="image"))
    actions = tuple(ActionSpec(n, limit=87.0 if i < 4 else 12.0) for i, n in enumerate(joints[:7]))
    actions += (ActionSpec(joints[7], kind="discrete", limit=15.0, values=(15.0, -15.0)),)
    return EmbodimentSpec("panda-builtin" + ("-image" if images else ""), tuple(observations), actions, 20.0, joints)


def load_spec(text: str) -> EmbodimentSpec:
    if text in ("builtin", "builtin-image"):
        return builtin_spec(images=text == "builtin-image")
    return EmbodimentSpec.from_json(Path(text).read_text())


def load_model(args: argparse.Namespace) -> tuple[GatoModel, GatoConfig, EmbodimentSpec]:
    if args.checkpoint:
        from gato_ros.train import load_checkpoint  # the training stage owns the checkpoint format

        model, config, spec = load_checkpoint(args.checkpoint)
        return model.eval(), config, spec
    if not (args.preset and args.random_init and args.spec):
        raise SystemExit("give --checkpoint DIR, or --preset P --random-init --spec PATH|builtin")
    torch.manual_seed(args.seed)
    overrides = {"context_window": args.context_tokens} if args.context_tokens else {}
    config = GatoConfig.from_preset(args.preset, **overrides)
    return GatoModel(config).eval(), config, load_spec(args.spec)


def action_vocab(*specs: EmbodimentSpec) -> list[tuple[int, int]]:
    """The ids any action dimension of the `specs` can produce, as sorted, disjoint [lo, hi) ranges (the union
    of `tokenizer.action_token_range`; for the Panda spec [(0, 2), (32000, 33024)]). A file of several arms
    scores the actions of every one of them."""
    ranges = sorted({tok.action_token_range(spec, i) for spec in specs for i in range(spec.action_size)})
    merged: list[list[int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def served_specs(spec: EmbodimentSpec, served: dict[str, str] | None) -> list[EmbodimentSpec]:
    """Every spec a file serves: those of `served` (`contract.served_metadata`), else `spec` alone."""
    if served is None:
        return [spec]
    return [EmbodimentSpec.from_json(json.dumps(raw)) for raw in json.loads(served[contract.META_SPECS]).values()]


def graph_has_images(spec: EmbodimentSpec, served: dict[str, str] | None) -> bool:
    """The graph takes patches when any spec it serves has an image key."""
    return any(s.image_keys for s in served_specs(spec, served))


def range_ids(ranges: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in ranges])


# ------------------------------------------------------------------------------------------ graph
class OnnxPolicy(torch.nn.Module):
    """Flat-argument view of GatoModel.forward(last_only=True) in the ONNX file's input order.

    The tied head is written as a 2-D Gemm(h, table, transB=1) on the last position: `F.linear` on a
    3-D input exports as MatMul(h, tableᵀ), and constant folding then stores a transposed copy of
    the 33k-row table beside the Gather's (twice the file). With a 2-D input and a (zero) bias the
    exporter emits Gemm with transB, so both consumers read the one `model.tokens.weight`.
    """

    def __init__(self, model: GatoModel, images: bool, logit_ids: np.ndarray | None = None) -> None:
        super().__init__()
        self.model, self.images, self.n_layer = model, images, model.config.n_layer
        self.register_buffer("head_bias", torch.zeros(1), persistent=False)  # makes linear a Gemm
        # Parity reference for a restricted head (the export itself always traces the full head).
        self.logit_ids = None if logit_ids is None else torch.from_numpy(logit_ids)

    def forward(self, input_ids, position_ids, local_positions, past_positions, *rest):  # type: ignore[no-untyped-def]
        kv = rest[: 2 * self.n_layer]
        past = [(kv[2 * i], kv[2 * i + 1]) for i in range(self.n_layer)]
        patches, patch_positions = (rest[-2], rest[-1]) if self.images else (None, None)
        h, presents = self.model.hidden(input_ids, position_ids, local_positions, past, past_positions,
                                        patches, patch_positions)
        logits = F.linear(h[:, -1, :], self.model.head_weight, self.head_bias).unsqueeze(1)  # [B, 1, V]
        if self.logit_ids is not None:
            logits = logits[..., self.logit_ids]
        return (logits, *[t for pair in presents for t in pair])


def example_inputs(config: GatoConfig, images: bool, seq: int = 5, cache: int = 7) -> tuple[torch.Tensor, ...]:
    """Small inputs of the right kinds for tracing (S and C distinct so no axis is specialized)."""
    g = torch.Generator().manual_seed(0)
    head = config.n_embd // config.n_head
    ids = torch.randint(tok.CONTINUOUS_OFFSET, tok.CONTINUOUS_OFFSET + tok.NUM_BINS, (1, seq), generator=g)
    ids[0, -1] = tok.SEPARATOR_TOKEN
    position_ids = torch.arange(cache, cache + seq).unsqueeze(0)
    local = torch.arange(seq).unsqueeze(0)
    past_positions = torch.arange(cache).unsqueeze(0)
    kv = [torch.randn(1, config.n_head, cache, head, generator=g) for _ in range(2 * config.n_layer)]
    args = [ids, position_ids, local, past_positions, *kv]
    if images:
        ids[0, 0] = tok.PATCH_TOKEN
        args += [torch.randn(1, seq, 3, tok.PATCH_SIZE, tok.PATCH_SIZE, generator=g) * 0.25,
                 torch.randint(0, tok.PATCH_POSITION_INTERVALS, (1, seq, 2), generator=g)]
    return tuple(args)


def dynamic_axes(n_layer: int, images: bool) -> dict[str, dict[int, str]]:
    inputs, outputs = io_names(n_layer, images)
    axes: dict[str, dict[int, str]] = {}
    for name in inputs:
        if contract.is_past_name(name):
            axes[name] = {0: "batch", 2: "past_sequence"}
        elif name == contract.PAST_POSITIONS:
            axes[name] = {0: "batch", 1: "past_sequence"}
        else:
            axes[name] = {0: "batch", 1: "sequence"}
    axes[contract.LOGITS] = {0: "batch"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "sequence"}
    return axes


def cache_update_graph(n_layer: int, elem_type: int) -> bytes:
    """The ring write as a graph, for runtimes that keep the cache on a GPU (numpy cannot reach it):
    updated.{j} = cache.{j} with slots[s] ← new.{j}[:, :, s] (ScatterElements on the cache axis)."""
    n = 2 * n_layer
    slots = contract.CACHE_UPDATE_SLOTS
    nodes = [
        helper.make_node("Constant", [], ["shape4"],
                         value=helper.make_tensor("s", TensorProto.INT64, [4], [1, 1, -1, 1])),
        helper.make_node("Reshape", [slots, "shape4"], ["slots4"]),
        helper.make_node("Shape", [contract.cache_update_names(0)[1]], ["new_shape"]),
        helper.make_node("Expand", ["slots4", "new_shape"], ["index"]),
    ]
    inputs = [helper.make_tensor_value_info(slots, TensorProto.INT64, ["S"])]
    outputs = []
    for j in range(n):
        cache, new, updated = contract.cache_update_names(j)
        nodes.append(helper.make_node("ScatterElements", [cache, "index", new], [updated], axis=2))
        inputs += [helper.make_tensor_value_info(cache, elem_type, ["B", "H", "C", "D"]),
                   helper.make_tensor_value_info(new, elem_type, ["B", "H", "S", "D"])]
        outputs.append(helper.make_tensor_value_info(updated, elem_type, ["B", "H", "C", "D"]))
    graph = helper.make_graph(nodes, "gato_ros_cache_update", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gato_ros")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def restrict_head(model: onnx.ModelProto, ranges: list[tuple[int, int]]) -> None:
    """Make the head compute the logits of the ids in `ranges` only: Gemm(h, Gather(table, ids), transB=1).

    The Gather reads initializers only, so ORT folds it into a constant [K, D] at session load: each call
    multiplies against K rows instead of 33k, while the file still stores the table once (the input Gather
    and the head share it, and the int8 text-row compression rewrites it under the same name)."""
    graph = model.graph
    table = table_name(model)
    head = [n for n in graph.node if n.op_type == "Gemm" and n.input[1] == table]
    if len(head) != 1:
        raise RuntimeError(f"expected one Gemm head over {table}, found {len(head)}")
    ids = range_ids(ranges)
    graph.initializer.append(numpy_helper.from_array(ids, "logit_ids"))
    gather = helper.make_node("Gather", [table, "logit_ids"], ["logit_table"], axis=0, name="logit_table_gather")
    head[0].input[1] = "logit_table"
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([gather, *nodes])
    logits = next(o for o in graph.output if o.name == contract.LOGITS)
    logits.type.tensor_type.shape.dim[2].dim_value = len(ids)
    del graph.value_info[:]  # intermediate shapes inferred for the full vocabulary


def logit_ranges(model: onnx.ModelProto) -> list[tuple[int, int]] | None:
    """The head's id ranges from `gato_ros.logit_ids` (None: the full vocabulary)."""
    value = next((p.value for p in model.metadata_props if p.key == contract.META_LOGIT_IDS), None)
    return None if value is None else [(int(lo), int(hi)) for lo, hi in json.loads(value)]


def cache_layout(model: onnx.ModelProto) -> str:
    """The file's `gato_ros.cache_layout` (absent: the ring whose presents hold the new tokens only)."""
    return next((p.value for p in model.metadata_props if p.key == contract.META_CACHE_LAYOUT),
                contract.CACHE_LAYOUT_RING)


def set_metadata(model: onnx.ModelProto, config: GatoConfig, spec: EmbodimentSpec, context: int, variant: str,
                 ranges: list[tuple[int, int]] | None = None, trained_capacities: tuple[int, ...] = (),
                 layout: str = contract.CACHE_LAYOUT_RING, served: dict[str, str] | None = None) -> None:
    """Write the gato_ros metadata_props. `served`: `contract.served_metadata(...)` for a file of several arms or
    tasks (its default spec must be `spec`); None keeps what the file says it serves (absent: the legacy one)."""
    props = {
        contract.META_CONFIG: config.to_json(),
        contract.META_SPEC: spec.to_json(),
        contract.META_TOKENIZER: json.dumps(contract.tokenizer_constants(), sort_keys=True),
        contract.META_CONTEXT_TOKENS: str(context),
        contract.META_VARIANT: variant,
        contract.META_EMPTY_POSITION: str(EMPTY_POSITION),
    }
    if layout == contract.CACHE_LAYOUT_RING:  # an in-place ring is written by the graph itself, on any device
        cache_input = contract.past_key_name(0)
        cache_type = next(i for i in model.graph.input if i.name == cache_input).type.tensor_type.elem_type
        props[contract.META_CACHE_UPDATE] = base64.b64encode(cache_update_graph(config.n_layer, cache_type)).decode()
    else:
        props[contract.META_CACHE_LAYOUT] = layout
    if ranges is not None:
        props[contract.META_LOGIT_IDS] = json.dumps([list(r) for r in ranges])
    if trained_capacities:
        props[contract.META_TRAINED_CAPACITIES] = json.dumps(sorted(trained_capacities))
    if served is not None:
        if json.loads(served[contract.META_SPEC]) != json.loads(props[contract.META_SPEC]):
            raise ValueError("the served default spec is not the spec the graph was exported for")
        props.update(served)
    optional = (contract.META_LOGIT_IDS, contract.META_TRAINED_CAPACITIES, contract.META_CACHE_LAYOUT,
                contract.META_CACHE_UPDATE)
    kept = [p for p in model.metadata_props if p.key not in props and p.key not in optional]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write `path`; weights go to `path.data` when the file would pass protobuf's 2 GB limit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    # Summed from the tensors: ByteSize() itself fails on a message past protobuf's 2 GB limit.
    if sum(len(t.raw_data) for t in model.graph.initializer) > TWO_GB:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # by path: works for external data too


def fused_graph_applies(spec: EmbodimentSpec, full_vocab_head: bool, attention: str) -> bool:
    """The node-by-node graph (gato_ros/attention_graph.py) serves specs with the action head."""
    return attention == "fused" and not full_vocab_head


def export_fused(model: GatoModel, spec: EmbodimentSpec, out: Path, context: int, half: bool = False,
                 trained_capacities: tuple[int, ...] = (), served: dict[str, str] | None = None) -> Path:
    """The fused serving graph written straight from the model, fp32 or fp16 (weights and cache; the rotary
    phases and the logits stay fp32): no fp32 file and no converter pass for the fp16 one."""
    ranges = action_vocab(*served_specs(spec, served))
    layout = contract.CACHE_LAYOUT_IN_PLACE
    proto = build_serving_graph(model.eval(), range_ids(ranges), np.float16 if half else np.float32, layout,
                                images=graph_has_images(spec, served))
    set_metadata(proto, model.config, spec, context, "fp16" if half else "fp32", ranges, trained_capacities, layout,
                 served)
    save(proto, out)
    return out


def export_fp32(model: GatoModel, spec: EmbodimentSpec, out: Path, context: int, full_vocab_head: bool = False,
                attention: str = "fused", trained_capacities: tuple[int, ...] = (),
                served: dict[str, str] | None = None) -> Path:
    """The fp32 serving graph: fused (`export_fused`) where it applies; the full-vocabulary head and
    `attention="plain"` go through the TorchScript exporter (the model's own attention, unfused)."""
    if fused_graph_applies(spec, full_vocab_head, attention):
        return export_fused(model, spec, out, context, trained_capacities=trained_capacities, served=served)
    proto = torchscript_graph(model, graph_has_images(spec, served))
    ranges = None if full_vocab_head else action_vocab(*served_specs(spec, served))
    if ranges is not None:
        restrict_head(proto, ranges)
    set_metadata(proto, model.config, spec, context, "fp32", ranges, trained_capacities, served=served)
    save(proto, out)
    return out


def torchscript_graph(model: GatoModel, images: bool) -> onnx.ModelProto:
    config = model.config
    inputs, outputs = io_names(config.n_layer, images)
    wrapper = OnnxPolicy(model.eval(), images)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(wrapper, example_inputs(config, images), str(raw), input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic_axes(config.n_layer, images),
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
        return onnx.load(str(raw))  # pulls external data (if torch wrote any) into memory


# ------------------------------------------------------------------------------------------ variants
def head_nodes(model: onnx.ModelProto) -> list[str]:
    """The node(s) computing the logits from the tied table (whole, or its action rows): kept in full
    precision (near-tied neighbouring bins, sensitive)."""
    table = table_name(model)
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and {table, "logit_table"} & set(n.input[1:])]


def quantize_body_dynamic(src: Path, dst: Path) -> None:
    """ORT dynamic int8 quantization of the block projections: weights int8 per output channel (QInt8,
    symmetric), activations quantized to uint8 per call (DynamicQuantizeLinear) and multiplied in int8
    (MatMulInteger). quantize_dynamic rewrites every Gemm as MatMul and transposes its weight in place,
    excluded or not, which would corrupt the table the Gather shares: the head hides under a placeholder
    op type while it runs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    hidden = "GatoRosHiddenGemm"
    proto = onnx.load(str(src))
    for n in proto.graph.node:
        if n.op_type == "Gemm":
            n.op_type = hidden
    # It warns on the root logger to run its pre-processing (shape inference, ORT optimizations) first:
    # the exporter already folded the graph, and an ORT-optimized file would tie it to one ORT version.
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # DefaultTensorType: shape inference gives no type to com.microsoft outputs (fused attention)
            quantize_dynamic(proto, str(Path(tmp) / "q.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=body_matmuls(proto),
                             extra_options={"DefaultTensorType": TensorProto.FLOAT})
            quantized = onnx.load(str(Path(tmp) / "q.onnx"))
    finally:
        logging.disable(logging.NOTSET)
    for n in quantized.graph.node:
        if n.op_type == hidden:
            n.op_type = "Gemm"
    save(quantized, dst)


def quantize_int8_dynamic(src: Path, dst: Path) -> None:
    """int8-dynamic = dynamic int8 compute for the transformer blocks + int8 storage for the table's text rows.

    What is int8: the blocks' qkv / attention-output / MLP weights (int8, per output channel) and their
    matrix products (MatMulInteger on per-call uint8 activations); the table's text rows, on disk only.
    What stays fp32: the tied head (Gemm over the 33k-row table: neighbouring action bins are near-ties,
    an int8 head lost ~10 % of action tokens on a trained checkpoint), the table's action rows, the value
    embedding, attention scores, norms. The body is quantized first: the table rewrite adds Cast/Mul nodes
    that an ORT pass inside the quantizer could otherwise fold back to fp32.
    Measured (issue 4, CPU, threads=1, step = prefill + 8 decodes): tiny checkpoint 9.0 -> 3.0 MiB, 96.6 %
    teacher-forced action-token agreement with fp32, mean torque error 0.004 N·m, no speed-up over fp32
    (d=64: the blocks are too small for int8 compute to pay); gato-79m (context 128) 315 -> 85 MiB and
    about 2x faster per step. The action-vocabulary head (1026 rows instead of 33k) roughly halved the tiny
    step for both: p50 4.3 -> 2.5 ms at context 128, 9-10 -> 4.4-4.7 ms at 1024 (loaded 2-core machine)."""
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.onnx"
        quantize_body_dynamic(src, body)
        proto = onnx.load(str(body))
    store_text_rows_int8(proto)
    save(proto, dst)


def quantize_int8_weights(src: Path, dst: Path) -> None:
    """int8 = int8 storage of the block projections and the table's text rows, fp32 compute
    (gato_ros/quantize.py says why)."""
    proto = onnx.load(str(src))
    if store_body_int8(proto) == 0:
        raise RuntimeError(f"{src}: no transformer projections found to store as int8")
    store_text_rows_int8(proto)
    save(proto, dst)


def quantize_int4(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(str(src))
    quant = MatMulNBitsQuantizer(proto, block_size=32, is_symmetric=True, nodes_to_exclude=head_nodes(proto))
    quant.process()
    save(quant.model.model, dst)


def rotary_angle_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """(Cast, Mul, Cos or Sin) triples that turn the integer rotary phase into cos/sin: the angle is
    Cast(phase) * 2π/P. The value embedding's Fourier features have no Cast right before their Mul."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for trig in (n for n in model.graph.node if n.op_type in ("Cos", "Sin")):
        scale = producer.get(trig.input[0])
        if scale is None or scale.op_type != "Mul":
            continue
        cast = next((producer[i] for i in scale.input if i in producer and producer[i].op_type == "Cast"), None)
        if cast is not None:
            found.append((cast, scale, trig))
    return found


def keep_rotary_angles_fp32(model: onnx.ModelProto) -> None:
    """Compute the rotary angle and its cos/sin in fp32 inside an fp16 graph, then cast cos/sin to fp16.

    The phase runs up to rope_period - 1 = 65535, past fp16's range (65504 is the largest finite value and
    anything from 65520 rounds to inf): cast to fp16 the angle is inf and cos/sin NaN. cos/sin lie in [-1, 1]
    and are safe in fp16. (onnxruntime's converter has a node_block_list for this, but it emits duplicate
    cast names when a blocked node feeds two blocked nodes, as the angle feeds Cos and Sin.)"""
    triples = rotary_angle_nodes(model)
    if not triples:
        raise RuntimeError("found no rotary angle nodes (Cast → Mul → Cos/Sin) to keep in fp32")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    done: set[str] = set()
    casts: list[onnx.NodeProto] = []
    for cast, scale, trig in triples:
        if cast.name not in done:
            next(a for a in cast.attribute if a.name == "to").i = TensorProto.FLOAT
            done.add(cast.name)
        if scale.name not in done:
            for k, name in enumerate(scale.input):
                if name == cast.output[0]:
                    continue
                value = (numpy_helper.to_array(inits[name]) if name in inits else
                         numpy_helper.to_array(next(a.t for a in producer[name].attribute if a.name == "value")))
                graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name + "_fp32"))
                scale.input[k] = name + "_fp32"
            done.add(scale.name)
        half = trig.output[0]
        trig.output[0] = half + "_fp32"
        casts.append(helper.make_node("Cast", [trig.output[0]], [half], to=TensorProto.FLOAT16,
                                      name=trig.name + "_to_fp16"))
    graph.node.extend(casts)
    used = {i for n in graph.node for i in n.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    stale = {t for c, s, n in triples for t in (*c.output, *s.output, *n.output)}
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def convert_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = onnx.load(str(src))
    # The KV cache goes fp16 (half the memory and bandwidth on the GPU); patches and logits stay fp32.
    # The runtime reads the cache type from the graph's inputs. The rotary angle path stays fp32.
    half = convert_float_to_float16(proto, keep_io_types=[contract.PATCHES, contract.LOGITS])
    keep_rotary_angles_fp32(half)
    half = OnnxModel(half)
    half.topological_sort()  # the converter appends its input casts after their consumers
    save(half.model, dst)


def make_variant(fp32: Path, variant: str, config: GatoConfig, spec: EmbodimentSpec, context: int,
                 trained_capacities: tuple[int, ...] = ()) -> Path:
    dst = fp32 if variant == "fp32" else fp32.with_name(f"{fp32.stem}.{variant}.onnx")
    if variant == "fp32":
        return dst
    {"int8": quantize_int8_weights, "int8-dynamic": quantize_int8_dynamic, "int4": quantize_int4,
     "fp16": convert_fp16}[variant](fp32, dst)
    proto = onnx.load(str(dst))
    # quantizers may drop or keep stale props (they keep gato_ros.specs/tasks: set_metadata leaves those as found)
    source = onnx.load(str(fp32), load_external_data=False)
    set_metadata(proto, config, spec, context, variant, logit_ranges(source), trained_capacities, cache_layout(source))
    save(proto, dst)
    return dst


# ------------------------------------------------------------------------------------------ parity
def parity(model: GatoModel, spec: EmbodimentSpec, path: Path, seq: int = 12, cache: int = 20,
           images: bool | None = None) -> float:
    """Max abs logit difference, ORT (CPU) vs torch, for a prefill over a partly filled cache and a
    one-token decode. Returns the larger of the two. `images`: whether the graph takes patches (default:
    whether `spec` has an image key)."""
    import onnxruntime as ort

    config = model.config
    images = bool(spec.image_keys) if images is None else images
    inputs, _ = io_names(config.n_layer, images)
    so = ort.SessionOptions()
    # As the runtime's sessions: ORT applies this flag process-wide from the first session a process creates
    # (a later session cannot turn it on), and the parity check often comes first (export, bench).
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    proto = onnx.load(str(path), load_external_data=False)
    ranges, in_place = logit_ranges(proto), cache_layout(proto) == contract.CACHE_LAYOUT_IN_PLACE
    reference = OnnxPolicy(model, images, None if ranges is None else range_ids(ranges))
    worst = 0.0
    for s in (seq, 1):
        args = list(example_inputs(config, images, seq=s, cache=cache))
        args[3][0, : cache // 3] = EMPTY_POSITION  # some empty slots, as after a reset
        with torch.no_grad():
            expected = [e.numpy() for e in reference(*args)]
        if in_place:  # a ring of cache + s slots: the new tokens go to the s empty ones (positions cache.. mod L)
            args, expected = with_room_for_new_tokens(args, expected, s, config.n_layer)
        got = session.run(None, {n: a.numpy() for n, a in zip(inputs, args, strict=True)})
        for e, g in zip(expected, got, strict=True):
            worst = max(worst, float(np.abs(e - g.astype(np.float32)).max()))
    return worst


def with_room_for_new_tokens(args: list[torch.Tensor], expected: list[np.ndarray], s: int, n_layer: int
                             ) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """`example_inputs` for an in-place ring: s empty slots appended, where the s new tokens land; the expected
    presents become the ring after that write."""
    kv = args[4:4 + 2 * n_layer]
    grown = [torch.cat([t, torch.zeros(*t.shape[:2], s, t.shape[3])], 2) for t in kv]
    positions = torch.cat([args[3], torch.full((1, s), EMPTY_POSITION)], 1)
    rings = [torch.cat([t, torch.from_numpy(e)], 2).numpy() for t, e in zip(kv, expected[1:], strict=True)]
    return [*args[:3], positions, *grown, *args[4 + 2 * n_layer:]], [expected[0], *rings]


# ------------------------------------------------------------------------------------------ cli
def export(model: GatoModel, spec: EmbodimentSpec, out: str | Path, variants: tuple[str, ...] = ("fp32",),
           context: int | None = None, check: bool = True, full_vocab_head: bool = False, attention: str = "fused",
           trained_capacities: tuple[int, ...] = (), served: dict[str, str] | None = None) -> dict[str, Path]:
    """Export fp32 to `out` (always: the variants derive from it) and the requested variants. The head
    covers the action vocabulary of every served spec only, or every token with `full_vocab_head`. `served`
    (`contract.served_metadata`) says which arms (with their specs; `spec` is the default arm's) and tasks the
    file serves, and every variant keeps it; None: the legacy Panda stacking.

    `context` (the runtime's default cache capacity) is the model's window unless `trained_capacities` lists it:
    those are the other capacities the model was trained to be served with (`gato_ros.trained_capacities`); the
    runtime refuses any capacity that is neither."""
    out = Path(out)
    if model.config.pinned_span and fused_graph_applies(spec, full_vocab_head, attention):
        raise ValueError("a model with a pinned span is exported with attention='plain' (--attention plain): the "
                         "fused graph masks by reach alone")
    context = int(context or model.config.context_window)
    trained_capacities = tuple(sorted({int(c) for c in trained_capacities} - {model.config.context_window}))
    if context != model.config.context_window and context not in trained_capacities:
        raise ValueError(f"context {context} differs from the model's trained window (context_window="
                         f"{model.config.context_window}); list it in trained_capacities if the model was trained "
                         f"for it")
    fp32 = export_fp32(model, spec, out, context, full_vocab_head, attention, trained_capacities, served)
    if check:
        diff = parity(model, spec, fp32, images=graph_has_images(spec, served))
        print(f"fp32 parity vs torch: max abs diff {diff:.2e} (logits and presents)")
        if diff > 1e-4:
            raise RuntimeError(f"fp32 ONNX disagrees with torch: max abs diff {diff:.3e} > 1e-4")
    paths = {"fp32": fp32}
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {VARIANTS}")
        if v == "fp16" and fused_graph_applies(spec, full_vocab_head, attention):
            paths[v] = export_fused(model, spec, fp32.with_name(f"{fp32.stem}.fp16.onnx"), context, half=True,
                                    trained_capacities=trained_capacities, served=served)
        else:
            paths[v] = make_variant(fp32, v, model.config, spec, context, trained_capacities)
        size = sum(p.stat().st_size for p in paths[v].parent.glob(paths[v].name + "*"))
        print(f"{v}: {paths[v]} ({size / 2**20:.1f} MiB)")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="training output dir (config.json, model.safetensors, spec.json)")
    parser.add_argument("--preset", help="model preset, with --random-init (tests, benchmarks)")
    parser.add_argument("--random-init", action="store_true", help="export an untrained model")
    parser.add_argument("--spec", help="spec.json path, or 'builtin' / 'builtin-image' (with --random-init)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="fp32 .onnx path; variants go beside it")
    parser.add_argument("--variants", default="fp32", help="comma list of " + ",".join(VARIANTS))
    parser.add_argument("--context-tokens", type=int, help="rolling cache capacity (default: the model's window)")
    parser.add_argument("--trained-capacities", default="",
                        help="comma list of cache capacities, besides the window, the model was trained to be served "
                             "with (written as gato_ros.trained_capacities; the runtime refuses any other)")
    parser.add_argument("--no-check", action="store_true", help="skip the torch parity check")
    parser.add_argument("--attention", default="fused", choices=("fused", "plain"),
                        help="fused: the graph of gato_ros/attention_graph.py (ORT MultiHeadAttention, the patch "
                             "network node by node); plain: the TorchScript export of the model's own attention")
    parser.add_argument("--full-vocab-head", action="store_true",
                        help="logits over all 33k tokens (default: only the ids the spec's actions can take)")
    parser.add_argument("--arm", default=None, help="the arm the spec is for (gato_ros.specs; default: the "
                        f"checkpoint's, else {contract.LEGACY_ARM}); not for a checkpoint of several arms")
    parser.add_argument("--tasks", default="", help="comma list of the tasks the model was trained on "
                        "(gato_ros.tasks; default: the checkpoint's served.json, else none written, which reads as "
                        f"{contract.LEGACY_TASK})")


def served_for_export(args: argparse.Namespace, spec: EmbodimentSpec) -> dict[str, str] | None:
    """What the file will serve: the checkpoint's arms (each with its spec) and tasks (served.json), with --tasks
    and, for a one-arm checkpoint, --arm in their place where given; None writes nothing (the legacy Panda
    stacking), for a checkpoint without served.json and no --arm/--tasks."""
    from gato_ros.train import load_served, served_specs  # the training stage owns the checkpoint format

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    recorded = load_served(args.checkpoint) if args.checkpoint else None
    if recorded is not None:
        specs = served_specs(recorded)
        if len(specs) > 1 and args.arm is not None:
            raise SystemExit(f"gato-ros export: {args.checkpoint} serves arms {', '.join(specs)}; --arm names the arm "
                             "of a one-arm checkpoint only")
        if next(iter(specs.values())) != spec:
            raise SystemExit(f"gato-ros export: {args.checkpoint}: spec.json is not the default arm's spec in "
                             "served.json")
        pairs = recorded.pairs
        if args.arm is not None:
            specs = {args.arm: spec}
            pairs = None if pairs is None else {args.arm: next(iter(pairs.values()))}
        if tasks:  # the tasks named here replace the record of what each arm was trained on
            pairs = None
        return contract.served_metadata({arm: s.to_json() for arm, s in specs.items()}, tasks or recorded.tasks,
                                        recorded.conditioning, pairs)
    if tasks or args.arm is not None:
        if not tasks:
            raise SystemExit("gato-ros export: --arm needs --tasks (the tasks the model was trained on)")
        return contract.served_metadata({args.arm or contract.LEGACY_ARM: spec.to_json()}, tasks)
    return None


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, config, spec = load_model(args)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    capacities = tuple(int(c) for c in args.trained_capacities.split(",") if c.strip())
    served = served_for_export(args, spec)
    if served is not None and contract.META_CONDITIONING in served and args.attention == "fused":
        raise SystemExit("gato-ros export: this checkpoint was trained with pinned prompts/instructions, which the "
                         "runtime keeps in a ring it writes itself: pass --attention plain")
    export(model, spec, args.out, variants, args.context_tokens, check=not args.no_check,
           full_vocab_head=args.full_vocab_head, attention=args.attention, trained_capacities=capacities,
           served=served)
    return 0
