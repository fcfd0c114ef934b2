"""FP16 and INT8 variants of an exported student, each with measured accuracy.

INT8 quantisation of face embedders is known to destroy accuracy silently (cosine 0.69
vs FP32 has been reported), so a variant is only kept when its embeddings still point
the same way as torch's on the parity faces and, given a ``.bin`` set, its verification
accuracy is within ``max_drop`` of the FP32 file's.

The INT8 recipe rewrites the graph (exactly, before calibration) so that every layer,
PRelu and the grouped stem convolution included, runs as onnxruntime INT8 kernels in one
NHWC chain; see "INT8 graph rewrites" below and bench/p6_latency.py for the measurements.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import DataError, FacekdError
from facekd.export import parity as parity_mod
from facekd.fileio import atomic_path, sha256_file

log = logging.getLogger(__name__)

VARIANT_THRESHOLDS = {"fp16": parity_mod.FP16_THRESHOLDS, "int8": parity_mod.INT8_THRESHOLDS}
ACCURACY_KEYS = ("acc_mean", "accuracy", "acc", "accuracy_flip", "acc_flip", "acc2")


# ----------------------------------------------------------------------------- FP16

def convert_fp16(model_proto: Any, keep_fp32_nodes: list[str] | None = None) -> tuple[Any, str]:
    """FP16 weights and compute with float32 input/output; returns (model, converter name).

    IO stays float32 so callers (and insightface) feed the same arrays; the input
    normalisation nodes stay float32 so raw 0..255 pixels are scaled before rounding.
    Uses onnxconverter-common when installed, else :func:`convert_fp16_plain`.
    """
    try:
        from onnxconverter_common import float16
    except ImportError:
        return convert_fp16_plain(model_proto, keep_fp32_nodes), "facekd"
    with warnings.catch_warnings():
        # It warns for every weight below FP16's range; the parity check judges the result.
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(
            model_proto, keep_io_types=True,
            node_block_list=list(keep_fp32_nodes or [])), "onnxconverter-common"


def convert_fp16_plain(model_proto: Any, keep_fp32_nodes: list[str] | None = None) -> Any:
    """Own FP16 conversion for plain CNN graphs (Conv/PRelu/Add/Gemm/BatchNorm/Reshape...).

    Float initialisers and Constant tensors become FP16 (clipped to FP16's range), Casts
    to float become Casts to FP16, a Cast to FP16 is put where float32 enters the FP16
    region (graph input or the output of a kept node) and a Cast back before each
    output. Ops that need float32 operands (e.g. Resize scales) are not handled: the
    parity gate would reject such a file.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    graph = model.graph
    keep = set(keep_fp32_nodes or [])
    kept = [n for n in graph.node if n.name in keep]
    converted = [n for n in graph.node if n.name not in keep]
    used_by_fp16 = {name for n in converted for name in n.input}
    limit = float(np.finfo(np.float16).max)

    def to_half(tensor: Any) -> Any:
        arr = numpy_helper.to_array(tensor).astype(np.float32)
        return numpy_helper.from_array(np.clip(arr, -limit, limit).astype(np.float16),
                                       tensor.name)

    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name in used_by_fp16:
            init.CopyFrom(to_half(init))
    for node in converted:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" \
                    and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(to_half(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    graph_inputs = [i.name for i in graph.input
                    if i.type.tensor_type.elem_type == TensorProto.FLOAT]
    entering = [name for name in graph_inputs + [o for n in kept for o in n.output]
                if name in used_by_fp16]
    casts_after: dict[str, Any] = {}
    for name in entering:
        half = f"{name}_fp16"
        casts_after[name] = helper.make_node("Cast", [name], [half], to=TensorProto.FLOAT16,
                                             name=f"Cast_{name}_to_fp16")
        for node in converted:
            for i, inp in enumerate(node.input):
                if inp == name:
                    node.input[i] = half
    final_casts = []
    for out in graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{out.name}_fp16"
        for node in converted:
            node.output[:] = [half if o == out.name else o for o in node.output]
            node.input[:] = [half if i == out.name else i for i in node.input]
        final_casts.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT,
                                            name=f"Cast_{out.name}_to_fp32"))
    ordered = [casts_after[n] for n in graph_inputs if n in casts_after]
    for node in graph.node:
        ordered.append(node)
        ordered += [casts_after[o] for o in node.output if o in casts_after]
    del graph.node[:]
    graph.node.extend(ordered + final_casts)
    del graph.value_info[:]
    return model


# ----------------------------------------------------------------------------- INT8

