"""Synthetic face dataset: determinism, formats, held-out identities, landmarks, difficulty."""

from __future__ import annotations

import hashlib
import json
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest

from facekd.data import open_rec
from facekd.data.align import ARCFACE_DST, norm_crop
from facekd.data.binset import decode_bin_images, load_bin
from facekd.data.synth import (
    ROLE_AGEDB,
    ROLE_CFP,
    ROLE_IJB,
    ROLE_LFW,
    ROLE_TRAIN,
    ROLE_UNLABELLED,
    _pair_plan,
    generate,
    identity_params,
    render_identity_images,
)
from facekd.data.synth_render import FaceRenderer, Nuisance, sample_identity, sample_nuisance
from facekd.errors import FacekdError

SMALL = dict(preset="tiny", identities=5, images_per_id=3, lfw_pairs=20, cfp_pairs=20,
             agedb_pairs=20, ijb_identities=3, ijb_impostors=50, unlabelled_identities=3,
             unlabelled_images_per_id=2, progress=False)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "synth.log"}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    generate(out, seed=3, **SMALL)
    return out


def test_same_seed_gives_identical_files_and_other_seed_differs(small_set: Path,
                                                                tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, seed=3, workers=2, **{k: v for k, v in SMALL.items()})
    first, second = _tree_hashes(small_set), _tree_hashes(again)
    assert first == second
    assert {"train.rec", "train.idx", "property", "lfw.bin", "cfp_fp.bin", "agedb_30.bin",
            "train_landmarks.npy", "synth.json", "unlabelled/train.rec",
            "ijb/meta/ijbc_face_tid_mid.txt"} <= set(first)
    other = tmp_path / "other"
    generate(other, seed=4, **{**SMALL, "lfw_pairs": 0, "cfp_pairs": 0, "agedb_pairs": 0,
                               "ijb_identities": 0, "unlabelled_identities": 0})
    assert (other / "train.rec").read_bytes() != (small_set / "train.rec").read_bytes()
    assert not (other / "lfw.bin").exists() and not (other / "ijb").exists()


def test_rerun_keeps_finished_parts_and_rebuilds_missing_ones(tmp_path: Path) -> None:
    out = tmp_path / "resume"
    opts = {**SMALL, "cfp_pairs": 0, "agedb_pairs": 0, "ijb_identities": 0,
            "unlabelled_identities": 0}
    generate(out, seed=1, **opts)
    before = _tree_hashes(out)
    rec_mtime = (out / "train.rec").stat().st_mtime_ns
    (out / "lfw.bin").unlink()
    generate(out, seed=1, **opts)
    assert (out / "train.rec").stat().st_mtime_ns == rec_mtime  # kept, not rewritten
    assert _tree_hashes(out) == before  # the rebuilt lfw.bin is byte-identical
    generate(out, seed=1, **{**opts, "lfw_pairs": 40})  # only the lfw part depends on it
    assert (out / "train.rec").stat().st_mtime_ns == rec_mtime
    assert len(load_bin(out / "lfw.bin")[1]) == 40


def test_training_layout_is_readable(small_set: Path) -> None:
    reader = open_rec(small_set)
    assert reader.num_classes == 5
    keys = list(reader.image_keys())
    assert keys == list(range(1, 16))
    labels = [reader.label_of(k) for k in keys]
    assert labels == sorted(labels) and sorted(set(labels)) == list(range(5))
    assert (small_set / "property").read_text().strip() == "5,112,112"
    landmarks = np.load(small_set / "train_landmarks.npy")
    assert landmarks.shape == (15, 5, 2)
    # aligned faces: true landmarks sit near the template (detector noise, expression, pose)
    assert np.abs(landmarks - ARCFACE_DST).mean() < 3.0
    for key in keys[:3]:
        _, payload = reader[key]
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (112, 112, 3)
    pool = open_rec(small_set / "unlabelled")
    assert pool.num_classes == 3 and len(list(pool.image_keys())) == 6


