"""Validation of a shards folder's metadata (facekd.data.shard_meta), property-based.

Beside the RecordIO fuzz in test_recordio.py: arbitrary ``dataset.json`` content and
manifests with arbitrary integers, a dropped column or a column of the wrong type must
either raise a DataError or give arrays that every reader can use as they are (every
row readable inside its shard, labels inside ``num_classes``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facekd.data.recordio import MAX_CLASSES
from facekd.data.shard_meta import COLUMNS, load_shards_meta
from facekd.data.shards import ShardSet
from facekd.errors import DataError

TAR_SIZES = (2048, 1024)  # two shard files of random bytes
INT64 = st.one_of(st.integers(-3, 2100),
                  st.sampled_from([-(2**63), 2**63 - 1, 10**9, 2**31, MAX_CLASSES]))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12),
                              st.floats(allow_nan=False), st.text(max_size=12)),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
NAMES = st.lists(st.sampled_from(["shard-000000.tar", "shard-000001.tar", "../x.tar",
                                  "/etc/passwd", "", "missing.tar", "sub/../shard-000001.tar"]),
                 max_size=3)
META = st.one_of(
    JSON,
    st.fixed_dictionaries({}, optional={"shards": st.one_of(NAMES, JSON),
                                        "samples": st.one_of(st.integers(-2, 8), JSON),
                                        "num_classes": st.one_of(INT64, JSON)}))


def _write(folder: Path, meta: object, raw_meta: bytes | None,
           rows: list[tuple[int, ...]], drop: str | None, as_text: str | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for i, size in enumerate(TAR_SIZES):
        (folder / f"shard-{i:06d}.tar").write_bytes(rng.bytes(size))
    if raw_meta is not None:
        (folder / "dataset.json").write_bytes(raw_meta)
    elif meta is not None:
        (folder / "dataset.json").write_text(json.dumps(meta))
    columns = {}
    for j, name in enumerate(COLUMNS):
        if name == drop:
            continue
        values = [r[j] for r in rows]
        columns[name] = (pa.array([str(v) for v in values]) if name == as_text
                         else pa.array(values, pa.int64()))
    pq.write_table(pa.table(columns) if columns else pa.table({"x": pa.array([1])}),
                   folder / "manifest.parquet")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=META, raw_meta=st.one_of(st.none(), st.binary(max_size=30)),
       rows=st.lists(st.tuples(INT64, INT64, st.integers(-2, 3) | INT64, INT64, INT64),
                     max_size=5),
       drop=st.one_of(st.none(), st.sampled_from(COLUMNS)),
       as_text=st.one_of(st.none(), st.sampled_from(COLUMNS)))
def test_fuzz_metadata_is_valid_or_a_data_error(meta, raw_meta, rows, drop, as_text):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write(folder, meta, raw_meta, rows, drop, as_text)
        try:
            checked = load_shards_meta(folder)
        except DataError as exc:
            assert "\n" not in str(exc)
            return
        n = len(checked.keys)
        assert n == len(rows)
        assert checked.num_classes <= MAX_CLASSES
        if n:
            assert (checked.labels >= -1).all()  # -1: an unlabelled sample
            assert (checked.labels < checked.num_classes).all()
            assert (checked.sizes > 0).all() and (checked.offsets >= 0).all()
            lengths = np.array([(folder / checked.shard_names[s]).stat().st_size
                                for s in checked.shards.tolist()])
            assert (checked.offsets + checked.sizes <= lengths).all()
        shards = ShardSet(folder)
        try:
            for i in range(n):  # every row is readable, exactly its size
                assert len(shards.read(i)) == int(checked.sizes[i])
        finally:
            shards.close()


def test_good_folder_round_trips(tmp_path):
    rows = [(1, 0, 0, 512, 100), (2, 1, 1, 0, 1024)]
    _write(tmp_path, {"shards": ["shard-000000.tar", "shard-000001.tar"], "samples": 2,
                      "num_classes": 3}, None, rows, None, None)
    checked = load_shards_meta(tmp_path)
    assert checked.num_classes == 3 and checked.keys.tolist() == [1, 2]


@pytest.mark.parametrize(("meta", "rows", "message"), [
    ({"num_classes": 2}, [(1, 2, 0, 0, 10)], r"row 0 \(key 1\): label outside \[-1, 2\)"),
    ({"shards": ["shard-000000.tar"]}, [(1, 0, 5, 0, 10)], "shard index outside the 1"),
    ({}, [(1, 0, 5, 0, 10)], "shard-000005.tar: cannot open shard"),
    ({}, [(1, 0, 0, 0, -1)], "image size must be positive"),
    ({}, [(1, 0, 0, 2000, 100)], "ends beyond its shard"),
    ({"samples": 9}, [(1, 0, 0, 0, 10)], "declares 9 samples"),
    ({"shards": "shard-000000.tar"}, [], "'shards' must be a list"),
    ({"shards": ["../../etc/passwd"]}, [], "lies outside"),
    ({"num_classes": True}, [], "non-negative integer"),
])
def test_each_rule_names_the_value(tmp_path, meta, rows, message):
    _write(tmp_path, meta, None, rows, None, None)
    with pytest.raises(DataError, match=message):
        load_shards_meta(tmp_path)
