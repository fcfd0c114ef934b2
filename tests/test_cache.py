"""Teacher cache: exact per-(key, flip) embeddings, resumable build, training equals live."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_support import MemoryLoader, StandInTeacher, memory_loader_factory, tiny_recipe

from facekd.errors import DataError
from facekd.train.cache import build_teacher_cache, open_cache
from facekd.train.trainer import train


class _Killed(Exception):
    pass


def _killing_factory(after_batches: int):
    """A loader factory whose loader dies after ``after_batches`` batches (a kill)."""
    inner = memory_loader_factory()

    def factory(source, batch_size, **kw):
        loader = inner(source, batch_size, **kw)
        original = MemoryLoader.__iter__

        def dying_iter(self=loader):
            for i, batch in enumerate(original(self)):
                if i == after_batches:
                    raise _Killed
                yield batch

        loader.__iter__ = dying_iter  # type: ignore[method-assign]
        return _IterProxy(loader)

    return factory


class _IterProxy:
    def __init__(self, loader):
        self._loader = loader

    def __iter__(self):
        return self._loader.__iter__()

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)


def test_build_resumes_after_a_kill_and_matches_one_pass(tmp_path):
    teacher = StandInTeacher()
    common = dict(batch_size=4, dtype="float32", chunk_batches=2, teacher=teacher,
                  progress=False)
    with pytest.raises(_Killed):
        build_teacher_cache("", "memory", tmp_path / "resumed",
                            loader_factory=_killing_factory(5), **common)
    assert not (tmp_path / "resumed" / "meta.json").exists()
    assert len(list((tmp_path / "resumed" / "chunks").glob("chunk-r0-*.npz"))) == 2
    build_teacher_cache("", "memory", tmp_path / "resumed",
                        loader_factory=memory_loader_factory(), **common)
    build_teacher_cache("", "memory", tmp_path / "once",
                        loader_factory=memory_loader_factory(), **common)
    resumed, once = open_cache(tmp_path / "resumed"), open_cache(tmp_path / "once")
    assert np.array_equal(resumed.keys, once.keys) and list(resumed.keys) == list(range(1, 33))
    assert np.array_equal(resumed.emb, once.emb)
    assert not (tmp_path / "resumed" / "chunks").exists()
    meta = json.loads((tmp_path / "once" / "meta.json").read_text())
    assert meta["complete"] and meta["num_samples"] == 32 and meta["dim"] == 32


def test_lookup_returns_the_row_of_the_view_the_loader_gave(tmp_path):
    teacher = StandInTeacher()
    factory = memory_loader_factory()
    build_teacher_cache("", "memory", tmp_path / "c", batch_size=8, dtype="float16",
                        teacher=teacher, progress=False, loader_factory=factory)
    cache = open_cache(tmp_path / "c")
    assert cache.emb.dtype == np.float16 and cache.emb.shape == (32, 2, 32)
    torch.testing.assert_close(cache.centres, teacher.centres)
    batch = next(iter(factory("memory", 8, seed=3, flip=True)))
    assert batch["flipped"].any() and not batch["flipped"].all()
    got = cache.lookup(batch["key"], batch["flipped"])
    live = teacher.embed(batch["image"])
    torch.testing.assert_close(got.embedding, live, atol=2e-3, rtol=2e-3)  # float16 storage
    with pytest.raises(DataError, match="sample key 999 is not in the teacher cache"):
        cache.lookup(np.array([1, 999]), np.array([False, False]))


def test_incomplete_or_foreign_cache_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format": "facekd-teacher-cache",
                                                    "complete": False}))
    with pytest.raises(DataError, match="incomplete"):
        open_cache(tmp_path)
    with pytest.raises(DataError, match="missing"):
        open_cache(tmp_path / "nowhere")


def test_training_with_the_cache_equals_the_live_teacher(tmp_path):
    teacher = StandInTeacher()
    factory = memory_loader_factory()
    build_teacher_cache("", "memory", tmp_path / "cache", batch_size=8, dtype="float32",
                        teacher=teacher, progress=False, loader_factory=factory)
    overrides = ("optim.epochs=1", "method.params={num_negatives: 2}")
    live = train(tiny_recipe(tmp_path / "live", "srd", overrides), loader_factory=factory,
                 teacher=teacher)
    cached = train(tiny_recipe(tmp_path / "cached", "srd",
                               (*overrides, f"teacher.cache={tmp_path / 'cache'}")),
                   loader_factory=factory)
    a = torch.load(live / "full.pt", weights_only=True)
    b = torch.load(cached / "full.pt", weights_only=True)
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=1e-5,
                                   rtol=1e-4, msg=key)
    torch.testing.assert_close(a["head"]["weight"], b["head"]["weight"], atol=1e-5, rtol=1e-4)
    for key, value in a["meta"]["method_state"].items():   # the SRD connector too
        torch.testing.assert_close(value, b["meta"]["method_state"][key], atol=1e-5,
                                   rtol=1e-4, msg=key)
    sa = json.loads((live / "summary.json").read_text())["last_losses"]
    sb = json.loads((cached / "summary.json").read_text())["last_losses"]
    assert sa["srd"] == pytest.approx(sb["srd"], rel=1e-4)


@pytest.mark.slow
def test_two_process_build_equals_one_process(tmp_path):
    from train_support import cache_worker, run_processes

    run_processes(cache_worker, 2, str(tmp_path / "two"))
    build_teacher_cache("", "memory", tmp_path / "one", batch_size=4, dtype="float32",
                        teacher=StandInTeacher(), progress=False,
                        loader_factory=memory_loader_factory())
    two, one = open_cache(tmp_path / "two"), open_cache(tmp_path / "one")
    assert np.array_equal(two.keys, one.keys) and len(two) == 32
    np.testing.assert_allclose(two.emb, one.emb, atol=1e-6)
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["world_size"] == 2
