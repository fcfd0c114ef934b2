"""MXNet RecordIO (``.rec`` + ``.idx``) in pure Python: reader, writer and insightface layout.

Users hold MS1M / Glint / WebFace as ``train.rec`` files and mxnet no longer installs with
NumPy >= 1.24, so facekd reads and writes the format itself. The byte layout follows
dmlc-core's ``recordio`` (see ``../shared/reference/formats.md``): every part is
``uint32 magic | uint32 lrec | data | zero padding to 4 bytes`` with
``lrec = cflag << 29 | length``; a record containing the magic number at a 4-aligned
offset is split there into parts (cflag 1 first, 2 middle, 3 last) and the magic is put
back on reading. The writer reproduces MXNet's bytes exactly.

Random access keeps the whole ``.idx`` as two numpy arrays (keys, offsets) and reads
through one ``mmap``: a lookup is an array index plus two ``struct.unpack_from`` calls,
with no per-record Python objects beyond the result.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import numbers
import os
import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from facekd.errors import DataError
from facekd.fileio import make_dirs, output_error

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
MAX_PART_LENGTH = LENGTH_MASK
_FRAME = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_FAST_HEAD = struct.Struct("<IIIf")  # magic, lrec, flag, label
_F32 = struct.Struct("<f")
IR_SIZE = _IR.size  # 24 bytes


class IRHeader(NamedTuple):
    """MXNet's image-record header: ``label`` is a float, or a float32 vector when flag > 0."""

    flag: int
    label: Any
    id: int
    id2: int


# --------------------------------------------------------------------------------------
# Record packing (the payload of one logical record)


def pack_record(header: IRHeader | Sequence[Any], payload: bytes) -> bytes:
    """Pack ``header`` + payload like ``mx.recordio.pack``.

    A numeric label forces ``flag = 0``; a sequence label becomes a float32 vector after
    the header with ``flag = len(label)`` and the header's label field 0.0.
    """
    _, label, id_, id2 = header
    try:
        if isinstance(label, numbers.Number):
            head = _IR.pack(0, float(label), int(id_), int(id2))
        else:
            vector = np.asarray(label, dtype=np.float32).ravel()
            head = _IR.pack(vector.size, 0.0, int(id_), int(id2)) + vector.tobytes()
    except (struct.error, OverflowError, TypeError, ValueError) as exc:
        raise DataError(f"cannot pack record header {tuple(header)!r}: {exc}") from None
    return head + bytes(payload)