class _BatchReader:
    """onnxruntime CalibrationDataReader over an in-memory image batch."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 32) -> None:
        self.input_name = input_name
        self.images = images
        self.batch_size = batch_size
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        batch = self.images[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return {self.input_name: np.ascontiguousarray(batch, np.float32)}

    def rewind(self) -> None:
        self.position = 0


INT8_RECIPES = ("prelu-int8", "qdq-dw-fp32")


def quantize_int8(src: Path, dst: Path, calib: np.ndarray, *, normalize_inside: bool,
                  exclude_nodes: list[str] | None = None,
                  recipe: str = "prelu-int8", slope_op: str = "conv") -> dict[str, Any]:
    """Static INT8 (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration).

    ``recipe`` "prelu-int8" (default) applies the graph rewrites below so every layer,
    PRelu included, runs INT8 in one NHWC chain; "qdq-dw-fp32" is the earlier recipe
    (plain QDQ, grouped/depthwise convolutions and PRelu left FP32), kept for comparison.
    ``calib`` is float32 NCHW in [-1, 1]; it is rescaled to 0..255 when the file
    normalises inside. ``slope_op`` is how the INT8 PRelu multiplies by its slopes
    (:func:`quantized_prelus`). Returns the settings for the model card.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if recipe not in INT8_RECIPES:
        raise FacekdError(f"unknown INT8 recipe '{recipe}' ({', '.join(INT8_RECIPES)})")
    feed = calib * 127.5 + 127.5 if normalize_inside else calib

    class Reader(_BatchReader, CalibrationDataReader):
        pass

    settings: dict[str, Any] = {
        "recipe": recipe, "format": "QDQ", "weights": "int8 per-channel",
        "activations": "uint8", "calibration": "MinMax", "calibration_images": len(calib)}
    with tempfile.TemporaryDirectory(prefix="facekd-int8-") as work:
        pre = Path(work) / "pre.onnx"
        excluded = list(exclude_nodes or [])
        with contextlib.redirect_stdout(None):
            # onnxruntime's basic optimisations first: constant folding removes the
            # Identity nodes the exporter puts in front of shared weights, so the rewrites
            # below see every weight as an initializer.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            if recipe == "prelu-int8":
                model_proto = onnx.load(str(pre))
                settings["prelu_slopes_folded"] = fold_prelu_slopes_above_one(model_proto)
                settings["grouped_convs_split"] = split_grouped_convs(model_proto)
                settings["conv_inputs_padded"] = pad_conv_input_channels(model_proto)
                # The channel Pad runs on the float input, before the one QuantizeLinear.
                excluded += [n.name for n in model_proto.graph.node
                             if n.op_type == "Pad" and n.name.endswith("_facekd_pad")]
                onnx.save(model_proto, str(pre))
            if recipe == "qdq-dw-fp32":
                # onnxruntime's INT8 grouped convolution is much slower than its FP32 one
                # and this recipe's PRelus break the NHWC chain, so these stay FP32.
                excluded += _depthwise_convs(pre)
            settings["excluded_nodes"] = excluded
            quantize_static(
                str(pre), str(dst), Reader("data", feed), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=excluded)
        if recipe == "prelu-int8":
            model_proto = onnx.load(str(dst))
            settings["prelu_int8"] = quantized_prelus(model_proto, slope_op)
            settings["prelu_slope_op"] = slope_op
            settings["prelu_fp32"] = sum(n.op_type == "PRelu" for n in model_proto.graph.node)
            onnx.save(model_proto, str(dst))
    settings["depthwise_conv"] = "fp32" if recipe == "qdq-dw-fp32" else "int8"
    return settings


def _depthwise_convs(path: Path) -> list[str]:
    """Names of grouped (depthwise) Conv nodes of an ONNX file."""
    import onnx

    model_proto = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model_proto.graph.node if n.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in n.attribute)]


# ----------------------------------------------------------------------------- INT8 graph rewrites
#
# onnxruntime has no INT8 PRelu: a QDQ graph runs every PRelu in FP32 between
# DequantizeLinear/QuantizeLinear, which breaks the NHWC INT8 chain (Transposes around each
# one) and costs more than the INT8 convolutions themselves (bench/p6_latency.py profile).
# These rewrites make every layer of a MobileFaceNet-style net INT8:
#   1. FP32, exact: a PRelu with slopes > 1 is turned into one with slopes <= 1 by negating
#      those channels in the producing Conv and scaling them by -slope in the consuming Convs
#      (prelu_a(x) = -a * prelu_{1/a}(-x)).
#   2. FP32, exact: a grouped Conv with k > 1 channels per group that follows Conv -> PRelu
#      becomes k depthwise Convs summed; the producing Conv computes its channels in all k
#      rotations at once (k x the outputs, then Split). onnxruntime's grouped INT8/FP32
#      kernels are its slow generic path; its depthwise INT8 kernel is fast in NHWC.
#   3. INT8, after quantisation: DequantizeLinear -> PRelu -> QuantizeLinear becomes
#      Max(q, slope * q) on the uint8 tensor, slope * q being a 1x1 depthwise QLinearConv
#      whose per-channel weight scales keep every slope exact. With slopes <= 1,
#      prelu(x) = max(x, a * x), and Max of two tensors with the same scale/zero point is
#      the quantised Max, so the result keeps the producer's quantisation parameters.
#   4. FP32, exact: the stem Conv's 3 input channels are zero-padded to 4 (zero weights for
#      the extra channel); onnxruntime's INT8 Conv is ~4x faster with 4 input channels
#      than with 3 (measured 0.41 vs 1.85 ms for mbf's 3->256 stem at 112 px).

