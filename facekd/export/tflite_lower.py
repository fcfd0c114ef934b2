"""Lower a facekd ONNX backbone to a LiteRT (TFLite) flatbuffer, without TensorFlow.

The torch -> TFLite converters on PyPI do not install beside facekd's pinned set
(litert-torch pulls xdsl, which caps typing-extensions below the pinned 4.16; onnx2tf
wants numpy 1.x, onnx 1.19, onnxruntime 1.23 and protobuf 4), so facekd writes the
flatbuffer itself with the schema bindings that ``ai-edge-litert`` ships. The students
are plain CNNs (Conv, depthwise Conv, PRelu, Add, BatchNorm, a Linear embedding), so
the lowering is small; anything else is refused by name, and every file still has to
pass the parity gate in LiteRT's own interpreter.

Layout: NHWC inside (as TFLite kernels want), input ``data`` 1 x 112 x 112 x 3 with a
dynamic batch signature, output ``embedding``. With ``fp16`` every float constant is
stored as FP16 behind a DEQUANTIZE op (LiteRT's "float16 quantisation").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from facekd.data.pixels import GRAPH_OFFSET, GRAPH_RECIPROCAL
from facekd.errors import FacekdError

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"


@dataclass
class _Act:
    """An activation: TFLite tensor index and its logical NCHW shape (batch excluded)."""

    index: int
    shape: tuple[int, ...]
    producer: int | None = None  # index into _Graph.ops of the op that wrote it


class _Graph:
    """Tensors, buffers and operators of one subgraph; constants stay numpy until the end."""

    def __init__(self, fp16: bool) -> None:
        from ai_edge_litert import schema_py_generated as s

        self.s = s
        self.fp16 = fp16
        self.tensors: list[Any] = []
        self.consts: dict[int, np.ndarray] = {}
        self.ops: list[dict[str, Any]] = []
        self.opcodes: dict[int, int] = {}
        self.uses: dict[int, int] = {}

    def tensor(self, name: str, shape: list[int], dtype: int,
               signature: list[int] | None = None) -> int:
        """A new tensor (no data); returns its index."""
        t = self.s.TensorT()
        t.name = name
        t.shape = list(shape)
        if signature is not None:
            t.shapeSignature = list(signature)
        t.type = dtype
        self.tensors.append(t)
        return len(self.tensors) - 1

    def act(self, name: str, nchw: tuple[int, ...]) -> int:
        """A float32 activation tensor, NHWC for 4-D, batch 1 with a dynamic signature."""
        shape = [1, nchw[1], nchw[2], nchw[0]] if len(nchw) == 3 else [1, *nchw]
        return self.tensor(name, shape, self.s.TensorType.FLOAT32, [-1, *shape[1:]])

    def const(self, name: str, value: np.ndarray) -> int:
        """A constant; float ones go FP16 + DEQUANTIZE when the graph is FP16."""
        value = np.ascontiguousarray(value)
        if value.dtype == np.int32:
            index = self.tensor(name, list(value.shape), self.s.TensorType.INT32)
            self.consts[index] = value
            return index
        value = value.astype(np.float32)
        if not self.fp16:
            index = self.tensor(name, list(value.shape), self.s.TensorType.FLOAT32)
            self.consts[index] = value
            return index
        half = self.tensor(f"{name}_fp16", list(value.shape), self.s.TensorType.FLOAT16)
        self.consts[half] = value
        index = self.tensor(name, list(value.shape), self.s.TensorType.FLOAT32)
        self.op(self.s.BuiltinOperator.DEQUANTIZE, [half], [index])
        return index

    def op(self, code: int, inputs: list[int], outputs: list[int], options_type: int = 0,
           options: Any = None) -> int:
        self.opcodes.setdefault(code, len(self.opcodes))
        for i in inputs:
            if i >= 0:
                self.uses[i] = self.uses.get(i, 0) + 1
        self.ops.append({"code": code, "inputs": inputs, "outputs": outputs,
                         "options_type": options_type, "options": options})
        return len(self.ops) - 1

    def finish(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        """Pack the model (constants into buffers; FP16 ones rounded here)."""
        from ai_edge_litert.tools import flatbuffer_utils

        s = self.s
        buffers = [s.BufferT()]
        for index, tensor in enumerate(self.tensors):
            if index in self.consts:
                value = self.consts[index]
                if tensor.type == s.TensorType.FLOAT16:
                    limit = float(np.finfo(np.float16).max)
                    value = np.clip(value, -limit, limit).astype(np.float16)
                buf = s.BufferT()
                buf.data = np.frombuffer(value.tobytes(), np.uint8)
                buffers.append(buf)
                tensor.buffer = len(buffers) - 1
            else:
                tensor.buffer = 0
        codes = []
        for code, _ in sorted(self.opcodes.items(), key=lambda kv: kv[1]):
            oc = s.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = 1
            codes.append(oc)
        ops = []
        for spec in self.ops:
            o = s.OperatorT()
            o.opcodeIndex = self.opcodes[spec["code"]]
            o.inputs = list(spec["inputs"])
            o.outputs = list(spec["outputs"])
            if spec["options"] is not None:
                o.builtinOptionsType = spec["options_type"]
                o.builtinOptions = spec["options"]
            ops.append(o)
        sub = s.SubGraphT()
        sub.tensors, sub.operators = self.tensors, ops
        sub.inputs, sub.outputs = list(inputs), list(outputs)
        sub.name = "main"
        model = s.ModelT()
        model.version = 3
        model.operatorCodes = codes
        model.subgraphs = [sub]
        model.buffers = buffers
        model.description = description
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Lowering:
    """Walks the ONNX graph in order, emitting TFLite ops; constants fold with numpy."""

    def __init__(self, model_proto: Any, fp16: bool, normalize_inside: bool,
                 int8_prelu: bool = False) -> None:
        from onnx import numpy_helper

        self.g = _Graph(fp16)
        self.s = self.g.s
        self.graph = model_proto.graph
        self.values: dict[str, Any] = {
            init.name: numpy_helper.to_array(init) for init in self.graph.initializer}
        self.normalize_inside = normalize_inside
        self.int8_prelu = int8_prelu
        self.readers: dict[str, int] = {o.name: 1 for o in self.graph.output}
        for node in self.graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1

    # ------------------------------------------------------------------ helpers
    def _const(self, name: str) -> np.ndarray | None:
        value = self.values.get(name)
        return value if isinstance(value, np.ndarray) else None

    def _act(self, name: str) -> _Act:
        value = self.values.get(name)
        if not isinstance(value, _Act):
            raise FacekdError(f"TFLite lowering: tensor '{name}' is not an activation")
        return value

    def _emit(self, code: int, inputs: list[int], name: str, shape: tuple[int, ...],
              options_type: int = 0, options: Any = None) -> _Act:
        out = self.g.act(name, shape)
        op = self.g.op(code, inputs, [out], options_type, options)
        return _Act(out, shape, op)

    # ------------------------------------------------------------------ entry
    def run(self, description: str) -> bytes:
        graph_input = self.graph.input[0]
        dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:]
        if dims != [3, 112, 112]:
            raise FacekdError(f"TFLite lowering: input shape {dims}, expected 3x112x112")
        data = self.g.act(INPUT_NAME, (3, 112, 112))
        current = _Act(data, (3, 112, 112))
        if self.normalize_inside:
            scale = self.g.const("facekd_input_scale",
                                 np.array([GRAPH_RECIPROCAL], np.float32))
            shift = self.g.const("facekd_input_shift", np.array([GRAPH_OFFSET], np.float32))
            mid = self._emit(self.s.BuiltinOperator.MUL, [current.index, scale], "data_scaled",
                             current.shape, self.s.BuiltinOptions.MulOptions, self.s.MulOptionsT())
            current = self._emit(self.s.BuiltinOperator.ADD, [mid.index, shift],
                                 "data_normalized", current.shape,
                                 self.s.BuiltinOptions.AddOptions, self.s.AddOptionsT())
        self.values[graph_input.name] = current
        for node in self.graph.node:
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                raise FacekdError(f"TFLite lowering: ONNX op {node.op_type} ({node.name}) is "
                                  f"not supported; export the student to ONNX or NCNN instead")
            handler(node)
        outs = [self._act(o.name) for o in self.graph.output]
        if len(outs) != 1 or len(outs[0].shape) != 1:
            raise FacekdError("TFLite lowering: the backbone must return one N x D embedding")
        self.g.tensors[outs[0].index].name = OUTPUT_NAME
        return self.g.finish([data], [outs[0].index], description)

    # ------------------------------------------------------------------ constant ops
    def _fold(self, node: Any, fn: Any) -> None:
        ins = [self._const(n) for n in node.input]
        if any(v is None for v in ins):
            raise FacekdError(f"TFLite lowering: {node.op_type} ({node.name}) on activations "
                              f"is not supported")
        self.values[node.output[0]] = np.asarray(fn(*ins, **_attrs(node)))

    def _op_Identity(self, node: Any) -> None:
        self.values[node.output[0]] = self.values[node.input[0]]

    def _op_Constant(self, node: Any) -> None:
        from onnx import numpy_helper

        value = _attrs(node).get("value")
        if value is None:
            raise FacekdError(f"TFLite lowering: Constant {node.name} without a tensor value")
        self.values[node.output[0]] = numpy_helper.to_array(value)

    def _op_Shape(self, node: Any) -> None:
        value = self.values[node.input[0]]
        shape = (1, *value.shape) if isinstance(value, _Act) else value.shape
        self.values[node.output[0]] = np.asarray(shape, np.int64)

    def _op_Gather(self, node: Any) -> None:
        self._fold(node, lambda x, i, axis=0: np.take(x, i, axis=axis))

    def _op_Unsqueeze(self, node: Any) -> None:
        self._fold(node, lambda x, axes: np.expand_dims(x, tuple(int(a) for a in axes)))

    def _op_Concat(self, node: Any) -> None:
        self._fold(node, lambda *xs, axis: np.concatenate([np.atleast_1d(x) for x in xs], axis))

    def _op_Cast(self, node: Any) -> None:
        from onnx import helper

        self._fold(node, lambda x, to: x.astype(helper.tensor_dtype_to_np_dtype(to)))

    # ------------------------------------------------------------------ layers
    def _op_Conv(self, node: Any) -> None:
        s = self.s
        x = self._act(node.input[0])
        w = self._const(node.input[1])
        if w is None or len(x.shape) != 3:
            raise FacekdError(f"TFLite lowering: Conv {node.name} needs constant weights and a "
                              f"4-D input")
        bias = (self._const(node.input[2]) if len(node.input) > 2 and node.input[2]
                else np.zeros(w.shape[0], np.float32))
        a = _attrs(node)
        group = int(a.get("group", 1))
        kh, kw = w.shape[2], w.shape[3]
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise FacekdError(f"TFLite lowering: Conv {node.name} uses auto_pad")
        sh, sw = (int(v) for v in a.get("strides", [1, 1]))
        dh, dw = (int(v) for v in a.get("dilations", [1, 1]))
        pt, pl, pb, pr = (int(v) for v in a.get("pads", [0, 0, 0, 0]))
        cin, h, wd = x.shape
        out_c = w.shape[0]
        eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        oh = (h + pt + pb - eh) // sh + 1
        ow = (wd + pl + pr - ew) // sw + 1
        src = x.index
        if (pt, pl, pb, pr) == (0, 0, 0, 0):
            padding = s.Padding.VALID
        elif (sh, sw) == (1, 1) and pt == pb == (eh - 1) // 2 and pl == pr == (ew - 1) // 2 \
                and eh % 2 == 1 and ew % 2 == 1:
            padding = s.Padding.SAME
        else:
            pads = self.g.const(f"{node.name}_pads", np.array(
                [[0, 0], [pt, pb], [pl, pr], [0, 0]], np.int32))
            padded = self._emit(s.BuiltinOperator.PAD, [src, pads], f"{node.name}_padded",
                                (cin, h + pt + pb, wd + pl + pr), s.BuiltinOptions.PadOptions,
                                s.PadOptionsT())
            src, padding = padded.index, s.Padding.VALID
        if group == 1 or group != cin:
            if group != 1 and cin % group:
                raise FacekdError(f"TFLite lowering: Conv {node.name} groups {group} do not "
                                  f"divide {cin} channels")
            weights = self.g.const(f"{node.name}_weights", w.transpose(0, 2, 3, 1))
            opts = s.Conv2DOptionsT()
            opts.padding, opts.strideH, opts.strideW = padding, sh, sw
            opts.dilationHFactor, opts.dilationWFactor = dh, dw
            code, otype = s.BuiltinOperator.CONV_2D, s.BuiltinOptions.Conv2DOptions
        else:
            weights = self.g.const(f"{node.name}_weights", w.transpose(1, 2, 3, 0))
            opts = s.DepthwiseConv2DOptionsT()
            opts.padding, opts.strideH, opts.strideW = padding, sh, sw
            opts.dilationHFactor, opts.dilationWFactor = dh, dw
            opts.depthMultiplier = out_c // cin
            code, otype = (s.BuiltinOperator.DEPTHWISE_CONV_2D,
                           s.BuiltinOptions.DepthwiseConv2DOptions)
        b = self.g.const(f"{node.name}_bias", bias)
        self.values[node.output[0]] = self._emit(code, [src, weights, b], node.output[0],
                                                 (out_c, oh, ow), otype, opts)

    def _op_PRelu(self, node: Any) -> None:
        x = self._act(node.input[0])
        slope = self._const(node.input[1])
        if slope is None:
            raise FacekdError(f"TFLite lowering: PRelu {node.name} needs constant slopes")
        channels = x.shape[0]
        flat = np.asarray(slope, np.float32).reshape(-1)
        if flat.size == 1:
            flat = np.full(channels, flat[0], np.float32)
        if flat.size != channels:
            raise FacekdError(f"TFLite lowering: PRelu {node.name} slope shape {slope.shape}")
        if self.int8_prelu and len(x.shape) == 3:
            self.values[node.output[0]] = self._prelu_as_convs(node, x, flat)
            return
        alpha_shape = (1, 1, channels) if len(x.shape) == 3 else (channels,)
        alpha = self.g.const(f"{node.name}_alpha", flat.reshape(alpha_shape))
        self.values[node.output[0]] = self._emit(self.s.BuiltinOperator.PRELU,
                                                 [x.index, alpha], node.output[0], x.shape)

    def _prelu_as_convs(self, node: Any, x: _Act, a: np.ndarray) -> _Act:
        """PReLU from ops XNNPACK runs in INT8 (it has no INT8 PRELU, MAXIMUM or RELU).

        Each PRELU op would split the INT8 graph into a reference kernel between two
        delegate partitions (mbf: 1.8x the FP32 file here). With every slope <= 1,
        prelu_a(x) = x + relu((a - 1) x): one 1x1 depthwise conv (per-channel int8 scales
        carry each slope; relu fused) and an ADD, two passes over the tensor.
        :func:`onnx_to_tflite` folds slopes > 1 away first where it can; a PReLU that
        keeps some is a * x + (1 - a) * relu(x), with a sign conv for the channels with
        a > 1 (relu(|1 - a| x) = |1 - a| relu(x)): three or four passes. Exact in float.
        """
        s = self.s
        name = node.output[0]
        if (a <= 1.0).all():
            negative = self._depthwise_1x1(x, (a - 1.0).astype(np.float32),
                                           f"{name}_negative_part",
                                           s.ActivationFunctionType.RELU)
            return self._emit(s.BuiltinOperator.ADD, [x.index, negative.index], name,
                              x.shape, s.BuiltinOptions.AddOptions, s.AddOptionsT())
        plus = np.abs(1.0 - a).astype(np.float32)
        relu = self._depthwise_1x1(x, plus, f"{name}_relu_part", s.ActivationFunctionType.RELU)
        relu = self._depthwise_1x1(relu, np.where(a > 1.0, -1.0, 1.0).astype(np.float32),
                                   f"{name}_relu_sign")
        linear = self._depthwise_1x1(x, a, f"{name}_linear_part")
        return self._emit(s.BuiltinOperator.ADD, [linear.index, relu.index], name, x.shape,
                          s.BuiltinOptions.AddOptions, s.AddOptionsT())

    def _depthwise_1x1(self, x: _Act, weights: np.ndarray, name: str,
                       activation: int = 0) -> _Act:
        s = self.s
        opts = s.DepthwiseConv2DOptionsT()
        opts.padding, opts.strideH, opts.strideW = s.Padding.VALID, 1, 1
        opts.depthMultiplier = 1
        opts.fusedActivationFunction = activation
        w = self.g.const(f"{name}_weights", weights.reshape(1, 1, 1, -1))
        b = self.g.const(f"{name}_bias", np.zeros(weights.size, np.float32))
        return self._emit(s.BuiltinOperator.DEPTHWISE_CONV_2D, [x.index, w, b], name, x.shape,
                          s.BuiltinOptions.DepthwiseConv2DOptions, opts)

    def _op_Relu(self, node: Any) -> None:
        x = self._act(node.input[0])
        self.values[node.output[0]] = self._emit(self.s.BuiltinOperator.RELU, [x.index],
                                                 node.output[0], x.shape)

    def _op_Add(self, node: Any) -> None:
        s = self.s
        a, b = (self.values[n] for n in node.input)
        if isinstance(a, _Act) and isinstance(b, _Act):
            if a.shape != b.shape:
                raise FacekdError(f"TFLite lowering: Add {node.name} of shapes {a.shape} and "
                                  f"{b.shape} (broadcast) is not supported")
            self.values[node.output[0]] = self._emit(
                s.BuiltinOperator.ADD, [a.index, b.index], node.output[0], a.shape,
                s.BuiltinOptions.AddOptions, s.AddOptionsT())
            return
        act, const = (a, b) if isinstance(a, _Act) else (b, a)
        if not isinstance(act, _Act):
            self._fold(node, lambda x, y: x + y)
            return
        self.values[node.output[0]] = self._affine(node, node.input[0 if act is a else 1],
                                                   act, None, np.asarray(const))

    def _op_BatchNormalization(self, node: Any) -> None:
        x = self._act(node.input[0])
        gamma, beta, mean, var = (self._const(n) for n in node.input[1:5])
        eps = float(_attrs(node).get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        self.values[node.output[0]] = self._affine(node, node.input[0], x, scale,
                                                   beta - mean * scale)

    def _affine(self, node: Any, source: str, x: _Act, scale: np.ndarray | None,
                shift: np.ndarray) -> _Act:
        """x * scale + shift per channel: folded into the producing Conv/FC when it is the
        only reader, else MUL/ADD ops."""
        s = self.s
        channels = x.shape[0]
        shift = np.broadcast_to(np.asarray(shift, np.float32).reshape(-1), (channels,))
        scale_v = (None if scale is None else
                   np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (channels,)))
        if x.producer is not None and self.readers.get(source, 0) == 1:
            spec = self.g.ops[x.producer]
            if spec["code"] in (s.BuiltinOperator.CONV_2D, s.BuiltinOperator.DEPTHWISE_CONV_2D,
                                s.BuiltinOperator.FULLY_CONNECTED) and self._foldable(spec):
                w_index, b_index = spec["inputs"][1], spec["inputs"][2]
                w, b = self._raw(w_index), self._raw(b_index)
                if scale_v is not None:
                    axis = 3 if spec["code"] == s.BuiltinOperator.DEPTHWISE_CONV_2D else 0
                    shape = [1] * w.ndim
                    shape[axis] = channels
                    self._set_raw(w_index, w * scale_v.reshape(shape))
                    b = b * scale_v
                self._set_raw(b_index, b + shift)
                return x
        bshape = (1, 1, channels) if len(x.shape) == 3 else (channels,)
        current = x
        if scale_v is not None:
            m = self.g.const(f"{node.name}_scale", scale_v.reshape(bshape))
            current = self._emit(s.BuiltinOperator.MUL, [current.index, m],
                                 f"{node.output[0]}_scaled", x.shape,
                                 s.BuiltinOptions.MulOptions, s.MulOptionsT())
        add = self.g.const(f"{node.name}_shift", shift.reshape(bshape))
        return self._emit(s.BuiltinOperator.ADD, [current.index, add], node.output[0], x.shape,
                          s.BuiltinOptions.AddOptions, s.AddOptionsT())

    def _foldable(self, spec: dict[str, Any]) -> bool:
        """Weights and bias are private constants (possibly behind one DEQUANTIZE)."""
        return all(self._raw_index(i) is not None for i in spec["inputs"][1:3])

    def _raw_index(self, index: int) -> int | None:
        if index in self.g.consts:
            return index
        for spec in self.g.ops:
            if spec["outputs"] == [index] and spec["code"] == self.s.BuiltinOperator.DEQUANTIZE:
                return spec["inputs"][0] if spec["inputs"][0] in self.g.consts else None
        return None

    def _raw(self, index: int) -> np.ndarray:
        return self.g.consts[self._raw_index(index)]

    def _set_raw(self, index: int, value: np.ndarray) -> None:
        self.g.consts[self._raw_index(index)] = np.asarray(value, np.float32)

    def _flatten(self, node: Any, x: _Act) -> _Act:
        s = self.s
        src = x.index
        if len(x.shape) == 3 and x.shape[1] * x.shape[2] > 1:
            # NHWC -> NCHW first so the flattened order is torch's (C, H, W).
            perm = self.g.const(f"{node.name}_perm", np.array([0, 3, 1, 2], np.int32))
            moved = self.g.tensor(f"{node.name}_nchw", [1, *x.shape], s.TensorType.FLOAT32,
                                   [-1, *x.shape])
            self.g.op(s.BuiltinOperator.TRANSPOSE, [src, perm], [moved],
                      s.BuiltinOptions.TransposeOptions, s.TransposeOptionsT())
            src = moved
        size = int(np.prod(x.shape))
        target = self.g.const(f"{node.name}_shape", np.array([-1, size], np.int32))
        opts = s.ReshapeOptionsT()
        opts.newShape = [-1, size]
        return self._emit(s.BuiltinOperator.RESHAPE, [src, target], node.output[0], (size,),
                          s.BuiltinOptions.ReshapeOptions, opts)

    def _op_Reshape(self, node: Any) -> None:
        x = self.values[node.input[0]]
        target = self._const(node.input[1])
        if not isinstance(x, _Act):
            self._fold(node, lambda v, t: v.reshape(t))
            return
        size = int(np.prod(x.shape))
        if target is None or target.size != 2 or int(target[-1]) not in (-1, size):
            raise FacekdError(f"TFLite lowering: Reshape {node.name} other than a flatten is "
                              f"not supported")
        self.values[node.output[0]] = self._flatten(node, x)

    def _op_Flatten(self, node: Any) -> None:
        if int(_attrs(node).get("axis", 1)) != 1:
            raise FacekdError(f"TFLite lowering: Flatten {node.name} with axis != 1")
        self.values[node.output[0]] = self._flatten(node, self._act(node.input[0]))

    def _fc(self, node: Any, x: _Act, weight_out_in: np.ndarray, bias: np.ndarray) -> None:
        s = self.s
        if len(x.shape) != 1 or weight_out_in.shape[1] != x.shape[0]:
            raise FacekdError(f"TFLite lowering: {node.op_type} {node.name} input {x.shape} "
                              f"does not match weights {weight_out_in.shape}")
        w = self.g.const(f"{node.name}_weights", weight_out_in)
        b = self.g.const(f"{node.name}_bias", bias)
        self.values[node.output[0]] = self._emit(
            s.BuiltinOperator.FULLY_CONNECTED, [x.index, w, b], node.output[0],
            (weight_out_in.shape[0],), s.BuiltinOptions.FullyConnectedOptions,
            s.FullyConnectedOptionsT())

    def _op_MatMul(self, node: Any) -> None:
        x = self._act(node.input[0])
        w = self._const(node.input[1])
        if w is None or w.ndim != 2:
            raise FacekdError(f"TFLite lowering: MatMul {node.name} needs 2-D constant weights")
        self._fc(node, x, np.asarray(w, np.float32).T, np.zeros(w.shape[1], np.float32))

    def _op_Gemm(self, node: Any) -> None:
        a = _attrs(node)
        x = self._act(node.input[0])
        w = self._const(node.input[1])
        if w is None or a.get("transA", 0):
            raise FacekdError(f"TFLite lowering: Gemm {node.name} form is not supported")
        w = np.asarray(w, np.float32) * float(a.get("alpha", 1.0))
        w = w if a.get("transB", 0) else w.T
        bias = (self._const(node.input[2]) if len(node.input) > 2 and node.input[2]
                else np.zeros(w.shape[0], np.float32))
        self._fc(node, x, w, np.asarray(bias, np.float32) * float(a.get("beta", 1.0)))


def onnx_to_tflite(model_proto: Any, *, fp16: bool = False, normalize_inside: bool = False,
                   int8_prelu: bool = False,
                   description: str = "facekd face embedder") -> bytes:
    """The TFLite flatbuffer (FP32, or FP16 weights) of a facekd ONNX backbone.

    ``int8_prelu`` gives the float graph the INT8 quantiser starts from: PReLU slopes
    > 1 folded into the neighbouring convs (exact; on a copy of ``model_proto``), then
    each PRelu written as depthwise convs and an ADD (:meth:`_Lowering._prelu_as_convs`).
    """
    if int8_prelu:
        import onnx

        from facekd.export.int8_rewrites import fold_prelu_slopes_above_one

        folded = onnx.ModelProto()
        folded.CopyFrom(model_proto)
        fold_prelu_slopes_above_one(folded)
        model_proto = folded
    return _Lowering(model_proto, fp16, normalize_inside, int8_prelu).run(description)
