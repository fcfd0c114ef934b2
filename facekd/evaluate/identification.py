"""IJB-B / IJB-C 1:N identification (rank-k and TPIR@FPIR), insightface's convention.

Files (the NIST protocol CSVs, as insightface's ``IJB_1N.py`` reads them) under
``<root>/meta``: ``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_gallery_G2.csv`` and
``ijbc_1N_probe_mixed.csv`` (IJB-B: ``ijbb_1N_gallery_S1.csv``, ``..._S2.csv``,
``ijbb_1N_probe_mixed.csv``); one header line, then ``TEMPLATE_ID,SUBJECT_ID,...`` per
image. Like the reference, the gallery is G1 and G2 together (each subject has one gallery
template), template features are the 1:1 ones, a probe is correct at rank k when its
mated gallery template is among the k most similar, and TPIR at FPIR f takes the
``ceil(Q * f)``-th largest non-mated score of all probe x gallery scores as threshold and
counts mated scores strictly above it. Probes whose subject has no gallery template are
left out and counted (the reference stops with an error). Scores are computed in probe
blocks, keeping only the top non-mated scores, so memory stays bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import DataError

FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)


@dataclass
class OneToNLists:
    gallery_templates: np.ndarray
    gallery_subjects: np.ndarray
    probe_templates: np.ndarray
    probe_subjects: np.ndarray
    files: list[Path]


def one_to_n_paths(root: str | Path, dataset: str = "IJBC") -> list[Path]:
    ds = dataset.upper()
    prefix = ds.lower()
    g1, g2 = ("G1", "G2") if ds == "IJBC" else ("S1", "S2")
    meta = Path(root) / "meta"
    return [meta / f"{prefix}_1N_gallery_{g1}.csv", meta / f"{prefix}_1N_gallery_{g2}.csv",
            meta / f"{prefix}_1N_probe_mixed.csv"]


def read_template_subjects(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(template id, subject id) per row of a 1:N CSV (header skipped), errors by line."""
    templates, subjects = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        next(f, None)
        for lineno, line in enumerate(f, 2):
            if not line.strip():
                continue
            fields = line.split(",")
            if len(fields) < 2:
                raise DataError(f"{path}:{lineno}: expected TEMPLATE_ID,SUBJECT_ID,... "
                                f"got {line.strip()[:80]!r}")
            try:
                templates.append(int(fields[0]))
                subjects.append(int(fields[1]))
            except ValueError:
                raise DataError(f"{path}:{lineno}: template and subject ids must be "
                                f"integers, got {fields[0]!r}, {fields[1]!r}") from None
    if not templates:
        raise DataError(f"{path}: no records")
    return np.asarray(templates, dtype=np.int64), np.asarray(subjects, dtype=np.int64)


def read_one_to_n(root: str | Path, dataset: str = "IJBC") -> OneToNLists | None:
    """The gallery/probe lists, or None when the protocol folder has no 1:N files."""
    paths = one_to_n_paths(root, dataset)
    present = [p.is_file() for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = paths[present.index(False)]
        raise DataError(f"{missing}: missing 1:N protocol file (the others are present)")
    g1 = read_template_subjects(paths[0])
    g2 = read_template_subjects(paths[1])
    probe = read_template_subjects(paths[2])
    return OneToNLists(np.concatenate([g1[0], g2[0]]), np.concatenate([g1[1], g2[1]]),
                       probe[0], probe[1], paths)


def _unique_with_subject(templates: np.ndarray, subjects: np.ndarray,
                         path: Path) -> tuple[np.ndarray, np.ndarray]:
    uniq, first = np.unique(templates, return_index=True)
    subj = subjects[first]
    # a template must belong to one subject
    inv = np.searchsorted(uniq, templates)
    bad = np.flatnonzero(subjects != subj[inv])
    if len(bad):
        raise DataError(f"{path}: template {int(templates[bad[0]])} is listed with "
                        f"two subjects")
    return uniq, subj


def identify(template_feats: np.ndarray, unique_templates: np.ndarray, lists: OneToNLists, *,
             ranks: tuple[int, ...] = RANKS, fpirs: tuple[float, ...] = FPIRS,
             block: int = 2048) -> dict[str, Any]:
    """Rank-k accuracy and TPIR@FPIR from normalised template features (rows sorted by id)."""
    from facekd.evaluate.ijb import template_index

    g_t, g_s = _unique_with_subject(lists.gallery_templates, lists.gallery_subjects,
                                    lists.files[0])
    p_t, p_s = _unique_with_subject(lists.probe_templates, lists.probe_subjects,
                                    lists.files[2])
    subj_sorted = np.argsort(g_s, kind="stable")
    dup = np.flatnonzero(np.diff(g_s[subj_sorted]) == 0)
    if len(dup):
        raise DataError(f"{lists.files[0]}: subject {int(g_s[subj_sorted[dup[0]]])} has "
                        f"more than one gallery template")
    pos = np.clip(np.searchsorted(g_s[subj_sorted], p_s), 0, len(g_s) - 1)
    mated = g_s[subj_sorted][pos] == p_s
    mask = subj_sorted[pos]
    gallery = template_feats[template_index(unique_templates, g_t, "gallery template")]
    probes_all = template_feats[template_index(unique_templates, p_t, "probe template")]
    probes = probes_all[mated]
    mask = mask[mated]
    q = len(probes)
    if q == 0:
        raise DataError(f"{lists.files[2]}: no probe subject has a gallery template")
    k_neg = max(1, max(math.ceil(q * f) for f in fpirs))
    rank_of = np.empty(q, dtype=np.int64)
    mated_score = np.empty(q, dtype=np.float64)
    top_neg = np.empty(0, dtype=np.float64)
    for s in range(0, q, block):
        sim = probes[s:s + block] @ gallery.T
        rows = np.arange(len(sim))
        m = sim[rows, mask[s:s + block]]
        mated_score[s:s + block] = m
        rank_of[s:s + block] = np.sum(sim > m[:, None], axis=1)
        sim[rows, mask[s:s + block]] = -np.inf
        flat = sim.ravel()
        if len(flat) > k_neg:
            flat = np.partition(flat, len(flat) - k_neg)[-k_neg:]
        top_neg = np.concatenate([top_neg, flat])
        if len(top_neg) > k_neg:
            top_neg = np.partition(top_neg, len(top_neg) - k_neg)[-k_neg:]
    neg_desc = np.sort(top_neg)[::-1]
    out: dict[str, Any] = {f"rank{k}": float(np.mean(rank_of < k)) for k in ranks}
    tpir = {}
    for f in fpirs:
        k = math.ceil(q * f)
        th = neg_desc[min(k, len(neg_desc)) - 1]
        tpir[f] = float(np.sum(mated_score > th) / q)
    out["tpir_at_fpir"] = tpir
    out["num_probes"] = q
    out["num_probes_without_gallery"] = int((~mated).sum())
    out["num_gallery"] = len(g_t)
    return out
