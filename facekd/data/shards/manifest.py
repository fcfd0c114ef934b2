"""Per-shard part indexes, the streamed ``manifest.parquet`` and ``dataset.json``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facekd.data.shards.layout import (
    DATASET_JSON,
    FORMAT_NAME,
    MANIFEST,
    PART_SUFFIX,
    PARTS_DIR,
    SHARD_PATTERN,
)
from facekd.errors import DataError
from facekd.fileio import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

PART_DTYPE = np.dtype([("key", "<i8"), ("label", "<i8"), ("offset", "<i8"), ("size", "<i8"),
                       ("ext", "S3"), ("sha1", "u1", (20,))])
Part = tuple[np.ndarray, np.ndarray, np.ndarray]  # index rows, bad keys, bad errors

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


def part_path(out: Path, shard: int) -> Path:
    return out / PARTS_DIR / f"{SHARD_PATTERN.format(shard)[:-len('.tar')]}{PART_SUFFIX}"


def shard_done(out: Path, shard: int) -> bool:
    return (out / SHARD_PATTERN.format(shard)).is_file() and part_path(out, shard).is_file()


_ROW_GROUP = 1 << 11  # manifest rows per parquet row group: small buffer, flat RSS


class ManifestWriter:
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

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def add(self, shard: int, part: Part | None) -> None:
        """Shard ``shard`` is written; ``part`` is its index (None: read its part file)."""
        self.arrived[shard] = part if part is not None else read_part(
            part_path(self.out, shard))
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
                part = read_part(part_path(self.out, shard))
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


def write_dataset_json(out: Path, tasks: Sequence[tuple[int, int, int]], source: Any,
                        manifest: ManifestWriter, extra: dict[str, Any]) -> dict[str, Any]:
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