def test_bins_are_balanced_held_out_and_decodable(small_set: Path) -> None:
    reader = open_rec(small_set)
    train_hashes = {hashlib.sha256(reader[k][1]).digest() for k in reader.image_keys()}
    for name in ("lfw", "cfp_fp", "agedb_30"):
        bins, issame = load_bin(small_set / f"{name}.bin")
        assert len(issame) == 20 and sum(issame) == 10
        folds = np.array(issame).reshape(10, 2)
        assert (folds.sum(axis=1) == 1).all()  # every fold balanced
        assert not train_hashes & {hashlib.sha256(b).digest() for b in bins}
        assert decode_bin_images(bins).shape == (40, 3, 112, 112)
    # each fold has its own people
    _, folds = _pair_plan("lfw", 600, seed=0)
    people = [{img[0] for a, b, _ in fold for img in (a, b)} for fold in folds]
    assert all(not people[i] & people[j] for i in range(10) for j in range(i + 1, 10))
    assert sum(len(f) for f in folds) == 600 and sum(s for f in folds for *_, s in f) == 300


def test_held_out_identities_differ_from_training_ones() -> None:
    train = np.stack([identity_params(0, ROLE_TRAIN, i).vector() for i in range(50)])
    for role in (ROLE_LFW, ROLE_CFP, ROLE_AGEDB, ROLE_IJB, ROLE_UNLABELLED):
        held = np.stack([identity_params(0, role, i).vector() for i in range(50)])
        gaps = np.abs(held[:, None, :] - train[None, :, :]).max(axis=-1)
        assert gaps.min() > 1e-3


