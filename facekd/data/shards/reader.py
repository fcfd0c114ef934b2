"""Random access to a shards folder through its manifest (one mmap per tar, lazily)."""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from facekd.data.shards.layout import MANIFEST
from facekd.errors import DataError


class ShardSet:
    """Random access to a shards folder through its manifest (one mmap per tar, lazily)."""

    def __init__(self, folder: str | os.PathLike, max_open: int | None = None) -> None:
        from facekd.data.shard_meta import load_shards_meta

        self.folder = Path(folder)
        self.max_open = max_open  # None: keep every shard mapped (random access)
        checked = load_shards_meta(self.folder)  # every value validated before use
        self.meta = checked.meta
        self.keys, self.labels, self.shards = checked.keys, checked.labels, checked.shards
        self.offsets, self.sizes = checked.offsets, checked.sizes
        self.shard_names: list[str] = checked.shard_names
        self.num_classes = checked.num_classes
        self._maps: OrderedDict[int, Any] = OrderedDict()
        self._views: tuple[memoryview, ...] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        state["_views"] = None
        return state

    def _map(self, shard: int) -> Any:
        mm = self._maps.get(shard)
        if mm is not None:
            if self.max_open is not None:
                self._maps.move_to_end(shard)
        else:
            if self.max_open is not None and len(self._maps) >= self.max_open:
                self._maps.popitem(last=False)[1].close()  # unmapped: RSS stays flat
            path = self.folder / self.shard_names[shard]
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (FileNotFoundError, ValueError) as exc:
                raise DataError(f"{path}: cannot open shard ({exc})") from None
            self._maps[shard] = mm
        return mm

    def read(self, index: int) -> bytes:
        """Image bytes of manifest row ``index``."""
        if self._views is None:
            self._views = (memoryview(self.shards), memoryview(self.offsets),
                           memoryview(self.sizes))
        shards, offsets, sizes = self._views
        shard, off, size = shards[index], offsets[index], sizes[index]
        mm = self._maps.get(shard) if self.max_open is None else None
        if mm is None:
            mm = self._map(shard)
        if off + size > len(mm):
            raise DataError(f"{self.folder / self.shard_names[shard]}: sample "
                            f"{int(self.keys[index])} lies beyond the end of the shard")
        return mm[off:off + size]

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps = OrderedDict()


def is_shards_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()