def unpack_record(record: bytes | memoryview, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a reassembled record into its :class:`IRHeader` and the image payload."""
    if len(record) < IR_SIZE:
        raise DataError(f"{where}: record of {len(record)} bytes is shorter than the "
                        f"{IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = _IR.unpack_from(record, 0)
    start = IR_SIZE
    if flag:
        end = IR_SIZE + 4 * flag
        if end > len(record):
            raise DataError(f"{where}: IRHeader flag {flag} announces a {flag}-float label "
                            f"vector but the record has only {len(record)} bytes")
        label = np.frombuffer(bytes(record[IR_SIZE:end]), dtype=np.float32)
        start = end
    return IRHeader(flag, label, id_, id2), bytes(record[start:])


_INT64_LIMIT = float(1 << 63)


def label_to_int(label: Any, where: str = "record") -> int:
    """Identity of an image record: the scalar label, or element 0 of a label vector."""
    value = (label[0] if label.size else -1) if isinstance(label, np.ndarray) else label
    try:
        result = int(value)
    except (ValueError, OverflowError):
        raise DataError(f"{where}: label {value} is not a finite number") from None
    if not -(1 << 63) <= result < 1 << 63:  # a float32 label can reach 3.4e38
        raise DataError(f"{where}: label {value} is out of range for a class index")
    return result


# --------------------------------------------------------------------------------------
# Framing (MXNet / dmlc writer rules)


def split_points(record: bytes) -> list[int]:
    """Offsets where dmlc's writer splits ``record``: the magic at 4-aligned offsets."""
    limit = len(record) & ~3
    hits: list[int] = []
    i = record.find(MAGIC_BYTES)
    while i != -1 and i + 4 <= limit:
        if i & 3 == 0:
            hits.append(i)
            i = record.find(MAGIC_BYTES, i + 4)
        else:
            i = record.find(MAGIC_BYTES, i + 1)
    return hits


def _part(cflag: int, data: bytes) -> bytes:
    length = len(data)
    if length > MAX_PART_LENGTH:
        raise DataError(f"record part of {length} bytes exceeds RecordIO's 2**29-1 limit")
    pad = -length & 3
    return _FRAME.pack(MAGIC, (cflag << 29) | length) + data + b"\0" * pad


def frame_record(record: bytes) -> bytes:
    """The bytes dmlc's ``RecordIOWriter::WriteRecord`` emits for one record."""
    hits = split_points(record)
    if not hits:
        return _part(0, record)
    out = []
    start = 0
    for n, hit in enumerate(hits):
        out.append(_part(1 if n == 0 else 2, record[start:hit]))
        start = hit + 4
    out.append(_part(3, record[start:]))
    return b"".join(out)


# --------------------------------------------------------------------------------------
# Index files


_IDX_BLOCK = 8 << 20  # bytes of .idx text parsed at a time


def parse_idx(idx_path: str | os.PathLike, spill_dir: str | os.PathLike | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Read ``key<TAB>offset`` lines into two int64 arrays (file order).

    The text is parsed a block at a time into arrays sized by a first counting pass, so
    the peak is the two arrays (16 bytes a record), not the text plus two copies of it.
    With ``spill_dir`` the arrays live in an unnamed temporary file there, memory-mapped
    (:func:`spilled_array`): a conversion then holds no per-record memory of its own.
    """
    idx_path = Path(idx_path)
    lines = 0
    last = b"\n"
    ascii_only = True
    with open(idx_path, "rb") as f:
        while block := f.read(_IDX_BLOCK):
            lines += block.count(b"\n")
            ascii_only = ascii_only and block.isascii()
            last = block[-1:]
    if last != b"\n":
        lines += 1
    keys, offsets = (spilled_array(lines, spill_dir) for _ in range(2))
    rows = 0
    carry = b""
    blank = True
    with open(idx_path, "rb") as f:
        while True:
            block = f.read(_IDX_BLOCK)
            text = carry + block
            if block:
                cut = text.rfind(b"\n") + 1
                text, carry = text[:cut], text[cut:]
            else:
                carry = b""
            if text.strip():
                blank = False
                count = text.count(b"\n") + (0 if text.endswith(b"\n") else 1)
                try:
                    flat = np.fromstring(text, dtype=np.int64, sep=" ")
                except ValueError:
                    flat = np.zeros(0, np.int64)
                if flat.size != 2 * count or rows + count > lines or not ascii_only:
                    _raise_bad_idx_line(idx_path, idx_path.read_bytes())
                    raise DataError(f"{idx_path}: not a RecordIO index ('key<TAB>offset' "
                                    f"per line)")
                keys[rows:rows + count] = flat[0::2]
                offsets[rows:rows + count] = flat[1::2]
                rows += count
                release_array(keys, offsets)
            if not block:
                break
    if blank:  # an empty or all-blank file indexes nothing
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if rows != lines:
        _raise_bad_idx_line(idx_path, idx_path.read_bytes())
        raise DataError(f"{idx_path}: not a RecordIO index ('key<TAB>offset' per line)")
    return keys, offsets


def spilled_array(n: int, spill_dir: str | os.PathLike | None, dtype: Any = np.int64
                  ) -> np.ndarray:
    """An array of ``n`` values: in memory, or mapped from an unnamed file in ``spill_dir``.

    The file has no name (removed as soon as it is mapped), so nothing is left behind by
    a killed run; its pages are page cache that :func:`release_array` drops from this
    process's RSS once written or read.
    """
    if spill_dir is None or n == 0:
        return np.empty(n, dtype)
    import tempfile

    size = n * np.dtype(dtype).itemsize
    try:
        with tempfile.TemporaryFile(dir=spill_dir) as f:
            if hasattr(os, "posix_fallocate"):  # a full disk: ENOSPC now, not SIGBUS later
                os.posix_fallocate(f.fileno(), 0, size)
            else:
                f.truncate(size)
            return np.memmap(f, dtype=dtype, mode="r+", shape=(n,))
    except OSError as exc:
        raise output_error(Path(spill_dir), exc) from exc


def release_array(*arrays: np.ndarray) -> None:
    """Drop the resident pages of memory-mapped arrays (no-op for in-memory ones)."""
    for values in arrays:
        mm = getattr(values, "_mmap", None)
        if mm is None and isinstance(getattr(values, "base", None), mmap.mmap):
            mm = values.base
        if isinstance(mm, mmap.mmap):
            drop_pages(mm)


def _raise_bad_idx_line(idx_path: Path, text: bytes) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            shown = line[:60].decode("latin-1")
            raise DataError(f"{idx_path}: line {number} is not 'key<TAB>offset': {shown!r}")


def write_idx(idx_path: str | os.PathLike, keys: Iterable[int], offsets: Iterable[int]) -> None:
    """Write an index atomically in MXNet's ``key\\toffset\\n`` format."""
    from facekd.fileio import write_bytes_atomic

    body = "".join(f"{int(k)}\t{int(o)}\n" for k, o in zip(keys, offsets, strict=True))
    write_bytes_atomic(idx_path, body.encode("ascii"))


# --------------------------------------------------------------------------------------
# Reader


def _map_file(path: Path) -> tuple[Any, mmap.mmap | bytes, int]:
    """Open and mmap ``path`` read-only (an empty file maps to ``b''``)."""
    f = open(path, "rb")  # noqa: SIM115 - kept open for the reader's lifetime
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return f, b"", 0
    return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


_DROP_EVERY = 4096  # records between page releases in whole-file passes
_SPAN_BLOCK = 1 << 16  # records per vectorised header read
# Pages the kernel maps around each one read (fault-around, large page-cache folios):
# measured on Linux 6.x, a 128 KB margin left 80 KB a block resident, 1 MB none
_FAULT_AROUND = 2 << 20
_DROP_BYTES = 32 << 20  # bytes between page releases in a sequential scan


def drop_pages(data: Any, start: int = 0, end: int | None = None) -> None:
    """Unmap the resident pages of ``data[start:end]`` (an mmap); the page cache stays.

    Whole-file passes (index validation, label scans, reindex) would otherwise count the
    entire file in the process's RSS; dropping as they go keeps conversions flat in size.
    """
    if not isinstance(data, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start -= start % mmap.PAGESIZE
    end = len(data) if end is None else min(end, len(data))
    if end > start:
        data.madvise(mmap.MADV_DONTNEED, start, end - start)


def scan_rec(rec_path: str | os.PathLike, data: Any = None) -> np.ndarray:
    """Offsets of every record's first part, by walking the file (no ``.idx`` needed)."""
    rec_path = Path(rec_path)
    f = None
    if data is None:
        f, data, size = _map_file(rec_path)
    size = len(data)
    offsets = array("q")
    unpack = _FRAME.unpack_from
    pos = 0
    dropped = 0
    inside = False
    try:
        while pos < size:
            if pos + 8 > size:
                raise DataError(f"{rec_path}: truncated at byte {pos}: {size - pos} trailing "
                                f"bytes are not a RecordIO part header")
            magic, lrec = unpack(data, pos)
            if magic != MAGIC:
                raise DataError(f"{rec_path}: wrong magic 0x{magic:08x} at byte {pos} "
                                f"(record {len(offsets)}); not a RecordIO file or corrupt")
            cflag = lrec >> 29
            length = lrec & LENGTH_MASK
            if cflag in (0, 1):
                if inside:
                    raise DataError(f"{rec_path}: multipart record at byte {offsets[-1]} "
                                    f"has no last part (new record at byte {pos})")
                offsets.append(pos)
                inside = cflag == 1
            elif cflag in (2, 3):
                if not inside:
                    raise DataError(f"{rec_path}: continuation part (cflag {cflag}) at byte "
                                    f"{pos} without a first part")
                inside = cflag == 2
            else:
                raise DataError(f"{rec_path}: invalid cflag {cflag} at byte {pos}")
            end = pos + 8 + length
            if end > size:
                raise DataError(f"{rec_path}: truncated: record part at byte {pos} needs "
                                f"{length} bytes, file ends after {size - pos - 8}")
            pos = end + (-length & 3)
            if pos - dropped > _DROP_BYTES:
                drop_pages(data, dropped, pos)
                dropped = pos - pos % mmap.PAGESIZE
        drop_pages(data)
        if inside:
            raise DataError(f"{rec_path}: truncated: multipart record at byte {offsets[-1]} "
                            f"has no last part")
    finally:
        if f is not None:
            if isinstance(data, mmap.mmap):
                data.close()
            f.close()
    return np.frombuffer(offsets, dtype=np.int64).copy()


class RecordReader:
    """Random access to a ``.rec`` by key, through its ``.idx`` (or a scan without one).

    ``reader[key] -> (IRHeader, payload)``; :meth:`read_raw` returns the reassembled
    record. Understands insightface's layout (header record 0, identity records) and the
    plain im2rec layout (every key an image). Picklable: a copy reopens the file lazily,
    so DataLoader workers each get their own mmap.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 *, property_path: str | os.PathLike | None = None,
                 spill_dir: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise DataError(f"{self.rec_path}: RecordIO file not found")
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self.property_path = Path(property_path) if property_path else None
        self._file: Any = None
        self._mm: Any = None
        self._size = 0
        self._open()
        if self.idx_path.is_file():
            # spill_dir: the index lives in a mapped scratch file there (conversions)
            keys, offsets = parse_idx(self.idx_path, spill_dir)
            self._check_covers(offsets)
        else:
            log.warning("%s: no index file %s; scanning the records sequentially "
                        "(run 'facekd prep reindex' to write one)", self.rec_path,
                        self.idx_path.name)
            offsets = scan_rec(self.rec_path, self._mm)
            keys = np.arange(len(offsets), dtype=np.int64)
            self.idx_path = None  # type: ignore[assignment]
        self._set_index(keys, offsets)
        self._layout: tuple[tuple[int, int] | None, tuple[int, int] | None] | None = None
        self._image_keys: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._view: memoryview | None = None

    # -- set-up ---------------------------------------------------------------------
    def _open(self) -> None:
        self._file, self._mm, self._size = _map_file(self.rec_path)

    def _check_covers(self, offsets: np.ndarray) -> None:
        """An ``.idx`` must index the ``.rec`` to its last record: an empty or cut-short
        index would silently drop every record after it."""
        hint = f"rebuild it with 'facekd prep reindex {self.rec_path}'"
        if not len(offsets):
            if self._size:
                raise DataError(f"{self.idx_path}: empty index beside a {self._size}-byte "
                                f"{self.rec_path.name}; {hint}")
            return
        last = int(offsets.max())
        release_array(offsets)
        if last < 0 or last + 8 > self._size or last & 3:
            return  # _set_index names the bad offset
        end = self._record_end(last)
        if end is not None and end < self._size:
            raise DataError(f"{self.idx_path}: indexes {len(offsets)} records ending at byte "
                            f"{end}, but {self.rec_path.name} has {self._size} bytes (the "
                            f"index is truncated or stale); {hint}")

    def _record_end(self, pos: int) -> int | None:
        """Byte after the (possibly multipart) record at ``pos``; None when damaged."""
        while pos + 8 <= self._size:
            magic, lrec = _FRAME.unpack_from(self._mm, pos)
            if magic != MAGIC:
                return None
            length = lrec & LENGTH_MASK
            pos += 8 + length + (-length & 3)
            if lrec >> 29 in (0, 3):
                return pos
        return None

    def _set_index(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        """Check every offset (inside the file, aligned, at a first part) and key order.

        In blocks of ``_DROP_EVERY`` records, dropping the pages each block touched (of the
        ``.rec`` and of a spilled index), so opening a 40M-record file holds no temporary
        of its size and leaves none of its pages resident.
        """
        where = self.idx_path or self.rec_path
        n = len(keys)
        words = np.frombuffer(self._mm, dtype="<u4", count=self._size // 4) if n else None
        contiguous = n > 0 and int(keys[0]) >= 0
        first_key = int(keys[0]) if n else 0
        try:
            for lo in range(0, n, _DROP_EVERY):
                hi = min(lo + _DROP_EVERY, n)
                block, block_keys = offsets[lo:hi], keys[lo:hi]
                bad = (block < 0) | (block + 8 > self._size) | (block & 3 != 0)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise DataError(f"{where}: key {int(block_keys[i])} points at byte "
                                    f"{int(block[i])}, outside {self.rec_path.name} "
                                    f"({self._size} bytes) or unaligned")
                chunk = np.asarray(block) // 4
                bad = (words[chunk] != MAGIC) | ((words[chunk + 1] >> 29) > 1)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise DataError(f"{where}: key {int(block_keys[i])} points at byte "
                                    f"{int(block[i])} of {self.rec_path.name}, which is not "
                                    f"the start of a record (wrong magic or a continuation "
                                    f"part)")
                if contiguous:
                    contiguous = bool((np.asarray(block_keys) == np.arange(
                        first_key + lo, first_key + hi)).all())
                # with a margin: the kernel maps pages around each one read (fault-around),
                # which would otherwise stay resident between the blocks
                drop_pages(self._mm, max(int(chunk.min()) * 4 - _FAULT_AROUND, 0),
                           int(chunk.max()) * 4 + 8 + _FAULT_AROUND)
                release_array(keys, offsets)
        finally:
            del words
        self._keys = keys
        self._offsets = offsets
        self._offset_list = memoryview(offsets)  # scalar reads give Python ints, fast
        self._base: int | None = None
        self._order: np.ndarray | None = None
        if contiguous:
            self._base = first_key
        else:
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            if n > 1 and (dup := np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])).size:
                raise DataError(f"{where}: key {int(sorted_keys[dup[0]])} appears twice")
            self._order = order
            self._sorted_keys = sorted_keys

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_file", "_mm", "_offset_list", "_view"):
            state[name] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()
        self._offset_list = memoryview(self._offsets)

    def release(self) -> None:
        """Drop this process's resident pages of the ``.rec`` mapping and of a spilled
        index (the page cache keeps them): after a pass, RSS is back to the arrays."""
        drop_pages(self._mm)
        release_array(self._keys, self._offsets)

    def close(self) -> None:
        self._offset_list = None  # type: ignore[assignment]
        if self._view is not None:
            self._view.release()  # raises BufferError while payload views are alive
            self._view = None
        if isinstance(self._mm, mmap.mmap):
            self._mm.close()
        if self._file is not None:
            self._file.close()
        self._mm, self._file = None, None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys -----------------------------------------------------------------------
    def keys(self) -> np.ndarray:
        """All keys in ``.idx`` order (int64 array)."""
        return self._keys

    def offsets(self) -> np.ndarray:
        return self._offsets

    def __len__(self) -> int:
        return len(self._keys)

    def _position(self, key: int) -> int:
        if self._base is not None:
            pos = key - self._base
            if 0 <= pos < len(self._keys):
                return pos
        elif self._order is not None and len(self._keys):
            i = int(np.searchsorted(self._sorted_keys, key))
            if i < len(self._sorted_keys) and self._sorted_keys[i] == key:
                return int(self._order[i])
        raise KeyError(key)

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`_position` (every key must exist)."""
        if self._base is not None:
            positions = keys - self._base
            if len(keys) and (positions.min() < 0 or positions.max() >= len(self._keys)):
                raise self._missing(int(keys[np.argmax((positions < 0) |
                                                       (positions >= len(self._keys)))]))
            return positions
        found = np.searchsorted(self._sorted_keys, keys)
        found = np.minimum(found, max(len(self._sorted_keys) - 1, 0))
        if len(keys) and not np.array_equal(self._sorted_keys[found], keys):
            raise self._missing(int(keys[np.argmax(self._sorted_keys[found] != keys)]))
        return self._order[found]

    def __contains__(self, key: object) -> bool:
        try:
            self._position(int(key))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    # -- reading --------------------------------------------------------------------
    def _missing(self, key: int) -> DataError:
        return DataError(f"{self.rec_path}: no record with key {key} in {self.idx_path or 'scan'}")

    def _joined(self, off: int, key: int) -> bytes:
        """Reassemble the parts of the record starting at ``off`` (magic put back)."""
        mm, size = self._mm, self._size
        chunks = []
        pos = off
        while True:
            if pos + 8 > size:
                raise DataError(f"{self.rec_path}: key {key}: truncated record at byte {pos}")
            magic, lrec = _FRAME.unpack_from(mm, pos)
            cflag = lrec >> 29
            if magic != MAGIC:
                raise DataError(f"{self.rec_path}: key {key}: wrong magic 0x{magic:08x} at "
                                f"byte {pos}")
            if (cflag in (0, 1)) != (pos == off) or cflag > 3:
                raise DataError(f"{self.rec_path}: key {key}: unexpected part cflag {cflag} "
                                f"at byte {pos}")
            length = lrec & LENGTH_MASK
            end = pos + 8 + length
            if end > size:
                raise DataError(f"{self.rec_path}: key {key}: truncated record: part at byte "
                                f"{pos} needs {length} bytes, file has {size - pos - 8}")
            chunks.append(mm[pos + 8:end])
            if cflag == 0 or cflag == 3:
                return MAGIC_BYTES.join(chunks)
            pos = end + (-length & 3)

    def read_raw(self, key: int) -> bytes:
        """The whole reassembled record (IRHeader + label vector + payload)."""
        try:
            pos = self._position(key)
        except KeyError:
            raise self._missing(key) from None
        return self._joined(self._offset_list[pos], key)

    def __getitem__(self, key: int) -> tuple[IRHeader, bytes]:
        try:
            pos = self._position(key)
        except KeyError:
            raise self._missing(key) from None
        off = self._offset_list[pos]
        mm = self._mm
        lrec = _FRAME.unpack_from(mm, off)[1]  # magic and cflag 0/1 checked at open
        if lrec >> 29:
            return unpack_record(self._joined(off, key), f"{self.rec_path}: key {key}")
        start = off + 8
        end = start + lrec
        if end > self._size or lrec < IR_SIZE:
            raise DataError(f"{self.rec_path}: key {key}: truncated or short record at byte "
                            f"{off} ({lrec} bytes announced, file has {self._size - start})")
        flag, label, id_, id2 = _IR.unpack_from(mm, start)
        start += IR_SIZE
        if flag:
            vec_end = start + 4 * flag
            if vec_end > end:
                raise DataError(f"{self.rec_path}: key {key}: label vector of {flag} floats "
                                f"overruns the {lrec}-byte record")
            label = np.frombuffer(mm[start:vec_end], dtype=np.float32)
            start = vec_end
        return IRHeader(flag, label, id_, id2), mm[start:end]

    def read_image(self, key: int, view: bool = False) -> tuple[int, int, bytes]:
        """``(flag, identity, payload)`` of image ``key``: the conversion fast path.

        One ``struct`` call reads framing, flag and scalar label together; no IRHeader or
        label array is built. Multipart and damaged records take the full path. With
        ``view=True`` the payload of a single-part record is a zero-copy memoryview into
        the mapping (drop it before :meth:`close`).
        """
        try:
            off = self._offset_list[self._position(key)]
        except KeyError:
            raise self._missing(key) from None
        _, lrec, flag, label = _FAST_HEAD.unpack_from(self._mm, off) \
            if off + 16 <= self._size else (0, 1 << 29, 0, 0.0)
        start = off + 8 + IR_SIZE + 4 * flag
        end = off + 8 + lrec
        if lrec >> 29 or end > self._size or start > end:
            header, payload = self[key]
            return header.flag, label_to_int(header.label, self._where(key)), payload
        if flag:
            label = _F32.unpack_from(self._mm, off + 8 + IR_SIZE)[0]
        if not -_INT64_LIMIT <= label < _INT64_LIMIT:  # also NaN: every comparison fails
            return flag, label_to_int(label, self._where(key)), b""  # raises, naming it
        label = int(label)
        if view:
            if self._view is None:
                self._view = memoryview(self._mm)
            return flag, label, self._view[start:end]
        return flag, label, self._mm[start:end]

    def image_spans(self, keys: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`read_image` for many keys at once, as arrays and without copying payloads.

        Returns ``(starts, ends, flags, labels, simple)``: the payload of ``keys[i]`` is
        ``view()[starts[i]:ends[i]]`` with identity ``labels[i]``, valid where ``simple[i]``.
        Keys that are not ``simple`` (multipart, truncated, short or with a label that is
        not a finite integer-sized float) must go through :meth:`read_image`, which joins
        them or raises the precise error. Conversions spend most of their Python time on
        per-record parsing otherwise.
        """
        offsets = self._offsets[self._positions(np.asarray(keys, np.int64))]
        n = len(offsets)
        if not n or self._size < 16:
            zeros = np.zeros(n, np.int64)
            return zeros, zeros, zeros, zeros, np.zeros(n, bool)
        words = np.frombuffer(self._mm, dtype="<u4", count=self._size // 4)
        try:
            last = len(words) - 1
            base = offsets // 4
            lrec = words[np.minimum(base + 1, last)].astype(np.int64)
            flags = words[np.minimum(base + 2, last)].astype(np.int64)
            label = words[np.minimum(base + 3, last)].view("<f4")
            first_of_vector = words[np.minimum(base + 2 + IR_SIZE // 4, last)].view("<f4")
        finally:
            del words  # the mapping cannot close while an array exports it
        label = np.where(flags != 0, first_of_vector, label).astype(np.float64)
        starts = offsets + 8 + IR_SIZE + 4 * flags
        ends = offsets + 8 + (lrec & LENGTH_MASK)
        finite = np.isfinite(label)
        simple = ((offsets + 16 <= self._size) & (lrec >> 29 == 0) & (ends <= self._size)
                  & (starts <= ends) & finite & (np.abs(np.where(finite, label, 0)) < 2.0**62))
        labels = np.trunc(np.where(simple, label, 0)).astype(np.int64)
        return starts, ends, flags, labels, simple

    def view(self) -> memoryview:
        """The whole mapped ``.rec`` as a memoryview (drop slices of it before :meth:`close`)."""
        if self._view is None:
            self._view = memoryview(self._mm)
        return self._view

    def header(self, key: int) -> IRHeader:
        return self[key][0]

    def label_of(self, key: int) -> int:
        """Identity of image ``key``: scalar label or label[0]."""
        return label_to_int(self[key][0].label, self._where(key))

    def _where(self, key: int) -> str:
        return f"{self.rec_path}: key {key}"

    def iter_records(self, keys: Iterable[int] | None = None
                     ) -> Iterator[tuple[int, IRHeader, bytes]]:
        """``(key, header, payload)`` for ``keys`` (default: all, in index order)."""
        for key in self._keys.tolist() if keys is None else keys:
            header, payload = self[key]
            yield key, header, payload

    # -- insightface layout -------------------------------------------------------------
    def _detect_layout(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """``([first, end) image keys, [first, end) identity keys)`` of insightface's
        layout, ``(None, None)`` for a plain one: ranges, so knowing the layout costs no
        per-record array (:meth:`image_keys` builds one only when asked)."""
        if self._layout is None:
            ranges: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None)
            if 0 in self:
                head = self.header(0)
                if head.flag >= 2:
                    first, end = (float(v) for v in head.label[:2])
                    top = float(len(self._keys)) + 1  # keys are distinct: none exceeds this
                    if not (1 <= first <= end <= top + len(self._keys)) or \
                            first > top or not first.is_integer() or not end.is_integer():
                        raise DataError(f"{self.rec_path}: header record 0 has label "
                                        f"{head.label.tolist()}, not [first_identity_key, "
                                        f"end_identity_key)")
                    ranges = ((1, int(first)), (int(first), int(end)))
            self._layout = ranges
        return self._layout

    @property
    def has_header(self) -> bool:
        """True for insightface's layout (record 0 is a header, then identity records)."""
        return self._detect_layout()[1] is not None

    def image_key_range(self) -> tuple[int, int] | None:
        """``[first, end)`` of the image keys with insightface's layout (every key in it
        is an image), None for a plain layout (see :meth:`image_keys`)."""
        return self._detect_layout()[0]

    def image_keys(self) -> np.ndarray:
        """Keys of image records: ``1 .. label[0]-1`` with a header, else every key."""
        if self._image_keys is None:
            span = self._detect_layout()[0]
            self._image_keys = self._keys if span is None else np.arange(*span,
                                                                         dtype=np.int64)
        return self._image_keys

    def identity_keys(self) -> np.ndarray:
        span = self._detect_layout()[1]
        return np.zeros(0, np.int64) if span is None else np.arange(*span, dtype=np.int64)

    def identities(self) -> np.ndarray:
        """``(num_ids, 2)`` int64 ``[first_key, end_key)`` image ranges, one row per identity.

        From the identity records with insightface's layout; for a plain layout, from
        runs of equal labels in key order (identities need not be contiguous there, so
        one identity may give several rows).
        """
        if self._detect_layout()[1] is not None:
            identity_keys = self.identity_keys()
            ranges = np.zeros((len(identity_keys), 2), np.int64)
            for i, key in enumerate(identity_keys.tolist()):
                head = self.header(key)
                if head.flag < 2:
                    raise DataError(f"{self.rec_path}: identity record {key} has flag "
                                    f"{head.flag}, expected a [first, end) label vector")
                first, end = (float(v) for v in head.label[:2])
                if not (0 <= first <= end < 2**62):
                    raise DataError(f"{self.rec_path}: identity record {key} has label "
                                    f"{head.label.tolist()}, not an image key range")
                ranges[i] = int(first), int(end)
            return ranges
        keys = self.image_keys()
        labels = self.labels()
        if not len(keys):
            return np.zeros((0, 2), np.int64)
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        ends = np.r_[starts[1:], len(keys)]
        return np.stack([keys[starts], keys[ends - 1] + 1], axis=1)

    def labels(self) -> np.ndarray:
        """int64 identity of every image key (same order as :meth:`image_keys`); cached."""
        return self.header_arrays()[0]

    def header_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(labels int64, flags uint32)`` of every image key, in one header pass; cached.

        Read with :meth:`image_spans`' array arithmetic a block at a time (a Python loop
        over every record cost about 1 us each, 40 s at WebFace42M size); records off that
        path (multipart, damaged) take :meth:`header`, which gives the value or the error.
        """
        if self._labels is None:
            keys = self.image_keys()
            labels = np.empty(len(keys), np.int64)
            flags = np.empty(len(keys), np.uint32)
            for lo in range(0, len(keys), _SPAN_BLOCK):
                block = keys[lo:lo + _SPAN_BLOCK]
                starts, ends, block_flags, block_labels, simple = self.image_spans(block)
                flags[lo:lo + len(block)] = block_flags
                labels[lo:lo + len(block)] = block_labels
                for i in np.flatnonzero(~simple).tolist():
                    key = int(block[i])
                    header = self.header(key)  # multipart or damaged: full path (or error)
                    flags[lo + i] = header.flag
                    labels[lo + i] = label_to_int(header.label, self._where(key))
                if len(block):
                    drop_pages(self._mm, max(int(starts.min()) - 64 - _FAULT_AROUND, 0),
                               int(ends.max()) + _FAULT_AROUND)
            self._labels, self._flags = labels, flags
        return self._labels, self._flags

    @property
    def num_classes(self) -> int:
        """From ``property`` if present, else the identity-record count, else max label + 1."""
        if self.property_path is not None and self.property_path.is_file():
            return read_property(self.property_path)[0]
        identities = self._detect_layout()[1]
        if identities is not None:
            return identities[1] - identities[0]
        labels = self.labels()
        return int(labels.max()) + 1 if len(labels) else 0


MAX_CLASSES = 1 << 26  # 67M; the largest public face set has about 4M identities


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from an insightface ``property`` file."""
    path = Path(path)
    if path.is_dir():
        path = path / "property"
    if not path.is_file():
        raise DataError(f"{path}: missing; insightface datasets need a 'property' file "
                        f"with one line 'num_classes,112,112'")
    first = path.read_bytes().split(b"\n", 1)[0].strip()
    fields = first.split(b",")
    try:
        values = [int(v) for v in fields[:3]]
    except ValueError:
        values = []
    if len(values) < 1 or values[0] < 0:
        raise DataError(f"{path}: first line {first[:60]!r} is not 'num_classes,height,width'")
    if values[0] > MAX_CLASSES:
        raise DataError(f"{path}: num_classes {values[0]} is beyond {MAX_CLASSES:,}")
    while len(values) < 3:
        values.append(112)
    return values[0], values[1], values[2]


def find_rec(path: str | os.PathLike) -> Path:
    """The ``.rec`` file for a dataset folder (``train.rec`` or the only ``*.rec``)."""
    path = Path(path)
    if path.is_dir():
        if (path / "train.rec").is_file():
            return path / "train.rec"
        recs = sorted(path.glob("*.rec"))
        if len(recs) == 1:
            return recs[0]
        if not recs:
            raise DataError(f"{path}: no train.rec (or other .rec file) in this folder")
        raise DataError(f"{path}: several .rec files and no train.rec: "
                        f"{', '.join(r.name for r in recs[:5])}")
    if not path.exists():
        raise DataError(f"{path}: not found")
    return path


def open_rec(path: str | os.PathLike, spill_dir: str | os.PathLike | None = None
             ) -> RecordReader:
    """Open a dataset folder or ``.rec`` file (``.idx`` and ``property`` read from beside it).

    ``spill_dir``: keep the index in a memory-mapped scratch file there (see
    :func:`parse_idx`), for whole-file jobs whose memory must not grow with the data.
    """
    rec = find_rec(path)
    prop = rec.parent / "property"
    if prop.is_file():
        read_property(prop)  # a damaged property is named now, not swallowed later
    return RecordReader(rec, rec.with_suffix(".idx"), property_path=prop,
                        spill_dir=spill_dir)


# --------------------------------------------------------------------------------------
# Writer


class RecordWriter:
    """Write ``.rec`` + ``.idx`` exactly as ``MXIndexedRecordIO(..., 'w')`` does.

    Both files are written under temporary names and renamed on :meth:`close`, so an
    interrupted conversion never leaves a partial dataset under the final names.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None
                 ) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        make_dirs(self.rec_path.parent)
        tag = f".tmp-{os.getpid()}"
        self._tmp_rec = self.rec_path.with_name(f".{self.rec_path.name}{tag}")
        self._tmp_idx = self.idx_path.with_name(f".{self.idx_path.name}{tag}")
        self._closed = True  # until both files are open: abort() then has nothing to drop
        try:
            self._rec = open(self._tmp_rec, "wb", buffering=1 << 20)  # noqa: SIM115
            try:
                self._idx = open(self._tmp_idx, "w", encoding="ascii",  # noqa: SIM115
                                 newline="\n", buffering=1 << 16)
            except OSError:
                self._rec.close()
                self._tmp_rec.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise output_error(self.rec_path, exc) from exc
        self._pos = 0
        self.count = 0
        self._closed = False

    def write(self, key: int, record: bytes) -> int:
        """Append one packed record (see :func:`pack_record`); returns its byte offset."""
        offset = self._pos
        framed = frame_record(record)
        try:
            self._rec.write(framed)
            self._idx.write(f"{int(key)}\t{offset}\n")
        except OSError as exc:
            raise output_error(self.rec_path, exc) from exc
        self._pos += len(framed)
        self.count += 1
        return offset

    def overwrite(self, offset: int, record: bytes) -> None:
        """Replace the record at ``offset`` by one of identical framed size (header patch)."""
        framed = frame_record(record)
        try:
            self._rec.flush()
            self._rec.seek(offset)
            old = self._rec.tell()
            self._rec.write(framed)
        except OSError as exc:
            raise output_error(self.rec_path, exc) from exc
        if self._rec.tell() - old != len(framed) or offset + len(framed) > self._pos:
            raise ValueError("overwrite must keep the framed record size")
        self._rec.seek(self._pos)

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._rec.close()
            self._idx.close()
            os.replace(self._tmp_rec, self.rec_path)
            os.replace(self._tmp_idx, self.idx_path)
        except OSError as exc:
            self.abort()
            raise output_error(self.rec_path, exc) from exc
        self._closed = True

    def abort(self) -> None:
        """Drop both temporary files (nothing appears under the final names)."""
        if self._closed:
            return
        self._closed = True
        for handle in (self._rec, self._idx):
            with contextlib.suppress(OSError):  # a full disk fails the final flush too
                handle.close()
        for tmp in (self._tmp_rec, self._tmp_idx):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------
# insightface dataset layout


def _header_record(first_identity: int, end_identity: int) -> bytes:
    return pack_record(IRHeader(2, [float(first_identity), float(end_identity)], 0, 0), b"")


def write_insightface_dataset(folder: str | os.PathLike, samples: Iterable[tuple[int, bytes]],
                              num_classes: int, image_size: tuple[int, int] = (112, 112),
                              progress: bool = False) -> dict[str, Any]:
    """Write ``train.rec``/``train.idx``/``property`` in insightface's layout.

    Record 0 is the header ``[N+1, N+1+num_classes]``, images get keys ``1..N`` grouped
    by identity (stable order within an identity), then one identity record per class
    with its ``[first, end)`` key range. Samples that already arrive grouped by label are
    written in one pass; otherwise a second pass reorders them from a scratch file.
    """
    from facekd.fileio import remove_stale_temps, write_text_atomic

    folder = make_dirs(folder)
    remove_stale_temps(folder)  # a killed earlier run's .train.rec.tmp-PID
    rec_path = folder / "train.rec"
    labels = array("q")
    sorted_so_far = True
    writer = RecordWriter(rec_path)
    try:
        header_offset = writer.write(0, _header_record(1, 1 + num_classes))
        key = 0
        bar = _progress(progress, "write images")
        for key, (label, image) in enumerate(samples, 1):
            label = int(label)
            if not 0 <= label < num_classes:
                raise DataError(f"{folder}: sample {key} has label {label}, outside "
                                f"[0, {num_classes})")
            if labels and label < labels[-1]:
                sorted_so_far = False
            labels.append(label)
            writer.write(key, pack_record(IRHeader(0, float(label), key, 0), image))
            bar.update(1)
        bar.close()
        num_images = key
        if not sorted_so_far:
            scratch = folder / f".unsorted-{os.getpid()}.rec"
            writer.rec_path, writer.idx_path = scratch, scratch.with_suffix(".idx")
            writer.close()
            try:
                return _write_sorted(folder, scratch, np.frombuffer(labels, np.int64),
                                     num_classes, image_size)
            finally:
                scratch.unlink(missing_ok=True)
                scratch.with_suffix(".idx").unlink(missing_ok=True)
        label_array = np.frombuffer(labels, np.int64)
        _finish_layout(writer, header_offset, label_array, num_classes)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    write_text_atomic(folder / "property", f"{num_classes},{image_size[0]},{image_size[1]}\n")
    return {"folder": str(folder), "images": num_images, "num_classes": num_classes,
            "reordered": False}


def _finish_layout(writer: RecordWriter, header_offset: int, labels: np.ndarray,
                   num_classes: int) -> None:
    """Identity records + the real header, for images 1..N sorted by label."""
    n = len(labels)
    classes = np.arange(num_classes)
    first = np.searchsorted(labels, classes, side="left") + 1
    end = np.searchsorted(labels, classes, side="right") + 1
    for c, (lo, hi) in enumerate(zip(first.tolist(), end.tolist(), strict=True)):
        writer.write(n + 1 + c, pack_record(IRHeader(2, [float(lo), float(hi)], n + 1 + c, 0),
                                            b""))
    writer.overwrite(header_offset, _header_record(n + 1, n + 1 + num_classes))


def _write_sorted(folder: Path, scratch: Path, labels: np.ndarray, num_classes: int,
                  image_size: tuple[int, int]) -> dict[str, Any]:
    from facekd.fileio import write_text_atomic

    order = np.argsort(labels, kind="stable")
    source = RecordReader(scratch)
    try:
        with RecordWriter(folder / "train.rec") as writer:
            header_offset = writer.write(0, _header_record(1, 1 + num_classes))
            for new_key, old_key in enumerate((order + 1).tolist(), 1):
                _, payload = source[old_key]
                writer.write(new_key, pack_record(
                    IRHeader(0, float(labels[old_key - 1]), new_key, 0), payload))
            _finish_layout(writer, header_offset, labels[order], num_classes)
    finally:
        source.close()
    write_text_atomic(folder / "property", f"{num_classes},{image_size[0]},{image_size[1]}\n")
    return {"folder": str(folder), "images": len(labels), "num_classes": num_classes,
            "reordered": True}


def reindex(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None
            ) -> dict[str, Any]:
    """Rebuild the ``.idx`` of ``rec_path`` by a sequential scan (keys 0..n-1)."""
    rec_path = find_rec(rec_path)
    idx = Path(idx_path) if idx_path else rec_path.with_suffix(".idx")
    offsets = scan_rec(rec_path)
    write_idx(idx, range(len(offsets)), offsets.tolist())
    return {"rec": str(rec_path), "idx": str(idx), "records": len(offsets)}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, desc: str, total: int | None = None) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", mininterval=1.0, disable=None)