def test_ijb_protocol_files(small_set: Path) -> None:
    meta = small_set / "ijb" / "meta"
    tid_mid = [line.split() for line in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    pts = [line.split() for line in (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    pairs = [line.split() for line in
             (meta / "ijbc_template_pair_label.txt").read_text().splitlines()]
    assert len(tid_mid) == len(pts) and all(len(f) == 3 for f in tid_mid)
    assert [f[0] for f in tid_mid] == [f[0] for f in pts]
    templates = [int(f[1]) for f in tid_mid]
    runs = [t for i, t in enumerate(templates) if i == 0 or templates[i - 1] != t]
    assert len(runs) == len(set(runs))  # lines grouped by template
    assert all(len(f) == 12 and len(f[1].split(".")[1]) == 3 and len(f[11].split(".")[1]) == 4
               for f in pts)
    scores = np.array([float(f[11]) for f in pts])
    assert scores.min() >= 0.5 and scores.max() <= 1.0
    labels = {int(f[2]) for f in pairs}
    assert labels == {0, 1}
    assert {int(f[0]) for f in pairs} | {int(f[1]) for f in pairs} <= set(templates)
    # a loose crop aligned with its landmarks looks like an aligned training face
    name, *coords = pts[0][:11]
    crop = cv2.imread(str(small_set / "ijb" / "loose_crop" / name))
    assert crop.shape[0] > 112
    aligned = norm_crop(crop, np.array(coords, float).reshape(5, 2))
    assert aligned.shape == (112, 112, 3) and aligned[40:100, 30:80].std() > 5


def test_ijb_media_sub_templates_grow_pairs_from_the_same_images(small_set: Path) -> None:
    meta = small_set / "ijb" / "meta"
    images: dict[int, set[str]] = {}
    for line in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines():
        name, tid, _ = line.split()
        images.setdefault(int(tid), set()).add(name)
    pairs = [tuple(map(int, line.split())) for line in
             (meta / "ijbc_template_pair_label.txt").read_text().splitlines()]
    files = list((small_set / "ijb" / "loose_crop").iterdir())
    all_names = set().union(*images.values())
    assert len(files) == len(all_names)  # an image in two templates is one file
    shared = sum(len(a & b) > 0 for a, b in combinations(images.values(), 2))
    assert shared > 0  # media sub-templates reuse their template's images
    genuine = [(a, b) for a, b, label in pairs if label == 1]
    assert genuine and all(not images[a] & images[b] for a, b in genuine)
    assert sum(1 for *_, label in pairs if label == 0) == 50
    summary = json.loads((small_set / "synth.json").read_text())["parts"]["ijb"]
    assert summary["templates"] == len(images) > summary["media_sub_templates"] > 0


def test_cfp_profiles_lie_in_the_training_pose_tail() -> None:
    from facekd.data.synth import CFP_PROFILE_YAW

    specs, _ = _pair_plan("cfp_fp", 200, seed=0)
    profile = np.abs([s[k]["yaw"] for s in specs for k in (2, 3)])
    frontal = np.abs([s[k]["yaw"] for s in specs for k in (0, 1)])
    assert CFP_PROFILE_YAW[0] <= profile.min() and profile.max() <= CFP_PROFILE_YAW[1] <= 50
    assert frontal.max() <= 8


def _plain_nuisance(yaw: float = 0.0) -> Nuisance:
    return Nuisance(yaw=np.deg2rad(yaw), background=np.array([0.0, 200.0, 0.0]), smile=0.0,
                    eye_open=1.0, jpeg_quality=95)


@pytest.mark.parametrize("index", range(6))
def test_landmarks_are_where_the_features_are_drawn(index: int) -> None:
    rng = np.random.default_rng([7, index])
    ident = sample_identity(rng)
    ident.glasses = 0.0
    renderer = FaceRenderer()
    for yaw in (0.0, 15.0):
        image, landmarks = renderer.render(ident, _plain_nuisance(yaw), index)
        for eye in landmarks[:2]:
            x, y = np.round(eye).astype(int)
            assert image[y - 1:y + 2, x - 1:x + 2].mean() < 70  # the pupil
        nose_x, nose_y = np.round(landmarks[2]).astype(int)
        assert np.abs(image[nose_y, nose_x].astype(int) - [0, 200, 0]).sum() > 60  # on the face
    # a loose crop puts the landmarks at the requested target
    target = ARCFACE_DST * 1.3 + 20
    image, landmarks = renderer.render(ident, _plain_nuisance(), index, target=target, size=180)
    assert image.shape == (180, 180, 3)
    assert np.abs(landmarks.mean(0) - target.mean(0)).max() < 0.5  # least-squares fit
    assert np.abs(landmarks - target).max() < 8  # individual geometry differs from template
    x, y = np.round(landmarks[0]).astype(int)
    assert image[y - 1:y + 2, x - 1:x + 2].mean() < 70


def test_same_identity_closer_than_others_but_not_trivially() -> None:
    features, labels = [], []
    for person in range(16):
        for jpeg, _, _ in render_identity_images(11, ROLE_TRAIN, person,
                                                 [{"image": k} for k in range(5)]):
            image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)
            features.append(small.astype(np.float32).ravel())
            labels.append(person)
    x = np.array(features)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    y = np.array(labels)
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    same = y[:, None] == y[None]
    off_diagonal = ~np.eye(len(y), dtype=bool)
    assert dist[same & off_diagonal].mean() < 0.95 * dist[~same].mean()
    np.fill_diagonal(dist, np.inf)
    nearest_correct = (y[dist.argmin(1)] == y).mean()
    assert 1 / 16 < nearest_correct < 0.7  # pixels alone must not solve it


def test_nuisance_strength_and_fixed_pose() -> None:
    ident = identity_params(0, ROLE_TRAIN, 0)
    calm = sample_nuisance(np.random.default_rng(1), ident, strength=0.0)
    assert calm.yaw == 0 and calm.blur == 0 and calm.occluder == 0 and calm.noise == 0
    turned = sample_nuisance(np.random.default_rng(1), ident, yaw_deg=60.0, age=0.9)
    assert np.isclose(np.degrees(turned.yaw), 60.0) and turned.age == 0.9


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(FacekdError, match="preset"):
        generate(tmp_path / "x", preset="huge", progress=False)
    with pytest.raises(FacekdError, match="lfw_pairs"):
        generate(tmp_path / "x", preset="tiny", lfw_pairs=7, progress=False)
    with pytest.raises(FacekdError, match="seed"):
        generate(tmp_path / "x", preset="tiny", seed=-1, progress=False)
    with pytest.raises(FacekdError, match="identities"):
        generate(tmp_path / "x", preset="tiny", identities=1, progress=False)


def test_aligned_faces_helper_is_deterministic() -> None:
    from facekd.data.synth import aligned_faces

    faces = aligned_faces(3, seed=2)
    assert faces.shape == (3, 112, 112, 3) and faces.dtype == np.uint8
    assert np.array_equal(faces, aligned_faces(3, seed=2))
    assert not np.array_equal(faces, aligned_faces(3, seed=3))
