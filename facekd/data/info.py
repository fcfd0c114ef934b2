"""``facekd prep info``: what a dataset holds, before anyone trains on it.

Counts come from one pass over the record headers (no image decoding); image sizes and
formats come from the JPEG/PNG headers of an evenly spaced sample of images.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import DataError


def image_size(payload: bytes) -> tuple[str, int, int, int] | None:
    """``(format, height, width, channels)`` from a JPEG/PNG header, without decoding."""
    if payload[:8] == b"\x89PNG\r\n\x1a\n" and len(payload) >= 26:
        width, height = struct.unpack(">II", payload[16:24])
        channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(payload[25], 0)
        return "png", height, width, channels
    if payload[:2] != b"\xff\xd8":
        return None
    pos = 2
    n = len(payload)
    while pos + 4 <= n:
        if payload[pos] != 0xFF:
            return None
        marker = payload[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xDA)):
            pos += 2
            continue
        length = struct.unpack(">H", payload[pos + 2:pos + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 10 > n:
                return None
            height, width = struct.unpack(">HH", payload[pos + 5:pos + 9])
            return "jpeg", height, width, payload[pos + 9]
        pos += 2 + length
    return None


def _per_identity_summary(counts: np.ndarray) -> dict[str, Any]:
    if not len(counts):
        return {}
    return {"min": int(counts.min()), "max": int(counts.max()),
            "mean": round(float(counts.mean()), 3), "median": float(np.median(counts)),
            "p5": float(np.percentile(counts, 5)), "p95": float(np.percentile(counts, 95)),
            "identities_with_one_image": int((counts == 1).sum()),
            "empty_identities": int((counts == 0).sum())}


def dataset_info(source: str | os.PathLike, out: str | os.PathLike | None = None,
                 sample_images: int = 2000) -> dict[str, Any]:
    """Summary of a ``.rec`` dataset or shards folder; writes JSON + histogram to ``out``.

    ``out=None`` writes to ``<dataset>/info`` when that is writable, ``"-"`` writes nothing.
    """
    from facekd.data.shards import ShardSet, is_shards_folder

    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: not found")
    if is_shards_folder(source):
        shards = ShardSet(source)
        labels, flags = shards.labels, None
        num_classes = shards.num_classes
        sampled = _sample(len(shards), sample_images)
        payloads = []
        for n, i in enumerate(sampled):
            payloads.append(shards.read(i))
            if n % _RELEASE_EVERY == _RELEASE_EVERY - 1:
                shards.close()  # see _rec_summary
        shards.close()
        summary: dict[str, Any] = {"source": str(source), "kind": "shards",
                                   "shards": len(shards.shard_names), "records": len(shards)}
    else:
        summary, labels, flags, num_classes, payloads = _rec_summary(source, sample_images)
    from facekd.data.recordio import MAX_CLASSES

    if len(labels) and (labels.max() >= MAX_CLASSES or num_classes > MAX_CLASSES):
        raise DataError(f"{source}: labels reach {int(labels.max())} (num_classes "
                        f"{num_classes}); beyond {MAX_CLASSES:,} classes is not a face dataset")
    counts = np.bincount(labels[labels >= 0], minlength=num_classes) if len(labels) else \
        np.zeros(num_classes, np.int64)
    summary.update({
        "images": len(labels), "num_classes": int(num_classes),
        "identities_with_images": int((counts > 0).sum()),
        "label_range": [int(labels.min()), int(labels.max())] if len(labels) else None,
        "images_per_identity": _per_identity_summary(counts)})
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        summary.setdefault("warnings", []).append(
            f"labels span {int(labels.min())}..{int(labels.max())} but num_classes is "
            f"{num_classes}")
    if flags is not None:
        summary["flags"] = {str(k): int(v) for k, v in
                            zip(*np.unique(flags, return_counts=True), strict=True)}
    sizes: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    for payload in payloads:
        parsed = image_size(payload)
        if parsed is None:
            formats["unknown"] += 1
            continue
        fmt, height, width, channels = parsed
        formats[fmt] += 1
        sizes[f"{height}x{width}x{channels}"] += 1
    summary["sampled_images"] = len(payloads)
    summary["image_formats"] = dict(formats.most_common())
    summary["image_sizes"] = dict(sizes.most_common(20))
    if out is None:  # default: an 'info' folder beside the data, when writable
        folder = source if source.is_dir() else source.parent
        if os.access(folder, os.W_OK):
            out = folder / "info"
        else:
            summary.setdefault("warnings", []).append(
                f"{folder} is read-only; pass --out to write summary.json and the histogram")
    if out is not None and str(out) != "-":
        _write_outputs(Path(out), summary, counts)
    return summary


_RELEASE_EVERY = 16  # sampled images read between page releases


def _sample(total: int, count: int) -> list[int]:
    if total == 0 or count <= 0:
        return []
    return np.unique(np.linspace(0, total - 1, min(count, total)).astype(np.int64)).tolist()


def _rec_summary(source: Path, sample_images: int
                 ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, int, list[bytes]]:
    from facekd.data.recordio import open_rec, read_property

    reader = open_rec(source)
    keys = reader.image_keys()
    labels, flags = reader.header_arrays()
    summary: dict[str, Any] = {
        "source": str(source), "kind": "rec", "rec": str(reader.rec_path),
        "layout": "insightface" if reader.has_header else "im2rec", "records": len(reader),
        "indexed": reader.idx_path is not None}
    warnings = []
    prop = reader.rec_path.parent / "property"
    if prop.is_file():
        num_classes = read_property(prop)[0]
        summary["property"] = prop.read_text(errors="replace").splitlines()[0]
    else:
        num_classes = reader.num_classes
        if reader.has_header:
            warnings.append(f"{prop}: missing (insightface datasets carry one)")
    if reader.has_header:
        identities = len(reader.identity_keys())
        summary["identity_records"] = identities
        if prop.is_file() and identities != num_classes:
            warnings.append(f"property says {num_classes} classes, the .rec has "
                            f"{identities} identity records")
    if warnings:
        summary["warnings"] = warnings
    sampled = _sample(len(keys), sample_images)
    payloads = []
    for n, i in enumerate(sampled):
        payloads.append(reader[int(keys[i])][1])
        if n % _RELEASE_EVERY == _RELEASE_EVERY - 1:
            # each read maps up to a few MB around it (page-cache folios): 2,000 samples
            # spread over a large file would otherwise map most of it into RSS
            reader.release()
    reader.release()
    return summary, labels, flags, num_classes, payloads


def _write_outputs(out: Path, summary: dict[str, Any], counts: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facekd.fileio import atomic_path, make_dirs, write_json_atomic

    make_dirs(out)
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(counts):
        bins = np.arange(0, int(counts.max()) + 2) if counts.max() < 60 else 60
        ax.hist(counts, bins=bins, color="#4477aa")
    ax.set_xlabel("images per identity")
    ax.set_ylabel("identities")
    ax.set_title(f"{summary['images']} images, {summary['num_classes']} identities")
    fig.tight_layout()
    with atomic_path(out / "images_per_identity.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    summary["histogram"] = str(out / "images_per_identity.png")
    summary["summary_json"] = str(out / "summary.json")
    write_json_atomic(out / "summary.json", summary)
