"""What keeps the data path's memory flat at WebFace42M size (bench/scale.py measures it).

The epoch plan is the same numbers as before in less memory (int32 order, block-drawn
flips, a rank's flips only); the manifest is held in narrow columns read a row group at
a time, widened when a value needs it, and checked in row blocks that name the same row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import facekd.data.loader as loader_mod
import facekd.data.shard_meta as shard_meta
from facekd.data.loader import _BatchStream, epoch_flips, epoch_permutation
from facekd.data.shard_meta import COLUMNS, load_shards_meta
from facekd.errors import DataError


def _generator(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, stream]))


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000, 65_537])
def test_epoch_plan_is_the_generator_permutation_and_random_draws(n, monkeypatch):
    monkeypatch.setattr(loader_mod, "_DRAW_ROWS", 1000)  # many blocks
    order = epoch_permutation(n, 5, 3)
    assert order.dtype == np.int32
    assert np.array_equal(order, _generator(5, 3, 0).permutation(n))
    assert np.array_equal(epoch_flips(n, 5, 3), _generator(5, 3, 1).random(n) < 0.5)


class _Source:
    def __init__(self, n: int) -> None:
        self.keys = np.arange(10, 10 + n, dtype=np.int64)
        self.labels = np.arange(n, dtype=np.int64) % 7
        self.name = "synthetic"

    def __len__(self) -> int:
        return len(self.keys)


@pytest.mark.parametrize("world", [1, 3, 8])
def test_rank_rows_and_flips_are_the_whole_epoch_plan_sliced(world):
    n, batch = 1001, 16
    source = _Source(n)
    perm = _generator(2, 1, 0).permutation(n)
    flips = _generator(2, 1, 1).random(n) < 0.5
    for rank in range(world):
        stream = _BatchStream(source, batch, rank, world, flip=True, drop_last=False,
                              labelled=True)
        mine = perm[rank::world]
        for j in range(stream.total()):
            rows, batch_flips = stream.rows(2, 1, j)
            want = mine[j * batch:(j + 1) * batch]
            assert np.array_equal(rows, want)
            assert np.array_equal(batch_flips, flips[want])
        plan_rows, plan_flips = stream._epoch_plan(2, 1)
        assert plan_rows.base is None or world == 1  # no view of every rank's rows kept
        assert len(plan_flips) == len(mine)          # this rank's flips, not the epoch's
    plain = _BatchStream(source, batch, 0, world, flip=False, drop_last=False, labelled=True)
    assert not plain.rows(2, 1, 0)[1].any()


def _manifest(folder: Path, rows: dict[str, list[int]], row_group: int = 3,
              tar_bytes: int = 4096) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shard-000000.tar").write_bytes(bytes(tar_bytes))
    n = len(rows["key"])
    (folder / "dataset.json").write_text(json.dumps(
        {"samples": n, "num_classes": 100, "shards": ["shard-000000.tar"]}))
    table = pa.table({c: pa.array(rows[c], pa.int64()) for c in COLUMNS})
    pq.write_table(table, folder / "manifest.parquet", row_group_size=row_group)


def _rows(n: int) -> dict[str, list[int]]:
    return {"key": list(range(1, n + 1)), "label": [i % 100 for i in range(n)],
            "shard": [0] * n, "offset": [512 * (i % 7) for i in range(n)],
            "size": [100] * n}


def test_manifest_columns_are_narrow_and_exact_across_row_groups(tmp_path):
    rows = _rows(10)
    _manifest(tmp_path / "a", rows)
    meta = load_shards_meta(tmp_path / "a")
    for name, column in zip(COLUMNS, (meta.keys, meta.labels, meta.shards, meta.offsets,
                                      meta.sizes), strict=True):
        assert column.dtype == shard_meta.NARROW[name]
        assert column.tolist() == rows[name]


def test_a_value_beyond_the_narrow_type_widens_its_column_and_keeps_the_value(tmp_path):
    rows = _rows(8)
    rows["key"][6] = 2**40 + 5  # in the third row group: the first two were narrow
    rows["size"][7] = 70_000  # an image over 64 KB: 32 bits, not 64
    rows["offset"][7] = 0
    _manifest(tmp_path / "b", rows, tar_bytes=80_000)
    meta = load_shards_meta(tmp_path / "b")
    assert meta.keys.dtype == np.int64 and meta.keys.tolist() == rows["key"]
    assert meta.sizes.dtype == np.int32 and meta.sizes.tolist() == rows["size"]
    assert meta.labels.dtype == np.int32 and meta.shards.dtype == np.uint16


def test_block_checks_name_the_row_in_a_later_block(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_meta, "_CHECK_ROWS", 4)
    rows = _rows(12)
    rows["offset"][9] = -512  # block 2, a negative value in an unsigned column: widened
    _manifest(tmp_path / "c", rows)
    with pytest.raises(DataError, match=r"row 9 \(key 10\): negative offset \(got -512"):
        load_shards_meta(tmp_path / "c")
    rows = _rows(12)
    rows["offset"][10] = 4096  # span ends beyond the 4096-byte shard
    _manifest(tmp_path / "d", rows)
    with pytest.raises(DataError, match=r"row 10 \(key 11\): image span ends beyond"):
        load_shards_meta(tmp_path / "d")
    rows = _rows(12)
    rows["label"][5] = 100
    _manifest(tmp_path / "e", rows)
    with pytest.raises(DataError, match=r"row 5 \(key 6\): label outside \[-1, 100\)"):
        load_shards_meta(tmp_path / "e")


# --------------------------------------------------------------------------------------
# the .rec index of a conversion: streamed, spilled to an unnamed mapped file, no key array


def _rec(folder: Path, n: int, num_classes: int) -> Path:
    import cv2

    from facekd.data.recordio import write_insightface_dataset

    jpeg = cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()
    write_insightface_dataset(folder, ((i * num_classes // n, jpeg) for i in range(n)),
                              num_classes=num_classes)
    return folder


def test_idx_parsed_in_blocks_and_spilled_gives_the_same_index(tmp_path, monkeypatch):
    from facekd.data import recordio

    folder = _rec(tmp_path / "rec", 300, 30)
    whole = recordio.parse_idx(folder / "train.idx")
    monkeypatch.setattr(recordio, "_IDX_BLOCK", 64)  # lines cut across many blocks
    spill = tmp_path / "spill"
    spill.mkdir()
    for spill_dir in (None, spill):
        keys, offsets = recordio.parse_idx(folder / "train.idx", spill_dir)
        assert np.array_equal(keys, whole[0]) and np.array_equal(offsets, whole[1])
    assert isinstance(keys, np.memmap) and not list(spill.iterdir())  # the file has no name
    (tmp_path / "bad.idx").write_bytes((folder / "train.idx").read_bytes() + b"7\tx\n")
    with pytest.raises(DataError, match=r"line 332 is not 'key<TAB>offset'"):
        recordio.parse_idx(tmp_path / "bad.idx", spill)
    (tmp_path / "blank.idx").write_bytes(b"\n\n")
    assert len(recordio.parse_idx(tmp_path / "blank.idx")[0]) == 0


def test_conversion_source_keeps_no_key_array_and_reads_the_same(tmp_path):
    from facekd.data.recordio import open_rec
    from facekd.data.shards import RecSamples

    folder = _rec(tmp_path / "rec", 200, 20)
    reader = open_rec(folder)
    samples = RecSamples(folder, spill_dir=tmp_path)
    assert samples.keys is None and len(samples) == 200
    assert reader.image_key_range() == (1, 201) and reader.num_classes == 20
    assert [samples.key_of(i) for i in (0, 199)] == [1, 200]
    with pytest.raises(IndexError):
        samples.get(200)
    block = samples.block(190, 210, False, [])
    assert block.keys.tolist() == list(range(191, 201))
    assert block.labels.tolist() == [reader.label_of(k) for k in range(191, 201)]
    assert bytes(block.payloads[0]) == reader.read_image(191)[2]
    samples.release()
    assert reader.identity_keys().tolist() == list(range(201, 221))
    assert reader.identities()[0].tolist() == [1, 11]


def test_rec2shards_with_the_spilled_index_gives_the_same_shards(tmp_path):
    from facekd.data.shards import rec2shards, write_shards
    from facekd.data.shards.sources import RecSamples

    folder = _rec(tmp_path / "rec", 120, 12)
    rec2shards(folder, tmp_path / "a", shard_size=50, workers=2)
    write_shards(RecSamples(folder), tmp_path / "b", shard_size=50, workers=1)
    for name in ("shard-000000.tar", "shard-000002.tar", "manifest.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(DataError):
        rec2shards(tmp_path / "missing", tmp_path / "c")
    assert not (tmp_path / "c").exists()  # a bad source leaves no output folder
