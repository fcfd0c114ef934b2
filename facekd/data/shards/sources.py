"""Sample sources for shard writing (picklable; each worker process opens its own handles).

A source has ``len``, ``get(index) -> (key, label, flag, bytes, ext)``, ``key_of``,
``describe`` and optionally a vectorised ``block`` and ``release``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from facekd.errors import DataError


def image_ext(payload: bytes | memoryview) -> str | None:
    """``'jpg'`` or ``'png'`` from the magic bytes, else None (unknown or empty)."""
    head = bytes(payload[:8])
    if head[:3] == b"\xff\xd8\xff":
        return "jpg"
    if head == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def check_image_bytes(payload: bytes | memoryview, where: Any, key: int | None = None) -> str:
    """Cheap structural check (no decode): JPEG/PNG signature and end marker.

    ``where`` (and ``key``) only name the record in the error message.
    """
    if payload[:3] == b"\xff\xd8\xff" and b"\xff\xd9" in bytes(payload[-64:]):
        return "jpg"  # the common case, checked without building any string
    if key is not None:
        where = f"{where}: key {key}"
    ext = image_ext(payload)
    if ext is None:
        raise DataError(f"{where}: payload of {len(payload)} bytes is not a JPEG or PNG image "
                        f"(starts {bytes(payload[:8]).hex()})")
    tail = bytes(payload[-64:])
    if (ext == "jpg" and b"\xff\xd9" not in tail) or (ext == "png" and b"IEND" not in tail):
        kind = "JPEG" if ext == "jpg" else "PNG"
        raise DataError(f"{where}: {kind} image of {len(payload)} bytes is truncated "
                        f"(no end marker)")
    return ext


_PNG_HEAD = np.frombuffer(b"\x89PNG\r\n\x1a\n", np.uint8)
_PNG_END = np.frombuffer(b"IEND", np.uint8)  # then the chunk's 4-byte CRC
_EXT_BYTES = {"jpg": b"jpg", "png": b"png"}


class RecSamples:
    """Images of a ``.rec`` dataset, addressed by position in ``image_keys()``.

    Holds no per-record array of its own where it can help it: insightface's image keys
    are a range (kept as its first key and count), and with ``spill_dir`` the reader's
    index is a memory-mapped scratch file there whose pages are dropped after use, so a
    conversion's memory stays flat however many records the ``.rec`` has.
    """

    kind = "rec"

    def __init__(self, path: str | os.PathLike, spill_dir: str | os.PathLike | None = None
                 ) -> None:
        from facekd.data.recordio import open_rec

        self.path = str(path)
        self.reader = open_rec(path, spill_dir=spill_dir)
        span = self.reader.image_key_range()
        # keys: an array for a plain layout; None when they are the range first..first+n
        self.keys: np.ndarray | None = None if span else self.reader.image_keys()
        self._first = span[0] if span else 0
        self._count = span[1] - span[0] if span else len(self.keys)
        self._key_list: Any = None if span else memoryview(self.keys)  # Python ints
        self._num_classes: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_key_list"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.keys is not None:
            self._key_list = memoryview(self.keys)

    def __len__(self) -> int:
        return self._count

    def _key(self, index: int) -> int:
        if self._key_list is None:
            if not 0 <= index < self._count:
                raise IndexError(index)
            return self._first + index
        return self._key_list[index]

    def _keys(self, start: int, stop: int) -> np.ndarray:
        if self.keys is None:
            stop = min(stop, self._count)
            return np.arange(self._first + start, self._first + max(stop, start),
                             dtype=np.int64)
        return np.asarray(self.keys[start:stop])

    @property
    def num_classes(self) -> int:
        """The reader's class count, 0 when its label scan meets a bad label (the caller
        then counts the converted labels; a bad record is reported by :meth:`get`)."""
        if self._num_classes is None:
            try:
                self._num_classes = self.reader.num_classes
            except DataError:
                self._num_classes = 0
        return self._num_classes

    def get(self, index: int) -> tuple[int, int, int, bytes, str]:
        """``(key, label, flag, image bytes, ext)`` of sample ``index``."""
        key = self._key(index)
        flag, label, payload = self.reader.read_image(key)
        return key, label, flag, payload, check_image_bytes(payload, self.reader.rec_path, key)

    def key_of(self, index: int) -> int:
        return int(self._key(index))

    def block(self, start: int, stop: int, skip_bad: bool, bad: list[tuple[int, str]]
              ) -> SampleBlock:
        """Samples ``start:stop`` with payloads as zero-copy views into the ``.rec`` mapping.

        Headers are parsed and image signatures checked for the whole block with array
        operations; only records off that fast path (multipart, damaged, under 16 bytes,
        a JPEG end marker not in the last two bytes or a PNG ``IEND`` not in the last
        chunk) take :meth:`get`, which gives the same bytes or raises the same error.
        """
        keys = self._keys(start, stop)
        try:
            starts, ends, flags, labels, fast = self.reader.image_spans(keys)
        except DataError:  # a key missing from the .idx: let get() name it (or skip it)
            return samples_block(self, start, stop, skip_bad, bad)
        view = self.reader.view()
        exts = np.full(len(keys), b"jpg", "S3")
        if len(keys):
            data = np.frombuffer(view, np.uint8)
            try:
                fast &= ends - starts >= 16
                first, end = np.where(fast, starts, 0), np.where(fast, ends, 16)
                jpeg = ((data[first] == 0xFF) & (data[first + 1] == 0xD8)
                        & (data[first + 2] == 0xFF) & (data[end - 2] == 0xFF)
                        & (data[end - 1] == 0xD9))
                other = np.flatnonzero(fast & ~jpeg)  # usually none: PNG datasets
                head = data[first[other, None] + np.arange(8)]
                tail = data[end[other, None] - 8 + np.arange(4)]
            finally:
                del data  # the mapping cannot close while an array exports it
            png = np.zeros_like(jpeg)
            png[other] = (head == _PNG_HEAD).all(axis=1) & (tail == _PNG_END).all(axis=1)
            exts[png] = b"png"
            fast &= jpeg | png
        payloads: list[Any] = [view[a:b] for a, b in zip(starts.tolist(), ends.tolist(),
                                                          strict=True)]
        sizes = ends - starts
        slow = np.flatnonzero(~fast)
        if not len(slow):
            return SampleBlock(keys, labels, flags, exts, sizes, payloads)
        keep = np.ones(len(keys), bool)
        for i in slow.tolist():
            try:
                _, labels[i], flags[i], payloads[i], ext = self.get(start + i)
            except DataError as exc:
                if not skip_bad:
                    raise
                bad.append((int(keys[i]), str(exc)))
                keep[i] = False
                continue
            exts[i], sizes[i] = _EXT_BYTES[ext], len(payloads[i])
        return SampleBlock(keys[keep], labels[keep], flags[keep], exts[keep], sizes[keep],
                           [p for p, k in zip(payloads, keep.tolist(), strict=True) if k])

    def release(self) -> None:
        """Drop this process's mapped pages of the ``.rec`` and of a spilled index
        (keeps RSS flat)."""
        self.reader.release()

    def describe(self) -> dict[str, Any]:
        return {"source": str(Path(self.path).resolve()), "source_kind": "rec",
                "source_layout": "insightface" if self.reader.has_header else "im2rec"}


# --------------------------------------------------------------------------------------
# Shard writing (runs in worker processes)

_SOURCE: Any = None

class SampleBlock(NamedTuple):
    """Consecutive good samples of one source: metadata arrays plus the image buffers."""

    keys: np.ndarray  # int64
    labels: np.ndarray  # int64
    flags: np.ndarray  # int64
    exts: np.ndarray  # S3: b"jpg" | b"png"
    sizes: np.ndarray  # int64 image bytes
    payloads: list[Any]  # bytes or zero-copy memoryviews into the source


def samples_block(source: Any, start: int, stop: int, skip_bad: bool,
                  bad: list[tuple[int, str]]) -> SampleBlock:
    """Samples ``start:stop`` of any source through its per-sample ``get``.

    Bad samples raise, or with ``skip_bad`` are appended to ``bad`` as ``(key, error)``.
    """
    keys: list[int] = []
    labels: list[int] = []
    flags: list[int] = []
    exts: list[bytes] = []
    payloads: list[Any] = []
    for index in range(start, stop):
        try:
            key, label, flag, payload, ext = source.get(index)
        except DataError as exc:
            if not skip_bad:
                raise
            bad.append((source.key_of(index), str(exc)))
            continue
        keys.append(key)
        labels.append(label)
        flags.append(flag)
        exts.append(_EXT_BYTES[ext])
        payloads.append(payload)
    return SampleBlock(np.array(keys, np.int64), np.array(labels, np.int64),
                       np.array(flags, np.int64), np.array(exts, "S3"),
                       np.fromiter(map(len, payloads), np.int64, len(payloads)), payloads)


def decodable_only(block: SampleBlock, source: Any, skip_bad: bool,
                   bad: list[tuple[int, str]]) -> SampleBlock:
    """``block`` without the images OpenCV cannot decode (``--verify``): the signature
    and end-marker checks pass a JPEG whose body is garbage, which would otherwise be
    copied into the shards and fail only when training reads it."""
    import cv2

    keep = np.ones(len(block.keys), bool)
    with _libjpeg_quiet():  # its "Corrupt JPEG data" chatter would break the one-line error
        for i, payload in enumerate(block.payloads):
            buf = np.frombuffer(payload, np.uint8)
            try:
                image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
            except cv2.error:
                image = None
            keep[i] = image is not None and image.size > 0
    for i in np.flatnonzero(~keep).tolist():
        key = int(block.keys[i])
        name = source.sample_name(key) if hasattr(source, "sample_name") else \
            f"{source.path}: key {key}"
        error = f"{name}: image of {len(block.payloads[i])} bytes cannot be decoded"
        if not skip_bad:
            raise DataError(error)
        bad.append((int(block.keys[i]), error))
    if keep.all():
        return block
    return SampleBlock(block.keys[keep], block.labels[keep], block.flags[keep],
                       block.exts[keep], block.sizes[keep],
                       [p for p, k in zip(block.payloads, keep.tolist(), strict=True) if k])


@contextlib.contextmanager
def _libjpeg_quiet() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a moment (libjpeg writes warnings there)."""
    try:
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
