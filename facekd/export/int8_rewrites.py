"""INT8 graph rewrites: exact FP32 rewrites before calibration, one INT8 one after."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

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
    graph = model_proto.graph
    producer, consumers = _graph_index(graph)
    inits = _Initializers(graph, consumers)
    replaced = 0
    for grouped in [n for n in graph.node if n.op_type == "Conv"]:
        chain = _grouped_chain(grouped, producer, consumers, inits, max_per_group)
        if chain is None:
            continue
        source, prelu = chain.source, chain.prelu
        new_nodes = _rotated_source_nodes(chain, inits) + _depthwise_sum_nodes(chain, inits)
        position = list(graph.node).index(source)
        for node in (source, prelu, grouped):
            graph.node.remove(node)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(position + offset, node)
        replaced += 1
    return replaced


class _GroupedChain(NamedTuple):
    """A Conv -> PRelu -> grouped Conv chain that :func:`split_grouped_convs` rewrites."""

    source: Any
    prelu: Any
    grouped: Any
    kernel: np.ndarray
    slope: np.ndarray
    per_group: int
    channels: int
    tag: str

    @property
    def orders(self) -> list[np.ndarray]:
        """Per rotation s, the source channel each output channel reads."""
        local = np.arange(self.channels) % self.per_group
        return [np.arange(self.channels) - local + (local + shift) % self.per_group
                for shift in range(self.per_group)]


def _grouped_chain(grouped: Any, producer: dict[str, Any], consumers: dict[str, list[Any]],
                   inits: _Initializers, max_per_group: int) -> _GroupedChain | None:
    """The chain ending in ``grouped`` when it can be rewritten exactly, else None."""
    groups = int(_node_attr(grouped, "group", 1))
    kernel = inits.array(grouped.input[1])
    if groups == 1 or kernel is None:
        return None
    per_group = kernel.shape[1]
    channels = per_group * groups
    if not 1 < per_group <= max_per_group or kernel.shape[0] != channels:
        return None
    prelu = producer.get(grouped.input[0])
    if prelu is None or prelu.op_type != "PRelu" or len(consumers[prelu.output[0]]) != 1:
        return None
    source = producer.get(prelu.input[0])
    if source is None or source.op_type != "Conv" or len(consumers[source.output[0]]) != 1:
        return None
    src_weight = inits.array(source.input[1])
    slope = _channel_slopes(inits, prelu.input[1], channels)
    if src_weight is None or slope is None or src_weight.shape[0] != channels:
        return None
    return _GroupedChain(source, prelu, grouped, kernel, slope, per_group, channels,
                         grouped.name or grouped.output[0])


def _rotated_source_nodes(chain: _GroupedChain, inits: _Initializers) -> list[Any]:
    """The source Conv computing all k rotations of its channels at once, then Split."""
    from onnx import helper

    source, tag = chain.source, chain.tag
    src_weight = inits.array(source.input[1])
    src_bias = inits.array(source.input[2]) if len(source.input) > 2 and source.input[2] \
        else None
    src_inputs = [source.input[0], inits.add(
        f"{tag}_facekd_src_w", np.concatenate([src_weight[o] for o in chain.orders]))]
    if src_bias is not None:
        src_inputs.append(inits.add(f"{tag}_facekd_src_b",
                                    np.concatenate([src_bias[o] for o in chain.orders])))
    merged = f"{tag}_facekd_rotations"
    parts = [f"{tag}_facekd_rot{shift}_pre" for shift in range(chain.per_group)]
    return [
        helper.make_node("Conv", src_inputs, [merged], name=f"{tag}_facekd_src",
                         **{a.name: helper.get_attribute_value(a) for a in source.attribute}),
        helper.make_node("Split", [merged, inits.add(
            f"{tag}_facekd_split", np.full(chain.per_group, chain.channels, np.int64))], parts,
            axis=1, name=f"{tag}_facekd_split")]


def _depthwise_sum_nodes(chain: _GroupedChain, inits: _Initializers) -> list[Any]:
    """Per rotation a PRelu and a depthwise Conv; the partial outputs summed into the
    grouped Conv's output."""
    from onnx import helper

    grouped, kernel, tag, channels = chain.grouped, chain.kernel, chain.tag, chain.channels
    bias = inits.array(grouped.input[2]) if len(grouped.input) > 2 and grouped.input[2] \
        else None
    local = np.arange(channels) % chain.per_group
    conv_attrs = {a.name: helper.get_attribute_value(a) for a in grouped.attribute
                  if a.name not in ("group", "kernel_shape")}
    nodes, partials = [], []
    for shift, order in enumerate(chain.orders):
        rotated = f"{tag}_facekd_rot{shift}"
        taps = kernel[np.arange(channels), (local + shift) % chain.per_group][:, None]
        dw_inputs = [rotated, inits.add(f"{tag}_facekd_dw_w{shift}",
                                        np.ascontiguousarray(taps.astype(np.float32)))]
        if shift == 0 and bias is not None:
            dw_inputs.append(inits.add(f"{tag}_facekd_dw_b", bias.astype(np.float32)))
        partials.append(f"{tag}_facekd_part{shift}")
        nodes += [
            helper.make_node("PRelu", [f"{tag}_facekd_rot{shift}_pre", inits.add(
                f"{tag}_facekd_slope{shift}", chain.slope[order].reshape(-1, 1, 1))],
                [rotated], name=f"{tag}_facekd_prelu{shift}"),
            helper.make_node("Conv", dw_inputs, [partials[-1]], name=f"{tag}_facekd_dw{shift}",
                             group=channels, kernel_shape=list(kernel.shape[2:]),
                             **conv_attrs)]
    total = partials[0]
    for shift, partial in enumerate(partials[1:], start=1):
        out = grouped.output[0] if shift == chain.per_group - 1 else f"{tag}_facekd_sum{shift}"
        nodes.append(helper.make_node("Add", [total, partial], [out],
                                      name=f"{tag}_facekd_add{shift}"))
        total = out
    return nodes


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
