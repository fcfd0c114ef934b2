"""ONNX graph helpers shared by export, quantisation and every reader of facekd files.

The input names, the in-graph ``(x - 127.5) / 127.5`` pair and the ``facekd.*``
metadata live here so that ``onnx_export`` and the variant code write them one way; the
metadata key that says where the scaling lives is
:data:`facekd.models.embedder.NORMALIZATION_KEY`, read by the one ONNX embedder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from facekd.data.pixels import GRAPH_MEAN, GRAPH_RECIPROCAL
from facekd.errors import FacekdError
from facekd.models.embedder import NORMALIZATION_KEY

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
NORM_SUB_NODE = "Sub_facekd_input_normalize"
NORM_MUL_NODE = "Mul_facekd_input_normalize"


def add_input_normalization(model_proto: Any) -> None:
    """Put ``(x - 127.5) / 127.5`` in the graph as the first nodes, named Sub*/Mul*.

    insightface's ArcFaceONNX switches to mean 0 / std 1 when it sees ``Sub`` and ``Mul``
    node names among the first eight nodes, so these two go first.
    """
    from onnx import TensorProto, helper

    graph = model_proto.graph
    centred, scaled = f"{INPUT_NAME}_centred", f"{INPUT_NAME}_normalized"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == INPUT_NAME:
                node.input[i] = scaled
    for output in graph.output:
        if output.name == INPUT_NAME:
            raise FacekdError("the model returns its input unchanged; nothing to export")
    graph.initializer.extend([
        helper.make_tensor("facekd_input_mean", TensorProto.FLOAT, [], [GRAPH_MEAN]),
        helper.make_tensor("facekd_input_scale", TensorProto.FLOAT, [], [GRAPH_RECIPROCAL]),
    ])
    sub = helper.make_node("Sub", [INPUT_NAME, "facekd_input_mean"], [centred], name=NORM_SUB_NODE)
    mul = helper.make_node("Mul", [centred, "facekd_input_scale"], [scaled], name=NORM_MUL_NODE)
    nodes = [sub, mul, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)


def move_normalization_first(model_proto: Any) -> None:
    """After quantisers/converters reorder nodes, put the Sub/Mul pair first again.

    The pair and whatever it depends on (e.g. a Cast of the input) move to the front in
    their original relative order; that keeps the node list topologically sorted because
    the set of ancestors is closed under taking predecessors.
    """
    graph = model_proto.graph
    nodes = list(graph.node)
    norm = [n for n in nodes if n.name in (NORM_SUB_NODE, NORM_MUL_NODE)]
    if len(norm) != 2:
        return
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    front: set[int] = set()
    stack = [nodes.index(n) for n in norm]
    while stack:
        i = stack.pop()
        if i in front:
            continue
        front.add(i)
        stack.extend(producer[name] for name in nodes[i].input if name in producer)
    ordered = [n for i, n in enumerate(nodes) if i in front]
    ordered += [n for i, n in enumerate(nodes) if i not in front]
    del graph.node[:]
    graph.node.extend(ordered)


def set_metadata(model_proto: Any, entries: dict[str, Any]) -> None:
    """Write ``facekd.*`` metadata_props (strings; dicts become JSON)."""
    keep = [p for p in model_proto.metadata_props if p.key not in entries]
    del model_proto.metadata_props[:]
    for prop in keep:
        model_proto.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in entries.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        model_proto.metadata_props.add(key=key, value=text)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict (without loading the weights)."""
    import onnx

    model_proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model_proto.metadata_props}


def base_metadata(student: Any, normalize_inside: bool, variant: str) -> dict:
    """The metadata every facekd ONNX file carries (``student``: an ``ExportedStudent``)."""
    from facekd import __version__

    return {
        "facekd.version": __version__,
        "facekd.variant": variant,
        "facekd.arch": student.arch,
        "facekd.arch_kwargs": student.arch_kwargs,
        "facekd.embedding_size": str(student.embedding_size),
        NORMALIZATION_KEY: "inside" if normalize_inside else "outside",
        "facekd.input_format": ("float32 NCHW RGB in [0, 255]; (x - 127.5) / 127.5 in graph"
                                if normalize_inside else
                                "float32 NCHW RGB, (x - 127.5) / 127.5 applied by the caller"),
        "facekd.checkpoint_sha256": student.source.checkpoint_sha256,
    }



def variant_path(out: str | Path, variant: str) -> Path:
    """``student.onnx`` -> ``student.fp16.onnx`` / ``student.int8.onnx``."""
    out = Path(out)
    return out if variant == "fp32" else out.with_name(f"{out.stem}.{variant}.onnx")
