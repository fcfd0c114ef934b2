"""NCNN files of a student (pnnx: ``.param`` + ``.bin``), run in the ``ncnn`` package.

pnnx converts the TorchScript trace of the backbone to NCNN (BatchNorms folded, the
embedding BatchNorm folded into the InnerProduct). FP16 is pnnx's FP16 weight storage,
run with NCNN's FP16 storage/arithmetic on; FP32 files are checked with every FP16 option
off, so the gate sees the file's own numbers (NCNN turns FP16 arithmetic on by default on
ARM: the card records the options).

INT8 is NCNN's own scheme (what ``ncnn2table`` + ``ncnn2int8`` produce, which the pip
wheels do not ship): per-output-channel int8 weights and one int8 scale per layer input
for every Convolution, ConvolutionDepthWise and InnerProduct, from the max |activation|
on the calibration images (the ONNX INT8's MinMax); the layers dequantise to float,
so PReLU, Add and the rest stay float.
"""

from __future__ import annotations

import contextlib
import struct
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facekd.data.pixels import GRAPH_MEAN, GRAPH_RECIPROCAL, to_raw_pixels
from facekd.errors import FacekdError

INT8_TAG = 0x000D4B38
FP16_TAG = 0x01306B47
QUANTISED_LAYERS = ("Convolution", "ConvolutionDepthWise", "InnerProduct")
# Layers without weights in the .bin (what pnnx emits for CNN students and a few more).
WEIGHTLESS = {"Input", "Split", "BinaryOp", "Reshape", "Flatten", "ReLU", "Sigmoid",
              "Pooling", "Concat", "Eltwise", "Noop", "Permute", "Slice", "Crop", "UnaryOp",
              "Softmax", "Dropout", "Swish", "HardSwish", "HardSigmoid", "Clip", "Squeeze",
              "ExpandDims", "Reduction"}


def pnnx_convert(model: Any, out_param: Path, out_bin: Path, *, fp16: bool,
                 normalize_inside: bool) -> None:
    """torch module -> NCNN .param/.bin through the pnnx binary (its chatter captured)."""
    import pnnx
    import torch

    module = _with_input_scaling(model) if normalize_inside else model
    module.eval()
    sample = torch.zeros(1, 3, 112, 112)
    with tempfile.TemporaryDirectory(prefix="facekd-pnnx-") as work:
        pt = Path(work) / "student.pt"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.jit.trace(module, sample, check_trace=False).save(str(pt))
        stem = Path(work) / "student"
        command = [pnnx.EXEC_PATH, str(pt), "inputshape=[1,3,112,112]f32", "device=cpu",
                   "optlevel=2", f"ncnnparam={out_param}", f"ncnnbin={out_bin}",
                   f"pnnxparam={stem}.pnnx.param", f"pnnxbin={stem}.pnnx.bin",
                   f"pnnxpy={stem}_pnnx.py", f"pnnxonnx={stem}.pnnx.onnx",
                   f"ncnnpy={stem}_ncnn.py", f"fp16={int(fp16)}"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=work, check=False)
    if done.returncode != 0 or not out_param.is_file() or not out_bin.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise FacekdError(f"{out_param}: pnnx could not convert the student: "
                          f"{tail[-1] if tail else f'exit {done.returncode}'}")


def _with_input_scaling(model: Any) -> Any:
    """``(x - 127.5) / 127.5`` + backbone as one torch module (raw 0..255 input)."""
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner((x - GRAPH_MEAN) * GRAPH_RECIPROCAL)

    return Scaled(model)


# ----------------------------------------------------------------------------- running

@dataclass
class NcnnOptions:
    """The ncnn.Option fields a file is run with (recorded in the card)."""

    fp16: bool = False
    int8: bool = False
    threads: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {"use_fp16_storage": self.fp16, "use_fp16_packed": self.fp16,
                "use_fp16_arithmetic": self.fp16, "use_bf16_storage": False,
                "use_int8_inference": self.int8, "num_threads": self.threads,
                "use_vulkan_compute": False}


