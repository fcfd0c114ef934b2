"""CPU image decode into a uint8 RGB CHW batch: what the loader and the device-decode
fallback share (a module of its own so neither imports the other)."""

from __future__ import annotations

from typing import Any

import numpy as np

from facekd.errors import DataError


def decode_into(payload: bytes, out: np.ndarray, flip: bool, where: Any, key: int,
                scratch: np.ndarray | None = None) -> None:
    """Decode one image into ``out`` (3xHxW uint8, RGB planes), mirrored when ``flip``.

    OpenCV does the work in three SIMD calls (decode BGR, flip, split): ``cv2.split``
    writes the planes straight into the batch in R, G, B order, so the channel swap and
    the HWC->CHW transpose cost nothing extra. ``scratch`` (HxWx3 uint8) receives the
    mirrored image, sparing an allocation per flip.
    """
    import cv2

    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR) \
        if len(payload) else None  # cv2 raises its own error on an empty buffer
    if image is None:
        raise DataError(f"{where}: key {key}: not a decodable image ({len(payload)} bytes)")
    height, width = out.shape[1], out.shape[2]
    if image.shape[0] != height or image.shape[1] != width:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if flip:
        image = cv2.flip(image, 1, dst=scratch)
    cv2.split(image, [out[2], out[1], out[0]])


def decode_batch(read: Any, rows: list[int], flips: list[bool], out: np.ndarray, where: Any,
                 keys: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """:func:`decode_into` for a whole batch: ``out[i]`` <- image ``read(rows[i])``.

    The same three OpenCV calls per image with the per-image Python trimmed to the
    minimum (OpenCV functions bound once, the expected size checked in one comparison);
    anything unusual goes through :func:`decode_into`. That saves about 2 us per image
    of the ~15 us the loader adds to ``cv2.imdecode``'s ~150 us (``cv2.split`` is about
    half of it; bench/p3_loader.py measures the parts).
    """
    import cv2

    imdecode, frombuffer, flip, split = cv2.imdecode, np.frombuffer, cv2.flip, cv2.split
    colour, expected = cv2.IMREAD_COLOR, (out.shape[2], out.shape[3], 3)
    for plane, row, flipped in zip(out, rows, flips, strict=True):
        payload = read(row)
        image = imdecode(frombuffer(payload, np.uint8), colour) if len(payload) else None
        if image is None or image.shape != expected:  # corrupt or another size
            decode_into(payload, plane, flipped, where, int(keys[row]), scratch)
            continue
        if flipped:
            image = flip(image, 1, dst=scratch)
        split(image, [plane[2], plane[1], plane[0]])
