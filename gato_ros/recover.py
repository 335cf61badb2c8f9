"""Rebuild a GatoModel checkpoint from an exported gato_ros ONNX file (fp32, or the int8 variant).

    python scripts/recover_checkpoint.py models/stack_int8.onnx checkpoints/stack_recovered

The int8 file stores every transformer projection as int8 with one fp32 scale per output channel and the
token table's text rows as int8 with one scale per row; everything else is fp32. Dequantizing gives
the weights the int8 file actually computes with, in fp32: the recovered checkpoint is the fp32 model
*of the shipped file*, not the (lost) checkpoint it was quantized from. Re-quantizing it per channel
gives back the same int8 tensors bit for bit (a per-channel max maps to ±127 again).

Weights the graph never reads (the image patch embedding, for a state-only spec) are not in the file;
they keep a fixed seeded initialization and do not change any output of such a policy.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from gato_ros import contract
from gato_ros.contract import GatoConfig
from gato_ros.model import GatoModel, ValueEmbedding
from gato_ros.spec import EmbodimentSpec
from gato_ros.train import save_checkpoint

# Exported node name of a linear layer's product → its module path in GatoModel.
_LINEAR_NODE = re.compile(r"^/(?P<module>(?:blocks\.\d+/(?:attn|mlp)/(?:qkv|proj|fc))|values/proj)/MatMul(?:_quant)?$")
_UNUSED_WITHOUT_IMAGES = ("patch_embed.", "patch_rows.", "patch_cols.")


class RecoveryError(RuntimeError):
    """The file is not a gato_ros export this tool can map back onto GatoModel."""


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _dequantized_linear(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    """torch Linear weight [out, in] of a MatMul (fp32 weight [in, out], or int8 `<weight>_int8` with its
    `<weight>_scale`) or MatMulInteger (int8 weight, zero point 0, fp32 scale per output column)."""
    weight = node.input[1]
    if node.op_type == "MatMul" and weight in inits:
        return inits[weight].T
    if node.op_type == "MatMul" and weight + "_int8" in inits:  # int8 storage, rebuilt at load (quantize.py)
        return (inits[weight + "_int8"].astype(np.float32) * inits[weight + "_scale"]).T
    if node.op_type != "MatMulInteger":
        raise RecoveryError(f"{node.name}: unexpected op {node.op_type}")
    q = inits[weight].astype(np.float32)
    stem = weight.removesuffix("_quantized")
    zero, scale = inits[stem + "_zero_point"], inits[stem + "_scale"]
    if np.any(zero != 0):
        raise RecoveryError(f"{node.name}: asymmetric weights (non-zero zero point) are not supported")
    return (q * scale.reshape(1, -1)).T


def _token_table(inits: dict[str, np.ndarray]) -> np.ndarray:
    if "model.tokens.weight" in inits:
        return inits["model.tokens.weight"]
    text = inits["model.tokens.weight.text_int8"].astype(np.float32) * inits["model.tokens.weight.text_scale"]
    return np.concatenate([inits["model.tokens.weight.discrete"], text, inits["model.tokens.weight.actions"]])


def _unfuse_qkv(found: dict[str, np.ndarray], config: GatoConfig) -> None:
    """The fused graph's qkv product (attention_graph._attention) carries 1/sqrt(head_dim) folded into q and, for
    narrow models, extra rotate-half columns after v: keep q, k, v and undo the scale."""
    d, scale = config.n_embd, math.sqrt(config.n_embd // config.n_head)
    for i in range(config.n_layer):
        for name in (f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.qkv.bias"):
            if name in found:
                value = np.array(found[name][: 3 * d], dtype=np.float32)
                value[:d] *= scale
                found[name] = value


def _split_merged_table(found: dict[str, np.ndarray], head: np.ndarray, meta: dict[str, str], config: GatoConfig,
                        path: str | Path) -> None:
    """A file whose input table holds each continuous id's value embedding (attention_graph.merged_input_table) and
    whose head is `logit_table` over the ids of `gato_ros.logit_ids` (the tied token table's rows there): the token
    table gets its own rows back from the head, and the value embedding's one linear layer is the least-squares fit
    of the merged rows on its features, which is exact (those rows were made by that layer)."""
    table = found["tokens.weight"].copy()
    lo, hi = contract.CONTINUOUS_OFFSET, contract.CONTINUOUS_OFFSET + contract.NUM_BINS
    merged = table[lo:hi].astype(np.float64)
    ranges = json.loads(meta.get(contract.META_LOGIT_IDS, "null")) or []
    ids = np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, np.int64)
    if len(ids) != len(head) or not np.isin(np.arange(lo, hi), ids).all():
        raise RecoveryError(f"{path}: logit_table does not cover the continuous ids; cannot split the merged table")
    table[ids] = head
    values = ValueEmbedding(config)
    values.proj = torch.nn.Identity()  # its output is then the features the linear layer mixes
    with torch.no_grad():
        features = values(torch.arange(lo, hi)).double().numpy()
    design = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, merged, rcond=None)
    error = np.abs(design @ solution - merged).max()
    if error > 1e-3 * max(1.0, np.abs(merged).max()):
        raise RecoveryError(f"{path}: the merged table's continuous rows are not a value embedding (fit error {error})")
    found["values.proj.weight"] = solution[:-1].T.astype(np.float32)
    found["values.proj.bias"] = solution[-1].astype(np.float32)
    found["tokens.weight"] = table


def state_dict_from_onnx(path: str | Path) -> tuple[dict[str, torch.Tensor], GatoConfig, EmbodimentSpec]:
    proto = onnx.load(str(path))
    meta = _metadata(proto)
    if "gato_ros.config" not in meta or "gato_ros.spec" not in meta:
        raise RecoveryError(f"{path}: not a gato_ros export (no gato_ros.config / gato_ros.spec metadata)")
    config, spec = GatoConfig.from_json(meta["gato_ros.config"]), EmbodimentSpec.from_json(meta["gato_ros.spec"])
    # A training-only auxiliary head is never exported: the recovered model is the one the file serves.
    config = replace(config, aux_size=0)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    found: dict[str, np.ndarray] = {k.removeprefix("model."): v for k, v in inits.items() if k.startswith("model.")
                                    and not k.startswith("model.tokens.weight")
                                    and not k.endswith((".T_int8", ".T_scale"))}  # int8 storage: read per MatMul
    found["tokens.weight"] = _token_table(inits)
    for node in proto.graph.node:
        match = _LINEAR_NODE.match(node.name)
        if match and node.op_type in ("MatMul", "MatMulInteger"):
            found[match["module"].replace("/", ".") + ".weight"] = _dequantized_linear(node, inits)
    if any(node.op_type == "MultiHeadAttention" for node in proto.graph.node):
        _unfuse_qkv(found, config)
    if config.value_embedding and "values.proj.weight" not in found and "logit_table" in inits:
        _split_merged_table(found, inits["logit_table"], meta, config, path)
    torch.manual_seed(0)
    state = GatoModel(config).state_dict()
    missing = [k for k in state if k not in found and not (spec.image_keys == () and k.startswith(
        _UNUSED_WITHOUT_IMAGES))]
    if missing:
        raise RecoveryError(f"{path}: cannot find {missing} in the graph")
    for key, value in found.items():
        if key not in state:
            raise RecoveryError(f"{path}: initializer for {key!r} matches no GatoModel parameter")
        if key.startswith("patch_embed.norm") and value.shape == (*state[key].shape, 1, 1):
            value = value.reshape(state[key].shape)  # the fused graph's per-channel affine is [C, 1, 1]
        if tuple(state[key].shape) != value.shape:
            raise RecoveryError(f"{path}: {key} has shape {value.shape}, the config needs {tuple(state[key].shape)}")
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy
    return state, config, spec


def recover_checkpoint(onnx_path: str | Path, out: str | Path) -> Path:
    """Write a checkpoint directory (train.load_checkpoint format) with the weights `onnx_path` computes with."""
    state, config, spec = state_dict_from_onnx(onnx_path)
    model = GatoModel(config)
    model.load_state_dict(state)
    out = Path(out)
    save_checkpoint(out, model.eval(), spec, None,
                    {"step": 0, "recovered_from": str(onnx_path),
                     "variant": _metadata(onnx.load(str(onnx_path), load_external_data=False)).get(
                         "gato_ros.variant", "fp32")})
    return out
