"""Calibration images for INT8 (from a ``.bin``, a RecordIO dataset or shards) and the
onnxruntime reader that feeds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facekd.data.pixels import normalise_pixels
from facekd.errors import DataError


class BatchReader:
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
        images = decode_bin_images([bins[i] for i in pick], source=str(path), indices=pick)
    elif path.suffix in (".rec", ".idx") or (path / "train.rec").is_file():
        images = _rec_images(path, count)
    elif path.is_dir():
        images = _loader_images(path, count, seed)
    else:
        raise DataError(f"{path}: calibration data must be a .bin, a RecordIO dataset or "
                        f"a shards folder")
    if len(images) == 0:
        raise DataError(f"{path}: no images for calibration")
    return np.ascontiguousarray(normalise_pixels(images))


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
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR) \
            if len(payload) else None  # cv2 raises its own error on an empty buffer
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
