"""WebDataset tar shards: conversion from ``.rec`` (and folders), back to ``.rec``, reading.

A shards folder holds ``shard-000000.tar ...`` (per sample ``{key}.jpg|png`` with the
source bytes copied, never re-encoded, and ``{key}.json``), ``manifest.parquet`` (one row
per sample: key, label, shard, byte offset and size of the image inside its tar, sha1)
and ``dataset.json``. The manifest gives the training loader random access into the tars
without unpacking them, while the tars stay readable by the ``webdataset`` library.

Tar headers are written by hand (ustar, mtime 0): ``tarfile`` member by member is several
times slower, and fixed metadata makes shards byte-identical across runs, so a conversion
killed half way resumes by keeping finished shards and redoing the rest.

Conversion cost is meant to stay near "hash every image + copy the bytes": records are
parsed, checked and framed a block at a time with array operations, image bytes go from
the ``.rec`` mapping to ``os.writev`` without a Python copy, and the parent streams the
manifest while the workers write (bench/p2_rec2shards.py measures it against a copy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from facekd.errors import DataError
from facekd.fileio import atomic_path, make_dirs, remove_stale_temps, write_json_atomic

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:06d}.tar"
PARTS_DIR = ".parts"
MANIFEST = "manifest.parquet"
DATASET_JSON = "dataset.json"
FORMAT_NAME = "facekd-shards"
_BLOCK = 512
_ZEROS = bytes(_BLOCK * 2)


# --------------------------------------------------------------------------------------
# Hand-written ustar headers


_HEAD_MID = b"0000644\0" b"0000000\0" b"0000000\0"  # mode, uid, gid (bytes 100-124)
_HEAD_MTIME = b"00000000000\0"  # mtime 0 (bytes 136-148): reproducible shards
_HEAD_TAIL = (b"0" + bytes(100) + b"ustar\0" + b"00").ljust(_BLOCK - 156, b"\0")  # 156-512
_NAME_PAD = bytes(100)
_BASE_SUM = sum(_HEAD_MID) + sum(_HEAD_MTIME) + sum(_HEAD_TAIL) + 8 * 32  # chksum as spaces


def tar_header(name: bytes, size: int) -> bytes:
    """One 512-byte ustar header for a regular file ``name`` of ``size`` bytes."""
    if len(name) > 100:
        raise DataError(f"tar member name longer than 100 bytes: {name[:40]!r}...")
    size_field = b"%011o\0" % size
    checksum = _BASE_SUM + sum(name) + sum(size_field)
    return b"".join((name, _NAME_PAD[len(name):], _HEAD_MID, size_field, _HEAD_MTIME,
                     b"%06o\0 " % checksum, _HEAD_TAIL))


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


# --------------------------------------------------------------------------------------
# Sample sources (picklable; each worker process opens its own file handles)


_PNG_HEAD = np.frombuffer(b"\x89PNG\r\n\x1a\n", np.uint8)
_PNG_END = np.frombuffer(b"IEND", np.uint8)  # then the chunk's 4-byte CRC


class RecSamples:
    """Images of a ``.rec`` dataset, addressed by position in ``image_keys()``."""

    kind = "rec"

    def __init__(self, path: str | os.PathLike) -> None:
        from facekd.data.recordio import open_rec

        self.path = str(path)
        self.reader = open_rec(path)
        self.keys = self.reader.image_keys()
        self._key_list = memoryview(self.keys)  # Python ints on indexing
        self._num_classes: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_key_list"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._key_list = memoryview(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

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
        key = self._key_list[index]
        flag, label, payload = self.reader.read_image(key)
        return key, label, flag, payload, check_image_bytes(payload, self.reader.rec_path, key)

    def key_of(self, index: int) -> int:
        return int(self.keys[index])

    def block(self, start: int, stop: int, skip_bad: bool, bad: list[tuple[int, str]]
              ) -> SampleBlock:
        """Samples ``start:stop`` with payloads as zero-copy views into the ``.rec`` mapping.

        Headers are parsed and image signatures checked for the whole block with array
        operations; only records off that fast path (multipart, damaged, under 16 bytes,
        a JPEG end marker not in the last two bytes or a PNG ``IEND`` not in the last
        chunk) take :meth:`get`, which gives the same bytes or raises the same error.
        """
        keys = self.keys[start:stop]
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
        """Drop this process's mapped pages of the ``.rec`` (keeps RSS flat)."""
        mm = getattr(self.reader, "_mm", None)
        if isinstance(mm, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def describe(self) -> dict[str, Any]:
        return {"source": str(Path(self.path).resolve()), "source_kind": "rec",
                "source_layout": "insightface" if self.reader.has_header else "im2rec"}


# --------------------------------------------------------------------------------------
# Shard writing (runs in worker processes)

_SOURCE: Any = None


def _init_worker(source: Any) -> None:
    global _SOURCE
    _SOURCE = source


_HEADER_ROW = np.frombuffer(tar_header(b"", 0), np.uint8)  # template for a block of headers
_BATCH = 512  # samples per block: hashed, framed and written together (2 writev calls)
_IOV_MAX = 1024  # iovecs per os.writev call (Linux's IOV_MAX)
_ROW = 4 * _BLOCK  # per sample: padding source, json header, json body, next image header
PART_SUFFIX = ".part"  # .parts/shard-NNNNNN.part: the shard's index, three .npy arrays
PART_DTYPE = np.dtype([("key", "<i8"), ("label", "<i8"), ("offset", "<i8"), ("size", "<i8"),
                       ("ext", "S3"), ("sha1", "u1", (20,))])


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


def tar_headers(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``len(names)`` ustar headers at once as an (n, 512) uint8 array (same bytes as
    :func:`tar_header`): names are an ``S100`` array, sizes int64."""
    headers = np.empty((len(names), _BLOCK), np.uint8)
    _fill_headers(headers, _name_bytes(names.astype("S100")), np.asarray(sizes, np.int64))
    return headers


_OCTAL_SHIFTS = 3 * np.arange(10, -1, -1, dtype=np.int64)  # 11 octal digits of a size
_CHECKSUM_SHIFTS = 3 * np.arange(5, -1, -1, dtype=np.int64)  # 6 octal digits


def _fill_headers(out: np.ndarray, name_bytes: np.ndarray, sizes: np.ndarray,
                  template: bool = True) -> None:
    """Write ustar headers into the (m, 512) uint8 view ``out`` (rows may be strided).

    ``name_bytes`` is (m, w <= 100) NUL-padded. The octal size and checksum fields come
    from array arithmetic, the checksum from the name and size bytes only (every other
    field is constant): per-header string formatting was the largest cost per sample.
    With ``template=False`` the rows already hold a header whose name beyond ``w`` bytes
    is NUL, and only the name, size and checksum fields are written.
    """
    if template:
        out[:] = _HEADER_ROW
    out[:, :name_bytes.shape[1]] = name_bytes
    size_digits = 48 + ((sizes[:, None] >> _OCTAL_SHIFTS) & 7)
    out[:, 124:135] = size_digits
    checksum = (_BASE_SUM + name_bytes.sum(axis=1, dtype=np.int64)
                + size_digits.sum(axis=1))
    out[:, 148:154] = 48 + ((checksum[:, None] >> _CHECKSUM_SHIFTS) & 7)
    if template:
        out[:, 154] = 0
        out[:, 155] = 32


def _name_bytes(strings: np.ndarray) -> np.ndarray:
    """An ``S<w>`` array as an (n, w) uint8 array of its NUL-padded bytes."""
    return np.frombuffer(strings.tobytes(), np.uint8).reshape(len(strings), -1)


MemberTexts = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_NAME_WIDTH = 32  # member names: up to 20 digits and a sign, a dot, an extension
_BODY_WIDTH = 128  # json bodies: three int64 values and 30 bytes of keys and punctuation


def member_texts_formatted(keys: np.ndarray, labels: np.ndarray, flags: np.ndarray,
                           exts: np.ndarray) -> MemberTexts:
    """Per sample: image name, json name, json body (NUL-padded uint8 rows) and body size.

    The general path: numpy's and Python's integer formatting (any sign).
    """
    stems = keys.astype("S20")
    bodies = [b'{"label": %d, "key": %d, "flag": %d}' % sample
              for sample in zip(labels.tolist(), keys.tolist(), flags.tolist(), strict=True)]
    return (_name_bytes(np.char.add(np.char.add(stems, b"."), exts).astype(f"S{_NAME_WIDTH}")),
            _name_bytes(np.char.add(stems, b".json").astype(f"S{_NAME_WIDTH}")),
            _name_bytes(np.array(bodies, f"S{_BODY_WIDTH}")),
            np.fromiter(map(len, bodies), np.int64, len(bodies)))


_POW10 = 10 ** np.arange(18, -1, -1, dtype=np.int64)  # 10**18 .. 1: any int64 >= 0
_LABEL_TEXT, _KEY_TEXT, _FLAG_TEXT, _CLOSE_TEXT, _JSON_TEXT = (
    np.frombuffer(text, np.uint8)
    for text in (b'{"label": ', b', "key": ', b', "flag": ', b"}", b".json"))


def _digit_counts(values: np.ndarray) -> np.ndarray:
    return np.maximum(np.searchsorted(_POW10[::-1], values, side="right"), 1)


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) ASCII decimal digits of non-negative ints with exactly ``width`` digits."""
    return (48 + (values[:, None] // _POW10[-width:]) % 10).astype(np.uint8)


def member_texts_by_digits(keys: np.ndarray, labels: np.ndarray, flags: np.ndarray,
                           exts: np.ndarray) -> MemberTexts | None:
    """:func:`member_texts_formatted` with array arithmetic (same bytes), or None when a
    value is negative. Samples are grouped by digit counts (one or two groups in a block
    of consecutive keys) so each group's strings have one layout; formatting numbers one
    by one was the largest Python cost per sample left.
    """
    n = len(keys)
    if n == 0 or min(keys.min(), labels.min(), flags.min()) < 0:
        return None
    code = (_digit_counts(labels) * 32 + _digit_counts(keys)) * 32 + _digit_counts(flags)
    groups, group_of = np.unique(code, return_inverse=True)
    image_names = np.zeros((n, _NAME_WIDTH), np.uint8)
    json_names = np.zeros((n, _NAME_WIDTH), np.uint8)
    bodies = np.zeros((n, _BODY_WIDTH), np.uint8)
    body_sizes = np.empty(n, np.int64)
    exts = np.frombuffer(np.ascontiguousarray(exts, "S3").tobytes(), np.uint8).reshape(n, 3)
    for g, group in enumerate(groups.tolist()):
        label_w, key_w, flag_w = group >> 10, (group >> 5) & 31, group & 31
        rows: Any = slice(None)
        if len(groups) > 1:
            rows = np.flatnonzero(group_of.reshape(-1) == g)
        key_digits = _digits(keys[rows], key_w)
        body = np.empty((len(key_digits), 30 + label_w + key_w + flag_w), np.uint8)
        at = 0
        for piece in (_LABEL_TEXT, _digits(labels[rows], label_w), _KEY_TEXT, key_digits,
                      _FLAG_TEXT, _digits(flags[rows], flag_w), _CLOSE_TEXT):
            body[:, at:at + piece.shape[-1]] = piece
            at += piece.shape[-1]
        bodies[rows, :at] = body
        body_sizes[rows] = at
        json_names[rows, :key_w] = key_digits
        json_names[rows, key_w:key_w + 5] = _JSON_TEXT
        image_names[rows, :key_w] = key_digits
        image_names[rows, key_w] = 46  # "."
        image_names[rows, key_w + 1:key_w + 4] = exts[rows]
    return image_names, json_names, bodies, body_sizes


def _block_iovecs(block: SampleBlock, pos: int
                  ) -> tuple[list[Any], np.ndarray, int]:
    """The tar bytes of ``block`` written at file position ``pos``, as buffers for writev.

    Every non-image byte of a sample (padding, json header and body, the next sample's
    image header) is built with array arithmetic into one 2 KB row per sample; the image
    bytes go to the kernel straight from the source buffers, never copied in Python.
    Returns ``(buffers, image offsets, end position)``.
    """
    n = len(block.keys)
    sizes = block.sizes
    texts = member_texts_by_digits(block.keys, block.labels, block.flags, block.exts)
    if texts is None:
        texts = member_texts_formatted(block.keys, block.labels, block.flags, block.exts)
    image_names, json_names, bodies, body_sizes = texts
    frame = _frame_rows(n)  # row i + 1 belongs to sample i; row 0 holds the first header
    _fill_headers(frame[1:, _BLOCK:2 * _BLOCK], json_names, body_sizes, template=False)
    frame[1:, 2 * _BLOCK:2 * _BLOCK + _BODY_WIDTH] = bodies
    _fill_headers(frame[:-1, 3 * _BLOCK:], image_names, sizes, template=False)
    pads = -sizes & 511
    lengths = sizes + pads + 3 * _BLOCK  # image header + image + pad + json header + body
    ends = pos + np.cumsum(lengths)
    offsets = ends - lengths + _BLOCK
    row_starts = np.arange(1, n + 1, dtype=np.int64) * _ROW
    gap_starts = (row_starts + _BLOCK - pads).tolist()
    gap_ends = (row_starts + _ROW).tolist()
    gap_ends[-1] -= _BLOCK  # the next image header belongs to the next block
    flat = memoryview(frame.reshape(-1))
    buffers: list[Any] = [None] * (2 * n + 1)
    buffers[0] = flat[3 * _BLOCK:_ROW]
    buffers[1::2] = block.payloads
    buffers[2::2] = [flat[a:b] for a, b in zip(gap_starts, gap_ends, strict=True)]
    return buffers, offsets, int(ends[-1])


_FRAMES: dict[str, np.ndarray] = {}  # this process's frame buffer, reused block after block


def _frame_rows(n: int) -> np.ndarray:
    """(n + 1, 2048) rows: zeros (padding source), json header, json body, next image
    header. Kept between blocks so the constant header bytes and the zeros are written
    once per process; each block overwrites only names, sizes, checksums and bodies."""
    frame = _FRAMES.get("rows")
    if frame is None or len(frame) < n + 1:
        frame = np.zeros((max(n, _BATCH) + 1, _ROW), np.uint8)
        frame[:, _BLOCK:2 * _BLOCK] = _HEADER_ROW
        frame[:, 3 * _BLOCK:] = _HEADER_ROW
        _FRAMES["rows"] = frame
    return frame[:n + 1]


def _writev_all(fd: int, buffers: list[Any]) -> None:
    """``os.writev`` of every buffer in IOV_MAX-sized calls, finishing short writes."""
    for lo in range(0, len(buffers), _IOV_MAX):
        chunk = buffers[lo:lo + _IOV_MAX]
        if not hasattr(os, "writev"):  # Windows
            rest = memoryview(b"".join(chunk))
        else:
            want = sum(map(len, chunk))
            done = os.writev(fd, chunk)
            if done == want:
                continue
            rest = memoryview(b"".join(chunk))[done:]  # rare (signals, full disk)
        while rest:
            rest = rest[os.write(fd, rest):]


def _write_shard(out: str, shard: int, start: int, stop: int, skip_bad: bool
                 ) -> dict[str, Any]:
    """Write shard ``shard`` from samples ``start:stop`` and its part index; returns stats.

    Blocks of ``_BATCH`` samples come from the source's vectorised ``block`` (a ``.rec``:
    zero-copy views into the mapping) or per-sample ``get``; each block is hashed, framed
    by :func:`_block_iovecs` and handed to the kernel with ``os.writev``.
    """
    import hashlib

    source = _SOURCE
    read_block = getattr(source, "block", None)
    sha1 = hashlib.sha1
    out_dir = Path(out)
    final = out_dir / SHARD_PATTERN.format(shard)
    parts: list[np.ndarray] = []
    bad: list[tuple[int, str]] = []
    with atomic_path(final) as tmp, open(tmp, "wb", buffering=0) as f:
        fd = f.fileno()
        pos = 0
        for lo in range(start, stop, _BATCH):
            hi = min(lo + _BATCH, stop)
            if read_block is not None:
                block = read_block(lo, hi, skip_bad, bad)
            else:
                block = samples_block(source, lo, hi, skip_bad, bad)
            if getattr(source, "decode_check", False):
                block = decodable_only(block, source, skip_bad, bad)
            n = len(block.keys)
            if not n:
                continue
            part = np.empty(n, PART_DTYPE)
            part["sha1"] = np.frombuffer(b"".join([sha1(p).digest() for p in block.payloads]),
                                         np.uint8).reshape(n, 20)
            part["size"] = block.sizes
            buffers, part["offset"], pos = _block_iovecs(block, pos)
            _writev_all(fd, buffers)
            part["key"], part["label"], part["ext"] = block.keys, block.labels, block.exts
            parts.append(part)
            del block, buffers
        f.write(_ZEROS)  # end-of-archive: two zero blocks
    index = np.concatenate(parts) if parts else np.zeros(0, PART_DTYPE)
    bad_keys = np.array([b[0] for b in bad], np.int64)
    bad_errors = np.array([b[1] for b in bad], dtype=str)
    write_part(_part_path(out_dir, shard), (index, bad_keys, bad_errors))
    if hasattr(source, "release"):
        source.release()
    return {"shard": shard, "samples": len(index), "bad": len(bad),
            "part": (index, bad_keys, bad_errors)}


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


def write_part(path: Path, part: Part) -> None:
    """A shard's index (``PART_DTYPE`` rows, bad keys, bad errors) as three .npy arrays."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for array in part:
            np.save(f, array)


def read_part(path: Path) -> Part:
    """``(index rows, bad keys, bad errors)`` written by :func:`write_part`."""
    try:
        with open(path, "rb") as f:
            index = np.load(f)
            bad_keys = np.load(f)
            bad_errors = np.load(f)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: damaged shard index ({exc}); delete it and the matching "
                        f"shard to convert that shard again") from None
    if index.dtype != PART_DTYPE:
        raise DataError(f"{path}: shard index has fields {index.dtype}, expected {PART_DTYPE}")
    return index, bad_keys, bad_errors


_EXT_BYTES = {"jpg": b"jpg", "png": b"png"}


def _verify_shard(out: str, shard: int, start: int, stop: int, skip_bad: bool
                  ) -> dict[str, Any]:
    """Re-read every sample of ``shard`` and compare it with the source bytes."""
    import hashlib

    source = _SOURCE
    out_dir = Path(out)
    tar_path = out_dir / SHARD_PATTERN.format(shard)
    index, bad_key_array, _ = read_part(_part_path(out_dir, shard))
    bad_keys = set(bad_key_array.tolist())
    keys, labels = index["key"].tolist(), index["label"].tolist()
    offsets, sizes = index["offset"].tolist(), index["size"].tolist()
    digests = [row.tobytes() for row in index["sha1"]]
    row = 0
    with open(tar_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for i in range(start, stop):
            if source.key_of(i) in bad_keys:
                continue
            if row >= len(keys):
                raise DataError(f"{tar_path}: {len(keys)} samples indexed, more expected")
            key, label, _, payload, ext = source.get(i)
            off, size = offsets[row], sizes[row]
            stored = mm[off:off + size]
            name = mm[off - _BLOCK:off - _BLOCK + 100].rstrip(b"\0").decode(errors="replace")
            if (stored != payload or name != f"{key}.{ext}" or keys[row] != key
                    or labels[row] != label or hashlib.sha1(stored).digest() != digests[row]):
                raise DataError(f"{tar_path}: sample {key} differs from the source "
                                f"(verify failed)")
            row += 1
    if row != len(keys):
        raise DataError(f"{tar_path}: {len(keys)} samples indexed, {row} expected")
    return {"shard": shard, "samples": row}


# --------------------------------------------------------------------------------------
# Driver


def _plan(total: int, shard_size: int) -> list[tuple[int, int, int]]:
    if shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    return [(i, start, min(start + shard_size, total))
            for i, start in enumerate(range(0, total, shard_size))]


def _prepare_fork() -> None:
    """Import what the workers would otherwise import lazily on their first shard.

    Forked workers start from the parent's state: importing ``numpy.char`` and
    ``numpy.lib.format`` here once saves each worker doing it on every run.
    """
    import hashlib  # noqa: F401

    import numpy.char
    import numpy.lib.format  # noqa: F401


def _run(tasks: Sequence[tuple[int, int, int]], fn: Callable[..., dict[str, Any]],
         source: Any, out: Path, workers: int, skip_bad: bool, desc: str
         ) -> Iterator[dict[str, Any]]:
    """Run ``fn`` over shard tasks, in-process or in worker processes, with a progress bar.

    Workers take the next task from a shared counter and send results over a pipe; the
    parent only waits on the pipes (no executor threads or per-task queues), and a worker
    that dies without a word (OOM killer) is a :class:`DataError`, not a hang. On the
    first error no new shard starts, the running ones finish, and the error is raised.
    """
    from tqdm import tqdm

    sizes = {shard: stop - start for shard, start, stop in tasks}
    bar = tqdm(total=sum(sizes.values()), desc=desc, unit="img", mininterval=1.0,
               disable=None)
    try:
        if workers <= 1 or len(tasks) <= 1:
            _init_worker(source)
            for shard, start, stop in tasks:
                result = fn(str(out), shard, start, stop, skip_bad)
                bar.update(stop - start)
                yield result
            return
        yield from _run_processes(list(tasks), fn, source, str(out), min(workers, len(tasks)),
                                  skip_bad, lambda shard: bar.update(sizes[shard]))
    finally:
        bar.close()


def _run_processes(tasks: list[tuple[int, int, int]], fn: Callable[..., dict[str, Any]],
                   source: Any, out: str, workers: int, skip_bad: bool,
                   progress: Callable[[int], Any]) -> Iterator[dict[str, Any]]:
    """Results of ``tasks`` run by ``workers`` processes (forked where possible: they
    share the parent's mapped source and imports), in completion order."""
    import multiprocessing as mp
    from multiprocessing.connection import wait as wait_ready

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    if method == "fork":
        _prepare_fork()
    ctx = mp.get_context(method)
    next_task = ctx.Value("q", 0)
    procs: list[Any] = []
    open_pipes: dict[Any, Any] = {}  # receiving end -> its worker, until the worker is done
    try:
        for _ in range(workers):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, daemon=True,
                               args=(sender, next_task, tasks, fn, source, out, skip_bad))
            proc.start()
            sender.close()  # later workers must not inherit it: EOF means this one is done
            procs.append(proc)
            open_pipes[receiver] = proc
        while open_pipes:
            for pipe in wait_ready(list(open_pipes)):
                try:
                    kind, value = pipe.recv()
                except EOFError:
                    proc = open_pipes.pop(pipe)
                    pipe.close()
                    proc.join()
                    if proc.exitcode:
                        raise DataError(f"{out}: a conversion worker died (exit code "
                                        f"{proc.exitcode}); run again to resume") from None
                    continue
                if kind == "error":
                    raise value
                progress(value["shard"])
                yield value
    finally:
        with next_task.get_lock():
            next_task.value = len(tasks)  # no new shard starts; running ones finish
        while open_pipes:  # keep reading, or a worker blocks sending a large result
            for pipe in wait_ready(list(open_pipes)):
                try:
                    pipe.recv()
                except (EOFError, OSError):
                    open_pipes.pop(pipe)
                    pipe.close()
        for proc in procs:
            proc.join()


def _worker_main(pipe: Any, next_task: Any, tasks: list[tuple[int, int, int]],
                 fn: Callable[..., dict[str, Any]], source: Any, out: str,
                 skip_bad: bool) -> None:
    """A worker process: run tasks until none are left, sending each result (or the error)."""
    _init_worker(source)
    try:
        while True:
            with next_task.get_lock():
                index = next_task.value
                next_task.value = index + 1
            if index >= len(tasks):
                return
            shard, start, stop = tasks[index]
            pipe.send(("result", fn(out, shard, start, stop, skip_bad)))
    except BaseException as exc:  # reported to the parent, which raises it
        try:
            pipe.send(("error", exc))
        except Exception:  # an exception that does not pickle
            pipe.send(("error", DataError(f"{out}: conversion worker failed: {exc!r}")))
    finally:
        pipe.close()


def write_shards(source: Any, out: str | os.PathLike, *, shard_size: int = 10000,
                 workers: int = 2, verify: bool = False, skip_bad: bool = False,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert a sample source into tar shards + manifest; resumes finished shards.

    The manifest is streamed while the workers run (each shard's index comes back with
    its result, in any order, and is written in shard order), so little is left to do
    after the last shard.
    """
    from facekd.logs import add_file_log

    out = make_dirs(out)
    make_dirs(out / PARTS_DIR)
    for folder in (out, out / PARTS_DIR):  # temp files of a killed earlier run
        remove_stale_temps(folder)
    handler = add_file_log(out / "convert.log")
    try:
        started = time.time()
        source.decode_check = verify  # decode every image while writing (see decodable_only)
        tasks = _plan(len(source), shard_size)
        plan_file = out / PARTS_DIR / "plan.json"
        plan = {"source": source.describe(), "samples": len(source), "shard_size": shard_size}
        if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
            raise DataError(f"{out}: holds shards of a different conversion "
                            f"({plan_file} differs); use an empty output folder")
        write_json_atomic(plan_file, plan)
        todo = [t for t in tasks if not _shard_done(out, t[0])]
        if len(todo) < len(tasks):
            log.info("%s: resuming, %d of %d shards already written", out,
                     len(tasks) - len(todo), len(tasks))
        written_before = {t[0] for t in tasks} - {t[0] for t in todo}
        with _ManifestWriter(out, [t[0] for t in tasks], written_before) as manifest:
            for result in _run(todo, _write_shard, source, out, workers, skip_bad,
                               "rec2shards"):
                manifest.add(result["shard"], result.get("part"))
            manifest.close()
        summary = _write_dataset_json(out, tasks, source, manifest, extra or {})
        if verify:
            for _ in _run(tasks, _verify_shard, source, out, workers, skip_bad, "verify"):
                pass
            summary["verified"] = True
        summary["seconds"] = round(time.time() - started, 3)
        return summary
    finally:
        import logging as _logging

        _logging.getLogger().removeHandler(handler)
        handler.close()


def _part_path(out: Path, shard: int) -> Path:
    return out / PARTS_DIR / f"{SHARD_PATTERN.format(shard)[:-len('.tar')]}{PART_SUFFIX}"


def _shard_done(out: Path, shard: int) -> bool:
    return (out / SHARD_PATTERN.format(shard)).is_file() and _part_path(out, shard).is_file()


_ROW_GROUP = 1 << 11  # manifest rows per parquet row group: small buffer, flat RSS
Part = tuple[np.ndarray, np.ndarray, np.ndarray]  # index rows, bad keys, bad errors


class _ManifestWriter:
    """``manifest.parquet`` streamed in shard order from shard indexes arriving in any order.

    Shards in ``written_before`` (finished by an earlier, interrupted run) are read from
    their part files when their turn comes. The manifest appears under its final name
    only on :meth:`close`; leaving the ``with`` block on an error removes the temp file.
    """

    def __init__(self, out: Path, shards: Sequence[int], written_before: set[int]) -> None:
        self.out = out
        self.shards = list(shards)
        self.written_before = written_before
        self.next = 0  # position in ``shards`` of the next shard to write
        self.arrived: dict[int, Part] = {}
        self.samples = 0
        self.max_label = -1
        self.bad: list[tuple[int, str]] = []
        self._rows: list[np.ndarray] = []
        self._row_shards: list[np.ndarray] = []
        self._buffered = 0
        self._stack = contextlib.ExitStack()
        self._writer: Any = None

    def __enter__(self) -> _ManifestWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def add(self, shard: int, part: Part | None) -> None:
        """Shard ``shard`` is written; ``part`` is its index (None: read its part file)."""
        self.arrived[shard] = part if part is not None else read_part(
            _part_path(self.out, shard))
        self._drain()

    def close(self) -> None:
        """Write what is left and move the manifest to its final name."""
        self._drain()
        if self.next < len(self.shards):
            missing = SHARD_PATTERN.format(self.shards[self.next])
            raise DataError(f"{self.out}: {missing} was never written")
        self._flush()
        self._stack.close()

    def _drain(self) -> None:
        while self.next < len(self.shards):
            shard = self.shards[self.next]
            part = self.arrived.pop(shard, None)
            if part is None:
                if shard not in self.written_before:
                    return  # still being written
                part = read_part(_part_path(self.out, shard))
            index, bad_keys, bad_errors = part
            if len(index):
                self._rows.append(index)
                self._row_shards.append(np.full(len(index), shard, np.int32))
                self.max_label = max(self.max_label, int(index["label"].max()))
            self.samples += len(index)
            self._buffered += len(index)
            self.bad.extend(zip(bad_keys.tolist(), bad_errors.tolist(), strict=True))
            self.next += 1
            if self._buffered >= _ROW_GROUP:
                self._flush()

    def _flush(self) -> None:
        """Write the buffered rows as one row group (and open the file on first use)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("key", pa.int64()), ("label", pa.int64()), ("shard", pa.int32()),
                            ("offset", pa.int64()), ("size", pa.int64()),
                            ("ext", pa.string()), ("sha1", pa.string())])
        if self._writer is None:
            tmp = self._stack.enter_context(atomic_path(self.out / MANIFEST, suffix=".parquet"))
            self._writer = self._stack.enter_context(pq.ParquetWriter(tmp, schema))
        elif not self._rows:
            return
        rows = np.concatenate(self._rows) if self._rows else np.zeros(0, PART_DTYPE)
        shards = np.concatenate(self._row_shards) if self._rows else np.zeros(0, np.int32)
        self._writer.write_table(pa.table({
            "key": np.ascontiguousarray(rows["key"]),
            "label": np.ascontiguousarray(rows["label"]),
            "shard": shards,
            "offset": np.ascontiguousarray(rows["offset"]),
            "size": np.ascontiguousarray(rows["size"]),
            "ext": pa.array(np.ascontiguousarray(rows["ext"])).cast(pa.string()),
            "sha1": _hex_digests(rows["sha1"])}, schema=schema))
        self._rows.clear()
        self._row_shards.clear()
        self._buffered = 0


def _write_dataset_json(out: Path, tasks: Sequence[tuple[int, int, int]], source: Any,
                        manifest: _ManifestWriter, extra: dict[str, Any]) -> dict[str, Any]:
    """``dataset.json`` (and ``bad_records.txt``) once the manifest is complete."""
    bad = manifest.bad
    samples = manifest.samples
    num_classes = int(getattr(source, "num_classes", 0) or 0) or manifest.max_label + 1
    dataset = {"format": FORMAT_NAME, "version": 1, "samples": samples,
               "num_classes": num_classes, "shards": [SHARD_PATTERN.format(t[0]) for t in tasks],
               "manifest": MANIFEST, **source.describe(), "bad_records": len(bad), **extra}
    write_json_atomic(out / DATASET_JSON, dataset)
    if bad:
        from facekd.fileio import write_text_atomic

        write_text_atomic(out / "bad_records.txt", "".join(f"{k}\t{e}\n" for k, e in bad))
        log.warning("%s: skipped %d bad records (listed in bad_records.txt)", out, len(bad))
    summary = {"out": str(out), "samples": samples, "shards": len(tasks),
               "num_classes": num_classes, "bad_records": len(bad),
               "bad_examples": [e for _, e in bad[:5]]}
    if bad:
        summary["bad_records_file"] = str(out / "bad_records.txt")
    return summary


def _hex_digests(raw: np.ndarray) -> Any:
    """(n, 20) uint8 digests -> pyarrow strings of 40-char hex, built from one hex buffer."""
    import pyarrow as pa

    n = len(raw)
    text = np.ascontiguousarray(raw, np.uint8).tobytes().hex().encode("ascii")
    offsets = np.arange(0, 40 * n + 1, 40, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text)
                                            ).cast(pa.string())


def rec2shards(source: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 10000,
               workers: int = 2, verify: bool = False, skip_bad: bool = False
               ) -> dict[str, Any]:
    """``.rec`` dataset (folder or file) -> WebDataset tar shards + manifest + dataset.json."""
    return write_shards(RecSamples(source), out, shard_size=shard_size, workers=workers,
                        verify=verify, skip_bad=skip_bad)


# --------------------------------------------------------------------------------------
# Reading shards


class ShardSet:
    """Random access to a shards folder through its manifest (one mmap per tar, lazily)."""

    def __init__(self, folder: str | os.PathLike, max_open: int | None = None) -> None:
        from facekd.data.shard_meta import load_shards_meta

        self.folder = Path(folder)
        self.max_open = max_open  # None: keep every shard mapped (random access)
        checked = load_shards_meta(self.folder)  # every value validated before use
        self.meta = checked.meta
        self.keys, self.labels, self.shards = checked.keys, checked.labels, checked.shards
        self.offsets, self.sizes = checked.offsets, checked.sizes
        self.shard_names: list[str] = checked.shard_names
        self.num_classes = checked.num_classes
        self._maps: OrderedDict[int, Any] = OrderedDict()
        self._views: tuple[memoryview, ...] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        state["_views"] = None
        return state

    def _map(self, shard: int) -> Any:
        mm = self._maps.get(shard)
        if mm is not None:
            if self.max_open is not None:
                self._maps.move_to_end(shard)
        else:
            if self.max_open is not None and len(self._maps) >= self.max_open:
                self._maps.popitem(last=False)[1].close()  # unmapped: RSS stays flat
            path = self.folder / self.shard_names[shard]
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (FileNotFoundError, ValueError) as exc:
                raise DataError(f"{path}: cannot open shard ({exc})") from None
            self._maps[shard] = mm
        return mm

    def read(self, index: int) -> bytes:
        """Image bytes of manifest row ``index``."""
        if self._views is None:
            self._views = (memoryview(self.shards), memoryview(self.offsets),
                           memoryview(self.sizes))
        shards, offsets, sizes = self._views
        shard, off, size = shards[index], offsets[index], sizes[index]
        mm = self._maps.get(shard) if self.max_open is None else None
        if mm is None:
            mm = self._map(shard)
        if off + size > len(mm):
            raise DataError(f"{self.folder / self.shard_names[shard]}: sample "
                            f"{int(self.keys[index])} lies beyond the end of the shard")
        return mm[off:off + size]

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps = OrderedDict()


def is_shards_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def shards2rec(source: str | os.PathLike, out: str | os.PathLike,
               progress: bool = True, verify: bool = False) -> dict[str, Any]:
    """Shards folder -> insightface ``train.rec``/``train.idx``/``property`` (grouped by label).

    ``verify`` checks every image against the manifest's sha1 before writing it.
    """
    import hashlib

    from facekd.data.recordio import write_insightface_dataset
    from facekd.data.shard_meta import manifest_sha1

    shards = ShardSet(source, max_open=4)
    order = np.argsort(shards.labels, kind="stable")
    labels = shards.labels
    digests = manifest_sha1(source) if verify else None

    def samples() -> Iterator[tuple[int, bytes]]:
        for i in order.tolist():
            payload = shards.read(i)
            if digests is not None and hashlib.sha1(payload).hexdigest() != digests[i]:
                raise DataError(f"{shards.folder / shards.shard_names[shards.shards[i]]}: "
                                f"sample {int(shards.keys[i])} does not match its sha1 in "
                                f"{MANIFEST} (verify failed)")
            yield int(labels[i]), payload

    try:
        summary = write_insightface_dataset(out, samples(), shards.num_classes,
                                            progress=progress)
    finally:
        shards.close()
    summary["source"] = str(source)
    return summary
