"""IJB-B / IJB-C 1:1 template verification, identical to insightface's ``eval_ijbc.py``.

Reproducing the reference needs its exact order of float32 operations: flip by sum,
optional per-image L2 normalisation, faceness weighting, the float32 mean of each media
*within a template*, the float32 sum over media in sorted media order, then float64
normalisation. Here the per-template Python loop of the reference becomes one stable
sort plus two segment sums vectorised across segments (adding rows in the same order), done in
row blocks so memory stays bounded; pair scores come from small dense products of the
template tiles the pairs touch, so 15.7M IJB-C pairs take seconds instead of minutes.
TAR@FAR uses the reference's rule: sklearn's ROC (``drop_intermediate=True``), flipped,
nearest FPR with ties to the smallest flipped index.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import DataError
from facekd.evaluate.verification import FAR_GRID, binary_roc, roc_auc

log = logging.getLogger(__name__)

DATASETS = ("IJBC", "IJBB")


@dataclass
class IJBProtocol:
    """Parsed meta files of an IJB protocol folder (rows aligned by line number)."""

    root: Path
    dataset: str
    names: np.ndarray  # (N,) str, from the 5pts file (the image under loose_crop/)
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    landmarks: np.ndarray  # (N, 5, 2) float32
    faceness: np.ndarray  # (N,) float32
    p1: np.ndarray  # (P,) int64
    p2: np.ndarray  # (P,) int64
    labels: np.ndarray  # (P,) int64
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"


def meta_paths(root: str | Path, dataset: str = "IJBC") -> dict[str, Path]:
    """The reference file names under ``<root>/meta`` for IJB-C or IJB-B."""
    ds = dataset.upper()
    if ds not in DATASETS:
        raise DataError(f"unknown IJB dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    prefix = ds.lower()
    meta = Path(root) / "meta"
    return {
        "tid_mid": meta / f"{prefix}_face_tid_mid.txt",
        "pairs": meta / f"{prefix}_template_pair_label.txt",
        "lmk": meta / f"{prefix}_name_5pts_score.txt",
    }


def _read_columns(path: Path, kinds: str) -> list[np.ndarray]:
    """Parse a whitespace-separated file whose columns have the given kinds.

    ``kinds`` has one letter per column: ``s`` string, ``i`` integer (int64; an integral
    ``20.0`` is accepted, ``20.5`` is not), ``f`` number, returned as its text so the
    caller converts it exactly as the reference does (``float(x)`` / ``astype``). The
    fast pandas path is tried first; any problem triggers a line-by-line scan so the
    error names the file and line (the reference silently mis-parses such files).
    """
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: missing IJB meta file")
    dtypes = {i: np.int64 if k == "i" else str for i, k in enumerate(kinds)}
    try:
        frame = pd.read_csv(path, sep=r"\s+", header=None, dtype=dtypes, engine="c",
                            names=list(range(len(kinds))), keep_default_na=False,
                            na_filter=False, quoting=csv.QUOTE_NONE)
        columns = [frame[i].to_numpy() for i in range(len(kinds))]
        for col, kind in zip(columns, kinds, strict=True):
            if kind == "f":
                np.asarray(col, dtype=str).astype(np.float64)  # validates every number
            elif kind == "s" and len(col) and (col == "").any():
                raise ValueError("empty field")
    except (ValueError, TypeError, pd.errors.ParserError, OverflowError):
        columns = None
    if columns is not None and len(columns[0]) > 0:
        return columns
    _scan_for_bad_line(path, kinds)
    raise DataError(f"{path}: no records")


def _scan_for_bad_line(path: Path, kinds: str) -> None:
    """Find the first malformed line and raise a DataError naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split()
            if len(tokens) != len(kinds):
                raise DataError(f"{path}:{lineno}: expected {len(kinds)} fields, "
                                f"got {len(tokens)}: {line.strip()[:80]!r}")
            for tok, kind in zip(tokens, kinds, strict=True):
                try:
                    if kind == "i" and float(tok) != int(float(tok)):
                        raise ValueError(tok)
                    elif kind == "f":
                        float(tok)
                except (ValueError, OverflowError):
                    what = "an integer" if kind == "i" else "a number"
                    raise DataError(f"{path}:{lineno}: {tok!r} is not {what}") from None


