"""What a verification number can claim: resolution floors and bootstrap intervals.

A TAR at FAR = 1e-4 read from 40,000 impostor pairs rests on four impostors above the
threshold, and two models that differ by a few points on a few hundred identities may
not differ at all. Every report therefore goes through this module:

- :func:`far_supported` is the one rule for printing a TAR@FAR or VAL@FAR: the protocol
  must hold at least ``10 / FAR`` impostor pairs (ten impostors above the threshold);
  otherwise the report prints ``n/a (N impostor pairs)``.
- Intervals are percentile bootstraps over *clusters* (subjects or templates), not
  pairs: one identity appears in many pairs, so resampling pairs would count correlated
  pairs as independent and give intervals far too narrow. A resample draws clusters with
  replacement (multinomial counts ``w``); a genuine pair inside cluster ``c`` then
  counts ``w[c]`` times and an impostor pair between ``c`` and ``d`` ``w[c] * w[d]``
  times, so no pair list is ever re-materialised (IJB-C's 15.7M pairs stay one array).
- Clusters come from the pairs themselves (:func:`pair_clusters`): connected components
  of the nodes (images, or templates) that genuine pairs link, so every node of one
  person that the protocol connects falls in one cluster; a node no genuine pair
  touches is its own cluster, the honest fallback when nothing else is known.
- The resampling weights depend only on the clusters and the seed, so two models scored
  on one protocol with one seed get *paired* replicates, and differences between them
  (:func:`gap_closed`) get intervals of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FLOOR_FACTOR = 10
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
FLOOR_RULE = ("TAR@FAR and VAL@FAR are printed only where the protocol has at least "
              "10/FAR impostor pairs (at least 10 impostors above the threshold); "
              "otherwise n/a (N impostor pairs)")
_MAX_ELEMENTS = 1 << 24  # replicate x pair weights held at once (128 MB of float64)


# ----------------------------------------------------------------------------- floors


def min_impostors(far: float) -> int:
    """Impostor pairs a protocol needs before a TAR at ``far`` means something."""
    return math.ceil(FLOOR_FACTOR / far - 1e-9)


def far_supported(far: float, n_impostors: int) -> bool:
    """The one rule: a TAR@FAR / VAL@FAR is reported only with >= 10/FAR impostor pairs."""
    return int(n_impostors) >= min_impostors(far)


def not_supported(n_impostors: int) -> str:
    return f"n/a ({int(n_impostors):,} impostor pairs)"


# -------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Interval:
    """A point value and its bootstrap interval, in the units they were given in."""

    value: float
    low: float
    high: float

    def scaled(self, factor: float) -> Interval:
        return Interval(self.value * factor, self.low * factor, self.high * factor)

    def format(self, digits: int = 2) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def excludes_zero(self) -> bool:
        """Whether 0 lies outside the interval (False for NaN bounds)."""
        return bool(self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Estimate:
    """A point value plus its bootstrap replicates.

    Replicates drawn with the same clusters and seed are paired across models, so
    differences and ratios of two estimates can be taken replicate by replicate.
    """

    value: float
    replicates: np.ndarray

    def interval(self, level: float = LEVEL) -> Interval:
        return percentile_interval(self.value, self.replicates, level)

    def minus(self, other: Estimate) -> Estimate:
        """The paired difference ``self - other``, replicate by replicate."""
        return Estimate(self.value - other.value, self.replicates - other.replicates)


def percentile_interval(value: float, replicates: np.ndarray, level: float = LEVEL) -> Interval:
    """The central ``level`` range of the finite replicates (NaN bounds if there are none)."""
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return Interval(float(value), math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(reps, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def gap_closed(teacher: Estimate, alone: Estimate, method: Estimate,
               level: float = LEVEL) -> Interval | None:
    """Share of the teacher-student gap a method closes, ``(method - alone) / (teacher -
    alone)``, with its interval; ``None`` when the gap itself is within its interval
    (its interval contains 0), where any share would be noise divided by noise.

    The three estimates must carry paired replicates (same protocol, clusters and seed).
    """
    gap = teacher.minus(alone)
    if not gap.interval(level).excludes_zero():  # also None for NaN bounds
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        share = (method.replicates - alone.replicates) / gap.replicates
    return percentile_interval((method.value - alone.value) / gap.value, share, level)


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class PairClusters:
    """The cluster of each side of every pair, and how the clusters were found."""

    first: np.ndarray   # (P,) int, cluster of the pair's first node
    second: np.ndarray  # (P,) int
    count: int
    how: str

    def weights(self, n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
        """(n_boot, count) multinomial cluster counts: each row one bootstrap resample."""
        if n_boot < 0:
            from facekd.errors import FacekdError

            raise FacekdError(f"bootstrap resamples must be >= 0 (0: no intervals), got {n_boot}")
        rng = np.random.default_rng([seed, self.count])
        draws = rng.integers(0, self.count, size=(n_boot, self.count))
        draws += np.arange(n_boot)[:, None] * self.count  # row-wise bincount in one call
        counts = np.bincount(draws.ravel(), minlength=n_boot * self.count)
        return counts.reshape(n_boot, self.count).astype(np.float64)


def pair_clusters(first: np.ndarray, second: np.ndarray, same: np.ndarray,
                  what: str = "nodes") -> PairClusters:
    """Connected components of the ``what`` (image or template ids) linked by genuine pairs.

    Nodes are any hashable-as-int ids; nodes that only impostor pairs touch stay their
    own cluster.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    first, second = np.asarray(first), np.asarray(second)
    same = np.asarray(same).astype(bool).ravel()
    nodes, inverse = np.unique(np.concatenate([first, second]), return_inverse=True)
    a, b = inverse[: len(first)], inverse[len(first):]
    n = len(nodes)
    graph = coo_matrix((np.ones(int(same.sum())), (a[same], b[same])), shape=(n, n))
    count, label = connected_components(graph, directed=False)
    how = (f"{count:,} clusters: connected components of the {n:,} {what} that the "
           f"{int(same.sum()):,} genuine pairs link")
    return PairClusters(label[a].astype(np.int64), label[b].astype(np.int64), int(count), how)


