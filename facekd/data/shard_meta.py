"""The metadata of a shards folder, validated before anything is sized or opened from it.

``dataset.json`` and ``manifest.parquet`` come with downloaded or hand-edited folders,
so every value is checked here, once, for every reader (``ShardSet``: ``prep info``,
``shards2rec``, the training loader, the teacher passes): JSON types, shard names that
stay inside the folder (:mod:`facekd.inputs`), the manifest's columns and their integer
types, shard indexes within the list, image spans inside their tar, labels within
``num_classes`` and the row count against the declared sample count. Each problem is a
one-line :class:`~facekd.errors.DataError` naming the file, the row's key and the value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from facekd.data.recordio import MAX_CLASSES
from facekd.errors import DataError

DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
SHARD_PATTERN = "shard-{:06d}.tar"
COLUMNS = ("key", "label", "shard", "offset", "size")


class ShardsMeta(NamedTuple):
    meta: dict[str, Any]
    shard_names: list[str]
    keys: np.ndarray  # one per manifest row, held narrow (see NARROW)
    labels: np.ndarray
    shards: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    num_classes: int


def _count(meta: dict[str, Any], key: str, where: Path) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: '{key}' is {value!r}, expected a non-negative integer")
    return value


def read_dataset_json(folder: Path) -> dict[str, Any]:
    """``dataset.json`` as a dict with checked types (``{}`` when the file is absent)."""
    path = folder / DATASET_JSON
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    names = meta.get("shards")
    if names is not None and (not isinstance(names, list)
                              or not all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: 'shards' must be a list of file names, got "
                        f"{str(names)[:60]!r}")
    for key in ("samples", "num_classes"):
        _count(meta, key, path)
    if (_count(meta, "num_classes", path) or 0) > MAX_CLASSES:
        raise DataError(f"{path}: 'num_classes' {meta['num_classes']} is beyond "
                        f"{MAX_CLASSES:,}")
    return meta


# Narrowest type each column is held in, widened along WIDER when a value does not fit
# (int64 last, so a bad value still reaches the checks below): 16 bytes a row instead of
# 40, which is what a 42M-row manifest costs every rank and every reader (shard indexes
# below 65,536 shards and images below 64 KB fit 16 bits; face crops are about 7 KB).
NARROW = {"key": np.int32, "label": np.int32, "shard": np.uint16, "offset": np.uint32,
          "size": np.uint16}
WIDER = (np.uint16, np.int32, np.int64)
_CHECK_ROWS = 1 << 20  # rows per vectorised check: no N-sized temporaries


def _read_columns(manifest: Path) -> dict[str, np.ndarray]:
    """The integer columns, read one row group at a time into preallocated narrow arrays.

    Reading the whole table and converting it held the Arrow table and a numpy copy of
    every column at once (about 150 bytes a row at peak); row group by row group the
    peak is the final arrays plus one group.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> DataError:
        return DataError(f"{manifest}: cannot read the manifest "
                         f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})")

    try:
        parquet = pq.ParquetFile(manifest)
        schema = parquet.schema_arrow
        rows = parquet.metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise unreadable(exc) from None
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{manifest}: missing column(s) {', '.join(missing)} "
                        f"(has {', '.join(schema.names) or 'none'})")
    for column in COLUMNS:
        kind = schema.field(column).type
        if not pa.types.is_integer(kind):
            raise DataError(f"{manifest}: column '{column}' is {kind}, expected integers")
    try:
        columns = {c: np.empty(rows, NARROW[c]) for c in COLUMNS}
    except (MemoryError, ValueError):
        raise DataError(f"{manifest}: declares {rows} rows, more than this machine can "
                        f"hold") from None
    at = 0
    try:
        for group in range(parquet.metadata.num_row_groups):
            table = parquet.read_row_group(group, columns=list(COLUMNS))
            count = table.num_rows
            if at + count > rows:
                raise DataError(f"{manifest}: row groups hold more rows than the "
                                f"{rows} its footer declares")
            for column in COLUMNS:
                chunked = table.column(column)
                if chunked.null_count:
                    raise DataError(f"{manifest}: column '{column}' has empty values "
                                    f"(row group {group})")
                values = np.asarray(chunked.to_numpy())
                out = columns[column]
                if len(values) and out.dtype != np.int64:
                    low, high = int(values.min()), int(values.max())
                    info = np.iinfo(out.dtype)
                    if low < info.min or high > info.max:  # rare: widen (a copy)
                        wider = next((t for t in WIDER if np.iinfo(t).min <= min(low, 0)
                                      and high <= np.iinfo(t).max
                                      and np.iinfo(t).max >= info.max), np.int64)
                        out = columns[column] = out.astype(wider)
                out[at:at + count] = values
            at += count
            del table
    except DataError:
        raise
    except Exception as exc:
        raise unreadable(exc) from None
    finally:
        pa.default_memory_pool().release_unused()
    if at != rows:
        raise DataError(f"{manifest}: footer declares {rows} rows, row groups hold {at}")
    return columns


