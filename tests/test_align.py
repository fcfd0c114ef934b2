"""Five-landmark alignment: agreement with insightface's goldens, folder alignment, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facekd.data.align import (
    ARCFACE_DST,
    align_folder,
    estimate_norm,
    norm_crop,
    similarity_transform,
)
from facekd.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
IJB = FIXTURES / "ijb"


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(IJB / "aligned_expected.npz") as data:
        return {k: data[k] for k in data.files}


def test_matrix_and_pixels_match_insightface(golden: dict) -> None:
    assert np.allclose(golden["src"], ARCFACE_DST)
    for i in range(len(golden["names"])):
        matrix = estimate_norm(golden["landmarks"][i])
        assert np.abs(matrix - golden["M"][i]).max() < 1e-4
        crop = norm_crop(golden["decoded_bgr"][i], golden["landmarks"][i])
        diff = np.abs(crop.astype(np.int16) - golden["aligned_bgr"][i].astype(np.int16))
        assert crop.shape == (112, 112, 3) and diff.max() <= 3
        rgb = crop[:, :, ::-1].transpose(2, 0, 1)
        blob = golden["input_blob"][i]
        assert np.abs(rgb.astype(np.int16) - blob[0]).max() <= 3
        assert np.abs(rgb[:, :, ::-1].astype(np.int16) - blob[1]).max() <= 3


def test_transform_recovers_known_similarity() -> None:
    angle, scale, shift = np.deg2rad(17.0), 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_DST.astype(np.float64)
    dst = src @ (scale * rot).T + shift
    matrix = similarity_transform(src, dst)
    assert np.allclose(matrix[:, :2], scale * rot, atol=1e-9)
    assert np.allclose(matrix[:, 2], shift, atol=1e-9)
    # landmarks already on the template map to (almost) the identity
    assert np.allclose(estimate_norm(ARCFACE_DST), [[1, 0, 0], [0, 1, 0]], atol=1e-6)
    # a mirrored face is still fitted by a proper rotation, never a reflection
    mirrored = src * [-1, 1]
    assert np.linalg.det(similarity_transform(mirrored, src)[:, :2]) > 0


def test_degenerate_landmarks() -> None:
    with pytest.raises(DataError, match="degenerate"):
        estimate_norm(np.full((5, 2), 3.0))
    with pytest.raises(DataError, match="5"):
        estimate_norm(np.zeros((4, 2)))


def test_align_folder_matches_norm_crop_and_resumes(tmp_path: Path, golden: dict) -> None:
    images = tmp_path / "images"
    shutil.copytree(IJB / "loose_crop", images)
    out = tmp_path / "aligned"
    summary = align_folder(images, images / "landmarks.txt", out)
    assert summary["aligned"] == 6 and summary["skipped_existing"] == 0
    for i, name in enumerate(golden["names"]):
        aligned = cv2.imread(str(out / str(name)))
        assert aligned.shape == (112, 112, 3)
        # JPEG decode of the fixture differs by libjpeg build; compare loosely after re-encode
        expected = norm_crop(cv2.imread(str(images / str(name))), golden["landmarks"][i])
        assert np.abs(aligned.astype(np.int16) - expected).mean() < 3
    again = align_folder(images, images / "landmarks.txt", out)
    assert again["aligned"] == 0 and again["skipped_existing"] == 6


def test_align_folder_errors(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((100, 80, 3), np.uint8))
    cv2.imwrite(str(images / "c.png"), np.zeros((100, 80, 3), np.uint8))
    lm = tmp_path / "lm.txt"
    lm.write_text("a.png 30 40 50 40 40 55 32 70 48 70\nc.png 30 40 50 40 40 55 32 70 48 120\n")
    with pytest.raises(DataError, match=r"lm\.txt:2: landmark 5 .* outside c\.png \(80x100\)"):
        align_folder(images, lm, tmp_path / "out")
    assert (tmp_path / "out" / "a.png").exists() and not (tmp_path / "out" / "c.png").exists()
    lm.write_text("b.png 30 40 50 40 40 55 32 70 48 70\n")
    with pytest.raises(DataError, match=r"lm\.txt:1: .*b\.png"):
        align_folder(images, lm, tmp_path / "out")
    lm.write_text("a.png 30 40 50\n")
    with pytest.raises(DataError, match=r"lm\.txt:1"):
        align_folder(images, lm, tmp_path / "out")
    lm.write_text("a.png 30 40 50 40 40 55 32 70 48 x7\n")
    with pytest.raises(DataError, match=r"lm\.txt:1: .*not numbers"):
        align_folder(images, lm, tmp_path / "out")