def bin_image_ids(bins: Sequence[bytes]) -> np.ndarray:
    """One id per distinct image of a ``.bin`` set (byte-identical images share it): the
    same picture reused across pairs is how the pair list reveals who is who."""
    import hashlib

    ids: dict[bytes, int] = {}
    return np.fromiter((ids.setdefault(hashlib.sha1(b).digest(), len(ids)) for b in bins),
                       dtype=np.int64, count=len(bins))


def _pair_weights(w: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """(B, P) weight of each pair in each resample (w: (B, C) cluster counts)."""
    out = w[:, ca] * w[:, cb]
    inside = ca == cb  # a pair within one cluster is drawn once per draw of it
    if inside.any():
        out[:, inside] = w[:, ca[inside]]
    return out


def _chunks(n_boot: int, n_pairs: int) -> list[slice]:
    step = max(1, _MAX_ELEMENTS // max(1, n_pairs))
    return [slice(i, min(i + step, n_boot)) for i in range(0, n_boot, step)]


# ---------------------------------------------------------------- weighted statistics


def tar_at_far_replicates(scores: np.ndarray, same: np.ndarray, clusters: PairClusters,
                          fars: Sequence[float], n_boot: int = BOOTSTRAP_SAMPLES,
                          seed: int = BOOTSTRAP_SEED, weights: np.ndarray | None = None
                          ) -> dict[float, np.ndarray]:
    """Bootstrap replicates of TAR at each FAR (higher score = more likely genuine).

    In each resample the threshold is the highest score at which the weighted share of
    impostors scoring above it stays <= FAR; TAR is the weighted share of genuine pairs
    above it (the usual "highest TPR with FPR <= FAR" reading). The total impostor weight
    of a resample is a bilinear form of the cluster counts (no pass over the pairs), and
    only the highest-scoring impostors are accumulated, so IJB-C's 15.6M impostors cost
    about what the FARs need.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    same = np.asarray(same).astype(bool).ravel()
    w_all = clusters.weights(n_boot, seed) if weights is None else np.asarray(weights, float)
    n_boot = len(w_all)
    out = {far: np.full(n_boot, np.nan) for far in fars}
    if not fars or n_boot == 0:
        return out
    gen, imp = np.flatnonzero(same), np.flatnonzero(~same)
    imp = imp[np.argsort(-scores[imp], kind="stable")]
    gen = gen[np.argsort(scores[gen], kind="stable")]
    s_imp, s_gen = scores[imp], scores[gen]
    ca_i, cb_i = clusters.first[imp], clusters.second[imp]
    ca_g, cb_g = clusters.first[gen], clusters.second[gen]
    tot_imp = _total_weight(w_all, ca_i, cb_i, clusters.count)
    top = min(len(imp), int(2 * max(fars) * len(imp)) + 2000)
    for part in _chunks(n_boot, top + len(gen)):
        w = w_all[part]
        cum_top = np.cumsum(_pair_weights(w, ca_i[:top], cb_i[:top]), axis=1)
        cum_gen = np.cumsum(_pair_weights(w, ca_g, cb_g), axis=1)
        for r in range(cum_top.shape[0]):
            b = part.start + r
            cum_imp = cum_top[r]
            for far in fars:
                limit = far * tot_imp[b] * (1 + 1e-12)
                if top < len(imp) and cum_imp[-1] <= limit:  # rare: needs more impostors
                    cum_imp = np.cumsum(_pair_weights(w[r:r + 1], ca_i, cb_i)[0])
                # impostors strictly above the threshold: the first k in descending order
                k = int(np.searchsorted(cum_imp, limit, side="right"))
                thr = s_imp[k] if k < len(s_imp) else -np.inf
                below = int(np.searchsorted(s_gen, thr, side="right"))
                tot_gen = cum_gen[r, -1] if len(gen) else 0.0
                accepted = tot_gen - (cum_gen[r, below - 1] if below else 0.0)
                out[far][b] = accepted / tot_gen if tot_gen > 0 else np.nan
    return out


def _total_weight(w: np.ndarray, ca: np.ndarray, cb: np.ndarray, n_clusters: int) -> np.ndarray:
    """Sum over pairs of their resample weights, for every resample, from the (cluster,
    cluster) pair counts: ``w N w^T`` off the diagonal plus ``N_cc w_c`` on it."""
    from scipy.sparse import coo_matrix

    inside = ca == cb
    counts = coo_matrix((np.ones(int((~inside).sum())), (ca[~inside], cb[~inside])),
                        shape=(n_clusters, n_clusters)).tocsr()
    total = np.asarray((counts @ w.T).T * w).sum(axis=1) if counts.nnz else np.zeros(len(w))
    if inside.any():
        total += w @ np.bincount(ca[inside], minlength=n_clusters).astype(np.float64)
    return total


def kfold_accuracy_replicates(dist: np.ndarray, same: np.ndarray, clusters: PairClusters,
                              folds: Sequence[slice], thresholds: np.ndarray,
                              n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                              weights: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap replicates of insightface's 10-fold accuracy (``dist < t`` accepts).

    Each resample reweights the pairs and reruns the protocol: per fold the threshold
    with the best weighted accuracy on the other folds, then the weighted accuracy of
    the test fold; the folds' mean (folds that a resample leaves empty are skipped).
    Accepted weight at every threshold is counted once over all pairs and once per test
    fold; a fold's training counts are the difference (exact: weights are integers).
    """
    dist = np.asarray(dist, dtype=np.float64).ravel()
    same = np.asarray(same).astype(bool).ravel()
    w_all = clusters.weights(n_boot, seed) if weights is None else np.asarray(weights, float)
    n_boot = len(w_all)
    acc = np.full((n_boot, len(folds)), np.nan)
    for part in _chunks(n_boot, len(dist)):
        pw = _pair_weights(w_all[part], clusters.first, clusters.second)
        gen_all, _ = _accepted(dist[same], pw[:, same], thresholds)
        imp_all, imp_tot = _accepted(dist[~same], pw[:, ~same], thresholds)
        rows = np.arange(pw.shape[0])
        for k, test in enumerate(folds):
            d, s, wt = dist[test], same[test], pw[:, test]
            gen_t, gen_t_tot = _accepted(d[s], wt[:, s], thresholds)
            imp_t, imp_t_tot = _accepted(d[~s], wt[:, ~s], thresholds)
            train_correct = (gen_all - gen_t) + ((imp_tot - imp_t_tot)[:, None]
                                                 - (imp_all - imp_t))
            best = np.argmax(train_correct, axis=1)  # first best threshold, as the reference
            correct = gen_t[rows, best] + imp_t_tot - imp_t[rows, best]
            total = gen_t_tot + imp_t_tot
            with np.errstate(invalid="ignore", divide="ignore"):
                acc[part, k] = np.where(total > 0, correct / total, np.nan)
    with np.errstate(invalid="ignore"):
        return np.nanmean(acc, axis=1)


def _accepted(dist: np.ndarray, w: np.ndarray, thresholds: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) weight of the pairs with ``dist < t`` at every threshold, and (B,) totals."""
    order = np.argsort(dist, kind="stable")
    cum = np.zeros((w.shape[0], len(dist) + 1))
    np.cumsum(w[:, order], axis=1, out=cum[:, 1:])
    return cum[:, np.searchsorted(dist[order], thresholds, side="left")], cum[:, -1]


# ------------------------------------------------------------------ protocol summaries


def verification_estimates(result: dict[str, Any], issame: np.ndarray, image_ids: np.ndarray,
                           fars: Sequence[float] = (1e-4, 1e-3),
                           n_boot: int = BOOTSTRAP_SAMPLES,
                           seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Intervals for a ``verify_pairs`` result: 10-fold accuracy and TAR at each
    supported FAR, clustered by the images the pairs share. JSON-ready; the estimates
    themselves (for paired comparisons) under ``"estimates"``."""
    from facekd.evaluate.verification import ACC_THRESHOLDS, kfold_test_slices

    same = np.asarray(issame).astype(bool).ravel()
    ids = np.asarray(image_ids)
    clusters = pair_clusters(ids[0::2], ids[1::2], same, "distinct images")
    dist = np.asarray(result["sq_distance"])
    folds = kfold_test_slices(len(dist), len(result["accuracy_per_fold"]))
    w = clusters.weights(n_boot, seed)
    est = {"acc": Estimate(result["acc_mean"], kfold_accuracy_replicates(
        dist, same, clusters, folds, ACC_THRESHOLDS, weights=w))}
    n_imp = int((~same).sum())
    supported = [f for f in fars if far_supported(f, n_imp)]
    reps = tar_at_far_replicates(-dist, same, clusters, supported, weights=w)
    for far in supported:
        est[f"tar@{far:g}"] = Estimate(result["tar_at_far"][far], reps[far])
    return _summary(est, clusters, n_boot, seed, n_imp, int(same.sum()))


def ijb_estimates(result: dict[str, Any], p1: np.ndarray, p2: np.ndarray, labels: np.ndarray,
                  fars: Sequence[float], n_boot: int = BOOTSTRAP_SAMPLES,
                  seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Intervals for a ``score_ijb`` result at each supported FAR, clustered by the
    templates genuine pairs link (IJB 1:1 files name templates, not subjects)."""
    same = np.asarray(labels).astype(bool)
    clusters = pair_clusters(p1, p2, same, "templates")
    n_imp = int((~same).sum())
    supported = [f for f in fars if far_supported(f, n_imp)]
    reps = tar_at_far_replicates(result["scores"], same, clusters, supported, n_boot, seed)
    est = {f"tar@{far:g}": Estimate(result["tar_at_far"][far], reps[far]) for far in supported}
    return _summary(est, clusters, n_boot, seed, n_imp, int(same.sum()))


def _summary(est: dict[str, Estimate], clusters: PairClusters, n_boot: int, seed: int,
             n_imp: int, n_gen: int) -> dict[str, Any]:
    if n_boot == 0:
        est = {}
    return {"intervals": {k: e.interval().as_dict() for k, e in est.items()},
            "estimates": est, "clusters": clusters.how, "bootstrap_samples": n_boot,
            "bootstrap_seed": seed, "level": LEVEL, "impostor_pairs": n_imp,
            "genuine_pairs": n_gen}


def interval_rule(n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> str:
    return (f"[low, high]: {int(LEVEL * 100)} % percentile bootstrap interval, {n_boot} "
            f"resamples of clusters (subjects/templates found from the pairs, not pairs), "
            f"seed {seed}")