def _graph_index(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(tensor name -> producing node, tensor name -> consuming nodes)."""
    producer = {name: node for node in graph.node for name in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


def _node_attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


class _Initializers:
    """Initializer arrays by name, with the use count that says whether editing is safe."""

    def __init__(self, graph: Any, consumers: dict[str, list[Any]]) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.protos = {init.name: init for init in graph.initializer}
        self.uses = {name: len(consumers.get(name, [])) for name in self.protos}
        self._to_array = numpy_helper.to_array

    def array(self, name: str) -> np.ndarray | None:
        proto = self.protos.get(name)
        return None if proto is None else self._to_array(proto)

    def private(self, name: str) -> bool:
        """True when exactly one node reads the initializer (editing it changes nothing else)."""
        return name in self.protos and self.uses.get(name, 0) == 1

    def own(self, node: Any, index: int) -> str | None:
        """The name of a private copy of ``node.input[index]`` (rewired), or None if that
        input is not an initializer; shared initializers are copied, never edited."""
        name = node.input[index] if index < len(node.input) else ""
        if not name or name not in self.protos:
            return None
        if not self.private(name):
            self.uses[name] -= 1
            copy = self.add(f"{name}_facekd_{node.name or node.output[0]}", self.array(name))
            node.input[index] = copy
            return copy
        return name

    def set(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        self.protos[name].CopyFrom(numpy_helper.from_array(value, name))

    def add(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        proto = numpy_helper.from_array(value, name)
        self.graph.initializer.append(proto)
        self.protos[name] = self.graph.initializer[-1]
        self.uses[name] = 1
        return name


def _channel_slopes(inits: _Initializers, name: str, channels: int) -> np.ndarray | None:
    """A PRelu slope as one float per channel of an NCHW input, or None if it is not a
    constant of shape [], [1], [C, 1, 1] or [1, C, 1, 1]."""
    slope = inits.array(name)
    if slope is None:
        return None
    slope = slope.astype(np.float32)
    if slope.size == 1:
        return np.full(channels, float(slope.reshape(-1)[0]), np.float32)
    if slope.shape not in ((channels, 1, 1), (1, channels, 1, 1)):
        return None
    return slope.reshape(-1)


def fold_prelu_slopes_above_one(model_proto: Any) -> int:
    """Exact FP32 rewrite so that PRelu slopes are <= 1 (see rewrite 1 above).

    Applies to Conv -> PRelu -> Conv(s) whose weights only these nodes use; other PRelus
    keep their slopes (and later stay FP32). Returns the number of PRelus changed.
    """
    graph = model_proto.graph
    producer, consumers = _graph_index(graph)
    inits = _Initializers(graph, consumers)
    outputs = {o.name for o in graph.output}
    changed = 0
    for prelu in [n for n in graph.node if n.op_type == "PRelu"]:
        conv = producer.get(prelu.input[0])
        readers = consumers.get(prelu.output[0], [])
        if conv is None or conv.op_type != "Conv" or len(consumers[conv.output[0]]) != 1:
            continue
        if prelu.output[0] in outputs or not readers or any(
                r.op_type != "Conv" or r.input[0] != prelu.output[0] for r in readers):
            continue
        weight = inits.array(conv.input[1])
        if weight is None or any(inits.array(r.input[1]) is None for r in readers):
            continue
        if len(conv.input) > 2 and conv.input[2] and inits.array(conv.input[2]) is None:
            continue
        slope = _channel_slopes(inits, prelu.input[1], weight.shape[0])
        if slope is None or not (slope > 1).any():
            continue
        inits.own(conv, 1)
        if len(conv.input) > 2 and conv.input[2]:
            inits.own(conv, 2)
        for reader in readers:
            inits.own(reader, 1)
        flip = slope > 1
        weight = weight.copy()
        weight[flip] *= -1
        inits.set(conv.input[1], weight)
        if len(conv.input) > 2 and conv.input[2]:
            bias = inits.array(conv.input[2]).copy()
            bias[flip] *= -1
            inits.set(conv.input[2], bias)
        for reader in readers:
            kernel = inits.array(reader.input[1]).copy()
            groups = int(_node_attr(reader, "group", 1))
            per_group_in, per_group_out = kernel.shape[1], kernel.shape[0] // groups
            for channel in np.flatnonzero(flip):
                group, local = divmod(int(channel), per_group_in)
                kernel[group * per_group_out:(group + 1) * per_group_out, local] *= -slope[channel]
            inits.set(reader.input[1], kernel)
        new_slope = np.where(flip, 1.0 / np.where(flip, slope, 1.0), slope).astype(np.float32)
        shape = inits.array(prelu.input[1]).shape
        slope_name = inits.add(f"{prelu.name or prelu.output[0]}_facekd_slope",
                               new_slope.reshape(shape if len(shape) == 3 else (-1, 1, 1)))
        prelu.input[1] = slope_name
        changed += 1
    return changed


def split_grouped_convs(model_proto: Any, max_per_group: int = 4) -> int:
    """Exact FP32 rewrite of Conv -> PRelu -> grouped Conv (k in/out channels per group,
    1 < k <= ``max_per_group``) into k depthwise Convs summed (see rewrite 2 above).

    The producing Conv computes its channels in k rotations at once (one Conv, k x the
    outputs, then Split), so depthwise Conv s reads, for output channel c, input channel
    ``c - c % k + (c % k + s) % k`` at position c. Returns the number of grouped Convs
    replaced.
    """
    from onnx import helper

    graph = model_proto.graph
    producer, consumers = _graph_index(graph)
    inits = _Initializers(graph, consumers)
    replaced = 0
    for grouped in [n for n in graph.node if n.op_type == "Conv"]:
        groups = int(_node_attr(grouped, "group", 1))
        kernel = inits.array(grouped.input[1])
        if groups == 1 or kernel is None:
            continue
        per_group = kernel.shape[1]
        channels = per_group * groups
        if not 1 < per_group <= max_per_group or kernel.shape[0] != channels:
            continue
        prelu = producer.get(grouped.input[0])
        if prelu is None or prelu.op_type != "PRelu" or len(consumers[prelu.output[0]]) != 1:
            continue
        source = producer.get(prelu.input[0])
        if source is None or source.op_type != "Conv" or len(consumers[source.output[0]]) != 1:
            continue
        src_weight = inits.array(source.input[1])
        slope = _channel_slopes(inits, prelu.input[1], channels)
        if src_weight is None or slope is None or src_weight.shape[0] != channels:
            continue
        src_bias = inits.array(source.input[2]) if len(source.input) > 2 and source.input[2] \
            else None
        bias = inits.array(grouped.input[2]) if len(grouped.input) > 2 and grouped.input[2] \
            else None
        local = np.arange(channels) % per_group
        orders = [np.arange(channels) - local + (local + shift) % per_group
                  for shift in range(per_group)]
        tag = grouped.name or grouped.output[0]
        src_inputs = [source.input[0], inits.add(
            f"{tag}_facekd_src_w", np.concatenate([src_weight[o] for o in orders]))]
        if src_bias is not None:
            src_inputs.append(inits.add(f"{tag}_facekd_src_b",
                                        np.concatenate([src_bias[o] for o in orders])))
        merged = f"{tag}_facekd_rotations"
        parts = [f"{tag}_facekd_rot{shift}_pre" for shift in range(per_group)]
        new_nodes = [
            helper.make_node("Conv", src_inputs, [merged], name=f"{tag}_facekd_src",
                             **{a.name: helper.get_attribute_value(a) for a in source.attribute}),
            helper.make_node("Split", [merged, inits.add(
                f"{tag}_facekd_split", np.full(per_group, channels, np.int64))], parts,
                axis=1, name=f"{tag}_facekd_split")]
        conv_attrs = {a.name: helper.get_attribute_value(a) for a in grouped.attribute
                      if a.name not in ("group", "kernel_shape")}
        partials = []
        for shift, order in enumerate(orders):
            rotated = f"{tag}_facekd_rot{shift}"
            taps = kernel[np.arange(channels), (local + shift) % per_group][:, None]
            dw_inputs = [rotated, inits.add(f"{tag}_facekd_dw_w{shift}",
                                            np.ascontiguousarray(taps.astype(np.float32)))]
            if shift == 0 and bias is not None:
                dw_inputs.append(inits.add(f"{tag}_facekd_dw_b", bias.astype(np.float32)))
            partials.append(f"{tag}_facekd_part{shift}")
            new_nodes += [
                helper.make_node("PRelu", [parts[shift], inits.add(
                    f"{tag}_facekd_slope{shift}", slope[order].reshape(-1, 1, 1))],
                    [rotated], name=f"{tag}_facekd_prelu{shift}"),
                helper.make_node("Conv", dw_inputs, [partials[-1]], name=f"{tag}_facekd_dw{shift}",
                                 group=channels, kernel_shape=list(kernel.shape[2:]),
                                 **conv_attrs)]
        total = partials[0]
        for shift, partial in enumerate(partials[1:], start=1):
            out = grouped.output[0] if shift == per_group - 1 else f"{tag}_facekd_sum{shift}"
            new_nodes.append(helper.make_node("Add", [total, partial], [out],
                                              name=f"{tag}_facekd_add{shift}"))
            total = out
        position = list(graph.node).index(source)
        for node in (source, prelu, grouped):
            graph.node.remove(node)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(position + offset, node)
        replaced += 1
    return replaced


def pad_conv_input_channels(model_proto: Any, multiple: int = 4, below: int = 16) -> int:
    """Exact FP32 rewrite: a dense Conv with fewer than ``below`` input channels, not a
    multiple of ``multiple``, reads its input zero-padded to the next multiple, with zero
    weights for the added channels (see rewrite 4 above).

    Returns the number of Convs changed.
    """
    from onnx import helper

    graph = model_proto.graph
    _, consumers = _graph_index(graph)
    inits = _Initializers(graph, consumers)
    changed = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or int(_node_attr(conv, "group", 1)) != 1:
            continue
        weight = inits.array(conv.input[1])
        if weight is None or weight.ndim != 4:
            continue
        channels = weight.shape[1]
        extra = -channels % multiple
        if extra == 0 or channels >= below:
            continue
        inits.own(conv, 1)
        padded_weight = np.concatenate(
            [weight, np.zeros((weight.shape[0], extra, *weight.shape[2:]), weight.dtype)], 1)
        inits.set(conv.input[1], padded_weight)
        tag = conv.name or conv.output[0]
        pads = inits.add(f"{tag}_facekd_channel_pads",
                         np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64))
        padded = f"{tag}_facekd_padded_input"
        graph.node.insert(list(graph.node).index(conv), helper.make_node(
            "Pad", [conv.input[0], pads], [padded], name=f"{tag}_facekd_pad", mode="constant"))
        conv.input[0] = padded
        changed += 1
    return changed


def prelu_as_max(model_proto: Any) -> int:
    """Exact FP32 rewrite PRelu(x, a) -> Max(x, a * x) where every slope is <= 1.

    Not used by the INT8 recipe; it shows what the FP32 file gains from the same
    algebra (bench/p6_latency.py). Returns the number of PRelus rewritten.
    """
    from onnx import helper

    graph = model_proto.graph
    _, consumers = _graph_index(graph)
    inits = _Initializers(graph, consumers)
    nodes, rewritten = [], 0
    for node in graph.node:
        slope = inits.array(node.input[1]) if node.op_type == "PRelu" else None
        if slope is None or slope.max() > 1.0:
            nodes.append(node)
            continue
        scaled = f"{node.output[0]}_facekd_ax"
        nodes += [helper.make_node("Mul", [node.input[0], node.input[1]], [scaled],
                                   name=f"{node.name}_mul"),
                  helper.make_node("Max", [node.input[0], scaled], [node.output[0]],
                                   name=f"{node.name}_max")]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def quantized_prelus(model_proto: Any, slope_op: str = "conv") -> int:
    """INT8 rewrite 3 (see above) on a QDQ model; returns the number of PRelus replaced.

    ``slope_op`` computes a * x: "conv" a 1x1 depthwise QLinearConv (per-channel int8
    weight scales, so each slope is kept to float precision), "mul" a QLinearMul with the
    slopes quantised to uint8 on one shared scale.

    Consumers that bake the input scale into an int32 bias (Conv, Gemm) get their bias
    requantised for the new input scale, since the PRelu output now keeps the scale of
    its input.
    """
    from onnx import helper

    graph = model_proto.graph
    producer, consumers = _graph_index(graph)
    inits = _Initializers(graph, consumers)
    outputs = {o.name for o in graph.output}
    replacements: dict[int, list[Any]] = {}
    removed: set[int] = set()
    for prelu in [n for n in graph.node if n.op_type == "PRelu"]:
        dq_in = producer.get(prelu.input[0])
        if dq_in is None or dq_in.op_type != "DequantizeLinear" or len(dq_in.input) < 3:
            continue
        q_name, scale_name, zp_name = dq_in.input[:3]
        scale, zero_point = inits.array(scale_name), inits.array(zp_name)
        if scale is None or zero_point is None or scale.size != 1 or zero_point.dtype != np.uint8:
            continue
        quantizers = consumers.get(prelu.output[0], [])
        if not quantizers or any(q.op_type != "QuantizeLinear" or q.output[0] in outputs
                                 for q in quantizers):
            continue
        dequantizers = [d for q in quantizers for d in consumers.get(q.output[0], [])]
        if not dequantizers or any(d.op_type != "DequantizeLinear" for d in dequantizers):
            continue
        readers = [r for d in dequantizers for r in consumers.get(d.output[0], [])]
        if not all(_bias_requantizable(r, producer, inits) for r in readers):
            continue
        channels = _prelu_channels(graph, prelu, inits)
        slope = _channel_slopes(inits, prelu.input[1], channels) if channels else None
        if slope is None or slope.max() > 1.0:
            continue
        tag = prelu.name or prelu.output[0]
        scaled, result = f"{tag}_facekd_ax", f"{tag}_facekd_q"
        replacements[id(prelu)] = [
            _slope_node(inits, tag, slope, (q_name, scale_name, zp_name), scaled, slope_op),
            helper.make_node("Max", [q_name, scaled], [result], name=f"{tag}_Max")]
        for dq in dequantizers:
            dq.input[0], dq.input[1], dq.input[2] = result, scale_name, zp_name
        for reader in readers:
            _requantize_bias(reader, producer, inits, float(scale.reshape(-1)[0]))
        removed.add(id(prelu))
        removed.update(id(q) for q in quantizers)
        if len(consumers[dq_in.output[0]]) == 1:
            removed.add(id(dq_in))
    if replacements:
        nodes = []
        for node in graph.node:
            nodes += replacements.get(id(node), [])
            if id(node) not in removed:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        if any(n.domain == "com.microsoft" for n in graph.node) and not any(
                o.domain == "com.microsoft" for o in model_proto.opset_import):
            model_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replacements)


def _slope_node(inits: _Initializers, tag: str, slope: np.ndarray,
                quantized_input: tuple[str, str, str], output: str, slope_op: str) -> Any:
    """The node computing slope * x on the uint8 tensor, quantised like its input."""
    from onnx import helper

    q_name, scale_name, zp_name = quantized_input
    if slope_op == "mul":
        low, high = min(float(slope.min()), 0.0), max(float(slope.max()), 0.0)
        slope_scale = (high - low) / 255.0 or 1.0
        slope_zp = round(-low / slope_scale)
        slope_q = np.clip(np.round(slope / slope_scale) + slope_zp, 0, 255).astype(np.uint8)
        names = (inits.add(f"{tag}_facekd_slope_q", slope_q.reshape(-1, 1, 1)),
                 inits.add(f"{tag}_facekd_slope_scale", np.array(slope_scale, np.float32)),
                 inits.add(f"{tag}_facekd_slope_zp", np.array(slope_zp, np.uint8)))
        return helper.make_node("QLinearMul", [q_name, scale_name, zp_name, *names, scale_name,
                                               zp_name], [output], name=f"{tag}_QLinearMul",
                                domain="com.microsoft")
    weight_scale = np.where(slope != 0, np.abs(slope) / 127.0, 1.0).astype(np.float32)
    weight = np.round(slope / weight_scale).astype(np.int8).reshape(-1, 1, 1, 1)
    names = (inits.add(f"{tag}_facekd_slope_w", weight),
             inits.add(f"{tag}_facekd_slope_w_scale", weight_scale),
             inits.add(f"{tag}_facekd_slope_w_zp", np.zeros(len(slope), np.int8)))
    return helper.make_node("QLinearConv", [q_name, scale_name, zp_name, *names, scale_name,
                                            zp_name], [output], name=f"{tag}_slope_QLinearConv",
                            group=len(slope), kernel_shape=[1, 1])

def _prelu_channels(graph: Any, prelu: Any, inits: _Initializers) -> int | None:
    """Channel count of a PRelu's input (from its slope, or shape inference)."""
    slope = inits.array(prelu.input[1])
    if slope is not None and slope.size > 1:
        return int(slope.size)
    for info in graph.value_info:
        if info.name == prelu.input[0]:
            dims = info.type.tensor_type.shape.dim
            if len(dims) > 1 and dims[1].dim_value > 0:
                return int(dims[1].dim_value)
    return None


def _bias_requantizable(reader: Any, producer: dict[str, Any], inits: _Initializers) -> bool:
    """A node whose int32 bias (if any) this pass can requantise for a new input scale."""
    if reader.op_type not in ("Conv", "Gemm") or len(reader.input) < 3 or not reader.input[2]:
        return True
    bias_dq, weight_dq = producer.get(reader.input[2]), producer.get(reader.input[1])
    if bias_dq is None or bias_dq.op_type != "DequantizeLinear":
        return bias_dq is None or reader.input[2] in inits.protos   # float bias: nothing baked
    return (weight_dq is not None and weight_dq.op_type == "DequantizeLinear"
            and inits.private(bias_dq.input[0]) and inits.private(bias_dq.input[1])
            and inits.array(weight_dq.input[1]) is not None)


def _requantize_bias(reader: Any, producer: dict[str, Any], inits: _Initializers,
                     input_scale: float) -> None:
    if reader.op_type not in ("Conv", "Gemm") or len(reader.input) < 3 or not reader.input[2]:
        return
    bias_dq, weight_dq = producer.get(reader.input[2]), producer.get(reader.input[1])
    if bias_dq is None or bias_dq.op_type != "DequantizeLinear":
        return
    old_q = inits.array(bias_dq.input[0]).astype(np.float64)
    old_scale = inits.array(bias_dq.input[1])
    bias = old_q * old_scale.astype(np.float64)
    new_scale = (input_scale * inits.array(weight_dq.input[1]).astype(np.float64)).astype(
        np.float32).reshape(old_scale.shape)
    new_q = np.clip(np.round(bias / new_scale.astype(np.float64)), -2 ** 31, 2 ** 31 - 1)
    inits.set(bias_dq.input[0], new_q.astype(np.int32))
    inits.set(bias_dq.input[1], new_scale)


def load_calibration_images(source: str | Path, count: int = 256, seed: int = 0) -> np.ndarray:
    """``count`` training faces as float32 NCHW in [-1, 1] for INT8 calibration.

    ``source`` is a ``.bin`` set, a RecordIO dataset (folder with train.rec or a .rec
    file) or a shards folder; images are taken evenly spread over the source so every
    identity range contributes.
    """
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: calibration data does not exist")
    if path.suffix == ".bin":
        from facekd.data.binset import decode_bin_images, load_bin

        bins, _ = load_bin(path)
        pick = _spread(len(bins), count)
        images = decode_bin_images([bins[i] for i in pick], source=str(path))
    elif path.suffix in (".rec", ".idx") or (path / "train.rec").is_file():
        images = _rec_images(path, count)
    elif path.is_dir():
        images = _loader_images(path, count, seed)
    else:
        raise DataError(f"{path}: calibration data must be a .bin, a RecordIO dataset or "
                        f"a shards folder")
    if len(images) == 0:
        raise DataError(f"{path}: no images for calibration")
    x = images.astype(np.float32)
    return np.ascontiguousarray((x - 127.5) / 127.5)


def _spread(total: int, count: int) -> list[int]:
    if total <= count:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, count)})


