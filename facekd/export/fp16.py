"""FP16 conversion of an exported FP32 file (float32 IO, normalisation nodes kept FP32)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np


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
