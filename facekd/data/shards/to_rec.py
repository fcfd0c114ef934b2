"""Shards folder -> insightface ``train.rec`` / ``train.idx`` / ``property``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from facekd.data.shards.layout import MANIFEST
from facekd.data.shards.reader import ShardSet
from facekd.errors import DataError


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