def _rec_images(path: Path, count: int) -> np.ndarray:
    """Decode ``count`` images spread over a RecordIO dataset to uint8 NCHW RGB."""
    import cv2

    from facekd.data.recordio import open_rec

    reader = open_rec(path.with_suffix(".rec") if path.suffix == ".idx" else path)
    keys = list(reader.image_keys())
    out = []
    for i in _spread(len(keys), count):
        _, payload = reader[keys[i]]
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{path}: record {keys[i]} is not a decodable image")
        if img.shape[:2] != (112, 112):
            img = cv2.resize(img, (112, 112), interpolation=cv2.INTER_LINEAR)
        out.append(img[:, :, ::-1].transpose(2, 0, 1))
    return np.stack(out) if out else np.empty((0, 3, 112, 112), np.uint8)


def _loader_images(path: Path, count: int, seed: int) -> np.ndarray:
    """Images from the training loader (shards folder), unflipped, as uint8-range NCHW."""
    from facekd.data.loader import build_train_loader

    loader = build_train_loader(str(path), batch_size=min(64, count), seed=seed, flip=False,
                                drop_last=False, labelled=False)
    got, total = [], 0
    for batch in loader:
        images = batch["image"].numpy()  # the loader yields uint8 NCHW RGB, exact pixels
        got.append(images)
        total += len(images)
        if total >= count:
            break
    if not got:
        return np.empty((0, 3, 112, 112), np.uint8)
    return np.concatenate(got)[:count]


