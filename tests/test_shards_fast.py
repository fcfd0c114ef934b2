"""The vectorised rec2shards path writes exactly what a plain per-member tar writer would.

``RecordReader.image_spans`` and ``RecSamples.block`` take the common records in bulk and
hand everything unusual (multipart, PNG, trailing bytes, bad records) to the per-sample
path; these tests pin both to a naive reference built from ``tar_header`` member by member.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from facekd.data import open_rec
from facekd.data.recordio import MAGIC_BYTES, IRHeader, RecordWriter, pack_record
from facekd.data.shards import RecSamples, rec2shards, tar_header
from facekd.data.shards import tar as shards_tar
from facekd.data.shards import writer as shards_writer
from facekd.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "recordio"


def _mixed_rec(folder: Path) -> list[str]:
    """A plain-layout .rec with every kind of record the fast path must hand over."""
    jpeg = open_rec(FIXTURES / "insightface_layout")[1][1]
    png = next(p for _, _, p in open_rec(FIXTURES / "plain_im2rec").iter_records()
               if p[:4] == b"\x89PNG")
    cut = (len(jpeg) // 2) & ~3
    magic_jpeg = jpeg[:cut] + MAGIC_BYTES + jpeg[cut:]  # split by the writer: multipart
    records = [
        ("plain jpeg", IRHeader(0, 3.0, 0, 0), jpeg),
        ("multipart jpeg", IRHeader(0, 4.0, 0, 0), magic_jpeg),
        ("png", IRHeader(0, 5.0, 0, 0), png),
        ("bytes after the end marker", IRHeader(0, 6.0, 0, 0), jpeg + b"\0\0\0"),
        ("label vector", IRHeader(2, [7.0, 99.0], 0, 0), jpeg),
        ("negative label", IRHeader(0, -2.0, 0, 0), jpeg),
        ("fractional label", IRHeader(0, 8.75, 0, 0), jpeg),
        ("nan label", IRHeader(0, math.nan, 0, 0), jpeg),
        ("not an image", IRHeader(0, 1.0, 0, 0), b"definitely not a picture"),
        ("truncated jpeg", IRHeader(0, 1.0, 0, 0), jpeg[:200]),
        ("empty payload", IRHeader(0, 1.0, 0, 0), b""),
        ("big key", IRHeader(0, 9.0, 0, 0), jpeg),
    ]
    keys = [*range(len(records) - 1), 10**15]
    with RecordWriter(folder / "train.rec") as writer:
        for key, (_, header, payload) in zip(keys, records, strict=True):
            writer.write(key, pack_record(header, payload))
    return [name for name, _, _ in records]


def _reference_shards(folder: Path, shard_size: int) -> tuple[dict[str, bytes], list[tuple]]:
    """Shard bytes and manifest rows from the per-sample path and scalar tar headers."""
    source = RecSamples(folder)
    tars: dict[str, bytes] = {}
    rows = []
    for shard, start in enumerate(range(0, len(source), shard_size)):
        chunks: list[bytes] = []
        pos = 0
        for index in range(start, min(start + shard_size, len(source))):
            try:
                key, label, flag, payload, ext = source.get(index)
            except DataError:
                continue
            payload = bytes(payload)
            body = b'{"label": %d, "key": %d, "flag": %d}' % (label, key, flag)
            rows.append((key, label, shard, pos + 512, len(payload), ext,
                         hashlib.sha1(payload).hexdigest()))
            for name, data in ((f"{key}.{ext}".encode(), payload), (f"{key}.json".encode(), body)):
                member = tar_header(name, len(data)) + data + bytes(-len(data) % 512)
                chunks.append(member)
                pos += len(member)
        tars[f"shard-{shard:06d}.tar"] = b"".join(chunks) + bytes(1024)
    return tars, rows


def test_image_spans_agree_with_read_image(tmp_path):
    names = _mixed_rec(tmp_path)
    reader = open_rec(tmp_path)
    keys = reader.keys()
    starts, ends, flags, labels, simple = reader.image_spans(keys)
    view = reader.view()
    for i, key in enumerate(keys.tolist()):
        if simple[i]:
            flag, label, payload = reader.read_image(key)
            assert (int(flags[i]), int(labels[i])) == (flag, label), names[i]
            assert bytes(view[starts[i]:ends[i]]) == payload, names[i]
    off_path = {names[i] for i in np.flatnonzero(~simple)}
    assert off_path == {"multipart jpeg", "nan label"}
    del view
    reader.close()


@pytest.mark.parametrize("layout", ["insightface_layout", "plain_im2rec", "multipart"])
def test_image_spans_agree_with_read_image_on_the_fixtures(layout):
    reader = open_rec(FIXTURES / layout)
    keys = reader.image_keys()
    starts, ends, flags, labels, simple = reader.image_spans(keys)
    view = reader.view()
    offset_of = dict(zip(reader.keys().tolist(), reader.offsets().tolist(), strict=True))
    for i, key in enumerate(keys.tolist()):
        multipart = view[offset_of[key] + 7] >> 5 != 0  # cflag: top bits of the length
        assert simple[i] != multipart
        if simple[i]:
            assert (int(flags[i]), int(labels[i]), bytes(view[starts[i]:ends[i]])) == \
                reader.read_image(key)
    assert simple.any()
    del view
    reader.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_equal_a_member_by_member_reference(tmp_path, monkeypatch, workers):
    names = _mixed_rec(tmp_path)
    monkeypatch.setattr(shards_writer, "_BATCH", 3)  # many blocks, bad records at their edges
    out = tmp_path / "shards"
    summary = rec2shards(tmp_path, out, shard_size=5, workers=workers, skip_bad=True,
                         verify=True)
    tars, rows = _reference_shards(tmp_path, 5)
    assert {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))} == tars
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert [tuple(r) for r in manifest.itertuples(index=False)] == rows
    bad = {names[int(line.split("\t")[0])]
           for line in (out / "bad_records.txt").read_text().splitlines()}
    assert bad == {"nan label", "not an image", "truncated jpeg", "empty payload"}
    assert summary["samples"] == len(names) - 4 == len(rows)
    assert set(manifest["ext"]) == {"jpg", "png"}


def test_short_writes_are_completed(tmp_path, monkeypatch):
    _mixed_rec(tmp_path)
    real_writev = os.writev

    def short_writev(fd, buffers):  # the kernel may write less than asked
        if len(buffers) > 2:
            return real_writev(fd, buffers[:2]) + os.write(fd, bytes(buffers[2])[:7])
        return real_writev(fd, buffers)

    monkeypatch.setattr(shards_tar.os, "writev", short_writev)
    rec2shards(tmp_path, tmp_path / "out", shard_size=4, workers=1, skip_bad=True)
    tars, _ = _reference_shards(tmp_path, 4)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "out").glob("*.tar"))} == tars


def test_damaged_shard_index_is_a_data_error(tmp_path):
    _mixed_rec(tmp_path)
    out = tmp_path / "out"
    rec2shards(tmp_path, out, shard_size=4, workers=1, skip_bad=True)
    part = out / ".parts" / "shard-000001.part"
    part.write_bytes(part.read_bytes()[:100])
    (out / "manifest.parquet").unlink()
    with pytest.raises(DataError, match=r"shard-000001\.part: damaged shard index"):
        rec2shards(tmp_path, out, shard_size=4, workers=1, skip_bad=True)
    assert not (out / "manifest.parquet").exists()


def test_worker_errors_reach_the_caller(tmp_path):
    _mixed_rec(tmp_path)
    with pytest.raises(DataError, match=r"train\.rec: key (7: label nan|8: payload of 24 b)"):
        rec2shards(tmp_path, tmp_path / "stop", shard_size=2, workers=2)
    assert not (tmp_path / "stop" / "manifest.parquet").exists()


def test_a_dying_worker_is_a_data_error_and_the_run_resumes(tmp_path, monkeypatch):
    _mixed_rec(tmp_path)
    real = shards_writer._write_shard

    def killed(source, out_dir, shard, start, stop, skip_bad):
        if shard == 2:
            os._exit(9)  # like the OOM killer: no exception, no result
        return real(source, out_dir, shard, start, stop, skip_bad)

    monkeypatch.setattr(shards_writer, "_write_shard", killed)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="conversion worker died"):
        rec2shards(tmp_path, out, shard_size=2, workers=2, skip_bad=True)
    monkeypatch.setattr(shards_writer, "_write_shard", real)
    rec2shards(tmp_path, out, shard_size=2, workers=2, skip_bad=True)
    tars, _ = _reference_shards(tmp_path, 2)
    assert {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))} == tars


def test_member_texts_by_digits_equal_the_formatted_ones():
    rng = np.random.default_rng(0)
    edges = np.array([0, 1, 9, 10, 99, 100, 999_999, 10**6, 10**18 - 1, 10**18,
                      np.iinfo(np.int64).max], np.int64)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        top = 10 ** int(rng.integers(1, 19))
        keys = np.concatenate([rng.choice(edges, n), rng.integers(0, top, n)])
        labels = rng.permutation(np.concatenate([rng.choice(edges, n), rng.integers(0, 10**5, n)]))
        flags = rng.choice(np.array([0, 1, 2, 10, 4294967295], np.int64), 2 * n)
        exts = rng.choice(np.array([b"jpg", b"png"], "S3"), 2 * n)
        fast = shards_tar.member_texts_by_digits(keys, labels, flags, exts)
        slow = shards_tar.member_texts_formatted(keys, labels, flags, exts)
        for got, want in zip(fast[:3], slow[:3], strict=True):
            width = max(got.shape[1], want.shape[1])
            pad = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in (got, want)]
            assert np.array_equal(*pad)
        assert np.array_equal(fast[3], slow[3])
    negative = np.array([-1], np.int64)
    assert shards_tar.member_texts_by_digits(negative, negative, np.zeros(1, np.int64),
                                             np.array([b"jpg"], "S3")) is None


def test_image_keys_missing_from_the_index_are_skipped_one_by_one(tmp_path):
    source = FIXTURES / "insightface_layout"
    for name in ("train.rec", "property"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    lines = (source / "train.idx").read_text().splitlines()
    (tmp_path / "train.idx").write_text("".join(f"{line}\n" for line in lines
                                                if line.split("\t")[0] != "5"))
    with pytest.raises(DataError, match="no record with key 5"):
        rec2shards(tmp_path, tmp_path / "stop", shard_size=8, workers=1)
    summary = rec2shards(tmp_path, tmp_path / "skip", shard_size=8, workers=1, skip_bad=True)
    assert summary["samples"] == 59 and summary["bad_records"] == 1
    assert "no record with key 5" in summary["bad_examples"][0]
