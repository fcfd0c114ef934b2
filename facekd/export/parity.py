"""Parity gate: an exported ONNX file must compute what the torch student computes.

Exporters fail quietly (a wrong stem, a dropped BatchNorm, weights that changed after
tracing, an FP16 overflow); nothing downstream notices until accuracy is gone. So every
export runs the ONNX file and the torch model side by side on a fixed batch of
real-looking aligned faces and refuses the file when they disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facekd.data.pixels import normalise_pixels
from facekd.errors import FacekdError, first_line

# ArcFace 112x112 reference landmarks (x, y): eyes, nose tip, mouth corners.
_ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


@dataclass(frozen=True)
class ParityThresholds:
    """Limits for one variant; ``max_abs`` is relative to max(1, max |torch embedding|)."""

    max_abs: float = 1e-3
    max_one_minus_cos: float = 1e-5


# FP32 must match to float rounding; FP16/INT8 only have to keep the direction.
FP32_THRESHOLDS = ParityThresholds(1e-3, 1e-5)
FP16_THRESHOLDS = ParityThresholds(5e-2, 1e-3)
INT8_THRESHOLDS = ParityThresholds(0.5, 5e-2)


@dataclass
class ParityReport:
    """Numbers of one ONNX-vs-torch comparison (kept in the model card)."""

    variant: str
    batch: int
    max_abs_diff: float
    max_abs_diff_scaled: float
    max_one_minus_cos: float
    mean_cos: float
    thresholds: dict[str, float]
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synthetic_aligned_faces(n: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` deterministic face-like aligned crops, uint8 N x 112 x 112 x 3 RGB.

    Uses :mod:`facekd.data.synth` when it is installed (its faces are what the demo
    trains on); otherwise draws simple faces whose eyes, nose and mouth sit near the
    ArcFace reference points, with varied skin, hair, background, pose jitter and
    noise, so the activations look like those of real crops rather than of noise.
    """
    faces = _faces_from_synth(n, seed)
    if faces is not None:
        return faces
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((n, 112, 112, 3), np.uint8)
    yy, xx = np.mgrid[0:112, 0:112].astype(np.float32)
    for i in range(n):
        c0, c1 = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / 160.0 + 0.5
        img = (c0 * t[..., None] + c1 * (1 - t[..., None])).clip(0, 255).astype(np.uint8)
        img = np.ascontiguousarray(img)
        tone = rng.uniform(90, 250)
        skin = (tone, tone * rng.uniform(0.68, 0.85), tone * rng.uniform(0.52, 0.72))
        hair = tuple(float(v) for v in rng.uniform(0, 90, 3))
        lm = _ARCFACE_DST + rng.normal(0, 1.5, _ARCFACE_DST.shape).astype(np.float32)
        cx, cy = float(lm[2, 0]), float(lm[2, 1]) - 8
        ax, ay = rng.uniform(34, 42), rng.uniform(46, 54)
        cv2.ellipse(img, (round(cx), round(cy - 22)), (round(ax + 4), round(ay * 0.7)),
                    0, 180, 360, hair, -1, cv2.LINE_AA)
        cv2.ellipse(img, (round(cx), round(cy)), (round(ax), round(ay)),
                    float(rng.uniform(-6, 6)), 0, 360, skin, -1, cv2.LINE_AA)
        dark = tuple(float(v) * 0.35 for v in skin)
        for eye in lm[:2]:
            ex, ey = round(float(eye[0])), round(float(eye[1]))
            cv2.ellipse(img, (ex, ey), (7, 4), 0, 0, 360, (235, 235, 235), -1, cv2.LINE_AA)
            cv2.circle(img, (ex, ey), 3, tuple(float(v) for v in rng.uniform(10, 120, 3)), -1,
                       cv2.LINE_AA)
            cv2.line(img, (ex - 9, ey - 9), (ex + 9, ey - 10), hair, 2, cv2.LINE_AA)
        nose = lm[2]
        cv2.line(img, (round(cx), round(float(lm[0, 1]) + 4)),
                 (round(float(nose[0])), round(float(nose[1]))), dark, 2, cv2.LINE_AA)
        mouth = lm[3:].round().astype(np.int32)
        mid = (int(mouth[:, 0].mean()), int(mouth[:, 1].mean()) + int(rng.integers(1, 5)))
        lips = tuple(float(v) for v in rng.uniform([120, 30, 40], [210, 90, 100]))
        cv2.polylines(img, [np.array([mouth[0], mid, mouth[1]], np.int32)], False, lips, 3,
                      cv2.LINE_AA)
        img = cv2.GaussianBlur(img, (3, 3), 0.8)
        noise = rng.normal(0, 4, img.shape)
        out[i] = (img.astype(np.float32) + noise).clip(0, 255).astype(np.uint8)
    return out