def load_net(param: Path, weights: Path, options: NcnnOptions) -> Any:
    """An ``ncnn.Net`` with ``options`` (FP16/BF16 off for FP32 files)."""
    import ncnn

    net = ncnn.Net()
    for key, value in options.as_dict().items():
        setattr(net.opt, key, value)
    if net.load_param(str(param)) != 0:
        raise FacekdError(f"{param}: ncnn cannot parse the .param file")
    if net.load_model(str(weights)) != 0:
        raise FacekdError(f"{weights}: ncnn cannot load the weights")
    return net


class NcnnEmbedder:
    """[-1, 1] NCHW float batch -> embeddings from an NCNN file, one image at a time."""

    def __init__(self, param: Path, weights: Path, *, normalize_inside: bool,
                 options: NcnnOptions) -> None:
        import hashlib

        from facekd.fileio import sha256_file

        self.name = Path(param).name
        # One identity for the pair (the evaluation records it as the model's hash).
        self.sha256 = hashlib.sha256(
            f"{sha256_file(param)}:{sha256_file(weights)}".encode()).hexdigest()
        self.normalize_inside = normalize_inside
        self.options = options
        self.net = load_net(param, weights, options)
        self.input_name = self.net.input_names()[0]
        self.output_name = self.net.output_names()[0]

    def run_one(self, chw: np.ndarray) -> np.ndarray:
        """One CHW float32 image as the file expects it -> its embedding."""
        image = _mat(chw)
        with self.net.create_extractor() as ex:
            ex.input(self.input_name, image)
            ret, out = ex.extract(self.output_name)
            if ret != 0:
                raise FacekdError(f"{self.name}: ncnn failed to run the file (code {ret})")
            return np.array(out, np.float32).reshape(-1)  # a copy, made while out is alive

    def __call__(self, batch: Any) -> np.ndarray:
        x = batch.detach().cpu().numpy() if hasattr(batch, "detach") else np.asarray(batch)
        x = x.astype(np.float32, copy=False)
        if self.normalize_inside:
            x = to_raw_pixels(x)
        return np.stack([self.run_one(img) for img in x])


def _mat(chw: np.ndarray) -> Any:
    """An ncnn.Mat owning a copy of ``chw``: ``ncnn.Mat(array)`` only borrows the numpy
    buffer, which a temporary array frees before the extractor reads it."""
    import ncnn

    array = np.ascontiguousarray(chw, np.float32)  # alive until clone() has copied it
    return ncnn.Mat(array).clone()


# ----------------------------------------------------------------------------- INT8

