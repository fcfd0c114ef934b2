"""Shards: rec2shards / shards2rec / folder2shards / rec2folder, resume, verify, bad records."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from facekd.cli import main as cli_main
from facekd.data import open_rec
from facekd.data.folder import folder2shards, rec2folder
from facekd.data.recordio import IRHeader, RecordWriter, pack_record, write_insightface_dataset
from facekd.data.shards import ShardSet, rec2shards, shards2rec, tar_header, tar_headers
from facekd.data.shards import writer as shards_writer
from facekd.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "recordio"
INSIGHTFACE = FIXTURES / "insightface_layout"


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def test_tar_header_is_valid_ustar():
    info = tarfile.TarInfo.frombuf(tar_header(b"123.jpg", 4321), "utf-8", "strict")
    assert (info.name, info.size, info.mtime, info.mode) == ("123.jpg", 4321, 0, 0o644)


def test_vectorised_headers_equal_the_scalar_ones():
    rng = np.random.default_rng(0)
    names = [b"%d.%s" % (k, e) for k, e in zip(rng.integers(0, 10**12, 50).tolist(),
                                               [b"jpg", b"png", b"json"] * 17, strict=False)]
    sizes = rng.integers(0, 2**32, 50)
    block = tar_headers(np.array(names, "S100"), sizes)
    for row, name, size in zip(block, names, sizes.tolist(), strict=True):
        assert row.tobytes() == tar_header(name, size)


def test_rec2shards_manifest_matches_source(tmp_path):
    out = tmp_path / "shards"
    summary = rec2shards(INSIGHTFACE, out, shard_size=16, workers=2, verify=True)
    assert summary == {**summary, "samples": 60, "shards": 4, "num_classes": 12,
                       "bad_records": 0, "verified": True}
    reader = open_rec(INSIGHTFACE)
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert manifest["key"].tolist() == list(range(1, 61))
    assert manifest["label"].tolist() == reader.labels().tolist()
    assert manifest["shard"].tolist() == [k // 16 for k in range(60)]
    for row in manifest.itertuples():
        payload = reader[row.key][1]
        tar = (out / f"shard-{row.shard:06d}.tar").read_bytes()
        assert tar[row.offset:row.offset + row.size] == payload
        assert row.sha1 == hashlib.sha1(payload).hexdigest() and row.ext == "jpg"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["samples"] == 60 and meta["num_classes"] == 12
    assert meta["source_layout"] == "insightface"


def test_shards_readable_by_webdataset_and_tarfile(tmp_path):
    import webdataset as wds

    out = tmp_path / "shards"
    rec2shards(FIXTURES / "plain_im2rec", out, shard_size=4, workers=1)
    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    reader = open_rec(FIXTURES / "plain_im2rec")
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        image = sample.get("jpg", sample.get("png"))
        seen[int(sample["__key__"])] = (meta, image)
    assert sorted(seen) == list(range(10))
    for key, (meta, image) in seen.items():
        assert image == reader[key][1]
        assert meta == {"label": key % 4, "key": key, "flag": 0}
    with tarfile.open(urls[0]) as tar:
        assert tar.getnames() == ["0.jpg", "0.json", "1.png", "1.json", "2.jpg", "2.json",
                                  "3.png", "3.json"]


def test_kill_and_resume_gives_identical_shards(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    rec2shards(INSIGHTFACE, reference, shard_size=8, workers=1)
    out = tmp_path / "resumed"
    real = shards_writer._write_shard

    def dying(source, out_dir, shard, start, stop, skip_bad):
        if shard == 3:
            raise KeyboardInterrupt  # like a kill in the middle of the run
        return real(source, out_dir, shard, start, stop, skip_bad)

    monkeypatch.setattr(shards_writer, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        rec2shards(INSIGHTFACE, out, shard_size=8, workers=1)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        f"shard-{i:06d}.tar" for i in range(3)]
    assert not (out / "manifest.parquet").exists()
    (out / ".shard-000004.tar.tmp-12345").write_bytes(b"partial")  # SIGKILL leftovers
    shutil.copy(out / "shard-000000.tar", out / "shard-000005.tar")  # renamed, no index
    monkeypatch.setattr(shards_writer, "_write_shard", real)
    rec2shards(INSIGHTFACE, out, shard_size=8, workers=2)
    assert _tree_bytes(out) == _tree_bytes(reference)
    assert (out / "manifest.parquet").read_bytes() == \
        (reference / "manifest.parquet").read_bytes()
    with pytest.raises(DataError, match="different conversion"):
        rec2shards(INSIGHTFACE, out, shard_size=9, workers=1)


def test_shards2rec_then_rec2shards_round_trip(tmp_path):
    first = tmp_path / "first"
    rec2shards(INSIGHTFACE, first, shard_size=25, workers=1)
    rec_folder = tmp_path / "rec"
    shards2rec(first, rec_folder, progress=False)
    original, rebuilt = open_rec(INSIGHTFACE), open_rec(rec_folder)
    assert rebuilt.identities().tolist() == original.identities().tolist()
    assert (rec_folder / "property").read_text() == "12,112,112\n"
    for key in original.image_keys().tolist():
        assert rebuilt[key][1] == original[key][1]
        assert rebuilt.label_of(key) == original.label_of(key)
    second = tmp_path / "second"
    rec2shards(rec_folder, second, shard_size=25, workers=1)
    # same keys, labels, image bytes and positions; only the JSON 'flag' of the vector-label
    # identities differs (shards2rec writes scalar labels)
    assert pd.read_parquet(second / "manifest.parquet").equals(
        pd.read_parquet(first / "manifest.parquet"))


def test_folder_round_trip(tmp_path):
    images = tmp_path / "images"
    summary = rec2folder(INSIGHTFACE, images)
    assert summary["images"] == 60
    assert sorted(p.name for p in images.iterdir()) == sorted(str(i) for i in range(12))
    out = tmp_path / "shards"
    folder2shards(images, out, shard_size=32, workers=1, verify=True)
    shard_set = ShardSet(out)
    assert len(shard_set) == 60 and shard_set.num_classes == 12
    files = json.loads((out / "files.json").read_text())
    reader = open_rec(INSIGHTFACE)
    classes = json.loads((out / "dataset.json").read_text())["classes"]
    for i in range(60):
        identity, name = files[int(shard_set.keys[i])].split("/")
        assert classes[int(shard_set.labels[i])] == identity
        assert shard_set.read(i) == reader[int(name.split(".")[0])][1]


def _rec_with_bad_records(folder: Path) -> None:
    good = open_rec(INSIGHTFACE)[1][1]
    with RecordWriter(folder / "train.rec") as writer:
        writer.write(0, pack_record(IRHeader(0, 0.0, 0, 0), good))
        writer.write(1, pack_record(IRHeader(0, 1.0, 1, 0), b"this is not an image"))
        writer.write(2, pack_record(IRHeader(0, 1.0, 2, 0), good[: len(good) // 2]))
        writer.write(3, pack_record(IRHeader(0, 2.0, 3, 0), good))


def test_bad_records_stop_or_are_skipped(tmp_path):
    _rec_with_bad_records(tmp_path)
    with pytest.raises(DataError, match=r"train\.rec: key 1: payload of 20 bytes is not"):
        rec2shards(tmp_path, tmp_path / "stop", shard_size=10, workers=1)
    summary = rec2shards(tmp_path, tmp_path / "skip", shard_size=10, workers=1, skip_bad=True,
                         verify=True)
    assert summary["samples"] == 2 and summary["bad_records"] == 2
    assert "key 2: JPEG image" in summary["bad_examples"][1]
    listed = (tmp_path / "skip" / "bad_records.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == ["1", "2"]
    assert ShardSet(tmp_path / "skip").keys.tolist() == [0, 3]


def test_cli_exit_codes(tmp_path, capsys):
    _rec_with_bad_records(tmp_path)
    assert cli_main(["prep", "rec2shards", str(tmp_path), str(tmp_path / "o"),
                     "--workers", "1"]) == 2
    assert "key 1" in capsys.readouterr().err
    assert cli_main(["prep", "rec2shards", str(tmp_path), str(tmp_path / "o2"),
                     "--workers", "1", "--skip-bad"]) == 0
    assert cli_main(["prep", "reindex", str(tmp_path / "missing.rec")]) == 2
    (tmp_path / "train.idx").write_text("0\t0\n1\t12345678\n")
    assert cli_main(["prep", "info", str(tmp_path)]) == 2
    assert "key 1 points at byte 12345678" in capsys.readouterr().err


def test_write_insightface_dataset_from_generator_of_shards(tmp_path):
    out = tmp_path / "shards"
    rec2shards(INSIGHTFACE, out, shard_size=60, workers=1)
    shard_set = ShardSet(out)
    reversed_rows = list(range(len(shard_set)))[::-1]
    write_insightface_dataset(tmp_path / "rec",
                              ((int(shard_set.labels[i]), shard_set.read(i))
                               for i in reversed_rows), num_classes=12)
    rebuilt = open_rec(tmp_path / "rec")
    assert np.array_equal(rebuilt.labels(), np.sort(shard_set.labels))
