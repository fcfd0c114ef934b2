"""INT8 recipe: exact FP32 rewrites, every PRelu INT8, fused and unfused runs agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from facekd.errors import FacekdError
from facekd.export import int8_rewrites, parity
from facekd.export.int8 import quantize_int8
from facekd.export.onnx_export import trace_to_onnx
from facekd.models import create_model


def _student() -> torch.nn.Module:
    """mbf_tiny with a 2-channels-per-group stem and PReLU slopes on both sides of 1."""
    torch.manual_seed(3)
    model = create_model("mbf_tiny", stem_groups=16)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
        if isinstance(module, torch.nn.PReLU):
            module.weight.data.uniform_(-0.3, 1.6)
    return model.eval()


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "student.onnx"
    trace_to_onnx(_student(), path)
    return path


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return parity.to_model_input(parity.synthetic_aligned_faces(24, seed=11))


def _run(path: Path | onnx.ModelProto, x: np.ndarray,
         level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
         optimized: Path | None = None) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    source = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _one_minus_cos(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float((1.0 - cos).max())


def test_fp32_rewrites_are_exact(fp32_file, faces):
    model_proto = onnx.load(str(fp32_file))
    prelus = sum(n.op_type == "PRelu" for n in model_proto.graph.node)
    assert int8_rewrites.fold_prelu_slopes_above_one(model_proto) == prelus   # all have slopes > 1
    assert int8_rewrites.split_grouped_convs(model_proto) == 1
    assert int8_rewrites.pad_conv_input_channels(model_proto) == 1     # the 3-channel stem
    onnx.checker.check_model(model_proto)
    for node in model_proto.graph.node:
        if node.op_type == "PRelu":
            slope = onnx.numpy_helper.to_array(
                next(i for i in model_proto.graph.initializer if i.name == node.input[1]))
            assert slope.max() <= 1.0
    groups = [a.i for n in model_proto.graph.node if n.op_type == "Conv"
              for a in n.attribute if a.name == "group"]
    reference = _run(fp32_file, faces)
    np.testing.assert_allclose(_run(model_proto, faces), reference, rtol=1e-5, atol=1e-5)
    weights = {i.name: i for i in model_proto.graph.initializer}
    for node in model_proto.graph.node:   # every grouped conv left is depthwise
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            assert weights[node.input[1]].dims[1] == 1
    assert max(groups) > 1
    # The FP32 comparison rewrite of the benchmark: PRelu as Max(x, a * x), bit-exact.
    remaining = sum(n.op_type == "PRelu" for n in model_proto.graph.node)   # split added one
    assert int8_rewrites.prelu_as_max(model_proto) == remaining == prelus + 1
    assert not [n for n in model_proto.graph.node if n.op_type == "PRelu"]
    np.testing.assert_allclose(_run(model_proto, faces), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slope_op", ["conv", "mul"])
def test_int8_runs_every_prelu_in_int8(fp32_file, faces, tmp_path, slope_op):
    out = tmp_path / "student.int8.onnx"
    settings = quantize_int8(fp32_file, out, faces[:16], normalize_inside=False,
                                      slope_op=slope_op)
    model_proto = onnx.load(str(out))
    assert settings["prelu_fp32"] == 0 and settings["prelu_int8"] > 0
    assert not [n for n in model_proto.graph.node if n.op_type == "PRelu"]
    assert settings["grouped_convs_split"] == 1 and settings["prelu_slopes_folded"] > 0
    assert settings["conv_inputs_padded"] == 1
    optimized = tmp_path / "optimized.onnx"
    fused = _run(out, faces, optimized=optimized)
    # onnxruntime runs the whole network as INT8 ops: no FP32 Conv or PRelu left after fusion,
    # and quantise/dequantise only at the ends.
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert "PRelu" not in ops and "Conv" not in ops
    assert ops.count("DequantizeLinear") + ops.count("QuantizeLinear") <= 2
    reference = _run(fp32_file, faces)
    assert _one_minus_cos(fused, reference) < parity.INT8_THRESHOLDS.max_one_minus_cos
    # The fused run (QLinearConv with its int32 bias) must agree with the plain QDQ
    # arithmetic: a bias quantised for the wrong input scale would make them differ.
    plain = _run(out, faces, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert _one_minus_cos(fused, plain) < 1e-3


def test_previous_recipe_and_unknown_recipe(fp32_file, faces, tmp_path):
    out = tmp_path / "legacy.int8.onnx"
    settings = quantize_int8(fp32_file, out, faces[:8], normalize_inside=False,
                                      recipe="qdq-dw-fp32")
    assert settings["depthwise_conv"] == "fp32" and settings["excluded_nodes"]
    assert any(n.op_type == "PRelu" for n in onnx.load(str(out)).graph.node)
    with pytest.raises(FacekdError, match="recipe"):
        quantize_int8(fp32_file, tmp_path / "x.onnx", faces[:8],
                               normalize_inside=False, recipe="fastest")


def test_shared_weights_behind_identity_nodes_are_rewritten(faces, tmp_path):
    """Default BatchNorm statistics give equal folded biases, which the exporter shares
    through Identity nodes; the recipe still rewrites every PRelu (on private copies)."""
    torch.manual_seed(5)
    model = create_model("mbf_tiny").eval()
    for module in model.modules():
        if isinstance(module, torch.nn.PReLU):
            module.weight.data.uniform_(-0.3, 1.6)
    src = tmp_path / "shared.onnx"
    trace_to_onnx(model, src)
    assert any(n.op_type == "Identity" for n in onnx.load(str(src)).graph.node)
    out = tmp_path / "shared.int8.onnx"
    settings = quantize_int8(src, out, faces[:8], normalize_inside=False)
    assert settings["prelu_fp32"] == 0 and settings["prelu_slopes_folded"] > 0
    assert _one_minus_cos(_run(out, faces), _run(src, faces)) < \
        parity.INT8_THRESHOLDS.max_one_minus_cos
