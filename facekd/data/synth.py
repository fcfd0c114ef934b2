"""The embedded default dataset: synthetic face identities in the formats users have.

``generate(out_dir, ...)`` writes, from one seed and byte-identically on every run:

- ``train.rec``/``train.idx``/``property`` (insightface layout) and
  ``train_landmarks.npy`` (true 5 landmarks of image key k at row k-1);
- ``lfw.bin`` (balanced pairs in 10 folds, each fold its own people),
  ``cfp_fp.bin`` (frontal vs. strongly turned faces), ``agedb_30.bin`` (same person
  across a large age gap) — all from identities never seen in training;
- ``ijb/`` a small IJB-C style 1:1 protocol: ``loose_crop/*.jpg`` larger crops with the
  face somewhere inside, ``meta/ijbc_face_tid_mid.txt``, ``ijbc_template_pair_label.txt``
  and ``ijbc_name_5pts_score.txt`` (landmarks with detector noise, faceness scores);
- ``unlabelled/`` a further pool of unseen identities in insightface layout (its labels
  are written for diagnostics only; semi-supervised training must ignore them);
- ``synth.json`` with the configuration, counts and file hashes.

Each identity's parameters come from ``(seed, role, index)``, so training, evaluation
and pool identities are disjoint by construction and do not change when other sizes
change. Every part is written atomically and skipped on a rerun when already complete
with the same configuration (resume after a kill).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import FacekdError
from facekd.fileio import atomic_path, sha256_file, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

ROLE_TRAIN, ROLE_LFW, ROLE_CFP, ROLE_AGEDB, ROLE_IJB, ROLE_UNLABELLED = range(6)
ROLE_NAMES = {ROLE_TRAIN: "train", ROLE_LFW: "lfw", ROLE_CFP: "cfp_fp", ROLE_AGEDB: "agedb_30",
              ROLE_IJB: "ijb", ROLE_UNLABELLED: "unlabelled"}

PRESETS: dict[str, dict[str, Any]] = {
    # seconds; for tests
    "tiny": dict(identities=16, images_per_id=6, lfw_pairs=40, cfp_pairs=40, agedb_pairs=40,
                 ijb_identities=6, ijb_impostors=200, unlabelled_identities=6,
                 unlabelled_images_per_id=4, workers=1),
    # the demo and benchmark default; under a minute on two cores
    "default": dict(identities=600, images_per_id=16, lfw_pairs=6000, cfp_pairs=7000,
                    agedb_pairs=6000, ijb_identities=100, ijb_impostors=120000,
                    unlabelled_identities=400, unlabelled_images_per_id=8, workers=2),
}
GENERATOR_VERSION = 2
# Parts whose layout changed since version 1 (the others keep their files and hashes):
# cfp_fp 2: profiles inside the training pose range (CFP_PROFILE_YAW); ijb 2: media
# sub-templates, so the same images carry >= 100,000 impostor pairs.
PART_VERSIONS = {"cfp_fp": 2, "ijb": 2}
# Yaw (degrees) of the CFP-FP-like set. Training poses are N(0, 14 deg) clipped at 50,
# so profiles at 45-70 deg lay outside anything a model learnt from: no model could
# carry its training to them and the ranking of models there was noise. Profiles at
# 30-50 deg sit in the training tail (about 3 % of training images turn that far). At
# 7,000 pairs (the demo's size since its 1,000 could not resolve a gap) the demo's
# 6-epoch teacher is above its student alone on both seeds measured: +0.70 [-0.86, 1.71]
# (seed 0) and +3.69 [2.24, 4.90] (seed 1) points (bench/results/demo_seeds.md); the
# earlier 3-epoch teacher was below it on seed 0 (bench/results/cfp_pose.md).
CFP_FRONTAL_YAW = 8.0
CFP_PROFILE_YAW = (30.0, 50.0)
EVAL_IMAGES_PER_ID = 4
LOOSE_SIZE = 160


# --------------------------------------------------------------------------- rendering jobs
def identity_params(seed: int, role: int, index: int):  # -> Identity
    """The latent parameters of identity ``index`` of ``role`` (deterministic)."""
    from facekd.data.synth_render import sample_identity

    return sample_identity(np.random.default_rng([seed, role, index]))


def _loose_target(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """Where the 5 landmarks sit in a loose crop: the template under a random similarity."""
    from facekd.data.align import ARCFACE_DST

    scale = rng.uniform(1.0, 1.25)
    angle = np.deg2rad(rng.uniform(-15, 15))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    centre = np.array([56.0, 66.0])
    placed = (ARCFACE_DST.astype(np.float64) - centre) @ rot.T
    return placed + canvas / 2 + rng.normal(0, canvas * 0.04, 2)


def render_identity_images(seed: int, role: int, index: int, specs: list[dict[str, Any]],
                           strength: float = 1.0) -> list[tuple[bytes, np.ndarray, float]]:
    """Render the images ``specs`` describe for one identity.

    A spec may fix ``yaw`` (degrees) or ``age``, set ``loose`` (IJB crop) with ``media``
    and ``frame`` (frames of one media share background, light and colour), and always
    has ``image`` (its index, part of its seed). Returns (JPEG bytes, 5x2 landmarks,
    faceness score) per spec; landmarks of loose crops include detector noise.
    """
    from facekd.data.synth_render import FaceRenderer, encode_jpeg, sample_nuisance

    ident = identity_params(seed, role, index)
    renderer = FaceRenderer()
    out = []
    media_cache: dict[int, Any] = {}
    for spec in specs:
        rng = np.random.default_rng([seed, role, index, 1 + spec["image"]])
        nuis = sample_nuisance(rng, ident, yaw_deg=spec.get("yaw"), age=spec.get("age"),
                               strength=strength)
        target, size, score = None, None, 1.0
        if spec.get("loose"):
            media = spec["media"]
            if media not in media_cache:
                media_rng = np.random.default_rng([seed, role, index, 1_000_000 + media])
                media_cache[media] = (sample_nuisance(media_rng, ident, strength=strength),
                                      _loose_target(media_rng, LOOSE_SIZE))
            base, base_target = media_cache[media]
            for name in ("background", "background_shapes", "light_angle", "light_strength",
                         "ambient", "colour_gain", "gamma", "glasses", "age"):
                setattr(nuis, name, getattr(base, name))
            nuis.landmark_noise = np.zeros((5, 2))
            target = base_target + rng.normal(0, 2.0, 2)
            size = LOOSE_SIZE
            quality = (1.0 - 0.2 * nuis.blur / 1.6 - 0.2 * (nuis.occluder > 0)
                       - 0.15 * min(1.0, abs(np.degrees(nuis.yaw)) / 50) - 0.08 * nuis.noise / 9)
            score = float(np.clip(quality + rng.normal(0, 0.05), 0.5, 1.0))
        image, landmarks = renderer.render(ident, nuis, index, target=target, size=size,
                                           rng=rng)
        if spec.get("loose"):
            landmarks = landmarks + rng.normal(0, 1.0, (5, 2))
        out.append((encode_jpeg(image, nuis.jpeg_quality), landmarks.astype(np.float32), score))
    return out


def _render_job(job: tuple) -> list[tuple[bytes, np.ndarray, float]]:
    return render_identity_images(*job)


def _run_jobs(jobs: list[tuple], workers: int, desc: str, progress: bool
              ) -> Iterator[list[tuple[bytes, np.ndarray, float]]]:
    """Render identity jobs in order, in ``workers`` processes (results stay ordered)."""
    from tqdm import tqdm

    total = sum(len(job[3]) for job in jobs)
    bar = tqdm(total=total, desc=desc, unit="img", disable=None if progress else True,
               leave=False)  # None: no bar when stderr is not a terminal
    try:
        if workers <= 1 or len(jobs) < 4:
            for job in jobs:
                result = _render_job(job)
                bar.update(len(result))
                yield result
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")  # safe even when the caller has torch loaded
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            chunk = max(1, min(32, len(jobs) // (workers * 8)))
            for result in pool.map(_render_job, jobs, chunksize=chunk):
                bar.update(len(result))
                yield result
    finally:
        bar.close()


# --------------------------------------------------------------------------- parts
def _fold_sizes(n_pairs: int) -> list[int]:
    return [n_pairs // 10 + (1 if i < n_pairs % 10 else 0) for i in range(10)]


def _pair_plan(kind: str, n_pairs: int, seed: int,
               profile_yaw: tuple[float, float] = CFP_PROFILE_YAW
               ) -> tuple[list[list[dict]], list[list[tuple]]]:
    """Which images each held-out identity needs and which pairs each fold uses.

    Returns per-identity spec lists and per-fold lists of
    ``((identity, image), (identity, image), same)``. Each fold has its own people,
    genuine and impostor pairs are balanced within every fold.
    """
    role = {"lfw": ROLE_LFW, "cfp_fp": ROLE_CFP, "agedb_30": ROLE_AGEDB}[kind]
    rng = np.random.default_rng([seed, role, 999_999_999])
    specs: list[list[dict]] = []
    folds: list[list[tuple]] = []
    for fold_pairs in _fold_sizes(n_pairs):
        n_same = fold_pairs // 2
        n_diff = fold_pairs - n_same
        if kind == "cfp_fp":
            per_id = 4  # 2 frontal x 2 turned
        else:
            per_id = math.comb(EVAL_IMAGES_PER_ID, 2)
        n_ids = max(2, math.ceil(n_same / per_id))
        first = len(specs)
        genuine: list[tuple] = []
        frontal: list[tuple] = []
        turned: list[tuple] = []
        for local in range(n_ids):
            ident = first + local
            if kind == "cfp_fp":
                yaws = [rng.uniform(-CFP_FRONTAL_YAW, CFP_FRONTAL_YAW),
                        rng.uniform(-CFP_FRONTAL_YAW, CFP_FRONTAL_YAW),
                        rng.choice([-1, 1]) * rng.uniform(*profile_yaw),
                        rng.choice([-1, 1]) * rng.uniform(*profile_yaw)]
                specs.append([{"image": i, "yaw": float(y)} for i, y in enumerate(yaws)])
                frontal += [(ident, 0), (ident, 1)]
                turned += [(ident, 2), (ident, 3)]
                genuine += [((ident, f), (ident, p)) for f in (0, 1) for p in (2, 3)]
            elif kind == "agedb_30":
                ages = np.sort(rng.uniform(0.0, 1.0, EVAL_IMAGES_PER_ID))
                ages[0], ages[-1] = rng.uniform(0.0, 0.2), rng.uniform(0.75, 1.0)
                specs.append([{"image": i, "age": float(a)} for i, a in enumerate(ages)])
                pairs = sorted(combinations(range(EVAL_IMAGES_PER_ID), 2),
                               key=lambda p: ages[p[0]] - ages[p[1]])  # largest gap first
                genuine += [((ident, a), (ident, b)) for a, b in pairs]
            else:
                specs.append([{"image": i} for i in range(EVAL_IMAGES_PER_ID)])
                genuine += [((ident, a), (ident, b))
                            for a, b in combinations(range(EVAL_IMAGES_PER_ID), 2)]
        if kind == "agedb_30":
            # keep the largest age gaps: take pairs per identity in gap order
            per = math.comb(EVAL_IMAGES_PER_ID, 2)
            ranked = sorted(range(len(genuine)), key=lambda i: (i % per, i // per))
            chosen_same = [genuine[i] for i in ranked[:n_same]]
        else:
            order = rng.permutation(len(genuine))
            chosen_same = [genuine[i] for i in order[:n_same]]
        impostors: set[tuple] = set()
        ids = np.arange(first, first + n_ids)
        guard = 0
        while len(impostors) < n_diff and guard < 100 * n_diff + 100:
            guard += 1
            a, b = rng.choice(ids, 2, replace=False)
            if kind == "cfp_fp":
                left = (int(a), int(rng.integers(2)))
                right = (int(b), 2 + int(rng.integers(2)))
            else:
                left = (int(a), int(rng.integers(len(specs[a]))))
                right = (int(b), int(rng.integers(len(specs[b]))))
            impostors.add((left, right))
        if len(impostors) < n_diff:
            raise FacekdError(f"{kind}: cannot draw {n_diff} distinct impostor pairs per fold")
        fold = [(a, b, True) for a, b in chosen_same] + [
            (a, b, False) for a, b in sorted(impostors)]
        order = rng.permutation(len(fold))
        folds.append([fold[i] for i in order])
    return specs, folds


def _write_pairs_bin(path: Path, kind: str, n_pairs: int, seed: int, strength: float,
                     workers: int, progress: bool,
                     profile_yaw: tuple[float, float] = CFP_PROFILE_YAW) -> dict[str, Any]:
    from facekd.data.binset import write_bin

    role = {"lfw": ROLE_LFW, "cfp_fp": ROLE_CFP, "agedb_30": ROLE_AGEDB}[kind]
    specs, folds = _pair_plan(kind, n_pairs, seed, profile_yaw)
    jobs = [(seed, role, i, s, strength) for i, s in enumerate(specs)]
    images: dict[tuple[int, int], bytes] = {}
    for ident, result in enumerate(_run_jobs(jobs, workers, kind, progress)):
        for image_index, (jpeg, _, _) in enumerate(result):
            images[(ident, image_index)] = jpeg
    bins: list[bytes] = []
    issame: list[bool] = []
    for fold in folds:
        for a, b, same in fold:
            bins += [images[a], images[b]]
            issame.append(same)
    write_bin(path, bins, issame)
    return {"pairs": len(issame), "genuine": int(sum(issame)), "identities": len(specs),
            "images": len(images)}


def _write_train(folder: Path, role: int, n_ids: int, per_id: int, seed: int, strength: float,
                 workers: int, progress: bool, landmarks_name: str | None) -> dict[str, Any]:
    from facekd.data.recordio import write_insightface_dataset

    jobs = [(seed, role, i, [{"image": k} for k in range(per_id)], strength)
            for i in range(n_ids)]
    landmarks: list[np.ndarray] = []

    def samples() -> Iterator[tuple[int, bytes]]:
        for label, result in enumerate(_run_jobs(jobs, workers, ROLE_NAMES[role], progress)):
            for jpeg, lms, _ in result:
                landmarks.append(lms)
                yield label, jpeg

    write_insightface_dataset(folder, samples(), num_classes=n_ids)
    if landmarks_name:
        with atomic_path(folder / landmarks_name, suffix=".npy") as tmp:
            np.save(tmp, np.stack(landmarks).astype(np.float32))
    return {"identities": n_ids, "images": n_ids * per_id}


def _ijb_plan(n_ids: int, seed: int) -> list[list[dict]]:
    """Templates of 1-3 media, media of 1-3 frames, 2-4 templates per identity."""
    rng = np.random.default_rng([seed, ROLE_IJB, 999_999_999])
    specs = []
    for _ in range(n_ids):
        image = media = 0
        person: list[dict] = []
        for template in range(int(rng.integers(2, 5))):
            for _ in range(int(rng.integers(1, 4))):
                for _ in range(int(rng.integers(1, 4))):
                    person.append({"image": image, "loose": True, "media": media,
                                   "template": template})
                    image += 1
                media += 1
        specs.append(person)
    return specs


def _ijb_id_counts(specs: list[list[dict]]) -> tuple[int, int, int]:
    """(templates, media sub-templates, media) the plan makes."""
    n_templates = n_sub = 0
    for person in specs:
        for template in sorted({s["template"] for s in person}):
            n_templates += 1
            media = {s["media"] for s in person if s["template"] == template}
            n_sub += len(media) if len(media) > 1 else 0
    n_media = sum(len({s["media"] for s in person}) for person in specs)
    return n_templates, n_sub, n_media


class _IjbTemplates:
    """Rendered IJB images (entries) and the templates that group them.

    ``entries`` hold (media id, JPEG, landmarks, score) in render order; ``members`` map
    a template id to its entry indices, ``owner`` to its identity. Template and media ids
    are taken in order from the shuffled id pools.
    """

    def __init__(self, template_ids: np.ndarray, media_ids: np.ndarray) -> None:
        self.template_ids, self.media_ids = template_ids, media_ids
        self.t_next = self.m_next = 0
        self.owner: dict[int, int] = {}
        self.entries: list[tuple[int, bytes, np.ndarray, float]] = []
        self.members: dict[int, list[int]] = {}  # template id -> entry indices, file order

    def _next_template_id(self) -> int:
        tid = int(self.template_ids[self.t_next])
        self.t_next += 1
        return tid

    def add_identity(self, ident: int, specs: list[dict], result: list[tuple]) -> None:
        """One identity's rendered images, each joining its template."""
        tid_of: dict[int, int] = {}
        media_map: dict[int, int] = {}
        for spec, (jpeg, lms, score) in zip(specs, result, strict=True):
            if spec["template"] not in tid_of:
                tid_of[spec["template"]] = tid = self._next_template_id()
                self.owner[tid] = ident
            if spec["media"] not in media_map:
                media_map[spec["media"]] = int(self.media_ids[self.m_next])
                self.m_next += 1
            self.members.setdefault(tid_of[spec["template"]], []).append(len(self.entries))
            self.entries.append((media_map[spec["media"]], jpeg, lms, score))

    def add_media_sub_templates(self) -> None:
        """Each media of a template with two or more becomes a template of its own."""
        entries = self.entries
        for tid in list(self.members):
            mids = list(dict.fromkeys(entries[i][0] for i in self.members[tid]))
            if len(mids) < 2:
                continue
            for mid in mids:
                sub = self._next_template_id()
                self.members[sub] = [i for i in self.members[tid] if entries[i][0] == mid]
                self.owner[sub] = self.owner[tid]


