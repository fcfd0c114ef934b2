"""P8's INT8 floors: the LiteRT and NCNN INT8 files of the student with every PReLU
removed (profiling only; a different function, never shipped).

Where a runtime's INT8 misses "<= 0.5x its FP32", these rows say how much of the gap is
the PReLUs (XNNPACK runs no INT8 PRELU, so the shipped LiteRT file spends a 1x1
depthwise conv and an ADD on each; NCNN runs PReLU in float between its INT8 layers) and
how much is the runtime's INT8 convolutions themselves: INT8-without-PReLU / FP32 (with
PReLU) is the best ratio any PReLU lowering could reach in that runtime.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def litert_int8_without_prelu(onnx_path: Path, workdir: Path, calib: np.ndarray) -> Path:
    """The student's ONNX trace with PRelu -> Identity, lowered and INT8-quantised as
    ``export tflite --int8`` does (same calibration images)."""
    import onnx

    from facekd.export.tflite_export import quantize_int8
    from facekd.export.tflite_lower import onnx_to_tflite

    model = onnx.load(str(onnx_path))
    for node in model.graph.node:
        if node.op_type == "PRelu":
            node.op_type = "Identity"
            del node.input[1:]
    path = workdir / "student.int8_no_prelu.tflite"
    path.write_bytes(quantize_int8(onnx_to_tflite(model, int8_prelu=True), calib,
                                   normalize_inside=False))
    return path


def ncnn_int8_without_prelu(param: Path, weights: Path, workdir: Path,
                            calib: np.ndarray) -> list[Path]:
    """The FP32 NCNN pair with its PReLU layers cut out, then INT8 as ``export ncnn
    --int8`` does (same calibration images)."""
    from facekd.export.ncnn_export import quantize_int8, read_param, read_weights, write_param

    layers, blob_count = read_param(param)
    read_weights(layers, weights)
    source: dict[str, str] = {}
    kept = []
    for layer in layers:
        layer.bottoms = [source.get(b, b) for b in layer.bottoms]
        if layer.type == "PReLU":
            source[layer.tops[0]] = layer.bottoms[0]
        else:
            kept.append(layer)
    float_param, float_bin = workdir / "no_prelu.param", workdir / "no_prelu.bin"
    write_param(float_param, kept, blob_count)
    chunks = []
    for layer in kept:
        for kind, value in layer.blobs:
            tag = struct.pack("<I", 0) if kind == "weight" else b""  # float32 weight tag
            chunks.append(tag + value.astype(np.float32).tobytes())
    float_bin.write_bytes(b"".join(chunks))
    out = [workdir / "student.int8_no_prelu.param", workdir / "student.int8_no_prelu.bin"]
    quantize_int8(float_param, float_bin, out[0], out[1], calib.astype(np.float32))
    return out