def _faces_from_synth(n: int, seed: int) -> np.ndarray | None:
    """Aligned faces from ``facekd.data.synth`` if that module offers them, else None."""
    try:
        from facekd.data import synth  # type: ignore[attr-defined]
    except ImportError:
        return None
    maker = getattr(synth, "aligned_faces", None) or getattr(synth, "render_faces", None)
    if maker is None:
        return None
    try:
        faces = np.asarray(maker(n, seed=seed))
    except TypeError:
        return None
    if faces.shape == (n, 3, 112, 112):
        faces = faces.transpose(0, 2, 3, 1)
    if faces.shape != (n, 112, 112, 3) or faces.dtype != np.uint8:
        return None
    return np.ascontiguousarray(faces)


def to_model_input(faces_rgb: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW in [-1, 1], the facekd embedder convention."""
    return np.ascontiguousarray(normalise_pixels(faces_rgb).transpose(0, 3, 1, 2))


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray, variant: str,
                       thresholds: ParityThresholds) -> ParityReport:
    """Max |diff| and cosine between two embedding batches, judged by ``thresholds``."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(candidate, np.float64)
    if ref.shape != got.shape:
        raise FacekdError(f"parity ({variant}): ONNX output shape {got.shape} "
                          f"differs from torch {ref.shape}")
    finite = bool(np.isfinite(got).all())
    max_abs = float(np.abs(ref - got).max()) if finite else math.inf
    scaled = max_abs / max(1.0, float(np.abs(ref).max()))
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = (ref * got).sum(axis=1) / np.maximum(denom, 1e-12)
    one_minus = float((1.0 - cos).max()) if finite else math.inf
    passed = finite and scaled <= thresholds.max_abs and one_minus <= thresholds.max_one_minus_cos
    return ParityReport(
        variant=variant, batch=int(ref.shape[0]), max_abs_diff=max_abs,
        max_abs_diff_scaled=scaled, max_one_minus_cos=one_minus,
        mean_cos=float(cos.mean()) if finite else math.nan,
        thresholds={"max_abs_scaled": thresholds.max_abs,
                    "max_one_minus_cos": thresholds.max_one_minus_cos},
        passed=passed)


def torch_embeddings(model: Any, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Eval-mode torch embeddings of a float32 NCHW batch (CPU, float32)."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out = model(torch.from_numpy(x[i:i + batch_size]))
            outs.append(out.float().cpu().numpy())
    return np.concatenate(outs)


def onnx_session(path: str | Path):
    """A CPU onnxruntime session (parity is about the file, not the accelerator)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # One non-spinning thread: parity batches are small, and spinning worker threads
    # burn the CPU that other jobs on a shared machine need.
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


def onnx_embeddings(path: str | Path, x: np.ndarray, normalize_inside: bool,
                    batch_size: int = 32) -> np.ndarray:
    """Run an exported file on a [-1, 1] batch through facekd's one ONNX embedder.

    The file is fed as every facekd command feeds it (its metadata, else insightface's
    Sub/Mul rule), so a file whose scaling disagrees with ``normalize_inside`` (what the
    export meant to write) fails here instead of scoring wrongly scaled pixels later.
    """
    from facekd.models.embedder import OnnxEmbedder

    embedder = OnnxEmbedder(path, session=onnx_session(path))
    if embedder.raw_pixels != normalize_inside:
        where = "inside the graph" if embedder.raw_pixels else "outside the graph"
        raise FacekdError(f"{path}: facekd would read its input normalisation as {where}, "
                          f"but the export put it "
                          f"{'inside' if normalize_inside else 'outside'}")
    try:
        outs = [embedder(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise FacekdError(f"{path}: onnxruntime cannot run the exported file: "
                          f"{first_line(exc)}") from exc
    return np.concatenate(outs).astype(np.float32)


def check_parity(model: Any, onnx_path: str | Path, x: np.ndarray, *, normalize_inside: bool,
                 variant: str = "fp32", thresholds: ParityThresholds = FP32_THRESHOLDS,
                 reference: np.ndarray | None = None) -> ParityReport:
    """Compare ``onnx_path`` with the torch ``model`` on ``x``; report, never raise on numbers.

    ``reference`` (torch embeddings of ``x``) may be passed to avoid recomputing it for
    each variant.
    """
    ref = torch_embeddings(model, x) if reference is None else reference
    got = onnx_embeddings(onnx_path, x, normalize_inside)
    return compare_embeddings(ref, got, variant, thresholds)


def describe_failure(report: ParityReport, path: str | Path) -> str:
    """One line for a FacekdError naming the file, the numbers and the limits."""
    return (f"{path}: {report.variant} parity gate failed: max|diff| {report.max_abs_diff:.3g} "
            f"(scaled {report.max_abs_diff_scaled:.3g}, limit "
            f"{report.thresholds['max_abs_scaled']:.3g}), 1-cos "
            f"{report.max_one_minus_cos:.3g} (limit "
            f"{report.thresholds['max_one_minus_cos']:.3g}) on {report.batch} faces")
