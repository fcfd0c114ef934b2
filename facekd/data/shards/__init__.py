"""WebDataset tar shards: conversion from ``.rec`` (and folders), back to ``.rec``, reading.

A shards folder holds ``shard-000000.tar ...`` (per sample ``{key}.jpg|png`` with the
source bytes copied, never re-encoded, and ``{key}.json``), ``manifest.parquet`` (one row
per sample: key, label, shard, byte offset and size of the image inside its tar, sha1)
and ``dataset.json``. The manifest gives the training loader random access into the tars
without unpacking them, while the tars stay readable by the ``webdataset`` library.

One module per job:

- :mod:`.layout`   file names of a shards folder;
- :mod:`.tar`      hand-written ustar framing of sample blocks (array arithmetic, writev);
- :mod:`.sources`  sample sources (a ``.rec``) and their cheap image checks;
- :mod:`.pool`     the worker-process pool that runs one task per shard;
- :mod:`.manifest` per-shard part indexes, ``manifest.parquet`` and ``dataset.json``;
- :mod:`.writer`   ``write_shards`` / ``rec2shards``: plan, write, resume, verify;
- :mod:`.reader`   :class:`ShardSet`, random access through the manifest;
- :mod:`.to_rec`   ``shards2rec``.
"""

from __future__ import annotations

from facekd.data.shards.layout import (
    DATASET_JSON,
    FORMAT_NAME,
    MANIFEST,
    PARTS_DIR,
    SHARD_PATTERN,
)
from facekd.data.shards.reader import ShardSet, is_shards_folder
from facekd.data.shards.sources import RecSamples, check_image_bytes, image_ext
from facekd.data.shards.tar import tar_header, tar_headers
from facekd.data.shards.to_rec import shards2rec
from facekd.data.shards.writer import rec2shards, write_shards

__all__ = ["DATASET_JSON", "FORMAT_NAME", "MANIFEST", "PARTS_DIR", "SHARD_PATTERN",
           "RecSamples", "ShardSet", "check_image_bytes", "image_ext", "is_shards_folder",
           "rec2shards", "shards2rec", "tar_header", "tar_headers", "write_shards"]
