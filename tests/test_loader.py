"""Training loader: exact pixels, deterministic shuffle/flip, rank/worker split, resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facekd.data import open_rec
from facekd.data.loader import BufferPool, build_train_loader, normalise_batch
from facekd.data.recordio import IRHeader, RecordWriter, pack_record
from facekd.data.shards import rec2shards
from facekd.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "recordio"
INSIGHTFACE = FIXTURES / "insightface_layout"


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "shards"
    rec2shards(INSIGHTFACE, out, shard_size=16, workers=1)
    return out


def _reference_pixels(payload: bytes, flipped: bool) -> torch.Tensor:
    """insightface's recipe up to the float step: cv2 decode, BGR->RGB, mirror, CHW."""
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    if image.shape[:2] != (112, 112):
        image = cv2.resize(image, (112, 112), interpolation=cv2.INTER_LINEAR)
    image = image[:, :, ::-1]
    if flipped:
        image = image[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _reference(payload: bytes, flipped: bool) -> torch.Tensor:
    """insightface's float input: (x/255 - 0.5) / 0.5."""
    return (_reference_pixels(payload, flipped).float() / 255 - 0.5) / 0.5


@pytest.mark.parametrize("layout", ["plain_im2rec", "insightface_layout"])
def test_pixels_labels_keys_match_reference(layout):
    reader = open_rec(FIXTURES / layout)
    loader = build_train_loader(FIXTURES / layout, 4, seed=5, drop_last=False)
    seen = 0
    for batch in loader:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 112, 112)
        assert batch["label"].dtype == torch.int64 and batch["key"].dtype == torch.int64
        floats = normalise_batch(batch["image"], "cpu")
        for i, key in enumerate(batch["key"].tolist()):
            flipped = bool(batch["flipped"][i])
            assert torch.equal(batch["image"][i], _reference_pixels(reader[key][1], flipped))
            assert torch.allclose(floats[i], _reference(reader[key][1], flipped), atol=1e-6)
            assert batch["label"][i] == reader.label_of(key)
        seen += len(batch["key"])
    assert seen == len(reader.image_keys())
    assert loader.num_classes == reader.num_classes


def test_shards_and_rec_give_the_same_batches(shards_dir):
    from_rec = build_train_loader(INSIGHTFACE, 8, seed=3, epoch=2)
    from_shards = build_train_loader(shards_dir, 8, seed=3, epoch=2)
    assert len(from_rec) == len(from_shards) == 7
    for a, b in zip(from_rec, from_shards, strict=True):
        assert torch.equal(a["key"], b["key"]) and torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["flipped"], b["flipped"])


def test_held_batches_are_never_overwritten(shards_dir):
    reader = open_rec(INSIGHTFACE)
    batches = list(build_train_loader(shards_dir, 8, seed=2, drop_last=False))
    views = [b["image"][0] for b in batches]  # a view alone must also keep its batch
    for batch, view in zip(batches, views, strict=True):
        key, flipped = int(batch["key"][0]), bool(batch["flipped"][0])
        assert torch.equal(view, batch["image"][0])
        assert torch.equal(view, _reference_pixels(reader[key][1], flipped))
    del batches
    loader = build_train_loader(shards_dir, 8, seed=2, drop_last=False)
    for batch, view in zip(loader, views, strict=True):
        assert torch.equal(batch["image"][0], view)


def test_shuffle_and_flip_depend_on_seed_and_epoch_only(shards_dir):
    def keys(**kw):
        loader = build_train_loader(shards_dir, 10, **kw)
        return [(b["key"].tolist(), b["flipped"].tolist()) for b in loader]

    assert keys(seed=1, epoch=0) == keys(seed=1, epoch=0)
    assert keys(seed=1, epoch=0) != keys(seed=1, epoch=1)
    assert keys(seed=1, epoch=0) != keys(seed=2, epoch=0)
    flips = [f for _, fl in keys(seed=1, epoch=0) for f in fl]
    assert 0 < sum(flips) < len(flips)
    assert not any(f for _, fl in keys(seed=1, flip=False) for f in fl)


def test_every_sample_exactly_once_over_ranks_and_workers(shards_dir):
    counts: Counter[int] = Counter()
    for rank in range(3):
        loader = build_train_loader(shards_dir, 4, seed=9, epoch=1, rank=rank, world_size=3,
                                    num_workers=2 if rank == 0 else 0, drop_last=False)
        batches = list(loader)
        assert len(batches) == len(loader)
        for batch in batches:
            counts.update(batch["key"].tolist())
    assert sorted(counts) == list(range(1, 61)) and set(counts.values()) == {1}


def test_workers_do_not_change_the_stream(shards_dir):
    single = [b["key"].tolist() for b in build_train_loader(shards_dir, 4, seed=4)]
    multi = [b["key"].tolist() for b in build_train_loader(shards_dir, 4, seed=4,
                                                           num_workers=2)]
    assert single == multi