def read_protocol(root: str | Path, dataset: str = "IJBC") -> IJBProtocol:
    """Read and cross-check the three meta files of an IJB-B/C protocol folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not an IJB protocol folder")
    files = meta_paths(root, dataset)
    for path in files.values():
        if not path.is_file():
            raise DataError(f"{path}: missing IJB meta file")
    _, templates, medias = _read_columns(files["tid_mid"], "sii")
    lmk_cols = _read_columns(files["lmk"], "s" + "f" * 11)
    names = lmk_cols[0].astype(str)
    if len(names) != len(templates):
        raise DataError(f"{files['lmk']}: {len(names)} lines but {files['tid_mid']} has "
                        f"{len(templates)}; the reference pairs them by line number")
    # reference: np.array([float(x) ...], dtype=np.float32); score: text -> float32
    numbers = [np.asarray(c, dtype=str).astype(np.float64) for c in lmk_cols[1:11]]
    landmarks = np.stack(numbers, axis=1).astype(np.float32).reshape(-1, 5, 2)
    faceness = np.asarray(lmk_cols[11], dtype=str).astype(np.float32)
    p1, p2, labels = _read_columns(files["pairs"], "iii")
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise DataError(f"{files['pairs']}:{bad[0] + 1}: label {labels[bad[0]]} is not 0 or 1")
    _check_pair_templates(files["pairs"], files["tid_mid"], templates, p1, p2)
    return IJBProtocol(root=root, dataset=dataset.upper(), names=names,
                       templates=templates.astype(np.int64), medias=medias.astype(np.int64),
                       landmarks=landmarks, faceness=faceness, p1=p1.astype(np.int64),
                       p2=p2.astype(np.int64), labels=labels.astype(np.int64), files=files)


def _check_pair_templates(pair_file: Path, tid_file: Path, templates: np.ndarray,
                          p1: np.ndarray, p2: np.ndarray) -> None:
    unique = np.unique(templates)
    for col in (p1, p2):
        pos = np.clip(np.searchsorted(unique, col), 0, len(unique) - 1)
        missing = np.flatnonzero(unique[pos] != col)
        if len(missing):
            i = int(missing[0])
            raise DataError(f"{pair_file}:{i + 1}: template {int(col[i])} has no images "
                            f"in {tid_file}")


# ----------------------------------------------------------------------------- scoring


def image_input_features(features: np.ndarray, faceness: np.ndarray | None,
                         use_norm_score: bool, use_detector_score: bool,
                         use_flip_test: bool) -> np.ndarray:
    """The reference's per-image feature (float32) for a block of rows of ``[orig | flip]``."""
    feats = np.asarray(features)
    if feats.dtype != np.float32:
        feats = feats.astype(np.float32)
    half = feats.shape[1] // 2
    x = feats[:, :half] + feats[:, half:] if use_flip_test else feats[:, :half]
    if not use_norm_score:
        x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
    if use_detector_score:
        if faceness is None:
            raise ValueError("use_detector_score needs faceness scores")
        x = x * np.asarray(faceness, dtype=np.float32)[:, np.newaxis]
    return x


def _row_blocks(group_starts: np.ndarray, n_rows: int, max_rows: int) -> Iterator[tuple[int, int]]:
    """Split sorted rows into blocks that end on group boundaries (<= max_rows unless a
    single group is larger)."""
    bounds = np.append(group_starts, n_rows)
    g = 0
    n_groups = len(group_starts)
    while g < n_groups:
        start = int(bounds[g])
        end_g = int(np.searchsorted(bounds, start + max_rows, side="right")) - 1
        end_g = max(end_g, g + 1)
        end_g = min(end_g, n_groups)
        yield g, end_g
        g = end_g


