"""RecordIO reader/writer: MXNet fixtures, byte-identical rewrite, layouts, bad input, fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facekd.data import open_rec
from facekd.data.recordio import (
    MAGIC_BYTES,
    IRHeader,
    RecordReader,
    RecordWriter,
    frame_record,
    label_to_int,
    pack_record,
    read_property,
    reindex,
    scan_rec,
    unpack_record,
    write_insightface_dataset,
)
from facekd.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "recordio"
LAYOUTS = ["insightface_layout", "plain_im2rec", "multipart"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _label(label):
    return label.tolist() if isinstance(label, np.ndarray) else label


def _parts(rec: Path, offset: int) -> list[list[int]]:
    data = rec.read_bytes()
    parts = []
    pos = offset
    while True:
        _, lrec = struct.unpack_from("<II", data, pos)
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        parts.append([cflag, length])
        pos += 8 + length + (-length & 3)
        if cflag in (0, 3):
            return parts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_fixture_record_matches_mxnet(layout):
    folder = FIXTURES / layout
    expected = json.loads((folder / "expected.json").read_text())
    reader = open_rec(folder)
    assert reader.keys().tolist() == expected["keys_in_idx_order"]
    assert len(reader) == len(expected["records"])
    for key_text, want in expected["records"].items():
        key = int(key_text)
        header, payload = reader[key]
        assert header.flag == want["flag"]
        assert _label(header.label) == want["label"]
        assert (header.id, header.id2) == (want["id"], want["id2"])
        assert len(payload) == want["payload_len"]
        assert _sha(payload) == want["payload_sha256"]
        raw = reader.read_raw(key)
        assert len(raw) == want["record_len"] and _sha(raw) == want["record_sha256"]
        assert int(reader.offsets()[key]) == want["offset"]
        assert _parts(reader.rec_path, want["offset"]) == want["parts"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rewrite_is_byte_identical(layout, tmp_path):
    folder = FIXTURES / layout
    expected = json.loads((folder / "expected.json").read_text())
    reader = open_rec(folder)
    with RecordWriter(tmp_path / "train.rec") as writer:
        for key in reader.keys().tolist():
            header, payload = reader[key]
            writer.write(key, pack_record(header, payload))
    for name in ("train.rec", "train.idx"):
        assert _sha((tmp_path / name).read_bytes()) == expected["files"][name]["sha256"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scan_without_idx_and_reindex(layout, tmp_path):
    shutil.copy(FIXTURES / layout / "train.rec", tmp_path / "train.rec")
    indexed = open_rec(FIXTURES / layout)
    scanned = open_rec(tmp_path)  # no .idx beside it: sequential scan
    assert scanned.offsets().tolist() == indexed.offsets().tolist()
    for key in indexed.keys().tolist():
        assert scanned.read_raw(key) == indexed.read_raw(key)
    summary = reindex(tmp_path / "train.rec")
    assert summary["records"] == len(indexed)
    assert (tmp_path / "train.idx").read_bytes() == (FIXTURES / layout / "train.idx").read_bytes()


def test_insightface_layout_helpers():
    reader = open_rec(FIXTURES / "insightface_layout" / "train.rec")
    assert reader.has_header
    assert reader.image_keys().tolist() == list(range(1, 61))
    assert reader.identity_keys().tolist() == list(range(61, 73))
    assert reader.identities().tolist() == [[1 + 5 * i, 6 + 5 * i] for i in range(12)]
    assert reader.labels().tolist() == [k // 5 for k in range(60)]
    assert reader.label_of(40) == 7  # vector label [7, 0]
    assert reader.num_classes == 12
    assert read_property(FIXTURES / "insightface_layout") == (12, 112, 112)


def test_plain_layout_and_pickled_reader():
    reader = open_rec(FIXTURES / "plain_im2rec")
    assert not reader.has_header
    assert reader.image_keys().tolist() == list(range(10))
    assert reader.labels().tolist() == [k % 4 for k in range(10)]
    clone = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker receives
    assert clone.read_raw(7) == reader.read_raw(7)


def test_pack_matches_mxnet_rules():
    scalar = pack_record(IRHeader(5, 3.0, 7, 9), b"xy")  # numeric label forces flag 0
    assert scalar == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"xy"
    vector = pack_record(IRHeader(0, [1.0, 2.0, 3.0], 1, 0), b"z")
    assert vector[:4] == struct.pack("<I", 3) and len(vector) == 24 + 12 + 1
    header, payload = unpack_record(vector)
    assert header.flag == 3 and header.label.tolist() == [1.0, 2.0, 3.0] and payload == b"z"


def _write_folder(folder: Path, records: list[tuple[IRHeader, bytes]]) -> None:
    with RecordWriter(folder / "train.rec") as writer:
        for key, (header, payload) in enumerate(records):
            writer.write(key, pack_record(header, payload))


payload_parts = st.lists(st.one_of(st.binary(max_size=24), st.just(MAGIC_BYTES)), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.one_of(st.floats(-1e6, 1e6, width=32),
              st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=4)),
    st.integers(0, 2**64 - 1), payload_parts), min_size=1, max_size=8))
def test_round_trip_with_magic_in_payloads(items):
    records = [(IRHeader(0, label, id_, 0), b"".join(parts)) for label, id_, parts in items]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_folder(folder, records)
        for reader in (open_rec(folder), RecordReader(folder / "train.rec", folder / "no.idx")):
            assert len(reader) == len(records)
            for key, (header, payload) in enumerate(records):
                got_header, got_payload = reader[key]
                assert got_payload == payload
                assert got_header.id == header.id
                if isinstance(header.label, list):
                    assert got_header.flag == len(header.label)
                    assert got_header.label.tolist() == header.label
                else:
                    assert got_header.flag == 0 and got_header.label == header.label
            reader.close()


def _read_everything(folder: Path, use_idx: bool) -> None:
    reader = RecordReader(folder / "train.rec", None if use_idx else folder / "missing.idx")
    try:
        for key in reader.keys().tolist():
            header, payload = reader[key]
            assert reader.read_image(key) == (header.flag, label_to_int(header.label), payload)
            reader.read_raw(key)
        reader.labels()
        reader.identities()
    finally:
        reader.close()


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200), idx=st.one_of(st.none(), st.binary(max_size=60)))
def test_fuzz_random_bytes_only_raise_data_error(data, idx):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "train.rec").write_bytes(data)
        if idx is not None:
            (folder / "train.idx").write_bytes(idx)
        with contextlib.suppress(DataError):
            _read_everything(folder, use_idx=idx is not None)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_multipart_file_only_raises_data_error(data):
    original = bytearray((FIXTURES / "multipart" / "train.rec").read_bytes())
    idx = (FIXTURES / "multipart" / "train.idx").read_bytes()
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "train.rec").write_bytes(bytes(mutated[:cut]))
        (folder / "train.idx").write_bytes(idx)
        for use_idx in (True, False):
            with contextlib.suppress(DataError):
                _read_everything(folder, use_idx)


def _copy_fixture(tmp_path: Path, layout: str = "insightface_layout") -> Path:
    folder = tmp_path / layout
    shutil.copytree(FIXTURES / layout, folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def test_truncated_rec_names_file_and_key(tmp_path):
    folder = _copy_fixture(tmp_path, "plain_im2rec")
    rec = folder / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-100])  # the last record (key 9) loses its tail
    reader = open_rec(folder)
    for key in range(9):
        reader[key]
    with pytest.raises(DataError, match=r"train\.rec: key 9: truncated"):
        reader[9]
    with pytest.raises(DataError, match="truncated"):
        scan_rec(rec)
    folder = _copy_fixture(tmp_path / "b")
    rec = folder / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-20000])  # whole records gone: caught at open
    with pytest.raises(DataError, match=r"train\.idx: key 58 points at byte 322668, outside"):
        open_rec(folder)


def test_wrong_magic_and_bad_offsets(tmp_path):
    folder = _copy_fixture(tmp_path)
    (folder / "train.rec").write_bytes(b"\0" * 64 + (folder / "train.rec").read_bytes()[64:])
    with pytest.raises(DataError, match=r"train\.idx: key 0 points at byte 0"):
        open_rec(folder)
    with pytest.raises(DataError, match="wrong magic"):
        scan_rec(folder / "train.rec")
    folder = _copy_fixture(tmp_path / "b")
    (folder / "train.idx").write_text("0\t0\n1\t999999999\n")
    with pytest.raises(DataError, match=r"key 1 points at byte 999999999"):
        open_rec(folder)
    (folder / "train.idx").write_text("0\t0\n1\tforty\n")
    with pytest.raises(DataError, match=r"train\.idx: line 2"):
        open_rec(folder)
    (folder / "train.idx").write_text("0\t0\n1\t42\n")  # inside record 0
    with pytest.raises(DataError, match="key 1 points at byte 42"):
        open_rec(folder)


def test_missing_and_bad_property(tmp_path):
    with pytest.raises(DataError, match="property: missing"):
        read_property(tmp_path)
    (tmp_path / "property").write_text("twelve,112,112\n")
    with pytest.raises(DataError, match="property: first line"):
        read_property(tmp_path)


def test_missing_key_is_a_data_error():
    reader = open_rec(FIXTURES / "multipart")
    with pytest.raises(DataError, match="no record with key 99"):
        reader[99]


def test_frame_splits_exactly_like_the_fixture():
    expected = json.loads((FIXTURES / "multipart" / "expected.json").read_text())
    reader = open_rec(FIXTURES / "multipart")
    for case in expected["cases"]:
        raw = reader.read_raw(case["key"])
        framed = frame_record(raw)
        start = case_offset = int(reader.offsets()[case["key"]])
        data = reader.rec_path.read_bytes()
        end = int(reader.offsets()[case["key"] + 1]) if case["key"] + 1 < len(reader) \
            else len(data)
        assert framed == data[start:end], case["name"]
        assert case_offset % 4 == 0


@pytest.mark.parametrize("shuffled", [False, True])
def test_write_insightface_dataset(tmp_path, shuffled):
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), [3, 1, 4, 2])
    labels = np.append(labels, 1)  # class 1 gets a second image later: out of order
    if shuffled:
        rng.shuffle(labels)
    images = [bytes([i]) * (10 + i) + MAGIC_BYTES * (i % 2) for i in range(len(labels))]
    summary = write_insightface_dataset(tmp_path, zip(labels.tolist(), images, strict=True),
                                        num_classes=5)
    assert summary["images"] == len(labels) and summary["reordered"]
    reader = open_rec(tmp_path)
    assert reader.has_header and reader.num_classes == 5
    assert (tmp_path / "property").read_text() == "5,112,112\n"
    order = np.argsort(labels, kind="stable")
    assert reader.labels().tolist() == labels[order].tolist()
    for new_key, old in enumerate(order.tolist(), 1):
        header, payload = reader[new_key]
        assert payload == images[old] and header.id == new_key and header.flag == 0
    counts = np.bincount(labels, minlength=5)
    ends = np.cumsum(counts) + 1
    want = [[int(e - c), int(e)] for c, e in zip(counts, ends, strict=True)]
    assert reader.identities().tolist() == want


def test_write_insightface_dataset_sorted_single_pass(tmp_path):
    samples = [(0, b"a"), (0, b"b"), (2, b"c")]
    summary = write_insightface_dataset(tmp_path, iter(samples), num_classes=3)
    assert not summary["reordered"]
    reader = open_rec(tmp_path)
    assert reader.identities().tolist() == [[1, 3], [3, 3], [3, 4]]
    assert [reader[k][1] for k in (1, 2, 3)] == [b"a", b"b", b"c"]
    with pytest.raises(DataError, match="label 7"):
        write_insightface_dataset(tmp_path / "bad", [(7, b"x")], num_classes=3)
    assert not (tmp_path / "bad" / "train.rec").exists()


def test_nonfinite_labels_and_impossible_headers_are_data_errors(tmp_path):
    _write_folder(tmp_path, [(IRHeader(0, float("nan"), 0, 0), b"x")])
    reader = open_rec(tmp_path)
    with pytest.raises(DataError, match="key 0: label nan is not a finite number"):
        reader.labels()
    with pytest.raises(DataError, match="key 0: label nan"):
        reader.read_image(0)
    folder = tmp_path / "huge"
    folder.mkdir()
    _write_folder(folder, [(IRHeader(0, [1e30, 2e30], 0, 0), b""), (IRHeader(0, 1.0, 1, 0), b"")])
    with pytest.raises(DataError, match="header record 0 has label"):
        open_rec(folder).image_keys()
