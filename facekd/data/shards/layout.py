"""File names inside a shards folder (shared by the writer, the manifest and the reader)."""

from __future__ import annotations

SHARD_PATTERN = "shard-{:06d}.tar"
PARTS_DIR = ".parts"
PART_SUFFIX = ".part"  # .parts/shard-NNNNNN.part: the shard's index, three .npy arrays
MANIFEST = "manifest.parquet"
DATASET_JSON = "dataset.json"
FORMAT_NAME = "facekd-shards"
