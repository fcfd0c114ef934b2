"""Image folders: ``folder2shards`` (one sub-folder per identity) and ``rec2folder``.

Folders are how users hold self-collected data and how they want to look at a ``.rec``;
both directions copy the encoded bytes unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from facekd.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class FolderSamples:
    """Images under ``root/<identity>/*.jpg|png``; labels follow sorted identity names."""

    kind = "folder"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        self.classes = sorted(p.name for p in self.root.iterdir()
                              if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DataError(f"{self.root}: no identity sub-folders (expected "
                            f"root/<identity>/<image>.jpg)")
        self.files: list[str] = []
        self.labels: list[int] = []
        for label, name in enumerate(self.classes):
            for path in sorted((self.root / name).iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    self.files.append(f"{name}/{path.name}")
                    self.labels.append(label)
        if not self.files:
            raise DataError(f"{self.root}: no .jpg/.png images in the identity folders")
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int) -> tuple[int, int, int, bytes, str]:
        """``(key, label, flag, bytes, ext)``; the key is the sample's position."""
        from facekd.data.shards import check_image_bytes

        path = self.root / self.files[index]
        payload = path.read_bytes()
        return index, self.labels[index], 0, payload, check_image_bytes(payload, str(path))

    def key_of(self, index: int) -> int:
        return index

    def sample_name(self, key: int) -> str:
        """The image file of sample ``key`` (for error messages)."""
        return str(self.root / self.files[key])

    def describe(self) -> dict[str, Any]:
        return {"source": str(self.root.resolve()), "source_kind": "folder"}


def folder2shards(source: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 10000,
                  workers: int = 2, verify: bool = False, skip_bad: bool = False
                  ) -> dict[str, Any]:
    """Identity folders -> tar shards; ``dataset.json`` keeps the class names and file list."""
    from facekd.data.shards import write_shards
    from facekd.fileio import write_json_atomic

    samples = FolderSamples(source)
    out = Path(out)
    summary = write_shards(samples, out, shard_size=shard_size, workers=workers,
                          verify=verify, skip_bad=skip_bad, extra={"classes": samples.classes})
    write_json_atomic(out / "files.json", samples.files)  # key -> source path
    return summary


def rec2folder(source: str | os.PathLike, out: str | os.PathLike, *, limit: int | None = None,
               skip_bad: bool = False) -> dict[str, Any]:
    """Write every image of a ``.rec`` to ``out/<label>/<key>.jpg|png`` (bytes unchanged)."""
    from tqdm import tqdm

    from facekd.data.recordio import label_to_int, open_rec
    from facekd.data.shards import check_image_bytes
    from facekd.fileio import write_bytes_atomic

    reader = open_rec(source)
    out = Path(out)
    keys = reader.image_keys().tolist()
    if limit is not None:
        keys = keys[:max(0, limit)]
    written, bad = 0, []
    try:
        for key in tqdm(keys, desc="rec2folder", unit="img", mininterval=1.0, disable=None):
            try:
                header, payload = reader[key]
                ext = check_image_bytes(payload, f"{reader.rec_path}: key {key}")
                label = label_to_int(header.label, f"{reader.rec_path}: key {key}")
            except DataError as exc:
                if not skip_bad:
                    raise
                bad.append(str(exc))
                continue
            write_bytes_atomic(out / str(label) / f"{key}.{ext}", payload)
            written += 1
    finally:
        reader.close()
    return {"out": str(out), "images": written, "bad_records": len(bad), "bad_examples": bad[:5]}
