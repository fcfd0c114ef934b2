"""10-fold verification: exact agreement with insightface's numbers, embedding, caching."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from eval_support import VERIF, LookupEmbedder, PixelEmbedder

from facekd.errors import DataError
from facekd.evaluate import evaluate_bin, verify_pairs
from facekd.evaluate.embed import ArrayImageSource, extract_features
from facekd.evaluate.verification import (
    ACC_THRESHOLDS,
    VAL_THRESHOLDS,
    binary_roc,
    kfold_test_slices,
    slinear_threshold,
)


@pytest.fixture(scope="module")
def fixture():
    expected = json.loads((VERIF / "expected.json").read_text())
    emb = np.load(VERIF / "embeddings.npy")
    issame = np.array(expected["bin_format"]["issame_list"])
    return expected, emb, issame


def test_fixture_numbers_exact(fixture):
    expected, emb, issame = fixture
    ref = expected["reference"]
    res = verify_pairs(emb[0], emb[1], issame)
    assert res["accuracy_per_fold"] == ref["accuracy_per_fold"]
    assert res["thresholds"] == ref["best_threshold_per_fold"]
    assert res["acc_mean"] == ref["accuracy_flip_mean"]
    assert res["acc_std"] == ref["accuracy_flip_std"]
    assert res["val"] == ref["val"]
    assert res["val_std"] == ref["val_std"]
    assert res["far"] == ref["far"]
    assert res["val_thresholds"] == ref["val_threshold_per_fold"]
    assert abs(res["xnorm"] - ref["xnorm"]) < 1e-9
    roc = np.load(VERIF / "expected_roc.npz")
    np.testing.assert_array_equal(res["sq_distance"], roc["pair_sq_distance"])
    np.testing.assert_array_equal(res["fold_tpr"], roc["tpr"])
    np.testing.assert_array_equal(res["fold_fpr"], roc["fpr"])
    assert 0.5 < res["auc"] <= 1 and 0 <= res["eer"] <= 0.5
    assert set(res["tar_at_far"]) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}


# ---- a literal, loop-per-threshold implementation of the reference to compare against


def _ref_acc(t, dist, same):
    pred = dist < t
    tp = np.sum(pred & same)
    tn = np.sum(~pred & ~same)
    return float(tp + tn) / dist.size


def _ref_val_far(t, dist, same):
    pred = dist < t
    return (float(np.sum(pred & same)) / float(np.sum(same)),
            float(np.sum(pred & ~same)) / float(np.sum(~same)))


def _reference_loop(emb, issame, folds=10):
    from sklearn.model_selection import KFold

    emb = emb / np.sqrt(np.einsum("ij,ij->i", emb, emb))[:, None]
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    acc, val, far = [], [], []
    for train, test in KFold(folds, shuffle=False).split(np.arange(len(issame))):
        acc_train = [_ref_acc(t, dist[train], issame[train]) for t in ACC_THRESHOLDS]
        best = ACC_THRESHOLDS[int(np.argmax(acc_train))]
        acc.append(_ref_acc(best, dist[test], issame[test]))
        d_imp = dist[train][~issame[train]]
        far_train = (d_imp[None, :] < VAL_THRESHOLDS[:, None]).sum(1) / float(len(d_imp))
        thr = (slinear_threshold(far_train, VAL_THRESHOLDS, 1e-3)
               if far_train.max() >= 1e-3 else 0.0)
        v, f = _ref_val_far(thr, dist[test], issame[test])
        val.append(v)
        far.append(f)
    return acc, val, far


def test_vectorised_equals_loop_on_uneven_folds():
    rng = np.random.default_rng(3)
    n_pairs = 157  # not divisible by 10: first folds get one more pair
    issame = np.zeros(n_pairs, dtype=bool)
    issame[rng.permutation(n_pairs)[: n_pairs // 2]] = True
    for k in range(10):  # every fold needs both kinds for VAL
        s = kfold_test_slices(n_pairs, 10)[k]
        issame[s.start], issame[s.start + 1] = True, False
    base = rng.standard_normal((n_pairs, 8))
    emb = np.repeat(base, 2, axis=0) + rng.standard_normal((2 * n_pairs, 8)) * 0.9
    emb[1::2][~issame] = rng.standard_normal((int((~issame).sum()), 8))
    emb = np.round(emb, 1)  # coarse values: tied distances and accuracy plateaus
    res = verify_pairs(emb, None, issame)
    acc, val, far = _reference_loop(emb.astype(np.float64), issame)
    assert res["accuracy_per_fold"] == acc
    assert res["val"] == float(np.mean(val)) and res["far"] == float(np.mean(far))


def test_kfold_matches_sklearn():
    from sklearn.model_selection import KFold

    for n in (40, 157, 6000, 11):
        ours = kfold_test_slices(n, 10)
        for s, (_, test) in zip(ours, KFold(10, shuffle=False).split(np.arange(n)), strict=True):
            assert list(range(s.start, s.stop)) == list(test)


def test_slinear_matches_scipy_without_duplicates_and_rule_with_them():
    from scipy.interpolate import interp1d

    rng = np.random.default_rng(0)
    x = np.sort(rng.random(50))
    x[0] = 0.0
    y = np.arange(50) * 0.001
    for target in (1e-3, 0.3, x[7], x[-1]):
        want = float(interp1d(x, y, kind="slinear")(target))
        assert abs(slinear_threshold(x, y, target) - want) < 1e-15
    # repeated x (what far_train always looks like): last point with x <= target, next one
    far = np.array([0.0, 0.0, 0.0005, 0.0005, 0.002, 0.002, 0.01])
    thr = np.arange(7) * 0.001
    got = slinear_threshold(far, thr, 1e-3)
    assert got == pytest.approx(0.003 + (1e-3 - 0.0005) / (0.002 - 0.0005) * 0.001, abs=1e-15)
    assert slinear_threshold(far, thr, 0.0) == pytest.approx(0.001)  # last zero, then next


def test_binary_roc_equals_sklearn():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 3000)
    scores = np.round(rng.standard_normal(3000) + labels, 1)  # many ties
    for drop in (True, False):
        fpr, tpr, thr = binary_roc(labels, scores, drop_intermediate=drop)
        f2, t2, th2 = roc_curve(labels, scores, drop_intermediate=drop)
        np.testing.assert_array_equal(fpr, f2)
        np.testing.assert_array_equal(tpr, t2)
        np.testing.assert_array_equal(thr[1:], th2[1:])


def test_nan_embeddings_are_a_clear_error():
    emb = np.ones((8, 4))
    emb[3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        verify_pairs(emb, None, np.array([True, False, True, False]), nrof_folds=2)


# ---- embedding + .bin end to end


@pytest.fixture(scope="module")
def tiny_images():
    from facekd.data.binset import decode_bin_images, load_bin

    bins, _ = load_bin(VERIF / "tiny_pairs.bin")
    return decode_bin_images(bins)


def test_evaluate_bin_reproduces_reference(fixture, tiny_images):
    expected, emb, _ = fixture
    ref = expected["reference"]
    embedder = LookupEmbedder(tiny_images, emb[0], emb[1])
    for name in ("tiny_pairs.bin", "tiny_pairs_ndarray.bin"):
        res = evaluate_bin(embedder, VERIF / name, batch_size=13, progress=False)
        assert res["accuracy_per_fold"] == ref["accuracy_per_fold"]
        assert res["val"] == ref["val"] and res["far"] == ref["far"]
        assert abs(res["xnorm"] - ref["xnorm"]) < 1e-9
        assert res["dataset_sha256"] == expected["files"][name]["sha256"]


def test_features_do_not_depend_on_batch_size(tiny_images):
    import torch
    from torch import nn

    from facekd.evaluate.embed import embed_fixed_batches

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.BatchNorm2d(8), nn.PReLU(8), nn.Flatten(),
                          nn.Linear(8 * 28 * 28, 64)).eval()
    images = tiny_images[:9]

    def forward(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    # the kernels really do depend on the batch shape ...
    plain = [embed_fixed_batches(forward, images, b) for b in (1, 7)]
    assert not np.array_equal(plain[0], plain[1])
    # ... so extract_features always feeds the model the same shape
    source = ArrayImageSource(images)
    outs = [extract_features(model, source, batch_size=b, progress=False) for b in (1, 7, 32)]
    assert outs[0].shape == (9, 128)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_feature_cache_and_resume(tmp_path, tiny_images, monkeypatch):
    import facekd.evaluate.embed as embed_mod

    monkeypatch.setattr(embed_mod, "PART_ROWS", 8)
    source = ArrayImageSource(tiny_images[:20])
    model = PixelEmbedder()
    first = extract_features(model, source, cache_dir=tmp_path, progress=False)
    calls = model.calls
    again = extract_features(model, source, cache_dir=tmp_path, progress=False)
    assert model.calls == calls  # served from the cache
    np.testing.assert_array_equal(first, again)
    # a killed run leaves parts behind: they are reused, the rest is computed
    cached = next(tmp_path.glob("*.npy"))
    key = cached.stem
    cached.unlink()
    parts = tmp_path / f"{key}.parts"
    parts.mkdir()
    np.save(parts / "part_000000.npy", first[:8])
    model.calls = 0
    resumed = extract_features(model, source, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(resumed, first)
    assert 0 < model.calls < calls
    assert not parts.exists()


def test_bad_bins_name_the_file_and_image(tmp_path, tiny_images):
    from facekd.data.binset import load_bin

    bins, issame = load_bin(VERIF / "tiny_pairs.bin")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(pickle.dumps((bins[:5], issame[:2]), protocol=4))
    with pytest.raises(DataError, match=r"odd\.bin"):
        evaluate_bin(PixelEmbedder(), odd, progress=False)
    broken = tmp_path / "broken.bin"
    bad = list(bins)
    bad[6] = b"not a jpeg"
    broken.write_bytes(pickle.dumps((bad, issame), protocol=4))
    with pytest.raises(DataError, match=r"broken\.bin: image 6 "):
        evaluate_bin(PixelEmbedder(), broken, progress=False, use_cache=False)
