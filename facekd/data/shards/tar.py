"""Hand-written ustar framing: headers, member names and json bodies, writev of a block.

Tar headers are written by hand (ustar, mtime 0): ``tarfile`` member by member is several
times slower, and fixed metadata makes shards byte-identical across runs, so a conversion
killed half way resumes by keeping finished shards and redoing the rest. Every non-image
byte of a block is built with array arithmetic; image bytes go from the source buffers to
``os.writev`` without a Python copy.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from facekd.data.shards.sources import SampleBlock
from facekd.errors import DataError

BLOCK = 512
_BLOCK = BLOCK
END_OF_ARCHIVE = bytes(BLOCK * 2)  # two zero blocks
_FRAME_ROWS = 512  # frame rows allocated at least: one block of samples


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


_HEADER_ROW = np.frombuffer(tar_header(b"", 0), np.uint8)  # template for a block of headers
_IOV_MAX = 1024  # iovecs per os.writev call (Linux's IOV_MAX)
_ROW = 4 * _BLOCK  # per sample: padding source, json header, json body, next image header


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


def block_iovecs(block: SampleBlock, pos: int
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
        frame = np.zeros((max(n, _FRAME_ROWS) + 1, _ROW), np.uint8)
        frame[:, _BLOCK:2 * _BLOCK] = _HEADER_ROW
        frame[:, 3 * _BLOCK:] = _HEADER_ROW
        _FRAMES["rows"] = frame
    return frame[:n + 1]


def writev_all(fd: int, buffers: list[Any]) -> None:
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