def _first_bad(manifest: Path, keys: np.ndarray, bad: np.ndarray, what: str,
               values: np.ndarray, lo: int = 0) -> None:
    """Raise naming the first row (``lo`` + position) where ``bad`` holds."""
    if bad.any():
        i = int(np.argmax(bad))
        among = "" if len(bad) == len(keys) else f" among rows {lo}..{lo + len(bad) - 1}"
        raise DataError(f"{manifest}: row {lo + i} (key {int(keys[lo + i])}): {what} "
                        f"(got {int(values[i])}; {int(bad.sum())} such rows{among})")


def _check_rows(manifest: Path, keys: np.ndarray, check: Any, *columns: np.ndarray) -> None:
    """``check(lo, *chunks)`` over row chunks of the columns (bounded temporaries)."""
    for lo in range(0, len(keys), _CHECK_ROWS):
        check(lo, *(c[lo:lo + _CHECK_ROWS] for c in columns))


def load_shards_meta(folder: str | os.PathLike) -> ShardsMeta:
    """Read and check ``dataset.json`` + ``manifest.parquet`` of a shards folder."""
    from facekd.inputs import Folder

    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise DataError(f"{manifest}: missing; not a facekd shards folder "
                        f"(convert with 'facekd prep rec2shards')")
    meta = read_dataset_json(folder)
    cols = _read_columns(manifest)
    keys, labels, shards = cols["key"], cols["label"], cols["shard"]
    offsets, sizes = cols["offset"], cols["size"]
    declared = meta.get("samples")
    if declared is not None and declared != len(keys):
        raise DataError(f"{folder / DATASET_JSON}: declares {declared} samples, "
                        f"{manifest.name} has {len(keys)} rows")
    names = meta.get("shards")
    if names is None:
        top = 0
        for lo in range(0, len(shards), _CHECK_ROWS):
            part = shards[lo:lo + _CHECK_ROWS]
            _first_bad(manifest, keys, (part < 0) | (part > 1 << 20), "shard index out of "
                       "range", part, lo)
            top = max(top, int(part.max()) + 1)
        names = [SHARD_PATTERN.format(i) for i in range(top)]
    where = folder / DATASET_JSON
    inside = Folder(folder)
    paths = [inside.inside(name, f"{where}: shards[{i}]", "shard")
             for i, name in enumerate(names)]
    used = np.zeros(len(names), bool)

    def spans(lo: int, shard: np.ndarray, offset: np.ndarray, size: np.ndarray) -> None:
        _first_bad(manifest, keys, (shard < 0) | (shard >= len(names)),
                   f"shard index outside the {len(names)} shards listed", shard, lo)
        _first_bad(manifest, keys, size <= 0, "image size must be positive", size, lo)
        _first_bad(manifest, keys, offset < 0, "negative offset", offset, lo)
        used[shard] = True

    _check_rows(manifest, keys, spans, shards, offsets, sizes)
    lengths = np.zeros(len(names), np.int64)
    for s in np.flatnonzero(used).tolist():
        try:
            lengths[s] = os.stat(paths[s]).st_size
        except OSError as exc:
            raise DataError(f"{paths[s]}: cannot open shard ({exc.strerror})") from None

    def inside_shard(lo: int, shard: np.ndarray, offset: np.ndarray, size: np.ndarray) -> None:
        end = offset.astype(np.int64) + size
        _first_bad(manifest, keys, end > lengths[shard],
                   "image span ends beyond its shard file", offset, lo)

    _check_rows(manifest, keys, inside_shard, shards, offsets, sizes)
    num_classes = _count(meta, "num_classes", where)
    top_label = num_classes if num_classes else MAX_CLASSES
    what = (f"label outside [-1, {num_classes}) (num_classes in {DATASET_JSON}; "
            f"-1: unlabelled)" if num_classes else f"label outside [-1, {MAX_CLASSES:,})")
    _check_rows(manifest, keys, lambda lo, label: _first_bad(
        manifest, keys, (label < -1) | (label >= top_label), what, label, lo), labels)
    if not num_classes:
        num_classes = max(int(labels.max()) + 1, 0) if len(labels) else 0
    return ShardsMeta(meta, list(names), keys, labels, shards, offsets, sizes, num_classes)


def manifest_sha1(folder: str | os.PathLike) -> np.ndarray:
    """The manifest's hex sha1 per row (for ``--verify``), as a str array."""
    import pyarrow.parquet as pq

    manifest = Path(folder) / MANIFEST
    try:
        column = pq.read_table(manifest, columns=["sha1"]).column("sha1")
    except Exception as exc:
        raise DataError(f"{manifest}: no readable 'sha1' column to verify against "
                        f"({str(exc).splitlines()[0][:120]})") from None
    return np.asarray(column.to_pylist(), dtype=object)
