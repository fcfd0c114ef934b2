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
    keys: np.ndarray  # int64, one per manifest row
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


def _read_columns(manifest: Path) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(manifest)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{manifest}: cannot read the manifest "
                        f"({str(exc).splitlines()[0][:160]})") from None
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{manifest}: missing column(s) {', '.join(missing)} "
                        f"(has {', '.join(schema.names) or 'none'})")
    for column in COLUMNS:
        kind = schema.field(column).type
        if not pa.types.is_integer(kind):
            raise DataError(f"{manifest}: column '{column}' is {kind}, expected integers")
    try:
        table = pq.read_table(manifest, columns=list(COLUMNS))
    except Exception as exc:
        raise DataError(f"{manifest}: cannot read the manifest "
                        f"({str(exc).splitlines()[0][:160]})") from None
    columns = {}
    for column in COLUMNS:
        chunked = table.column(column)
        if chunked.null_count:
            raise DataError(f"{manifest}: column '{column}' has {chunked.null_count} "
                            f"empty values")
        columns[column] = np.ascontiguousarray(chunked.to_numpy(), np.int64)
    return columns


def _first_bad(manifest: Path, keys: np.ndarray, bad: np.ndarray, what: str,
               values: np.ndarray) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{manifest}: row {i} (key {int(keys[i])}): {what} "
                        f"(got {int(values[i])}; {int(bad.sum())} such rows)")


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
        _first_bad(manifest, keys, (shards < 0) | (shards > 1 << 20), "shard index out of "
                   "range", shards)
        top = int(shards.max()) + 1 if len(shards) else 0
        names = [SHARD_PATTERN.format(i) for i in range(top)]
    where = folder / DATASET_JSON
    inside = Folder(folder)
    paths = [inside.inside(name, f"{where}: shards[{i}]", "shard")
             for i, name in enumerate(names)]
    _first_bad(manifest, keys, (shards < 0) | (shards >= len(names)),
               f"shard index outside the {len(names)} shards listed", shards)
    _first_bad(manifest, keys, sizes <= 0, "image size must be positive", sizes)
    _first_bad(manifest, keys, offsets < 0, "negative offset", offsets)
    lengths = np.zeros(len(names), np.int64)
    used = np.unique(shards)
    for s in used.tolist():
        try:
            lengths[s] = os.stat(paths[s]).st_size
        except OSError as exc:
            raise DataError(f"{paths[s]}: cannot open shard ({exc.strerror})") from None
    if len(keys):
        _first_bad(manifest, keys, offsets + sizes > lengths[shards],
                   "image span ends beyond its shard file", offsets)
    num_classes = _count(meta, "num_classes", where)
    if num_classes:
        _first_bad(manifest, keys, (labels < -1) | (labels >= num_classes),
                   f"label outside [-1, {num_classes}) (num_classes in {DATASET_JSON}; "
                   f"-1: unlabelled)", labels)
    else:
        _first_bad(manifest, keys, (labels < -1) | (labels >= MAX_CLASSES),
                   f"label outside [-1, {MAX_CLASSES:,})", labels)
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