@dataclass
class _Layer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, str]
    blobs: list[tuple[str, Any]] = field(default_factory=list)  # (kind, value) in .bin order

    def param(self, key: int, default: int = 0) -> int:
        return int(self.params.get(key, default))

    def line(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        return (f"{self.type:<24} {self.name:<24} {len(self.bottoms)} {len(self.tops)} "
                f"{' '.join(self.bottoms + self.tops)} {params}").rstrip()


def read_param(path: Path) -> tuple[list[_Layer], int]:
    """Layers of an NCNN text .param (and its blob count)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if not lines or lines[0].strip() != "7767517":
        raise FacekdError(f"{path}: not an NCNN text .param (magic 7767517)")
    _, blob_count = (int(v) for v in lines[1].split())
    layers = []
    for text in lines[2:]:
        parts = text.split()
        if not parts:
            continue
        kind, name, nb, nt = parts[0], parts[1], int(parts[2]), int(parts[3])
        bottoms, tops = parts[4:4 + nb], parts[4 + nb:4 + nb + nt]
        params = {}
        for item in parts[4 + nb + nt:]:
            key, value = item.split("=", 1)
            params[int(key)] = value
        layers.append(_Layer(kind, name, bottoms, tops, params))
    return layers, blob_count


def write_param(path: Path, layers: list[_Layer], blob_count: int) -> None:
    """The text ``.param`` of ``layers``, as :func:`read_param` reads it."""
    text = ["7767517", f"{len(layers)} {blob_count}", *(layer.line() for layer in layers), ""]
    path.write_text("\n".join(text), encoding="utf-8")


def _weight_blob(data: memoryview, pos: int, count: int, where: str) -> tuple[np.ndarray, int]:
    """One tagged weight blob (NCNN ModelBin type 0): float32, or FP16 after its tag."""
    (tag,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if tag == 0:
        arr = np.frombuffer(data, np.float32, count, pos).copy()
        return arr, pos + 4 * count
    if tag == FP16_TAG:
        arr = np.frombuffer(data, np.float16, count, pos).astype(np.float32)
        return arr, pos + ((2 * count + 3) // 4) * 4
    raise FacekdError(f"{where}: weight tag {tag:#x} (already quantised?) is not supported")


def _raw(data: memoryview, pos: int, count: int) -> tuple[np.ndarray, int]:
    return np.frombuffer(data, np.float32, count, pos).copy(), pos + 4 * count


def read_weights(layers: list[_Layer], path: Path) -> None:
    """Fill each layer's ``blobs`` from the .bin, in the order NCNN's load_model reads."""
    data = memoryview(path.read_bytes())
    pos = 0
    for layer in layers:
        where = f"{path} layer {layer.name}"
        if layer.type in QUANTISED_LAYERS:
            if layer.param(8) != 0:
                raise FacekdError(f"{where}: already INT8")
            count = layer.param(2 if layer.type == "InnerProduct" else 6)
            bias = layer.param(1 if layer.type == "InnerProduct" else 5)
            weight, pos = _weight_blob(data, pos, count, where)
            layer.blobs = [("weight", weight)]
            if bias:
                value, pos = _raw(data, pos, layer.param(0))
                layer.blobs.append(("raw", value))
        elif layer.type == "PReLU":
            value, pos = _raw(data, pos, layer.param(0, 1))
            layer.blobs = [("raw", value)]
        elif layer.type == "BatchNorm":
            value, pos = _raw(data, pos, 4 * layer.param(0))
            layer.blobs = [("raw", value)]
        elif layer.type not in WEIGHTLESS:
            raise FacekdError(f"{where}: layer type {layer.type} is not supported by facekd's "
                              f"NCNN INT8 conversion")
    if pos != len(data):
        raise FacekdError(f"{path}: {len(data) - pos} bytes left after the last layer's "
                          f"weights; .param and .bin do not match")


def calibrate(param: Path, weights: Path, layers: list[_Layer], images: np.ndarray
              ) -> dict[str, float]:
    """max |x| of every quantised layer's input blob over ``images`` (CHW float32)."""
    net = load_net(param, weights, NcnnOptions())
    net.opt.lightmode = False
    wanted = sorted({layer.bottoms[0] for layer in layers if layer.type in QUANTISED_LAYERS})
    peaks = dict.fromkeys(wanted, 0.0)
    for img in images:
        image = _mat(img)
        with net.create_extractor() as ex:
            ex.input(net.input_names()[0], image)
            for blob in wanted:
                ret, out = ex.extract(blob)
                if ret != 0:
                    raise FacekdError(f"{param}: ncnn cannot compute blob {blob}")
                peaks[blob] = max(peaks[blob], float(np.abs(np.array(out)).max()))
    return peaks


def _int8(values: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group (rows of ``values`` reshaped to ``groups``): q, scales."""
    rows = values.reshape(groups, -1)
    peak = np.abs(rows).max(axis=1)
    scales = np.where(peak > 0, 127.0 / np.maximum(peak, 1e-30), 1.0).astype(np.float32)
    q = np.clip(np.round(rows * scales[:, None]), -127, 127).astype(np.int8)
    return q.reshape(-1), scales


def quantize_int8(param: Path, weights: Path, out_param: Path, out_bin: Path,
                  images: np.ndarray) -> dict[str, Any]:
    """Write the INT8 NCNN pair of an FP32 one; returns the settings for the card."""
    layers, blob_count = read_param(param)
    read_weights(layers, weights)
    peaks = calibrate(param, weights, layers, images)
    chunks: list[bytes] = []
    count = 0
    for layer in layers:
        if layer.type in QUANTISED_LAYERS:
            weight = layer.blobs[0][1]
            groups = layer.param(7, 1) if layer.type == "ConvolutionDepthWise" else \
                layer.param(0)
            q, scales = _int8(weight, groups)
            peak = peaks[layer.bottoms[0]]
            bottom = np.array([127.0 / peak if peak > 0 else 1.0], np.float32)
            # 8=1 for depthwise (one scale per group) and 8=2 for the others, as ncnn2int8.
            layer.params[8] = "1" if layer.type == "ConvolutionDepthWise" else "2"
            body = q.tobytes()
            chunks.append(struct.pack("<I", INT8_TAG) + body + b"\0" * (-len(body) % 4))
            chunks += [v.astype(np.float32).tobytes() for _, v in layer.blobs[1:]]
            chunks += [scales.tobytes(), bottom.tobytes()]
            count += 1
        else:
            chunks += [v.astype(np.float32).tobytes() for _, v in layer.blobs]
    write_param(out_param, layers, blob_count)
    out_bin.write_bytes(b"".join(chunks))
    return {"scheme": "ncnn int8 (ncnn2int8 layout)", "weights": "int8 per output channel",
            "activations": "int8 per layer input, symmetric", "calibration": "MinMax (max |x|)",
            "calibration_images": len(images), "layers_int8": count,
            "layers_float": sorted({layer.type for layer in layers
                                    if layer.blobs and layer.type not in QUANTISED_LAYERS})}


def versions() -> dict[str, str]:
    """Package versions for the card."""
    from importlib.metadata import version

    out = {}
    for name in ("ncnn", "pnnx"):
        with contextlib.suppress(Exception):
            out[name] = version(name)
    return out


class NcnnFormat:
    """The NCNN backend of :func:`facekd.export.edge.export_edge` (``.param`` + ``.bin``)."""

    name = "ncnn"
    suffix = ".param"
    packages = ("ncnn", "pnnx")

    def files(self, main: Path) -> list[Path]:
        return [main, main.with_suffix(".bin")]

    def write(self, student: Any, variant: str, files: list[Path], *, normalize_inside: bool,
              calib: np.ndarray | None, fp32_files: list[Path]) -> dict[str, Any]:
        param, weights = files
        if variant in ("fp32", "fp16"):
            pnnx_convert(student.model, param, weights, fp16=variant == "fp16",
                         normalize_inside=normalize_inside)
            return {"converter": "pnnx (TorchScript trace)",
                    "weights": "float16" if variant == "fp16" else "float32",
                    "runtime_options": self.options(variant).as_dict()}
        if variant == "int8":
            if calib is None:
                raise FacekdError("--int8 needs calibration images (--calib-data)")
            images = to_raw_pixels(calib) if normalize_inside else calib
            settings = quantize_int8(fp32_files[0], fp32_files[1], param, weights,
                                     images.astype(np.float32))
            settings["runtime_options"] = self.options(variant).as_dict()
            return settings
        raise FacekdError(f"unknown variant '{variant}' (fp32, fp16 or int8)")

    @staticmethod
    def options(variant: str, threads: int = 1) -> NcnnOptions:
        """FP16 arithmetic only for the FP16 file; INT8 inference for the INT8 one."""
        return NcnnOptions(fp16=variant == "fp16", int8=variant == "int8", threads=threads)

    def embedder(self, files: list[Path], variant: str, *, normalize_inside: bool,
                 threads: int = 1) -> NcnnEmbedder:
        return NcnnEmbedder(files[0], files[1], normalize_inside=normalize_inside,
                            options=self.options(variant, threads))

    def card_io(self, normalize_inside: bool, embedding_size: int) -> dict[str, Any]:
        return {
            "input": {"name": "in0", "shape": [3, 112, 112], "dtype": "float32",
                      "channels": "RGB", "layout": "CHW (one image per extractor)",
                      "normalization": "inside" if normalize_inside else "outside",
                      "expects": ("raw pixels 0..255; (x - 127.5) / 127.5 is in the graph"
                                  if normalize_inside else
                                  "(x - 127.5) / 127.5 applied by the caller, e.g. "
                                  "Mat.substract_mean_normalize([127.5]*3, [1/127.5]*3)"),
                      "alignment": "5-point ArcFace similarity transform to 112x112"},
            "output": {"name": "out0", "shape": [embedding_size],
                       "note": "not L2-normalised; compare with cosine similarity"},
            "runtime": {"package": "ncnn", "version": versions().get("ncnn"),
                        "converter": f"pnnx {versions().get('pnnx')}",
                        "checked_with": "ncnn.Net on CPU, 1 thread, options per variant "
                                        "(see each variant's runtime_options)"},
        }