def test_drop_last_gives_equal_full_batches_per_rank(shards_dir):
    lengths, seen = [], []
    for rank in range(4):
        loader = build_train_loader(shards_dir, 4, rank=rank, world_size=4, drop_last=True)
        batches = list(loader)
        lengths.append(len(batches))
        assert all(len(b["key"]) == 4 for b in batches)
        seen += [k for b in batches for k in b["key"].tolist()]
    assert lengths == [3, 3, 3, 3] and len(set(seen)) == len(seen) == 48


def test_mid_epoch_resume_continues_the_same_stream(shards_dir):
    full = [b["key"].tolist() for b in build_train_loader(shards_dir, 6, seed=7, epoch=3)]
    first = build_train_loader(shards_dir, 6, seed=7, epoch=3)
    it = iter(first)
    head = [next(it)["key"].tolist() for _ in range(4)]
    state = first.state_dict()
    resumed = build_train_loader(shards_dir, 6, seed=0, epoch=0, num_workers=2)
    resumed.load_state_dict(state)
    tail = [b["key"].tolist() for b in resumed]
    assert head + tail == full
    done = resumed.state_dict()
    assert done["batches_done"] == len(full)
    finished = build_train_loader(shards_dir, 6)
    finished.load_state_dict(done)
    assert list(finished) == []  # resumed after the last batch: nothing repeats
    assert len(list(finished)) == len(full)  # a new pass replays the epoch
    resumed.set_epoch(4)
    assert len(list(resumed)) == len(full)
    other = build_train_loader(shards_dir, 5)
    with pytest.raises(DataError, match="batch_size was 6"):
        other.load_state_dict(state)


def test_unlabelled_source_has_label_minus_one(shards_dir):
    loader = build_train_loader(shards_dir, 16, labelled=False, drop_last=False)
    labels = torch.cat([b["label"] for b in loader])
    assert labels.tolist() == [-1] * 60


def test_corrupt_image_names_the_key(tmp_path):
    good = open_rec(INSIGHTFACE)[1][1]
    with RecordWriter(tmp_path / "train.rec") as writer:
        writer.write(0, pack_record(IRHeader(0, 0.0, 0, 0), good))
        writer.write(1, pack_record(IRHeader(0, 1.0, 1, 0), b"\xff\xd8\xff garbage"))
    loader = build_train_loader(tmp_path, 2, drop_last=False)
    with pytest.raises(DataError, match=r"train\.rec: key 1: not a decodable image"):
        list(loader)
    with pytest.raises(DataError, match="not found"):
        build_train_loader(tmp_path / "nowhere", 2)


def _arithmetic(images: torch.Tensor) -> torch.Tensor:
    """What a CUDA consumer computes: float32 (x - 127.5) / 127.5 in torch."""
    return (images.float() - 127.5) / 127.5


def test_normalise_batch_is_bit_identical_to_the_device_arithmetic():
    from facekd.data.loader import _normalise_arithmetic

    every_value = torch.arange(256, dtype=torch.uint8).repeat(2 * 3 * 112 * 112 // 256 + 1)
    images = every_value[:2 * 3 * 112 * 112].reshape(2, 3, 112, 112)
    table = normalise_batch(images, "cpu")
    assert table.dtype == torch.float32 and table.shape == images.shape
    assert torch.equal(table, _arithmetic(images))  # the cv2.LUT path
    assert torch.equal(_normalise_arithmetic(images.clone()), table)  # the CUDA path
    assert table.min() == -1.0 and table.max() == 1.0
    assert torch.allclose(table, (images.float() / 255 - 0.5) / 0.5, atol=1e-6, rtol=0)
    empty = normalise_batch(torch.empty(0, 3, 112, 112, dtype=torch.uint8))
    assert empty.shape == (0, 3, 112, 112) and empty.dtype == torch.float32


def test_normalise_batch_of_loader_batches_equals_arithmetic(shards_dir):
    pool = BufferPool(size=2)
    held = []
    for batch in build_train_loader(shards_dir, 8, seed=1, drop_last=False):
        floats = normalise_batch(batch["image"], torch.device("cpu"), pool)
        assert torch.equal(floats, _arithmetic(batch["image"]))
        held.append((floats, _arithmetic(batch["image"])))
    for floats, want in held:  # pooled outputs still held are never overwritten
        assert torch.equal(floats, want)


def test_normalise_batch_moves_to_the_device_first():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    moved = normalise_batch(images, "meta")  # a non-CPU device: the torch arithmetic path
    assert moved.device.type == "meta" and moved.dtype == torch.float32
    assert moved.shape == images.shape


def test_normalise_batch_passes_floats_through():
    floats = torch.rand(2, 3, 4, 4) * 2 - 1
    assert normalise_batch(floats, "cpu") is floats
    assert normalise_batch(floats) is floats
