"""Static INT8 quantisation (onnxruntime QDQ) with facekd's exact graph rewrites.

INT8 quantisation of face embedders is known to destroy accuracy silently (cosine 0.69
vs FP32 has been reported), which is why :mod:`facekd.export.variants` keeps a variant
only after parity and accuracy checks. The "prelu-int8" recipe rewrites the graph
(exactly, before calibration; :mod:`facekd.export.int8_rewrites`) so that every layer,
PRelu and the grouped stem convolution included, runs as onnxruntime INT8 kernels in one
NHWC chain; bench/p6_latency.py measures it.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from facekd.data.pixels import to_raw_pixels
from facekd.errors import FacekdError
from facekd.export.calibration import BatchReader
from facekd.export.int8_rewrites import (
    fold_prelu_slopes_above_one,
    pad_conv_input_channels,
    quantized_prelus,
    split_grouped_convs,
)

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
    feed = to_raw_pixels(calib) if normalize_inside else calib

    class Reader(BatchReader, CalibrationDataReader):
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
