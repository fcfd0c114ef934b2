"""LiteRT (TFLite) files of a student, run in ``ai-edge-litert``'s interpreter.

FP32 and FP16 come from :mod:`facekd.export.tflite_lower` (the student's ONNX trace
lowered to a flatbuffer; FP16 = FP16 weights behind DEQUANTIZE). INT8 is LiteRT's own
post-training full-integer quantiser (the calibration wrapper in ``ai-edge-litert``,
the same code TensorFlow's converter runs): int8 per-channel weights, int8 activations
from MinMax ranges on the calibration images, float32 input and output kept.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from facekd.data.pixels import to_raw_pixels
from facekd.errors import FacekdError
from facekd.fileio import sha256_file


class TfliteFormat:
    """The LiteRT backend of :func:`facekd.export.edge.export_edge`."""

    name = "tflite"
    suffix = ".tflite"
    packages = ("ai_edge_litert",)

    def __init__(self, *, simplify: bool = False, opset: int = 17) -> None:
        self.simplify = simplify
        self.opset = opset
        self._onnx: Any = None

    def files(self, main: Path) -> list[Path]:
        return [main]

    def _onnx_graph(self, student: Any) -> Any:
        """The student's ONNX trace (once per export), the lowering's input."""
        if self._onnx is None:
            import onnx

            from facekd.export.onnx_export import simplify_model, trace_to_onnx

            if self.opset < 17:
                raise FacekdError(f"opset {self.opset} is too old; facekd exports opset >= 17")
            with tempfile.TemporaryDirectory(prefix="facekd-tflite-") as work:
                path = Path(work) / "student.onnx"
                trace_to_onnx(student.model, path, self.opset)
                self._onnx = onnx.load(str(path))
            if self.simplify:
                self._onnx = simplify_model(self._onnx)
        return self._onnx

    def write(self, student: Any, variant: str, files: list[Path], *, normalize_inside: bool,
              calib: np.ndarray | None, fp32_files: list[Path]) -> dict[str, Any]:
        from facekd.export.tflite_lower import onnx_to_tflite

        description = (f"facekd {student.arch} face embedder ({variant}): input 'data' "
                       f"Nx112x112x3 RGB, output 'embedding' ({student.embedding_size}-d)")
        if variant in ("fp32", "fp16"):
            data = onnx_to_tflite(self._onnx_graph(student), fp16=variant == "fp16",
                                  normalize_inside=normalize_inside, description=description)
            settings = {"converter": "facekd tflite_lower (ONNX trace -> flatbuffer)",
                        "weights": "float16 + DEQUANTIZE" if variant == "fp16" else "float32",
                        "opset": self.opset, "simplified": self.simplify}
        elif variant == "int8":
            if calib is None:
                raise FacekdError("--int8 needs calibration images (--calib-data)")
            # The FP32 file's graph with PRelu as a depthwise conv + ADD (exact), so that
            # XNNPACK runs the whole INT8 graph; the FP32 file keeps PRELU (one pass in float).
            float_graph = onnx_to_tflite(self._onnx_graph(student), int8_prelu=True,
                                         normalize_inside=normalize_inside,
                                         description=description)
            data = quantize_int8(float_graph, calib, normalize_inside=normalize_inside)
            settings = {"quantizer": "LiteRT post-training full-integer (calibration wrapper)",
                        "prelu": "slopes > 1 folded into the convs, then x + relu((a - 1) x) "
                                 "as a 1x1 depthwise conv + ADD",
                        "weights": "int8 per-channel", "activations": "int8",
                        "bias": "int32", "calibration": "MinMax",
                        "calibration_images": len(calib), "io": "float32"}
        else:
            raise FacekdError(f"unknown variant '{variant}' (fp32, fp16 or int8)")
        files[0].write_bytes(data)
        return settings

    def embedder(self, files: list[Path], variant: str, *, normalize_inside: bool,
                 threads: int = 1) -> Any:
        return TfliteEmbedder(files[0], normalize_inside=normalize_inside, threads=threads)

    def card_io(self, normalize_inside: bool, embedding_size: int) -> dict[str, Any]:
        from importlib.metadata import version

        return {
            "input": {"name": "data", "shape": ["batch", 112, 112, 3], "dtype": "float32",
                      "channels": "RGB", "layout": "NHWC",
                      "normalization": "inside" if normalize_inside else "outside",
                      "expects": ("raw pixels 0..255; x / 127.5 - 1 is in the graph"
                                  if normalize_inside else
                                  "(x - 127.5) / 127.5 applied by the caller"),
                      "alignment": "5-point ArcFace similarity transform to 112x112"},
            "output": {"name": "embedding", "shape": ["batch", embedding_size],
                       "note": "not L2-normalised; compare with cosine similarity"},
            "runtime": {"package": "ai-edge-litert", "version": version("ai-edge-litert"),
                        "checked_with": "Interpreter (XNNPACK delegate), 1 thread"},
        }


def quantize_int8(fp32: bytes, calib: np.ndarray, *, normalize_inside: bool) -> bytes:
    """Full-integer INT8 flatbuffer of ``fp32`` calibrated on ``calib`` ([-1, 1] NCHW)."""
    from ai_edge_litert import _pywrap_tensorflow_lite_calibration_wrapper as wrapper

    feed = to_raw_pixels(calib) if normalize_inside else calib
    nhwc = np.ascontiguousarray(feed.transpose(0, 2, 3, 1), np.float32)
    calibrator = wrapper.CalibrationWrapper(fp32, [], [])
    calibrator.Prepare([[1, 112, 112, 3]])
    for image in nhwc:
        calibrator.FeedTensor([image[None]])
    f32, i8, i32 = (np.dtype(t).num for t in (np.float32, np.int8, np.int32))
    # input/output float32, no float fallback, int8 activations, int32 bias, per-channel.
    return bytes(calibrator.QuantizeModel(f32, f32, False, i8, i32, False, False))


class TfliteEmbedder:
    """[-1, 1] NCHW float batch -> embeddings from a .tflite file in LiteRT."""

    def __init__(self, path: str | Path, *, normalize_inside: bool, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.name = self.path.name
        self.sha256 = sha256_file(self.path)
        self.normalize_inside = normalize_inside
        with _quiet_stderr():
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.batch = 0

    def __call__(self, batch: Any) -> np.ndarray:
        x = batch.detach().cpu().numpy() if hasattr(batch, "detach") else np.asarray(batch)
        x = x.astype(np.float32, copy=False)
        if self.normalize_inside:
            x = to_raw_pixels(x)
        nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if len(nhwc) != self.batch:
            self.interpreter.resize_tensor_input(self.input, list(nhwc.shape))
            with _quiet_stderr():  # XNNPACK announces itself here
                self.interpreter.allocate_tensors()
            self.batch = len(nhwc)
        self.interpreter.set_tensor(self.input, nhwc)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output), np.float32)


@contextlib.contextmanager
def _quiet_stderr():
    """LiteRT prints an INFO line per interpreter to fd 2; keep the CLI's stderr clean."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
