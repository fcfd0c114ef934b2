"""Resolution floors and cluster-bootstrap intervals (facekd.evaluate.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from facekd.evaluate import stats
from facekd.evaluate.verification import (
    ACC_THRESHOLDS,
    binary_roc,
    kfold_test_slices,
    tar_at_far_max,
    verify_pairs,
)


def test_floor_is_ten_over_far():
    assert stats.min_impostors(1e-3) == 10_000 and stats.min_impostors(1e-4) == 100_000
    assert stats.far_supported(1e-3, 10_000) and not stats.far_supported(1e-3, 9_999)
    assert stats.far_supported(1e-6, 15_658_489 - 19_557)   # real IJB-C is unaffected
    assert not stats.far_supported(1e-3, 3_000)              # LFW's 3,000 impostor pairs
    assert stats.not_supported(40_000) == "n/a (40,000 impostor pairs)"


def test_clusters_are_components_of_genuine_links_only():
    # images 0-1-2 one person (two genuine pairs), 3-4 another, 5 only in an impostor pair
    first = np.array([0, 1, 3, 2])
    second = np.array([1, 2, 4, 5])
    same = np.array([True, True, True, False])
    c = stats.pair_clusters(first, second, same, "images")
    assert c.count == 3
    assert c.first[0] == c.second[0] == c.first[1] == c.second[1] == c.first[3]
    assert c.first[2] == c.second[2] != c.first[0]
    assert c.second[3] not in (c.first[0], c.first[2])
    assert "3 clusters" in c.how and "6 images" in c.how


def _protocol(rng, n_people=30, per=4):
    """People with ``per`` images each; genuine pairs inside people, impostors across."""
    person = np.repeat(np.arange(n_people), per)
    quality = rng.normal(0, 1, n_people)  # person-level effect: pairs are correlated
    a, b, same = [], [], []
    for p in range(n_people):
        imgs = np.flatnonzero(person == p)
        for i in range(per):
            for j in range(i + 1, per):
                a.append(imgs[i]), b.append(imgs[j]), same.append(True)
    for _ in range(3000):
        i, j = rng.choice(len(person), 2, replace=False)
        if person[i] != person[j]:
            a.append(i), b.append(j), same.append(False)
    a, b, same = np.array(a), np.array(b), np.array(same)
    score = np.where(same, 2.0 + quality[person[a]], 0.0) + rng.normal(0, 1, len(a))
    return a, b, same, score


def test_weighted_tar_equals_tar_of_the_rematerialised_pairs():
    rng = np.random.default_rng(0)
    a, b, same, score = _protocol(rng)
    clusters = stats.pair_clusters(a, b, same, "images")
    w = clusters.weights(5, seed=3)
    fars = (1e-2, 1e-1)
    reps = stats.tar_at_far_replicates(score, same, clusters, fars, weights=w)
    for r in range(len(w)):
        pw = stats._pair_weights(w[r:r + 1], clusters.first, clusters.second)[0]
        copies = pw.astype(int)
        s = np.repeat(score, copies)
        y = np.repeat(same, copies)
        fpr, tpr, _ = binary_roc(y.astype(int), s, drop_intermediate=False)
        expected = tar_at_far_max(fpr, tpr, fars)
        for far in fars:
            assert reps[far][r] == pytest.approx(expected[far], abs=1e-12)


def test_unit_weights_reproduce_the_reference_10_fold_accuracy():
    rng = np.random.default_rng(1)
    n = 400
    issame = np.tile([True, False], n // 2)
    emb = rng.normal(0, 1, (2 * n, 16))
    emb[1::2][issame] = emb[0::2][issame] + rng.normal(0, 0.8, (int(issame.sum()), 16))
    res = verify_pairs(emb, None, issame)
    ids = np.arange(2 * n)
    clusters = stats.pair_clusters(ids[0::2], ids[1::2], issame, "images")
    folds = kfold_test_slices(n, 10)
    ones = np.ones((1, clusters.count))
    acc = stats.kfold_accuracy_replicates(res["sq_distance"], issame, clusters, folds,
                                          ACC_THRESHOLDS, weights=ones)
    assert acc[0] == pytest.approx(res["acc_mean"], abs=1e-12)


def test_cluster_intervals_are_wider_than_pair_intervals_and_seeded():
    rng = np.random.default_rng(2)
    a, b, same, score = _protocol(rng)
    by_person = stats.pair_clusters(a, b, same, "images")
    n = len(a)
    by_pair = stats.PairClusters(np.arange(n), np.arange(n), n, "each pair")
    far = 1e-2
    r1 = stats.tar_at_far_replicates(score, same, by_person, [far], n_boot=300, seed=7)[far]
    r2 = stats.tar_at_far_replicates(score, same, by_person, [far], n_boot=300, seed=7)[far]
    assert np.array_equal(r1, r2)
    rp = stats.tar_at_far_replicates(score, same, by_pair, [far], n_boot=300, seed=7)[far]
    assert np.std(r1) > 1.3 * np.std(rp)


def test_gap_closed_only_where_the_gap_exceeds_its_interval():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1, 1000)
    alone = stats.Estimate(80.0, 80 + noise)
    teacher = stats.Estimate(90.0, 90 + noise + rng.normal(0, 0.5, 1000))
    method = stats.Estimate(85.0, 85 + noise + rng.normal(0, 0.5, 1000))
    share = stats.gap_closed(teacher, alone, method)
    assert share is not None and share.value == pytest.approx(0.5)
    assert share.low < 0.5 < share.high and share.high - share.low < 0.3
    close = stats.Estimate(80.5, 80.5 + noise + rng.normal(0, 2, 1000))
    assert stats.gap_closed(close, alone, method) is None    # gap within its interval


def test_interval_format():
    iv = stats.Interval(0.9712, 0.95, 0.985).scaled(100)
    assert iv.format() == "97.12 [95.00, 98.50]"