def sequential_segment_sum(x: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row sums of consecutive segments, adding rows strictly in order (like the
    reference's ``np.sum(..., axis=0)``; ``np.add.reduceat`` uses another order and
    changes float32 results). Vectorised across segments, one pass per row position."""
    out = x[starts].copy()
    if len(counts) == 0:
        return out
    by_size = np.argsort(-counts, kind="stable")
    sizes = counts[by_size]
    for k in range(1, int(sizes[0])):
        m = int(np.count_nonzero(sizes > k))
        seg = by_size[:m]
        out[seg] += x[starts[seg] + k]
    return out


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      faceness: np.ndarray | None = None, *, use_norm_score: bool = True,
                      use_detector_score: bool = True, use_flip_test: bool = True,
                      block_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Normalised template features (float64, T x D) and the sorted unique template ids.

    Same numbers as the reference's ``image2template_feature`` on the processed image
    features, without its per-template ``np.where`` scans (O(N) instead of O(N * T)).
    """
    templates = np.asarray(templates).astype(np.int64, copy=False)
    medias = np.asarray(medias).astype(np.int64, copy=False)
    n = len(templates)
    if features.shape[0] != n or len(medias) != n:
        raise DataError(f"{features.shape[0]} feature rows, {n} template ids and "
                        f"{len(medias)} media ids; they must match")
    order = np.lexsort((medias, templates))  # stable: rows keep file order within a media
    t_sorted = templates[order]
    m_sorted = medias[order]
    t_change = np.empty(n, dtype=bool)
    t_change[0] = True
    np.not_equal(t_sorted[1:], t_sorted[:-1], out=t_change[1:])
    m_change = t_change.copy()
    m_change[1:] |= m_sorted[1:] != m_sorted[:-1]
    t_starts = np.flatnonzero(t_change)
    unique_templates = t_sorted[t_starts]
    del t_sorted, m_sorted

    dim = features.shape[1] // 2
    out = np.zeros((len(unique_templates), dim), dtype=np.float64)
    m_starts_all = np.flatnonzero(m_change)
    for g0, g1 in _row_blocks(t_starts, n, block_rows):
        r0 = int(t_starts[g0])
        r1 = int(t_starts[g1]) if g1 < len(t_starts) else n
        rows = order[r0:r1]
        x = image_input_features(features[rows], None if faceness is None else faceness[rows],
                                 use_norm_score, use_detector_score, use_flip_test)
        lo, hi = np.searchsorted(m_starts_all, [r0, r1])
        m_starts = m_starts_all[lo:hi] - r0
        m_counts = np.diff(np.append(m_starts, r1 - r0))
        media_feats = sequential_segment_sum(x, m_starts, m_counts)
        multi = m_counts > 1
        media_feats[multi] /= m_counts[multi, None].astype(np.float32)
        # media index where each template of the block starts
        tm = np.searchsorted(m_starts, t_starts[g0:g1] - r0)
        out[g0:g1] = sequential_segment_sum(media_feats, tm, np.diff(np.append(tm, len(m_starts))))
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    out /= norms[:, np.newaxis]
    return out, unique_templates


def template_index(unique_templates: np.ndarray, ids: np.ndarray, what: str = "pair") -> np.ndarray:
    """Row (int32) of each template id in ``unique_templates`` (sorted); DataError if unknown.

    A direct lookup table when ids are small integers (IJB ids are), else binary search.
    """
    ids = np.asarray(ids)
    n_t = len(unique_templates)
    lo, hi = int(unique_templates[0]), int(unique_templates[-1])
    if len(ids) and lo >= 0 and hi < 64 * max(n_t, len(ids)) + 1_000_000:
        table = np.full(hi + 2, -1, dtype=np.int32)
        table[unique_templates] = np.arange(n_t, dtype=np.int32)
        pos = table[np.clip(ids, -1, hi + 1)]
        bad = np.flatnonzero(pos < 0)
    else:
        pos = np.clip(np.searchsorted(unique_templates, ids), 0, n_t - 1).astype(np.int32)
        bad = np.flatnonzero(unique_templates[pos] != ids)
    if len(bad):
        raise DataError(f"{what} {bad[0] + 1}: template {int(ids[bad[0]])} has no images")
    return pos


def pair_scores(template_feats: np.ndarray, i1: np.ndarray, i2: np.ndarray,
                tile: int = 1024) -> np.ndarray:
    """Dot products ``template_feats[i1[k]] . template_feats[i2[k]]`` for every pair.

    The templates that occur first / second in pairs are compacted into two matrices and
    the pairs grouped by (row tile, column tile) of those; a tile dense enough is scored
    by one BLAS product (at most tile x tile floats), a sparse one by gathering rows.
    Memory beyond the output is a few int32/int64 arrays of the pair count.
    """
    n = len(i1)
    scores = np.empty(n, dtype=np.float64)
    if n == 0:
        return scores
    n_t = len(template_feats)
    rows_a, r = _compact(i1, n_t)
    rows_b, c = _compact(i2, n_t)
    feats_a = template_feats[rows_a]
    feats_b = template_feats[rows_b]
    n_tc = (len(rows_b) + tile - 1) // tile
    n_tr = (len(rows_a) + tile - 1) // tile
    key = (r // tile) * n_tc + (c // tile)
    if n_tr * n_tc <= np.iinfo(np.uint16).max:
        key = key.astype(np.uint16)  # numpy's stable sort is a linear radix sort for 16 bits
    order = np.argsort(key, kind="stable")
    key_sorted = key[order]
    starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
    ends = np.append(starts[1:], n)
    tile_keys = key_sorted[starts]
    del key, key_sorted
    for s, e, k in zip(starts, ends, tile_keys, strict=True):
        idx = order[s:e]
        r0 = int(k // n_tc) * tile
        c0 = int(k % n_tc) * tile
        rr = r[idx] - r0
        cc = c[idx] - c0
        fa = feats_a[r0:r0 + tile]
        fb = feats_b[c0:c0 + tile]
        if len(fa) * len(fb) <= 32 * len(idx):
            scores[idx] = (fa @ fb.T)[rr, cc]
        else:
            scores[idx] = np.einsum("ij,ij->i", fa[rr], fb[cc])
    return scores


def _compact(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of ``index`` and each element's position among them (int32)."""
    present = np.zeros(size, dtype=bool)
    present[index] = True
    rows = np.flatnonzero(present)
    remap = np.cumsum(present, dtype=np.int32) - 1
    return rows, remap[index]


def nearest_fpr_tar(fpr: np.ndarray, tpr: np.ndarray, fars: tuple[float, ...] = FAR_GRID
                    ) -> tuple[dict[float, float], dict[float, float]]:
    """The reference's TAR rule on sklearn-order ROC arrays: returns ({far: tar}, {far: fpr})."""
    fpr_f = np.flipud(fpr)
    tpr_f = np.flipud(tpr)
    tars, chosen = {}, {}
    for x in fars:
        k = int(np.argmin(np.abs(fpr_f - x)))  # first minimum = smallest flipped index
        tars[x] = float(tpr_f[k])
        chosen[x] = float(fpr_f[k])
    return tars, chosen


def score_ijb(features: np.ndarray, faceness: np.ndarray | None, templates: np.ndarray,
              medias: np.ndarray, p1: np.ndarray, p2: np.ndarray, labels: np.ndarray, *,
              use_norm_score: bool = True, use_detector_score: bool = True,
              use_flip_test: bool = True, fars: tuple[float, ...] = FAR_GRID) -> dict[str, Any]:
    """Full 1:1 result: pair scores, ROC, AUC, TAR at each FAR and the FPR it used."""
    tfeats, unique_templates = template_features(
        features, templates, medias, faceness, use_norm_score=use_norm_score,
        use_detector_score=use_detector_score, use_flip_test=use_flip_test)
    i1 = template_index(unique_templates, np.asarray(p1).astype(np.int64, copy=False))
    i2 = template_index(unique_templates, np.asarray(p2).astype(np.int64, copy=False))
    scores = pair_scores(tfeats, i1, i2)
    del i1, i2
    labels = np.asarray(labels)
    fpr, tpr, _ = binary_roc(labels, scores, drop_intermediate=True)
    tars, chosen = nearest_fpr_tar(fpr, tpr, fars)
    return {"scores": scores, "fpr": fpr, "tpr": tpr, "auc": roc_auc(fpr, tpr),
            "template_feats": tfeats, "unique_templates": unique_templates,
            "tar_at_far": tars, "selected_fpr": chosen, "num_templates": len(unique_templates),
            "num_pairs": len(scores), "num_images": len(templates)}


def ijb_tar_at_far(features: np.ndarray, faceness: np.ndarray, templates: np.ndarray,
                   medias: np.ndarray, p1: np.ndarray, p2: np.ndarray, labels: np.ndarray,
                   use_norm_score: bool = True, use_detector_score: bool = True,
                   use_flip_test: bool = True) -> dict[float, float]:
    """TAR at FAR 1e-6 ... 1e-1 exactly as ``eval_ijbc.py`` reports them (as fractions).

    ``features`` are the image features with the flip half concatenated ([orig | flip]).
    """
    return score_ijb(features, faceness, templates, medias, p1, p2, labels,
                     use_norm_score=use_norm_score, use_detector_score=use_detector_score,
                     use_flip_test=use_flip_test)["tar_at_far"]


def config_name(use_norm_score: bool, use_detector_score: bool, use_flip_test: bool) -> str:
    """The fixture's config key, e.g. ``N1D1F1``."""
    return f"N{int(use_norm_score)}D{int(use_detector_score)}F{int(use_flip_test)}"