def _write_ijb_images(folder: Path, ijb: _IjbTemplates, template_order: list[int]
                      ) -> tuple[list[str], list[str]]:
    """The crops (an image in two templates is one file) and the lines of the two
    per-image files, grouped by template in ``template_order``."""
    crop_dir = folder / "loose_crop"
    crop_dir.mkdir(parents=True, exist_ok=True)
    tid_lines, lm_lines = [], []
    names: dict[int, str] = {}
    for tid in template_order:
        for i in ijb.members[tid]:
            mid, jpeg, lms, score = ijb.entries[i]
            if i not in names:
                names[i] = f"{len(names) + 1}.jpg"
                with atomic_path(crop_dir / names[i]) as tmp:
                    tmp.write_bytes(jpeg)
            tid_lines.append(f"{names[i]} {tid} {mid}")
            coords = " ".join(f"{v:.3f}" for v in lms.reshape(-1))
            lm_lines.append(f"{names[i]} {coords} {score:.4f}")
    return tid_lines, lm_lines


def _ijb_pairs(ijb: _IjbTemplates, n_impostors: int, rng: np.random.Generator
               ) -> tuple[list[tuple[int, int]], set[tuple[int, int]], list[str]]:
    """(genuine pairs, impostor pairs, pair-file lines in a random order). A genuine pair
    never joins two templates that share an image; impostors are drawn up to the count."""
    owner = ijb.owner
    templates = list(owner)
    image_sets = {t: set(ijb.members[t]) for t in templates}
    same_owner = [(a, b) for a, b in combinations(templates, 2) if owner[a] == owner[b]]
    genuine = [(a, b) for a, b in same_owner if not image_sets[a] & image_sets[b]]
    all_impostors = len(templates) * (len(templates) - 1) // 2 - len(same_owner)
    impostors: set[tuple[int, int]] = set()
    target = min(n_impostors, all_impostors)
    while len(impostors) < target:
        a, b = (int(t) for t in rng.choice(templates, 2, replace=False))
        if owner[a] != owner[b] and (b, a) not in impostors:
            impostors.add((a, b))
    pairs = [(a, b, 1) for a, b in genuine] + [(a, b, 0) for a, b in sorted(impostors)]
    pair_lines = [f"{pairs[i][0]} {pairs[i][1]} {pairs[i][2]}" for i in rng.permutation(len(pairs))]
    return genuine, impostors, pair_lines


