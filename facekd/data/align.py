"""Five-landmark face alignment to the ArcFace 112x112 template.

Recognition models only work on faces cropped the way they were trained on, so this
reproduces insightface's ``norm_crop``: a least-squares similarity transform (Umeyama)
from the detected eyes, nose tip and mouth corners to fixed reference points, then
``cv2.warpAffine`` with a black border.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from facekd.errors import DataError
from facekd.fileio import atomic_path

log = logging.getLogger(__name__)

# (x, y) of left eye, right eye, nose tip, left and right mouth corner in a 112x112 crop
# (the 96x112 reference of the SphereFace/ArcFace papers with x shifted by 8).
ARCFACE_DST = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def reference_points(size: int = 112) -> np.ndarray:
    """ARCFACE_DST scaled to ``size`` the way insightface does (112- or 128-based)."""
    if size % 112 == 0:
        ratio, shift_x = size / 112.0, 0.0
    else:
        ratio = size / 128.0
        shift_x = 8.0 * ratio
    dst = ARCFACE_DST.astype(np.float64) * ratio
    dst[:, 0] += shift_x
    return dst


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) taking src to dst; 2x3.

    Umeyama (1991), as skimage's ``SimilarityTransform.estimate`` computes it; float64.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if not np.isfinite(src_var) or src_var < 1e-12:
        raise DataError("landmarks are degenerate (all points coincide or are not finite)")
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1.0  # a reflection would fit better; a similarity may not reflect
    rotation = u @ np.diag(signs) @ vt
    scale = (sigma * signs).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def estimate_norm(landmarks5: np.ndarray, size: int = 112) -> np.ndarray:
    """2x3 matrix mapping an image's 5 landmarks onto the ArcFace template of ``size``."""
    landmarks5 = np.asarray(landmarks5, dtype=np.float64)
    if landmarks5.shape != (5, 2):
        raise DataError(f"expected 5 (x, y) landmarks, got an array of shape {landmarks5.shape}")
    return similarity_transform(landmarks5, reference_points(size))


def norm_crop(image: np.ndarray, landmarks5: np.ndarray, size: int = 112) -> np.ndarray:
    """Aligned ``size`` x ``size`` crop of ``image`` (any channel order kept as given)."""
    import cv2

    matrix = estimate_norm(landmarks5, size)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def read_landmarks_file(path: str | os.PathLike) -> list[tuple[int, str, np.ndarray]]:
    """Parse ``name x1 y1 ... x5 y5 [score]`` lines: (line number, name, 5x2 landmarks)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read landmarks file ({exc})") from None
    entries = []
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (11, 12):
            raise DataError(
                f"{path}:{lineno}: expected 'name x1 y1 ... x5 y5 [score]', "
                f"got {len(fields)} fields"
            )
        try:
            coords = np.array([float(v) for v in fields[1:11]], dtype=np.float64).reshape(5, 2)
        except ValueError:
            raise DataError(f"{path}:{lineno}: landmark coordinates are not numbers") from None
        if not np.isfinite(coords).all():
            raise DataError(f"{path}:{lineno}: landmark coordinates are not finite")
        entries.append((lineno, fields[0], coords))
    if not entries:
        raise DataError(f"{path}: no landmark lines")
    return entries


def align_folder(
    images_dir: str | os.PathLike,
    landmarks_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int = 112,
    quality: int = 95,
) -> dict:
    """Align every image named in ``landmarks_file``; resumable (existing outputs kept).

    Outputs keep the image's relative name and format (JPEG quality ``quality``).
    """
    import cv2
    from tqdm import tqdm

    from facekd.inputs import Folder

    images_dir, landmarks_file, out_dir = Path(images_dir), Path(landmarks_file), Path(out_dir)
    entries = read_landmarks_file(landmarks_file)
    sources, targets = Folder(images_dir), Folder(out_dir)
    aligned = skipped = 0
    for lineno, name, coords in tqdm(entries, desc="align", unit="img", leave=False,
                                     disable=None):
        where = f"{landmarks_file}:{lineno}"
        source = sources.inside(name, where, "image")
        target = targets.inside(name, where, "output")  # never written outside OUT
        if target.exists():
            skipped += 1
            continue
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"{landmarks_file}:{lineno}: image {source} is missing or unreadable")
        height, width = image.shape[:2]
        outside = (coords[:, 0] < 0) | (coords[:, 0] >= width)
        outside |= (coords[:, 1] < 0) | (coords[:, 1] >= height)
        if outside.any():
            i = int(np.argmax(outside))
            raise DataError(
                f"{landmarks_file}:{lineno}: landmark {i + 1} ({coords[i, 0]:g}, "
                f"{coords[i, 1]:g}) lies outside {name} ({width}x{height})"
            )
        try:
            crop = norm_crop(image, coords, size)
        except DataError as exc:
            raise DataError(f"{landmarks_file}:{lineno}: {exc}") from None
        ext = target.suffix.lower() if target.suffix.lower() in (".png", ".bmp") else ".jpg"
        params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
        ok, encoded = cv2.imencode(ext, crop, params)
        if not ok:
            raise DataError(f"{landmarks_file}:{lineno}: cannot encode aligned {name}")
        with atomic_path(target) as tmp:
            tmp.write_bytes(encoded.tobytes())
        aligned += 1
    log.info("aligned %d images into %s (%d already there)", aligned, out_dir, skipped)
    return {"out": str(out_dir), "aligned": aligned, "skipped_existing": skipped,
            "total": len(entries), "size": size}
