"""``write_shards`` / ``rec2shards``: plan shard tasks, write them, resume, verify.

Conversion cost is meant to stay near "hash every image + copy the bytes": records are
parsed, checked and framed a block at a time with array operations, image bytes go from
the ``.rec`` mapping to ``os.writev`` without a Python copy, and the parent streams the
manifest while the workers write (bench/p2_rec2shards.py measures it against a copy).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from facekd.data.shards.layout import PARTS_DIR, SHARD_PATTERN
from facekd.data.shards.manifest import (
    PART_DTYPE,
    ManifestWriter,
    part_path,
    read_part,
    shard_done,
    write_dataset_json,
    write_part,
)
from facekd.data.shards.pool import run_tasks
from facekd.data.shards.sources import RecSamples, decodable_only, samples_block
from facekd.data.shards.tar import BLOCK, END_OF_ARCHIVE, block_iovecs, writev_all
from facekd.errors import DataError
from facekd.fileio import atomic_path, make_dirs, remove_stale_temps, write_json_atomic

log = logging.getLogger(__name__)

_BATCH = 512  # samples per block: hashed, framed and written together (2 writev calls)

def _write_shard(source: Any, out: str, shard: int, start: int, stop: int, skip_bad: bool
                 ) -> dict[str, Any]:
    """Write shard ``shard`` from samples ``start:stop`` and its part index; returns stats.

    Blocks of ``_BATCH`` samples come from the source's vectorised ``block`` (a ``.rec``:
    zero-copy views into the mapping) or per-sample ``get``; each block is hashed, framed
    by :func:`~facekd.data.shards.tar.block_iovecs` and handed to the kernel with ``os.writev``.
    """
    import hashlib

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
            buffers, part["offset"], pos = block_iovecs(block, pos)
            writev_all(fd, buffers)
            part["key"], part["label"], part["ext"] = block.keys, block.labels, block.exts
            parts.append(part)
            del block, buffers
        f.write(END_OF_ARCHIVE)
    index = np.concatenate(parts) if parts else np.zeros(0, PART_DTYPE)
    bad_keys = np.array([b[0] for b in bad], np.int64)
    bad_errors = np.array([b[1] for b in bad], dtype=str)
    write_part(part_path(out_dir, shard), (index, bad_keys, bad_errors))
    if hasattr(source, "release"):
        source.release()
    return {"shard": shard, "samples": len(index), "bad": len(bad),
            "part": (index, bad_keys, bad_errors)}


def _verify_shard(source: Any, out: str, shard: int, start: int, stop: int, skip_bad: bool
                  ) -> dict[str, Any]:
    """Re-read every sample of ``shard`` and compare it with the source bytes."""
    import hashlib

    out_dir = Path(out)
    tar_path = out_dir / SHARD_PATTERN.format(shard)
    index, bad_key_array, _ = read_part(part_path(out_dir, shard))
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
            name = mm[off - BLOCK:off - BLOCK + 100].rstrip(b"\0").decode(errors="replace")
            if (stored != payload or name != f"{key}.{ext}" or keys[row] != key
                    or labels[row] != label or hashlib.sha1(stored).digest() != digests[row]):
                raise DataError(f"{tar_path}: sample {key} differs from the source "
                                f"(verify failed)")
            row += 1
    if row != len(keys):
        raise DataError(f"{tar_path}: {len(keys)} samples indexed, {row} expected")
    return {"shard": shard, "samples": row}


def _plan(total: int, shard_size: int) -> list[tuple[int, int, int]]:
    if shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    return [(i, start, min(start + shard_size, total))
            for i, start in enumerate(range(0, total, shard_size))]


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
        todo = [t for t in tasks if not shard_done(out, t[0])]
        if len(todo) < len(tasks):
            log.info("%s: resuming, %d of %d shards already written", out,
                     len(tasks) - len(todo), len(tasks))
        written_before = {t[0] for t in tasks} - {t[0] for t in todo}
        with ManifestWriter(out, [t[0] for t in tasks], written_before) as manifest:
            for result in run_tasks(todo, _write_shard, source, out, workers, skip_bad,
                                    "rec2shards"):
                manifest.add(result["shard"], result.get("part"))
            manifest.close()
        summary = write_dataset_json(out, tasks, source, manifest, extra or {})
        if verify:
            for _ in run_tasks(tasks, _verify_shard, source, out, workers, skip_bad, "verify"):
                pass
            summary["verified"] = True
        summary["seconds"] = round(time.time() - started, 3)
        return summary
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def rec2shards(source: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 10000,
               workers: int = 2, verify: bool = False, skip_bad: bool = False
               ) -> dict[str, Any]:
    """``.rec`` dataset (folder or file) -> WebDataset tar shards + manifest + dataset.json.

    The ``.rec``'s index is spilled to an unnamed scratch file in the output's parts
    folder (page cache, not process memory), so the conversion's peak RSS does not grow
    with the record count (bench/scale.py).
    """
    existed = Path(out).exists()
    spill = make_dirs(Path(out) / PARTS_DIR)
    try:
        samples = RecSamples(source, spill_dir=spill)
    except BaseException:
        if not existed:  # a bad source leaves no output folder behind
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    return write_shards(samples, out, shard_size=shard_size, workers=workers, verify=verify,
                        skip_bad=skip_bad)

