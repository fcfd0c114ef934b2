"""`facekd prep info`: counts from headers, sizes/formats from image headers, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from facekd.data.info import dataset_info, image_size
from facekd.data.shards import rec2shards

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "recordio"


def test_info_of_plain_im2rec_reads_every_size_and_format():
    summary = dataset_info(FIXTURES / "plain_im2rec", out="-")
    assert summary["layout"] == "im2rec" and summary["images"] == 10
    assert summary["num_classes"] == 4 and summary["label_range"] == [0, 3]
    assert summary["flags"] == {"0": 10}
    assert summary["image_formats"] == {"jpeg": 5, "png": 5}
    assert summary["image_sizes"] == {"112x112x3": 7, "112x112x1": 1, "128x96x3": 1,
                                      "112x112x4": 1}
    assert summary["images_per_identity"]["min"] == 2


def test_info_of_insightface_layout_and_shards_writes_outputs(tmp_path):
    summary = dataset_info(FIXTURES / "insightface_layout", out=tmp_path / "info")
    assert summary["identity_records"] == 12 and summary["flags"] == {"0": 30, "2": 30}
    assert summary["images_per_identity"]["mean"] == 5.0 and "warnings" not in summary
    written = json.loads((tmp_path / "info" / "summary.json").read_text())
    assert written["images"] == 60
    assert (tmp_path / "info" / "images_per_identity.png").read_bytes()[:4] == b"\x89PNG"
    rec2shards(FIXTURES / "insightface_layout", tmp_path / "shards", shard_size=32, workers=1)
    from_shards = dataset_info(tmp_path / "shards")
    assert from_shards["kind"] == "shards" and from_shards["images"] == 60
    assert (tmp_path / "shards" / "info" / "summary.json").is_file()


def test_image_size_parser_matches_opencv():
    rng = np.random.default_rng(0)
    for shape, ext in [((40, 70, 3), ".jpg"), ((33, 21), ".png"), ((9, 12, 4), ".png"),
                       ((50, 50), ".jpg")]:
        data = cv2.imencode(ext, rng.integers(0, 255, shape, dtype=np.uint8))[1].tobytes()
        fmt, height, width, channels = image_size(data)
        assert (height, width) == shape[:2]
        assert channels == (shape[2] if len(shape) == 3 else 1)
        assert fmt == ("jpeg" if ext == ".jpg" else "png")
    assert image_size(b"not an image") is None
