"""Verification sets in the insightface ``.bin`` format (``lfw.bin``, ``cfp_fp.bin``, ...).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``2 * len(issame_list)`` encoded
112x112 face images and one bool per pair. Pickles from strangers can run code, so
:func:`load_bin` uses an unpickler that admits only the globals the three known
variants need (Python-3 bytes via ``_codecs.encode``, Python-2 ``str`` as bytes, and
numpy uint8 arrays from ``build_eval_pack.py``); anything else raises
:class:`~facekd.errors.DataError` naming the file and the refused global.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import DataError
from facekd.fileio import atomic_path, sha256_file

IMAGE_SIZE = (112, 112)

# (module, name) pairs that numpy has used for ndarray reconstruction; numpy 2 renamed
# numpy.core to numpy._core, so pickles from both eras name either module.
_NUMPY_RECONSTRUCT = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}
_NUMPY_NDARRAY = {("numpy", "ndarray")}
_NUMPY_DTYPE = {("numpy", "dtype")}
_CODECS_ENCODE = {("_codecs", "encode")}


def _as_text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


class _ForbiddenGlobal(Exception):
    """Raised inside the unpickler; turned into a DataError with the file name."""


def _safe_codecs_encode(obj: Any, encoding: Any = "utf-8", *rest: Any) -> bytes:
    """``_codecs.encode`` restricted to what pickle protocol 2 emits for bytes."""
    if rest or not isinstance(obj, str) or _as_text(encoding) not in ("latin1", "latin-1"):
        raise _ForbiddenGlobal("_codecs.encode with arguments other than (str, 'latin1')")
    return obj.encode("latin1")


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` so a pickle can name it but never call it."""