# ----------------------------------------------------------------------------- variants

def make_variant(fp32_path: Path, target: Path, variant: str, *, student: Any,
                 normalize_inside: bool, calib: np.ndarray | None, calib_source: Any,
                 x: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Write the ``variant`` of ``fp32_path`` to ``target``, with parity/challenge numbers."""
    import onnx

    from facekd.export import onnx_export as ex

    norm_nodes = [ex.NORM_SUB_NODE, ex.NORM_MUL_NODE] if normalize_inside else []
    with atomic_path(target, suffix=".onnx") as tmp:
        if variant == "fp16":
            model_proto, converter = convert_fp16(onnx.load(str(fp32_path)),
                                                  keep_fp32_nodes=norm_nodes)
            settings: dict[str, Any] = {"converter": converter, "io": "float32"}
        elif variant == "int8":
            if calib is None:
                raise FacekdError("--int8 needs calibration images (--calib-data)")
            settings = quantize_int8(fp32_path, tmp, calib, normalize_inside=normalize_inside,
                                     exclude_nodes=norm_nodes)
            settings["calibration_source"] = str(calib_source)
            model_proto = onnx.load(str(tmp))
        else:
            raise FacekdError(f"unknown variant '{variant}' (fp16 or int8)")
        ex.move_normalization_first(model_proto)
        ex.set_metadata(model_proto, {**ex.base_metadata(student, normalize_inside, variant),
                                      "facekd.quantization": settings})
        model_proto.producer_name = "facekd"
        onnx.checker.check_model(model_proto)
        onnx.save(model_proto, str(tmp))
        report = parity_mod.check_parity(student.model, tmp, x, normalize_inside=normalize_inside,
                                         variant=variant, thresholds=VARIANT_THRESHOLDS[variant],
                                         reference=reference)
        challenge = ex.check_challenge(tmp, allow_fp16=(variant == "fp16"), raise_on_fail=False)
        compat = ex.insightface_compat(tmp, normalize_inside)
    log.info("wrote %s (%s: 1-cos %.2e vs torch)", target, variant, report.max_one_minus_cos)
    return {"file": target.name, "sha256": sha256_file(target), "bytes": target.stat().st_size,
            "quantization": settings, "parity": report.to_dict(), "challenge": challenge,
            "insightface": compat}


def accuracy_of(numbers: dict[str, Any]) -> float | None:
    """The verification accuracy (fraction) in an ``evaluate_bin`` result."""
    for key in ACCURACY_KEYS:
        value = numbers.get(key)
        if isinstance(value, (int, float)):
            return float(value) / 100.0 if value > 1.0 else float(value)
    return None


class OnnxFileEmbedder:
    """[-1, 1] NCHW float batch -> embeddings from an exported file (inside/outside scaling)."""

    def __init__(self, path: str | Path, normalize_inside: bool) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.sha256 = sha256_file(self.path)
        self.normalize_inside = normalize_inside
        self.session = parity_mod.onnx_session(self.path)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: Any) -> np.ndarray:
        x = batch.detach().cpu().numpy() if hasattr(batch, "detach") else np.asarray(batch)
        x = x.astype(np.float32, copy=False)
        if self.normalize_inside:
            x = x * 127.5 + 127.5
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]


def _embedder_for(path: Path, normalize_inside: bool, probe: np.ndarray) -> Any:
    """facekd's shared embedder for the file, if it reproduces the file's own output.

    Evaluation and export should share ``load_embedder``; a loader that ignores the
    in-graph normalisation would give wrong accuracies, so it is checked on ``probe``
    and replaced by :class:`OnnxFileEmbedder` when it disagrees.
    """
    own = OnnxFileEmbedder(path, normalize_inside)
    try:
        from facekd.models.embedder import load_embedder

        shared = load_embedder(str(path), device="cpu")
        if np.allclose(np.asarray(shared(probe)), own(probe), rtol=1e-3, atol=1e-4):
            return shared
        log.warning("%s: load_embedder output differs from the file's own; using the "
                    "export embedder", path)
    except ImportError:
        pass
    return own


def evaluate_variants(paths: dict[str, Path], bin_path: str | Path,
                      normalize_inside: bool) -> dict[str, dict[str, Any]]:
    """Verification numbers of each variant on one ``.bin`` set (image + flip)."""
    probe = parity_mod.to_model_input(parity_mod.synthetic_aligned_faces(2, seed=5))
    results: dict[str, dict[str, Any]] = {}
    for variant, path in paths.items():
        embedder = _embedder_for(Path(path), normalize_inside, probe)
        numbers = _evaluate_bin(embedder, bin_path)
        numbers = {k: _plain(v) for k, v in dict(numbers).items()}
        accuracy = accuracy_of(numbers)
        results[variant] = {"bin": Path(bin_path).name, "accuracy": accuracy,
                            "metrics": {k: v for k, v in numbers.items()
                                        if isinstance(v, (int, float, str, bool))}}
        log.info("%s on %s: accuracy %s", variant, Path(bin_path).name, accuracy)
    base = results.get("fp32", {}).get("accuracy")
    for numbers in results.values():
        acc = numbers["accuracy"]
        numbers["drop_vs_fp32"] = (base - acc) if base is not None and acc is not None else None
    return results


def _evaluate_bin(embedder: Any, bin_path: str | Path) -> dict[str, Any]:
    """``facekd.evaluate.evaluate_bin`` when present, else the same steps via verify_pairs."""
    try:
        from facekd.evaluate import evaluate_bin  # type: ignore[attr-defined]
    except ImportError:
        evaluate_bin = None
    if evaluate_bin is not None:
        # No feature cache: it is keyed by file hash, and a loader that ignored the
        # in-graph normalisation could have cached wrong features for this very file.
        return dict(evaluate_bin(embedder, str(bin_path), use_cache=False))
    from facekd.data.binset import decode_bin_images, load_bin
    from facekd.evaluate.verification import verify_pairs

    bins, issame = load_bin(bin_path)
    images = decode_bin_images(bins, source=str(bin_path)).astype(np.float32)
    x = (images - 127.5) / 127.5
    emb = np.concatenate([embedder(x[i:i + 64]) for i in range(0, len(x), 64)])
    flipped = np.ascontiguousarray(x[..., ::-1])
    emb_flip = np.concatenate([embedder(flipped[i:i + 64]) for i in range(0, len(x), 64)])
    return verify_pairs(emb, emb_flip, np.asarray(issame))


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers so the card serialises."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def judge_variants(variants: dict[str, dict[str, Any]], *, max_drop: float,
                   force: bool) -> list[str]:
    """Attach a verdict to each variant; return the names to refuse (empty with ``force``).

    A quantised variant fails when its embeddings drift past its parity limits, when it
    fails a challenge check, or when its accuracy drop exceeds ``max_drop``.
    """
    refused = []
    for name, info in variants.items():
        if name == "fp32":
            info["verdict"] = {"accepted": True, "forced": False, "reason": None}
            continue
        reasons = []
        parity = info["parity"]
        if not parity["passed"]:
            reasons.append(f"1-cos vs torch {parity['max_one_minus_cos']:.3g} > "
                           f"{parity['thresholds']['max_one_minus_cos']:.3g}")
        challenge = info.get("challenge")  # ONNX files only
        if challenge is not None and not challenge.get("passed", False):
            failed = [k for k, v in challenge.items() if v is False]
            reasons.append(f"challenge checks failed: {', '.join(failed)}")
        evaluation = info.get("evaluation")
        if evaluation is None:
            log.warning("%s: accuracy not measured (no --eval-bin); only parity was checked",
                        info["file"])
        elif evaluation.get("drop_vs_fp32") is not None and evaluation["drop_vs_fp32"] > max_drop:
            reasons.append(f"accuracy drop {evaluation['drop_vs_fp32']:.4f} > max-drop "
                           f"{max_drop:.4f} on {evaluation['bin']}")
        reason = "; ".join(reasons) or None
        info["verdict"] = {"accepted": not reasons or force, "forced": bool(reasons) and force,
                           "reason": reason}
        if reasons and force:
            banner = "!" * 72
            log.warning("%s\nKEEPING %s DESPITE FAILED CHECKS (--force): %s\n%s",
                        banner, info["file"], reason, banner)
        elif reasons:
            refused.append(name)
    return refused