def _write_ijb(folder: Path, n_ids: int, n_impostors: int, seed: int, strength: float,
               workers: int, progress: bool) -> dict[str, Any]:
    """The IJB-style protocol. Every template of two or more media also lends each of its
    media as a template of its own (IJB-C's templates share media the same way), so the
    same images carry about 2.5x the templates and 6x the possible impostor pairs: enough
    (>= 100,000) for TAR@FAR=1e-4 without rendering more faces. A genuine pair never
    joins two templates that share an image."""
    specs = _ijb_plan(n_ids, seed)
    rng = np.random.default_rng([seed, ROLE_IJB, 888_888_888])
    n_templates, n_sub, n_media = _ijb_id_counts(specs)
    n_all = n_templates + n_sub
    template_ids = rng.choice(np.arange(1, 5 * n_all + 1), n_all, replace=False)
    media_ids = rng.choice(np.arange(1, 50 * n_media + 1), n_media, replace=False)
    ijb = _IjbTemplates(template_ids, media_ids)
    jobs = [(seed, ROLE_IJB, i, s, strength) for i, s in enumerate(specs)]
    for ident, result in enumerate(_run_jobs(jobs, workers, "ijb", progress)):
        ijb.add_identity(ident, specs[ident], result)
    ijb.add_media_sub_templates()
    # lines grouped by template, templates in a random order (as in IJB-C's files)
    template_order = [list(ijb.members)[i] for i in rng.permutation(len(ijb.members))]
    tid_lines, lm_lines = _write_ijb_images(folder, ijb, template_order)
    genuine, impostors, pair_lines = _ijb_pairs(ijb, n_impostors, rng)
    meta = folder / "meta"
    write_text_atomic(meta / "ijbc_face_tid_mid.txt", "\n".join(tid_lines) + "\n")
    write_text_atomic(meta / "ijbc_name_5pts_score.txt", "\n".join(lm_lines) + "\n")
    write_text_atomic(meta / "ijbc_template_pair_label.txt", "\n".join(pair_lines) + "\n")
    return {"identities": n_ids, "images": len(ijb.entries), "templates": len(ijb.owner),
            "media_sub_templates": n_sub, "media": n_media, "genuine_pairs": len(genuine),
            "impostor_pairs": len(impostors)}


