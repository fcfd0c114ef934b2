"""10-fold pair verification (LFW / CFP-FP / AgeDB-30 protocol), identical to insightface.

The community numbers come from insightface's ``eval/verification.py``; users compare
against them to two decimals, so every step here reproduces that code's arithmetic:
float64 ``normalize(orig + flip)``, squared L2 distance, thresholds
``np.arange(0, 4, 0.01)`` with a strict ``dist < t``, sequential ``KFold`` folds,
``np.argmax`` (first threshold of a plateau) and VAL@FAR with the ``slinear``
interpolation of scipy <= 1.9.0 coded explicitly (newer scipy rejects the repeated x
values the reference always produces). Threshold sweeps are vectorised with sorted
distances and ``searchsorted``; counts are integers, so the result is bit-identical to
the reference's per-threshold loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facekd.errors import DataError

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
VAL_FAR_TARGET = 1e-3
FAR_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def kfold_test_slices(n: int, n_folds: int) -> list[slice]:
    """Contiguous test folds of ``KFold(n_folds, shuffle=False)``: first ``n % k`` get one more."""
    if n_folds < 2 or n < n_folds:
        raise DataError(f"cannot split {n} pairs into {n_folds} folds")
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    stops = np.cumsum(sizes)
    starts = stops - sizes
    return [slice(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of values strictly below each threshold (the reference's ``dist < t``)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def slinear_threshold(far_train: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """``interp1d(far_train, thresholds, kind='slinear')(target)`` as scipy <= 1.9.0 computed it.

    scipy built a degree-1 B-spline with knots ``[x0, x0, x1, ..., xn, xn]`` and evaluated
    it on the interval found by ``find_interval`` (last knot <= target, capped at the second
    to last point), with de Boor's arithmetic; a zero-length interval evaluates to 0.0.
    ``far_train`` is non-decreasing (it is a count ratio over increasing thresholds), so
    interp1d's stable argsort keeps the order.
    """
    x = np.asarray(far_train, dtype=np.float64)
    y = np.asarray(thresholds, dtype=np.float64)
    n = len(x)
    if n < 2 or not (x[0] <= target <= x[-1]):
        raise ValueError(f"target {target} outside the interpolation range")
    j = int(np.searchsorted(x, target, side="right")) - 1
    j = min(max(j, 0), n - 2)
    xa, xb, xv = float(x[j]), float(x[j + 1]), float(target)
    if xa == xb:
        return 0.0
    w = 1.0 / (xb - xa)
    h0 = 0.0 + w * (xb - xv)
    h1 = w * (xv - xa)
    return (0.0 + float(y[j]) * h0) + float(y[j + 1]) * h1


def binary_roc(labels: np.ndarray, scores: np.ndarray,
               drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.metrics.roc_curve`` for 0/1 labels (higher score = more likely genuine).

    Same points as sklearn (one per distinct score, collinear points dropped where both
    second differences are zero, a (0, 0) point prepended) from the same integer counts:
    at each distinct score v, TP = genuine scores >= v and FP = all scores >= v - TP.
    Counting with two plain sorts instead of sklearn's stable argsort is several times
    faster on IJB-C's 15.7M pairs and does not depend on the sklearn version.
    Returns ``fpr, tpr, thresholds`` in sklearn's (increasing FPR) order.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError("labels and scores differ in length")
    if not np.isfinite(scores).all():
        raise DataError("scores contain NaN or inf (check the embeddings)")
    n = len(scores)
    count_t = np.int32 if n < 2**31 - 1 else np.int64  # halves memory at IJB-C size
    ascending = np.sort(scores)
    run_start = np.flatnonzero(np.r_[True, ascending[1:] != ascending[:-1]]).astype(count_t)
    thr = ascending[run_start][::-1]  # distinct scores, descending
    del ascending
    np.subtract(n, run_start, out=run_start)
    fps = run_start[::-1]  # samples with score >= thr; minus TP below
    genuine = np.sort(scores[labels == 1])
    tps = np.searchsorted(genuine, thr, side="left").astype(count_t)
    np.subtract(len(genuine), tps, out=tps)
    fps -= tps
    del genuine
    if drop_intermediate and len(fps) > 2:
        keep = np.empty(len(fps), dtype=bool)
        keep[0] = keep[-1] = True
        np.logical_or(np.diff(fps, 2), np.diff(tps, 2), out=keep[1:-1])
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps = np.concatenate([[0], tps])
    fps = np.concatenate([[0], fps])
    thr = np.concatenate([[np.inf], thr])
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(len(fps), np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(len(tps), np.nan)
    return fpr, tpr, thr


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under an ROC curve given in increasing-FPR order (sklearn ``auc``)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """FPR where FPR == 1 - TPR, linearly interpolated between the ROC points around it."""
    fnr = 1.0 - tpr
    diff = fpr - fnr  # increases along the curve
    k = int(np.searchsorted(diff, 0.0, side="left"))
    if k == 0:
        return float(fpr[0])
    if k >= len(diff):
        return float(fpr[-1])
    d0, d1 = diff[k - 1], diff[k]
    a = 0.0 if d1 == d0 else -d0 / (d1 - d0)
    return float(fpr[k - 1] + a * (fpr[k] - fpr[k - 1]))


def tar_at_far_max(fpr: np.ndarray, tpr: np.ndarray,
                   fars: tuple[float, ...] = FAR_GRID) -> dict[float, float]:
    """Highest TPR among ROC points with FPR <= FAR (the usual pair-verification reading)."""
    out = {}
    for far in fars:
        ok = fpr <= far
        out[far] = float(tpr[ok].max()) if ok.any() else 0.0
    return out


def verify_pairs(emb: np.ndarray, emb_flip: np.ndarray | None, issame: np.ndarray,
                 nrof_folds: int = 10) -> dict[str, Any]:
    """Score a verification set exactly like insightface ``verification.test``.

    ``emb`` / ``emb_flip`` are (2N, D) embeddings of the images and their mirror images
    (pair i is rows 2i and 2i+1); ``emb_flip=None`` scores without flip. Returns
    ``acc_mean``, ``acc_std``, ``accuracy_per_fold``, ``thresholds`` (best threshold per
    fold), ``xnorm``, ``val``, ``val_std``, ``far``, ``val_thresholds`` and, from the same
    pooled scores, ``auc``, ``eer``, ``tar_at_far`` plus the ROC arrays (``roc_fpr``,
    ``roc_tpr``: pooled; ``fold_fpr``, ``fold_tpr``: the reference's fold-mean curve).
    """
    emb64 = np.asarray(emb, dtype=np.float64)
    issame = np.asarray(issame).astype(bool).ravel()
    if emb64.ndim != 2 or emb64.shape[0] != 2 * len(issame):
        raise DataError(f"expected {2 * len(issame)} embeddings for {len(issame)} pairs, "
                        f"got shape {tuple(emb64.shape)}")
    rows = [emb64]
    if emb_flip is not None:
        flip64 = np.asarray(emb_flip, dtype=np.float64)
        if flip64.shape != emb64.shape:
            raise DataError(f"flip embeddings have shape {flip64.shape}, expected {emb64.shape}")
        rows.append(flip64)
    xnorm = float(np.mean(np.concatenate([np.linalg.norm(r, axis=1) for r in rows])))
    summed = emb64 + flip64 if emb_flip is not None else emb64.copy()
    norms = np.sqrt(np.einsum("ij,ij->i", summed, summed))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    normed = summed / norms[:, None]
    dist = np.sum(np.square(normed[0::2] - normed[1::2]), 1)

    folds = kfold_test_slices(len(issame), nrof_folds)
    acc_per_fold, best_thr = _accuracy_folds(dist, issame, folds)
    val, far, val_thr = _val_folds(dist, issame, folds)
    fold_tpr, fold_fpr = _fold_mean_roc(dist, issame, folds)

    fpr, tpr, _ = binary_roc(issame.astype(np.int64), -dist, drop_intermediate=False)
    return {
        "acc_mean": float(np.mean(acc_per_fold)),
        "acc_std": float(np.std(acc_per_fold)),
        "accuracy_per_fold": [float(a) for a in acc_per_fold],
        "thresholds": [float(t) for t in best_thr],
        "xnorm": xnorm,
        "val": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
        "val_thresholds": [float(t) for t in val_thr],
        "auc": roc_auc(fpr, tpr),
        "eer": equal_error_rate(fpr, tpr),
        "tar_at_far": tar_at_far_max(fpr, tpr),
        "num_pairs": len(issame),
        "sq_distance": dist,
        "roc_fpr": fpr,
        "roc_tpr": tpr,
        "fold_fpr": fold_fpr,
        "fold_tpr": fold_tpr,
    }


def _split_counts(dist: np.ndarray, same: np.ndarray,
                  thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Accepted genuine / impostor counts at every threshold, plus the class sizes."""
    gen = np.sort(dist[same])
    imp = np.sort(dist[~same])
    return _count_below(gen, thresholds), _count_below(imp, thresholds), len(gen), len(imp)


def _train_mask(n: int, test: slice) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return mask


def _accuracy_folds(dist: np.ndarray, issame: np.ndarray,
                    folds: list[slice]) -> tuple[np.ndarray, np.ndarray]:
    thresholds = ACC_THRESHOLDS
    acc = np.zeros(len(folds))
    best = np.zeros(len(folds))
    for k, test in enumerate(folds):
        train = _train_mask(len(dist), test)
        tp, fp, _, n_imp = _split_counts(dist[train], issame[train], thresholds)
        acc_train = (tp + (n_imp - fp)) / int(train.sum())
        b = int(np.argmax(acc_train))
        best[k] = thresholds[b]
        d, s = dist[test], issame[test]
        pred = d < thresholds[b]
        acc[k] = float(np.sum(pred & s) + np.sum(~pred & ~s)) / d.size
    return acc, best


def _fold_mean_roc(dist: np.ndarray, issame: np.ndarray,
                   folds: list[slice]) -> tuple[np.ndarray, np.ndarray]:
    """Test-fold TPR/FPR at every accuracy threshold, averaged over folds (reference ROC)."""
    tprs = np.zeros((len(folds), len(ACC_THRESHOLDS)))
    fprs = np.zeros((len(folds), len(ACC_THRESHOLDS)))
    for k, test in enumerate(folds):
        tp, fp, n_gen, n_imp = _split_counts(dist[test], issame[test], ACC_THRESHOLDS)
        if n_gen:
            tprs[k] = tp / n_gen
        if n_imp:
            fprs[k] = fp / n_imp
    return np.mean(tprs, 0), np.mean(fprs, 0)


def _val_folds(dist: np.ndarray, issame: np.ndarray,
               folds: list[slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    thresholds = VAL_THRESHOLDS
    val = np.zeros(len(folds))
    far = np.zeros(len(folds))
    thr_used = np.zeros(len(folds))
    for k, test in enumerate(folds):
        train = _train_mask(len(dist), test)
        _, fa, _, n_imp = _split_counts(dist[train], issame[train], thresholds)
        if n_imp == 0:
            raise DataError(f"verification fold {k}: no impostor pairs in the training folds")
        far_train = fa / float(n_imp)
        if np.max(far_train) >= VAL_FAR_TARGET:
            thr = slinear_threshold(far_train, thresholds, VAL_FAR_TARGET)
        else:
            thr = 0.0
        thr_used[k] = thr
        d, s = dist[test], issame[test]
        n_same, n_diff = int(s.sum()), int((~s).sum())
        if n_same == 0 or n_diff == 0:
            raise DataError(f"verification fold {k}: the test fold has "
                            f"{n_same} genuine and {n_diff} impostor pairs; VAL needs both")
        pred = d < thr
        val[k] = float(np.sum(pred & s)) / float(n_same)
        far[k] = float(np.sum(pred & ~s)) / float(n_diff)
    return val, far, thr_used
