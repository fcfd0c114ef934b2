"""Helpers for the evaluation tests: fixture paths, a tiny IJB folder, stand-in embedders."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
VERIF = FIXTURES / "verification"
IJB = FIXTURES / "ijb"

# six fixture loose crops: templates / media (1 and 2 share a media: a 2-frame video)
TINY_TEMPLATES = [10, 10, 20, 20, 30, 40]
TINY_MEDIAS = [100, 100, 200, 201, 300, 400]
TINY_PAIRS = [(10, 20, 1), (10, 30, 0), (20, 40, 0), (30, 40, 1), (10, 40, 0), (20, 30, 0)]


def save_tiny_student(folder: Path, arch: str = "mbf_tiny") -> tuple[Any, Path]:
    """A seed-0 model in eval mode saved as ``folder/student.pt``: (model, checkpoint).

    The one "small saved student" of the evaluation and embedding-path tests; each test
    exports what it needs from it.
    """
    import torch

    from facekd.models import create_model, save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(arch).eval()
    return model, save_checkpoint(folder / "student.pt", model, arch)


def make_tiny_ijb(root: Path, one_to_n: bool = False, prefix: str = "ijbc") -> Path:
    """An IJB-style folder built from the six fixture loose crops and their landmarks."""
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(exist_ok=True)
    lmk_lines = (IJB / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()[:6]
    names = [line.split()[0] for line in lmk_lines]
    for name in names:
        shutil.copy(IJB / "loose_crop" / name, root / "loose_crop" / name)
    (root / "meta" / f"{prefix}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / f"{prefix}_face_tid_mid.txt").write_text("".join(
        f"{n} {t} {m}\n" for n, t, m in zip(names, TINY_TEMPLATES, TINY_MEDIAS, strict=True)))
    (root / "meta" / f"{prefix}_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {lab}\n" for a, b, lab in TINY_PAIRS))
    if one_to_n:
        head = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
        (root / "meta" / f"{prefix}_1N_gallery_G1.csv").write_text(
            head + "10,1,1.jpg\n10,1,2.jpg\n")
        (root / "meta" / f"{prefix}_1N_gallery_G2.csv").write_text(head + "30,2,5.jpg\n")
        (root / "meta" / f"{prefix}_1N_probe_mixed.csv").write_text(
            head + "20,1,3.jpg\n20,1,4.jpg\n40,2,6.jpg\n")
    return root


def uint8_from_model_input(x: np.ndarray) -> np.ndarray:
    """Invert ``(u/255 - 0.5)/0.5`` exactly (the stand-in embedders key on pixels)."""
    return np.rint((np.asarray(x, dtype=np.float64) * 0.5 + 0.5) * 255).astype(np.uint8)


class LookupEmbedder:
    """Returns stored embeddings for known images (and zeros for padding rows)."""

    def __init__(self, images: np.ndarray, emb: np.ndarray, emb_flip: np.ndarray):
        self.name = "lookup"
        self.sha256 = ""
        self.dim = emb.shape[1]
        self.table = {}
        for img, e, f in zip(images, emb, emb_flip, strict=True):
            self.table[img.tobytes()] = e
            self.table[np.ascontiguousarray(img[..., ::-1]).tobytes()] = f
        self.calls = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        u8 = uint8_from_model_input(x)
        zero = np.zeros(self.dim, dtype=np.float32)
        return np.stack([self.table.get(u.tobytes(), zero) for u in u8]).astype(np.float32)


class PixelEmbedder:
    """Deterministic 'model': a fixed random projection of 8x8-pooled pixels."""

    def __init__(self, dim: int = 16, seed: int = 0, sha256: str = "f" * 64):
        rng = np.random.default_rng(seed)
        self.proj = rng.standard_normal((3 * 8 * 8, dim)).astype(np.float32)
        self.name = "pixel"
        self.sha256 = sha256
        self.calls = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        x = np.asarray(x, dtype=np.float32)
        n = len(x)
        pooled = x[:, :, :112, :112].reshape(n, 3, 8, 14, 8, 14).mean(axis=(3, 5))
        return pooled.reshape(n, -1) @ self.proj