def _safe_reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` limited to an empty ndarray (filled later by BUILD)."""
    if cls is not _NdarrayToken or tuple(shape) != (0,) or _as_text(typecode) != "b":
        raise _ForbiddenGlobal("numpy _reconstruct with arguments other than (ndarray, (0,), 'b')")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _safe_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype`` limited to uint8, the only element type an encoded image has."""
    if _as_text(spec) != "u1":
        raise _ForbiddenGlobal(f"numpy.dtype({spec!r}) (only uint8 is allowed)")
    return np.dtype("u1")


def _python3_name(module: str, name: str) -> str:
    """The Python-3 name of a global as pickle's py2 import fixing would resolve it."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the handful of globals the ``.bin`` variants need."""

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _CODECS_ENCODE:
            return _safe_codecs_encode
        if key in _NUMPY_RECONSTRUCT:
            return _safe_reconstruct
        if key in _NUMPY_NDARRAY:
            return _NdarrayToken
        if key in _NUMPY_DTYPE:
            return _safe_dtype
        raise _ForbiddenGlobal(f"forbidden global {_python3_name(module, name)}")

    def persistent_load(self, pid: Any) -> Any:
        raise _ForbiddenGlobal("persistent id (not used by .bin files)")


def _image_bytes(item: Any, path: str, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        blob = bytes(item)
    elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim in (1, 2):
        blob = item.tobytes()
    else:
        raise DataError(f"{path}: image {index} is {type(item).__name__}, "
                        f"expected encoded bytes")
    if not blob:
        raise DataError(f"{path}: image {index} is empty (0 bytes)")
    return blob


def decode_image(blob: bytes, source: str, index: int, flags: int | None = None) -> np.ndarray:
    """``cv2.imdecode`` of image ``index`` of a ``.bin``; every reader of a ``.bin``
    decodes through here so a damaged image is a DataError naming its index (cv2 raises
    its own error on an empty buffer and returns None on garbage)."""
    import cv2

    buf = np.frombuffer(blob, dtype=np.uint8)
    img = None
    if buf.size:
        try:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR if flags is None else flags)
        except cv2.error:
            img = None
    if img is None or img.size == 0:
        raise DataError(f"{source}: image {index} cannot be decoded ({len(blob)} bytes)")
    return img


def _to_bool(item: Any, path: str, index: int) -> bool:
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    if isinstance(item, (int, np.integer)) and int(item) in (0, 1):
        return bool(item)
    raise DataError(f"{path}: issame[{index}] is {item!r}, expected a bool")


def parse_bin_bytes(data: bytes, name: str = "<bytes>") -> tuple[list[bytes], list[bool]]:
    """Unpickle ``.bin`` content safely and check its structure; ``name`` goes in errors."""
    if not data:
        raise DataError(f"{name}: empty file, not a .bin pickle")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise DataError(f"{name}: refused to unpickle: {exc}") from None
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise DataError(
            f"{name}: not a valid .bin pickle ({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{name}: expected a pickled (bins, issame_list) pair")
    raw_bins, raw_issame = obj
    if isinstance(raw_issame, np.ndarray):
        raw_issame = raw_issame.tolist()
    if not isinstance(raw_bins, (list, tuple)) or not isinstance(raw_issame, (list, tuple)):
        raise DataError(f"{name}: bins and issame_list must be lists")
    bins = [_image_bytes(b, name, i) for i, b in enumerate(raw_bins)]
    issame = [_to_bool(s, name, i) for i, s in enumerate(raw_issame)]
    if len(bins) != 2 * len(issame):
        raise DataError(
            f"{name}: {len(bins)} images for {len(issame)} pairs (need exactly 2 per pair)"
        )
    return bins, issame


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Read a ``.bin`` verification set: (encoded images, one bool per pair)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_bin_bytes(data, str(path))


def decode_bin_images(
    bins: Sequence[bytes],
    image_size: tuple[int, int] = IMAGE_SIZE,
    source: str = ".bin",
    indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Decode to a uint8 ``N x 3 x H x W`` RGB stack, as insightface's ``load_bin`` does.

    Images of another size are resized (insightface does the same); an undecodable
    image raises DataError naming its index in the file (``indices[i]`` when ``bins``
    is a selection of it).
    """
    import cv2

    height, width = image_size
    out = np.empty((len(bins), 3, height, width), dtype=np.uint8)
    for index, blob in enumerate(bins):
        img = decode_image(blob, source, index if indices is None else indices[index])
        if img.shape[:2] != (height, width):
            img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
        out[index] = img[:, :, ::-1].transpose(2, 0, 1)
    return out


def write_bin(path: str | os.PathLike, bins: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``(bins, issame)`` atomically as a protocol-4 pickle that insightface loads."""
    bins = [bytes(b) for b in bins]
    issame = [bool(s) for s in issame]
    if len(bins) != 2 * len(issame):
        raise DataError(f"{path}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)


def _read_pair_image(path: Path, resize: bool, quality: int) -> bytes:
    """Keep a 112x112 colour JPEG/PNG as is; re-encode anything else as JPEG."""
    import cv2

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if img is None:
        raise DataError(f"{path}: not a decodable image")
    is_jpeg_or_png = data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"
    colour_3 = img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    if is_jpeg_or_png and colour_3 and img.shape[:2] == IMAGE_SIZE:
        return data
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img.shape[:2] != IMAGE_SIZE:
        if not resize:
            raise DataError(
                f"{path}: image is {img.shape[1]}x{img.shape[0]}, expected an aligned 112x112 "
                "face (align it with `facekd prep align`, or pass --resize)"
            )
        img = cv2.resize(img, IMAGE_SIZE[::-1], interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise DataError(f"{path}: could not re-encode as JPEG")
    return enc.tobytes()


def read_pairs_file(
    pairs_txt: str | os.PathLike, root: str | os.PathLike | None = None
) -> list[tuple[Path, Path, bool]]:
    """Parse ``path1 path2 0|1`` lines; relative paths are relative to ``root``.

    ``root`` defaults to the pairs file's folder; a path that leaves it (absolute,
    ``..``, a symlink) is refused unless outside paths are allowed (:mod:`facekd.inputs`).
    """
    from facekd.inputs import Folder

    pairs_txt = Path(pairs_txt)
    try:
        lines = pairs_txt.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{pairs_txt}: cannot read pairs file ({exc})") from None
    base = Folder(Path(root) if root is not None else pairs_txt.parent)
    pairs = []
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise DataError(f"{pairs_txt}:{lineno}: expected 'path1 path2 0|1', got {line!r}")
        first, second = (base.inside(p, f"{pairs_txt}:{lineno}", "image")
                         for p in fields[:2])
        pairs.append((first, second, fields[2] == "1"))
    if not pairs:
        raise DataError(f"{pairs_txt}: no pairs")
    return pairs


def make_bin(
    pairs_txt: str | os.PathLike,
    out_bin: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    resize: bool = False,
    quality: int = 95,
) -> dict:
    """Build a ``.bin`` from a pairs list of aligned face images; returns a summary.

    Aligned 112x112 JPEG/PNG files are stored byte for byte; other formats or channel
    counts are re-encoded as JPEG; other sizes are an error unless ``resize``.
    """
    from tqdm import tqdm

    pairs = read_pairs_file(pairs_txt, root)
    cache: dict[Path, bytes] = {}
    bins: list[bytes] = []
    issame: list[bool] = []
    for first, second, same in tqdm(pairs, desc="make-bin", unit="pair", leave=False,
                                    disable=None):
        for image_path in (first, second):
            if image_path not in cache:
                cache[image_path] = _read_pair_image(image_path, resize, quality)
            bins.append(cache[image_path])
        issame.append(same)
    write_bin(out_bin, bins, issame)
    return {"path": str(out_bin), "pairs": len(issame), "images": len(cache),
            "genuine": sum(issame), "impostor": len(issame) - sum(issame)}


def _image_format(blob: bytes) -> str:
    if blob[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "other"


def bin_info(path: str | os.PathLike, decode: bool = True) -> dict:
    """Summarise a ``.bin``: pairs, genuine/impostor balance per fold, formats, sizes."""
    import cv2

    path = Path(path)
    bins, issame = load_bin(path)
    n_pairs = len(issame)
    info: dict[str, Any] = {
        "path": str(path),
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "pairs": n_pairs,
        "images": len(bins),
        "unique_images": len(set(bins)),
        "genuine": int(sum(issame)),
        "impostor": int(n_pairs - sum(issame)),
        "formats": dict(Counter(_image_format(b) for b in bins)),
    }
    if n_pairs >= 10:
        # KFold(10, shuffle=False): contiguous blocks, the first n % 10 get one more.
        sizes = [n_pairs // 10 + (1 if i < n_pairs % 10 else 0) for i in range(10)]
        starts = np.cumsum([0, *sizes])
        info["folds"] = [
            {"pairs": sizes[i], "genuine": int(sum(issame[starts[i]:starts[i + 1]]))}
            for i in range(10)
        ]
    if decode:
        shapes: Counter = Counter()
        for index, blob in enumerate(bins):
            img = decode_image(blob, str(path), index, cv2.IMREAD_UNCHANGED)
            shapes["x".join(str(s) for s in img.shape)] += 1
        info["image_shapes"] = dict(shapes)
    return info
