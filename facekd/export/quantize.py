"""FP16 and INT8 variants of an exported student, each with measured accuracy.

INT8 quantisation of face embedders is known to destroy accuracy silently (cosine 0.69
vs FP32 has been reported), so a variant is only kept when its embeddings still point
the same way as torch's on the parity faces and, given a ``.bin`` set, its verification
accuracy is within ``max_drop`` of the FP32 file's.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import DataError, FacekdError
from facekd.export import parity as parity_mod
from facekd.fileio import atomic_path, sha256_file

log = logging.getLogger(__name__)

VARIANT_THRESHOLDS = {"fp16": parity_mod.FP16_THRESHOLDS, "int8": parity_mod.INT8_THRESHOLDS}
ACCURACY_KEYS = ("acc_mean", "accuracy", "acc", "accuracy_flip", "acc_flip", "acc2")


# ----------------------------------------------------------------------------- FP16

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


# ----------------------------------------------------------------------------- INT8

class _BatchReader:
    """onnxruntime CalibrationDataReader over an in-memory image batch."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 32) -> None:
        self.input_name = input_name
        self.images = images
        self.batch_size = batch_size
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        batch = self.images[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return {self.input_name: np.ascontiguousarray(batch, np.float32)}

    def rewind(self) -> None:
        self.position = 0


def quantize_int8(src: Path, dst: Path, calib: np.ndarray, *, normalize_inside: bool,
                  exclude_nodes: list[str] | None = None,
                  keep_depthwise_fp32: bool = True) -> dict[str, Any]:
    """Static QDQ INT8 (per-channel weights, uint8 activations, MinMax calibration).

    ``calib`` is float32 NCHW in [-1, 1]; it is rescaled to 0..255 when the file
    normalises inside. Returns the settings for the model card.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feed = calib * 127.5 + 127.5 if normalize_inside else calib

    class Reader(_BatchReader, CalibrationDataReader):
        pass

    # onnxruntime's INT8 depthwise convolution is ~4x slower than its FP32 one on x86
    # (measured on MobileFaceNet, bench/p6_latency.py), and depthwise layers hold few
    # weights, so they stay FP32; the dense convolutions and the Gemm go INT8.
    settings: dict[str, Any] = {
        "format": "QDQ", "weights": "int8 per-channel", "activations": "uint8",
        "calibration": "MinMax", "calibration_images": len(calib),
        "depthwise_conv": "fp32" if keep_depthwise_fp32 else "int8"}
    with tempfile.TemporaryDirectory(prefix="facekd-int8-") as work:
        pre = Path(work) / "pre.onnx"
        with contextlib.redirect_stdout(None):
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            excluded = list(exclude_nodes or [])
            if keep_depthwise_fp32:
                excluded += _depthwise_convs(pre)
            settings["excluded_nodes"] = excluded
            quantize_static(
                str(pre), str(dst), Reader("data", feed), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=excluded)
    return settings


def _depthwise_convs(path: Path) -> list[str]:
    """Names of grouped (depthwise) Conv nodes of an ONNX file."""
    import onnx

    model_proto = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model_proto.graph.node if n.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def load_calibration_images(source: str | Path, count: int = 256, seed: int = 0) -> np.ndarray:
    """``count`` training faces as float32 NCHW in [-1, 1] for INT8 calibration.

    ``source`` is a ``.bin`` set, a RecordIO dataset (folder with train.rec or a .rec
    file) or a shards folder; images are taken evenly spread over the source so every
    identity range contributes.
    """
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: calibration data does not exist")
    if path.suffix == ".bin":
        from facekd.data.binset import decode_bin_images, load_bin

        bins, _ = load_bin(path)
        pick = _spread(len(bins), count)
        images = decode_bin_images([bins[i] for i in pick], source=str(path))
    elif path.suffix in (".rec", ".idx") or (path / "train.rec").is_file():
        images = _rec_images(path, count)
    elif path.is_dir():
        images = _loader_images(path, count, seed)
    else:
        raise DataError(f"{path}: calibration data must be a .bin, a RecordIO dataset or "
                        f"a shards folder")
    if len(images) == 0:
        raise DataError(f"{path}: no images for calibration")
    x = images.astype(np.float32)
    return np.ascontiguousarray((x - 127.5) / 127.5)


def _spread(total: int, count: int) -> list[int]:
    if total <= count:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, count)})


def _rec_images(path: Path, count: int) -> np.ndarray:
    """Decode ``count`` images spread over a RecordIO dataset to uint8 NCHW RGB."""
    import cv2

    from facekd.data.recordio import open_rec

    reader = open_rec(path.with_suffix(".rec") if path.suffix == ".idx" else path)
    keys = list(reader.image_keys())
    out = []
    for i in _spread(len(keys), count):
        _, payload = reader[keys[i]]
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{path}: record {keys[i]} is not a decodable image")
        if img.shape[:2] != (112, 112):
            img = cv2.resize(img, (112, 112), interpolation=cv2.INTER_LINEAR)
        out.append(img[:, :, ::-1].transpose(2, 0, 1))
    return np.stack(out) if out else np.empty((0, 3, 112, 112), np.uint8)


def _loader_images(path: Path, count: int, seed: int) -> np.ndarray:
    """Images from the training loader (shards folder), unflipped, as uint8-range NCHW."""
    from facekd.data.loader import build_train_loader

    loader = build_train_loader(str(path), batch_size=min(64, count), seed=seed, flip=False,
                                drop_last=False, labelled=False)
    got, total = [], 0
    for batch in loader:
        images = batch["image"].numpy()  # the loader yields uint8 NCHW RGB, exact pixels
        got.append(images)
        total += len(images)
        if total >= count:
            break
    if not got:
        return np.empty((0, 3, 112, 112), np.uint8)
    return np.concatenate(got)[:count]


# ----------------------------------------------------------------------------- variants

def make_variant(fp32_path: Path, target: Path, variant: str, *, student: Any,
                 normalize_inside: bool, calib: np.ndarray | None, calib_source: Any,
                 x: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Write the ``variant`` of ``fp32_path`` to ``target``, with parity/challenge numbers."""
    import onnx

    from facekd.export import onnx_export as ex

    norm_nodes = [ex.NORM_SUB_NODE, ex.NORM_MUL_NODE] if normalize_inside else []
    with atomic_path(target, suffix=".onnx") as tmp:
        if variant == "fp16":
            model_proto, converter = convert_fp16(onnx.load(str(fp32_path)),
                                                  keep_fp32_nodes=norm_nodes)
            settings: dict[str, Any] = {"converter": converter, "io": "float32"}
        elif variant == "int8":
            if calib is None:
                raise FacekdError("--int8 needs calibration images (--calib-data)")
            settings = quantize_int8(fp32_path, tmp, calib, normalize_inside=normalize_inside,
                                     exclude_nodes=norm_nodes)
            settings["calibration_source"] = str(calib_source)
            model_proto = onnx.load(str(tmp))
        else:
            raise FacekdError(f"unknown variant '{variant}' (fp16 or int8)")
        ex.move_normalization_first(model_proto)
        ex.set_metadata(model_proto, {**ex.base_metadata(student, normalize_inside, variant),
                                      "facekd.quantization": settings})
        model_proto.producer_name = "facekd"
        onnx.checker.check_model(model_proto)
        onnx.save(model_proto, str(tmp))
        report = parity_mod.check_parity(student.model, tmp, x, normalize_inside=normalize_inside,
                                         variant=variant, thresholds=VARIANT_THRESHOLDS[variant],
                                         reference=reference)
        challenge = ex.check_challenge(tmp, allow_fp16=(variant == "fp16"), raise_on_fail=False)
        compat = ex.insightface_compat(tmp, normalize_inside)
    log.info("wrote %s (%s: 1-cos %.2e vs torch)", target, variant, report.max_one_minus_cos)
    return {"file": target.name, "sha256": sha256_file(target), "bytes": target.stat().st_size,
            "quantization": settings, "parity": report.to_dict(), "challenge": challenge,
            "insightface": compat}


def accuracy_of(numbers: dict[str, Any]) -> float | None:
    """The verification accuracy (fraction) in an ``evaluate_bin`` result."""
    for key in ACCURACY_KEYS:
        value = numbers.get(key)
        if isinstance(value, (int, float)):
            return float(value) / 100.0 if value > 1.0 else float(value)
    return None


class OnnxFileEmbedder:
    """[-1, 1] NCHW float batch -> embeddings from an exported file (inside/outside scaling)."""

    def __init__(self, path: str | Path, normalize_inside: bool) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.sha256 = sha256_file(self.path)
        self.normalize_inside = normalize_inside
        self.session = parity_mod.onnx_session(self.path)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: Any) -> np.ndarray:
        x = batch.detach().cpu().numpy() if hasattr(batch, "detach") else np.asarray(batch)
        x = x.astype(np.float32, copy=False)
        if self.normalize_inside:
            x = x * 127.5 + 127.5
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]


