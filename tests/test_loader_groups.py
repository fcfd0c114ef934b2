"""Identity-grouped (P x K) training batches: layout, coverage, determinism, resume, use."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facekd.data.loader import (
    build_train_loader,
    epoch_flips,
    identity_chunks,
    normalise_batch,
    rank_indices,
)
from facekd.data.recordio import write_insightface_dataset
from facekd.errors import ConfigError, DataError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "recordio"
INSIGHTFACE = FIXTURES / "insightface_layout"
# uneven identities: 1 to 7 images, so K = 4 needs padding (and repeats for < 4)
COUNTS = [1, 2, 3, 4, 5, 6, 7, 4, 3, 9]


def _png(rng: np.random.Generator, colour: np.ndarray) -> bytes:
    image = np.clip(colour + rng.integers(-30, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


class PngSource:
    """An in-memory source with the loader's source interface (keys, labels, read)."""

    def __init__(self, counts: list[int], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
        self.keys = np.arange(len(self.labels), dtype=np.int64) + 1
        colours = rng.integers(40, 215, (len(counts), 1, 1, 3))
        self.payloads = [_png(rng, colours[label]) for label in self.labels]
        self.num_classes = len(counts)
        self.name = "png-source"

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> bytes:
        return self.payloads[index]


@pytest.fixture(scope="module")
def source() -> PngSource:
    return PngSource(COUNTS)


@pytest.fixture(scope="module")
def rec_dataset(tmp_path_factory) -> Path:
    """A real insightface-layout dataset: 12 identities x 5 images of identity colours."""
    folder = tmp_path_factory.mktemp("grouped") / "rec"
    rng = np.random.default_rng(3)
    colours = rng.integers(30, 225, (12, 1, 1, 3))
    samples = [(label, _png(rng, colours[label])) for label in range(12) for _ in range(5)]
    write_insightface_dataset(folder, samples, num_classes=12)
    return folder


def _blocks(batches: list[dict], k: int) -> list[tuple[int, ...]]:
    return [tuple(row) for b in batches for row in b["key"].view(-1, k).tolist()]


def test_k1_is_the_plain_per_sample_plan():
    """images_per_identity=1 gives exactly the documented per-sample permutation and flips."""
    for rank in range(2):
        plain = list(build_train_loader(INSIGHTFACE, 7, seed=4, epoch=3, rank=rank,
                                        world_size=2, drop_last=False))
        grouped_off = list(build_train_loader(INSIGHTFACE, 7, seed=4, epoch=3, rank=rank,
                                              world_size=2, drop_last=False,
                                              images_per_identity=1))
        rows = rank_indices(60, 4, 3, rank, 2)
        flips = epoch_flips(60, 4, 3)
        keys = np.concatenate([b["key"].numpy() for b in plain])
        from facekd.data import open_rec

        image_keys = open_rec(INSIGHTFACE).image_keys()
        assert np.array_equal(keys, np.asarray(image_keys)[rows])
        assert np.array_equal(np.concatenate([b["flipped"].numpy() for b in plain]), flips[rows])
        assert len(plain) == len(grouped_off)
        for a, b in zip(plain, grouped_off, strict=True):
            for name in ("image", "label", "key", "flipped"):
                assert torch.equal(a[name], b[name])


def test_every_batch_is_k_blocks_of_one_identity(source):
    k = 4
    loader = build_train_loader(source, 8, seed=1, images_per_identity=k, drop_last=False)
    key_label = dict(zip(source.keys.tolist(), source.labels.tolist(), strict=True))
    batches = list(loader)
    assert len(batches) == len(loader) > 1
    for batch in batches:
        assert batch["image"].shape[1:] == (3, 112, 112) and len(batch["key"]) % k == 0
        labels = batch["label"].view(-1, k)
        assert (labels == labels[:, :1]).all()
        for block, block_labels in zip(batch["key"].view(-1, k).tolist(), labels.tolist(),
                                       strict=True):
            assert [key_label[key] for key in block] == block_labels
            # an identity repeats an image inside a block only when it has fewer than K
            if COUNTS[block_labels[0]] >= k:
                assert len(set(block)) == k
            else:
                assert set(block) == {key for key, lab in key_label.items()
                                      if lab == block_labels[0]}


def test_each_chunk_exactly_once_over_2_ranks_x_2_workers(source):
    k = 4
    want = Counter(tuple(row) for row in source.keys[identity_chunks(source.labels, k, 5, 2)[0]]
                   .tolist())
    # sum over identities of ceil(count / K) chunks
    assert sum(want.values()) == sum(-(-c // k) for c in COUNTS)
    seen: Counter = Counter()
    for rank in range(2):
        loader = build_train_loader(source, 8, seed=5, epoch=2, rank=rank, world_size=2,
                                    num_workers=2, drop_last=False, images_per_identity=k)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen.update(_blocks(batches, k))
    assert seen == want
    # every image at least once: padding repeats images, nothing is dropped
    assert {key for block in seen for key in block} == set(source.keys.tolist())
    # drop_last: same full-batch count on every rank, no chunk twice
    full = [list(build_train_loader(source, 8, seed=5, epoch=2, rank=rank, world_size=2,
                                    images_per_identity=k)) for rank in range(2)]
    assert len(full[0]) == len(full[1]) > 0
    assert all(len(b["key"]) == 8 for batches in full for b in batches)
    blocks = [block for batches in full for block in _blocks(batches, k)]
    assert not Counter(blocks) - want


def test_workers_do_not_change_the_batches(source):
    alone = list(build_train_loader(source, 8, seed=2, images_per_identity=4))
    workers = list(build_train_loader(source, 8, seed=2, images_per_identity=4, num_workers=2))
    assert len(alone) == len(workers)
    for a, b in zip(alone, workers, strict=True):
        for name in ("image", "label", "key", "flipped"):
            assert torch.equal(a[name], b[name])


def _plan(source, seed: int, epoch: int) -> list[tuple[list[int], list[bool]]]:
    loader = build_train_loader(source, 8, seed=seed, epoch=epoch, images_per_identity=4,
                                drop_last=False)
    return [(b["key"].tolist(), b["flipped"].tolist()) for b in loader]


def test_deterministic_by_seed_and_epoch(source):
    first = _plan(source, 3, 1)
    assert first == _plan(source, 3, 1)
    assert first != _plan(source, 3, 2) and first != _plan(source, 4, 1)
    loader = build_train_loader(source, 8, seed=3, images_per_identity=4, drop_last=False)
    loader.set_epoch(1)
    assert [(b["key"].tolist(), b["flipped"].tolist()) for b in loader] == first
    flips = [f for _, batch_flips in first for f in batch_flips]
    assert 0 < sum(flips) < len(flips)  # flipped per image, at random


def test_flip_off_gives_no_mirrors(source):
    loader = build_train_loader(source, 8, images_per_identity=4, flip=False)
    assert not any(b["flipped"].any() for b in loader)


def test_resume_mid_epoch(source):
    full = build_train_loader(source, 8, seed=7, epoch=1, images_per_identity=4)
    want = [(b["key"].tolist(), b["flipped"].tolist()) for b in full]
    assert len(want) >= 3
    killed = build_train_loader(source, 8, seed=7, epoch=1, images_per_identity=4)
    iterator = iter(killed)
    next(iterator), next(iterator)
    state = killed.state_dict()
    assert state["images_per_identity"] == 4 and state["batches_done"] == 2
    resumed = build_train_loader(source, 8, seed=0, images_per_identity=4)
    resumed.load_state_dict(state)
    assert [(b["key"].tolist(), b["flipped"].tolist()) for b in resumed] == want[2:]
    plain = build_train_loader(source, 8, seed=7, epoch=1)
    with pytest.raises(DataError, match="images_per_identity"):
        plain.load_state_dict(state)


def test_bad_settings_are_one_line_errors(source):
    with pytest.raises(DataError, match="multiple of images_per_identity"):
        build_train_loader(source, 10, images_per_identity=4)
    with pytest.raises(DataError, match="images_per_identity"):
        build_train_loader(source, 8, images_per_identity=0)
    unlabelled = PngSource([3, 3])
    unlabelled.labels = np.full(6, -1, np.int64)
    with pytest.raises(DataError, match="no identity label"):
        build_train_loader(unlabelled, 4, images_per_identity=2)
    from facekd.train.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"data\.images_per_identity"):
        load_recipe(None, ["data.batch_size=64", "data.images_per_identity=3"]).validate()


def test_rec_source_and_refilled_relation_is_nonzero(rec_dataset):
    from facekd.distill import create_method
    from facekd.distill.base import StudentOutput, TeacherOutput

    loader = build_train_loader(rec_dataset, 8, seed=0, images_per_identity=4)
    assert len(loader) == 12 * 2 // 2  # 12 identities x ceil(5 / 4) chunks, 2 per batch
    batch = next(iter(loader))
    labels = batch["label"]
    assert len(set(labels.tolist())) == 2
    torch.manual_seed(0)
    pooled = torch.nn.functional.adaptive_avg_pool2d(normalise_batch(batch["image"]),
                                                     4).flatten(1)
    student = pooled @ torch.randn(pooled.shape[1], 16)
    teacher = pooled @ torch.randn(pooled.shape[1], 32)
    method = create_method("refilled", student_dim=16, teacher_dim=32, num_classes=12,
                           params={"stage": 1, "mining": "all"})
    terms = method(StudentOutput(embedding=student, features=[], head=None),
                   TeacherOutput(embedding=teacher, centres=None, scale=64.0, features=[]),
                   labels)
    assert float(terms["relation"]) > 1e-6


def test_trainer_builds_grouped_batches(tmp_path, rec_dataset):
    """data.images_per_identity reaches the loader: REFILLED stage 1 logs a relation term."""
    from train_support import StandInTeacher, tiny_recipe

    from facekd.train.trainer import train

    recipe = tiny_recipe(tmp_path / "run", "refilled", (
        f"data.train={rec_dataset}", "data.images_per_identity=4", "optim.epochs=1",
        "method.params={stage: 1, mining: all}", "run.max_steps=3", "run.save_every=100"))
    calls: list[dict] = []

    def recording_factory(*args, **kwargs):
        calls.append(kwargs)
        return build_train_loader(*args, **kwargs)

    train(recipe, teacher=StandInTeacher(num_classes=12), loader_factory=recording_factory)
    assert calls[0]["images_per_identity"] == 4 and calls[0]["labelled"]
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("loss/relation")]
    assert len(rows) == 3
    assert all(float(row["loss/relation"]) > 0 for row in rows)