# --------------------------------------------------------------------------- entry point
def _resolve(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    if preset not in PRESETS:
        raise FacekdError(f"unknown synth preset {preset!r} (choose from {', '.join(PRESETS)})")
    config = dict(PRESETS[preset])
    config.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("identities", "images_per_id", "unlabelled_identities",
                "unlabelled_images_per_id", "ijb_identities", "ijb_impostors"):
        if int(config[key]) < 0:
            raise FacekdError(f"synth option {key} must be >= 0, got {config[key]}")
    if config["identities"] < 2 or config["images_per_id"] < 1:
        raise FacekdError("synth needs at least 2 training identities and 1 image per identity")
    for key in ("lfw_pairs", "cfp_pairs", "agedb_pairs"):
        if config[key] != 0 and config[key] < 20:
            raise FacekdError(f"synth option {key} must be 0 (skip) or >= 20 (10 folds)")
    if config["ijb_identities"] == 1:
        raise FacekdError("synth option ijb_identities must be 0 (skip) or >= 2")
    return config


_PART_KEYS = {
    "train": ("identities", "images_per_id"),
    "lfw": ("lfw_pairs",),
    "cfp_fp": ("cfp_pairs",),
    "agedb_30": ("agedb_pairs",),
    "ijb": ("ijb_identities", "ijb_impostors"),
    "unlabelled": ("unlabelled_identities", "unlabelled_images_per_id"),
}


def _part_hash(name: str, config: dict[str, Any], seed: int) -> str:
    """Fingerprint of what a part depends on, so a changed size rebuilds only that part."""
    relevant = {k: config[k] for k in (*_PART_KEYS[name], "strength")}
    blob = json.dumps([PART_VERSIONS.get(name, 1), name, seed, relevant], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate(
    out_dir: str | os.PathLike,
    identities: int | None = None,
    images_per_id: int | None = None,
    seed: int = 0,
    *,
    preset: str = "default",
    lfw_pairs: int | None = None,
    cfp_pairs: int | None = None,
    agedb_pairs: int | None = None,
    ijb_identities: int | None = None,
    ijb_impostors: int | None = None,
    unlabelled_identities: int | None = None,
    unlabelled_images_per_id: int | None = None,
    strength: float = 1.0,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the synthetic face dataset (see the module docstring); returns a summary.

    Sizes default to ``preset`` ("tiny" for tests, "default" for the demo); pair counts
    or pool sizes of 0 skip that part. ``strength`` scales every nuisance (1.0 is the
    tuned default). Same arguments give byte-identical files, whatever ``workers`` is.
    """
    out = Path(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FacekdError(f"synth seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if not strength >= 0:
        raise FacekdError(f"synth strength must be >= 0, got {strength!r}")
    config = _resolve(preset, dict(
        identities=identities, images_per_id=images_per_id, lfw_pairs=lfw_pairs,
        cfp_pairs=cfp_pairs, agedb_pairs=agedb_pairs, ijb_identities=ijb_identities,
        ijb_impostors=ijb_impostors, unlabelled_identities=unlabelled_identities,
        unlabelled_images_per_id=unlabelled_images_per_id, workers=workers))
    config["strength"] = float(strength)
    workers = int(config["workers"]) if config["workers"] else 1
    out.mkdir(parents=True, exist_ok=True)
    from facekd.logs import add_file_log

    handler = add_file_log(out / "synth.log")
    try:
        return _generate(out, config, seed, workers, progress)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _generate(out: Path, config: dict[str, Any], seed: int, workers: int, progress: bool
              ) -> dict[str, Any]:
    state_path = out / ".synth-progress.json"
    try:
        done = json.loads(state_path.read_text()) if state_path.exists() else {}
    except (OSError, ValueError):
        done = {}
    strength = config["strength"]
    summary: dict[str, Any] = {}

    def part(name: str, files: Iterable[Path], build) -> None:
        key = _part_hash(name, config, seed)
        if done.get(name, {}).get("hash") == key and all(f.exists() for f in files):
            log.info("synth: %s already complete, kept", name)
            summary[name] = done[name]["summary"]
            return
        log.info("synth: writing %s", name)
        result = build()
        done[name] = {"hash": key, "summary": result}
        write_json_atomic(state_path, done)
        summary[name] = result

    part("train", [out / "train.rec", out / "train.idx", out / "property",
                   out / "train_landmarks.npy"],
         lambda: _write_train(out, ROLE_TRAIN, config["identities"], config["images_per_id"],
                              seed, strength, workers, progress, "train_landmarks.npy"))
    for kind, key in (("lfw", "lfw_pairs"), ("cfp_fp", "cfp_pairs"), ("agedb_30", "agedb_pairs")):
        if config[key]:
            path = out / f"{kind}.bin"
            part(kind, [path], lambda path=path, kind=kind, key=key: _write_pairs_bin(
                path, kind, config[key], seed, strength, workers, progress))
    if config["ijb_identities"]:
        ijb = out / "ijb"
        part("ijb", [ijb / "meta" / "ijbc_template_pair_label.txt"],
             lambda: _write_ijb(ijb, config["ijb_identities"], config["ijb_impostors"], seed,
                                strength, workers, progress))
    if config["unlabelled_identities"]:
        pool = out / "unlabelled"
        part("unlabelled", [pool / "train.rec", pool / "train.idx", pool / "property"],
             lambda: _write_train(pool, ROLE_UNLABELLED, config["unlabelled_identities"],
                                  config["unlabelled_images_per_id"], seed, strength, workers,
                                  progress, None))

    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.name != "synth.log" and p.name != "synth.json")
    manifest = {
        "generator": "facekd.data.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "config": {k: v for k, v in config.items() if k != "workers"},
        "roles": {name: role for role, name in ROLE_NAMES.items()},
        "identity_seed_rule": "numpy.random.default_rng([seed, role, index])",
        "parts": summary,
        "files": {str(p.relative_to(out)): sha256_file(p) for p in files
                  if "loose_crop" not in p.parts},
    }
    write_json_atomic(out / "synth.json", manifest)
    return {"out": str(out), "seed": seed, **summary}


def aligned_faces(n: int, seed: int = 0) -> np.ndarray:
    """``n`` aligned synthetic faces (uint8 N x 112 x 112 x 3 RGB), one per identity.

    For parity checks and smoke tests that need face-like inputs without a dataset on
    disk; deterministic in (n, seed).
    """
    from facekd.data.synth_render import FaceRenderer, sample_nuisance

    renderer = FaceRenderer()
    out = np.empty((n, 112, 112, 3), np.uint8)
    for i in range(n):
        ident = identity_params(seed, ROLE_TRAIN, i)
        nuis = sample_nuisance(np.random.default_rng([seed, ROLE_TRAIN, i, 1]), ident)
        out[i] = renderer.render(ident, nuis, i)[0]
    return out
