"""Checks an exported file must pass: insightface's recognition-challenge rules and
insightface's own loader reading the input scaling as intended."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from facekd.data.pixels import PIXEL_MEAN, PIXEL_SCALE, normalise_pixels
from facekd.errors import FacekdError
from facekd.export import parity as parity_mod
from facekd.models.embedder import input_is_raw_pixels


def check_challenge(path: str | Path, *, allow_fp16: bool = False,
                    raise_on_fail: bool = True) -> dict[str, Any]:
    """The insightface recognition-challenge checks on an ONNX file.

    4-D input, a single output, no FP16 initialisers (``allow_fp16`` for the declared FP16
    variant), finite outputs on a batch of 32, embedding dim <= 512. Returns each check's
    result; raises FacekdError naming the first failing check when ``raise_on_fail``.
    """
    import onnx

    model_proto = onnx.load(str(path))
    graph = model_proto.graph
    init_names = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    checks: dict[str, Any] = {}
    dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
    checks["single_input"] = len(inputs) == 1
    checks["input_4d"] = len(dims) == 4
    checks["input_112x112"] = (len(dims) == 4 and dims[2].dim_value == 112
                               and dims[3].dim_value == 112 and dims[1].dim_value == 3)
    checks["single_output"] = len(graph.output) == 1
    fp16 = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    fp16 += [n.name for n in graph.node if n.op_type == "Constant" and any(
        a.t.data_type == onnx.TensorProto.FLOAT16 for a in n.attribute if a.HasField("t"))]
    checks["fp16_initializers"] = len(fp16)
    checks["no_fp16_initializers"] = allow_fp16 or not fp16
    out = np.full((1, 1), np.nan, np.float32)
    if checks["single_input"] and checks["input_4d"]:
        session = parity_mod.onnx_session(path)
        rng = np.random.default_rng(32)
        batch = rng.uniform(0, 255, (32, 3, 112, 112)).astype(np.float32)
        if not input_is_raw_pixels(model_proto):
            batch = normalise_pixels(batch)
        out = session.run(None, {session.get_inputs()[0].name: batch})[0]
    checks["batch32_output_shape"] = list(out.shape)
    checks["no_nan_batch32"] = bool(np.isfinite(out).all()) and out.shape[0] == 32
    checks["feature_dim"] = int(out.shape[-1]) if out.ndim == 2 else None
    checks["feature_dim_le_512"] = out.ndim == 2 and out.shape[-1] <= 512
    failed = [k for k in ("single_input", "input_4d", "input_112x112", "single_output",
                          "no_fp16_initializers", "no_nan_batch32", "feature_dim_le_512")
              if not checks[k]]
    checks["passed"] = not failed
    if failed and raise_on_fail:
        raise FacekdError(f"{path}: fails the insightface recognition-challenge check(s) "
                          f"{', '.join(failed)} ({json.dumps({k: checks[k] for k in failed})})")
    return checks


def insightface_compat(path: str | Path, normalize_inside: bool) -> dict[str, Any]:
    """Load with ``insightface.model_zoo.get_model`` and check it is read as intended.

    It must be routed to ArcFaceONNX with the input mean/std matching where the
    normalisation lives (127.5 outside, 0/1 inside); a mismatch would silently feed the
    network wrongly scaled pixels.
    """
    try:
        with contextlib.redirect_stdout(None):
            from insightface.model_zoo import get_model

            model = get_model(str(path), providers=["CPUExecutionProvider"])
    except ImportError:
        return {"checked": False, "reason": "insightface not installed"}
    kind = type(model).__name__ if model is not None else None
    mean = getattr(model, "input_mean", None)
    std = getattr(model, "input_std", None)
    expected = (0.0, 1.0) if normalize_inside else (float(PIXEL_MEAN), float(PIXEL_SCALE))
    ok = kind == "ArcFaceONNX" and (mean, std) == expected
    return {"checked": True, "loaded_as": kind, "input_mean": mean, "input_std": std,
            "passed": ok}