def _embedder_for(path: Path, normalize_inside: bool, probe: np.ndarray) -> Any:
    """facekd's shared embedder for the file, if it reproduces the file's own output.

    Evaluation and export should share ``load_embedder``; a loader that ignores the
    in-graph normalisation would give wrong accuracies, so it is checked on ``probe``
    and replaced by :class:`OnnxFileEmbedder` when it disagrees.
    """
    own = OnnxFileEmbedder(path, normalize_inside)
    try:
        from facekd.models.embedder import load_embedder

        shared = load_embedder(str(path), device="cpu")
        if np.allclose(np.asarray(shared(probe)), own(probe), rtol=1e-3, atol=1e-4):
            return shared
        log.warning("%s: load_embedder output differs from the file's own; using the "
                    "export embedder", path)
    except ImportError:
        pass
    return own


def evaluate_variants(paths: dict[str, Path], bin_path: str | Path,
                      normalize_inside: bool) -> dict[str, dict[str, Any]]:
    """Verification numbers of each variant on one ``.bin`` set (image + flip)."""
    probe = parity_mod.to_model_input(parity_mod.synthetic_aligned_faces(2, seed=5))
    results: dict[str, dict[str, Any]] = {}
    for variant, path in paths.items():
        embedder = _embedder_for(Path(path), normalize_inside, probe)
        numbers = _evaluate_bin(embedder, bin_path)
        numbers = {k: _plain(v) for k, v in dict(numbers).items()}
        accuracy = accuracy_of(numbers)
        results[variant] = {"bin": Path(bin_path).name, "accuracy": accuracy,
                            "metrics": {k: v for k, v in numbers.items()
                                        if isinstance(v, (int, float, str, bool))}}
        log.info("%s on %s: accuracy %s", variant, Path(bin_path).name, accuracy)
    base = results.get("fp32", {}).get("accuracy")
    for numbers in results.values():
        acc = numbers["accuracy"]
        numbers["drop_vs_fp32"] = (base - acc) if base is not None and acc is not None else None
    return results


