"""The one input normalisation: uint8 RGB pixels -> float32 ``(x - 127.5) / 127.5``.

Training, the teacher cache, evaluation, export parity and INT8 calibration all feed
models through this rule (the batched torch form is
:func:`facekd.data.loader.normalise_batch`, which builds its CPU lookup table from
:data:`NORMALISE_LUT` and gives the same floats). ONNX files that scale inside the graph
(insightface's MXNet conversions, ``facekd export onnx --normalize-inside``) take raw
pixels back with :func:`to_raw_pixels`, which inverts the rule exactly for every uint8
value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PIXEL_MEAN = np.float32(127.5)
PIXEL_SCALE = np.float32(127.5)
NORMALISE_LUT = ((np.arange(256, dtype=np.float32) - PIXEL_MEAN) / PIXEL_SCALE).reshape(1, 256)
DESCRIPTION = "rgb, (x - 127.5) / 127.5 float32"
# The rule as graph constants, for files that scale their own input: subtract GRAPH_MEAN,
# then multiply by GRAPH_RECIPROCAL (the ONNX Sub/Mul pair, the NCNN export's traced
# module); the LiteRT lowering multiplies first, then adds GRAPH_OFFSET (-mean / scale).
GRAPH_MEAN = float(PIXEL_MEAN)
GRAPH_RECIPROCAL = 1.0 / float(PIXEL_SCALE)
GRAPH_OFFSET = -float(PIXEL_MEAN / PIXEL_SCALE)


def normalise_pixels(images: Any) -> np.ndarray:
    """uint8 (or uint8-valued float) pixels as float32 in [-1, 1]; a new array."""
    x = np.asarray(images).astype(np.float32)
    x -= PIXEL_MEAN
    x /= PIXEL_SCALE
    return x


def to_raw_pixels(x: Any) -> np.ndarray:
    """The inverse, ``x * 127.5 + 127.5`` in float32: for graphs that normalise inside."""
    raw = np.asarray(x, dtype=np.float32) * PIXEL_SCALE
    raw += PIXEL_MEAN
    return raw