def _evaluate_bin(embedder: Any, bin_path: str | Path) -> dict[str, Any]:
    """``facekd.evaluate.evaluate_bin`` when present, else the same steps via verify_pairs."""
    try:
        from facekd.evaluate import evaluate_bin  # type: ignore[attr-defined]
    except ImportError:
        evaluate_bin = None
    if evaluate_bin is not None:
        # No feature cache: it is keyed by file hash, and a loader that ignored the
        # in-graph normalisation could have cached wrong features for this very file.
        return dict(evaluate_bin(embedder, str(bin_path), use_cache=False))
    from facekd.data.binset import decode_bin_images, load_bin
    from facekd.evaluate.verification import verify_pairs

    bins, issame = load_bin(bin_path)
    images = decode_bin_images(bins, source=str(bin_path)).astype(np.float32)
    x = (images - 127.5) / 127.5
    emb = np.concatenate([embedder(x[i:i + 64]) for i in range(0, len(x), 64)])
    flipped = np.ascontiguousarray(x[..., ::-1])
    emb_flip = np.concatenate([embedder(flipped[i:i + 64]) for i in range(0, len(x), 64)])
    return verify_pairs(emb, emb_flip, np.asarray(issame))


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers so the card serialises."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def judge_variants(variants: dict[str, dict[str, Any]], *, max_drop: float,
                   force: bool) -> list[str]:
    """Attach a verdict to each variant; return the names to refuse (empty with ``force``).

    A quantised variant fails when its embeddings drift past its parity limits, when it
    fails a challenge check, or when its accuracy drop exceeds ``max_drop``.
    """
    refused = []
    for name, info in variants.items():
        if name == "fp32":
            info["verdict"] = {"accepted": True, "forced": False, "reason": None}
            continue
        reasons = []
        parity = info["parity"]
        if not parity["passed"]:
            reasons.append(f"1-cos vs torch {parity['max_one_minus_cos']:.3g} > "
                           f"{parity['thresholds']['max_one_minus_cos']:.3g}")
        if not info["challenge"].get("passed", False):
            failed = [k for k, v in info["challenge"].items() if v is False]
            reasons.append(f"challenge checks failed: {', '.join(failed)}")
        evaluation = info.get("evaluation")
        if evaluation is None:
            log.warning("%s: accuracy not measured (no --eval-bin); only parity was checked",
                        info["file"])
        elif evaluation.get("drop_vs_fp32") is not None and evaluation["drop_vs_fp32"] > max_drop:
            reasons.append(f"accuracy drop {evaluation['drop_vs_fp32']:.4f} > max-drop "
                           f"{max_drop:.4f} on {evaluation['bin']}")
        reason = "; ".join(reasons) or None
        info["verdict"] = {"accepted": not reasons or force, "forced": bool(reasons) and force,
                           "reason": reason}
        if reasons and force:
            banner = "!" * 72
            log.warning("%s\nKEEPING %s DESPITE FAILED CHECKS (--force): %s\n%s",
                        banner, info["file"], reason, banner)
        elif reasons:
            refused.append(name)
    return refused
