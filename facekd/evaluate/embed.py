"""Batched image + flip embedding for any embedder, cached on disk per (model, dataset).

Users saw IJB numbers move with the batch size (insightface #1351), and CPU kernels do
pick different algorithms per batch shape (an r-tiny IResNet differs by 6e-6 between
batches of 7 and 32). So the model is always called with exactly ``MODEL_BATCH`` rows (a
short batch is zero-padded; eval-mode rows do not interact and a row's result does not
depend on its position), and ``batch_size`` only sets how many images are loaded at a
time: features are bit-identical for any ``batch_size`` (tested with 1, 7 and 32).
Features are written in resumable parts under the cache folder, keyed by the model
file's sha256, the dataset fingerprint and the settings, so re-scoring is instant and a
killed extraction continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facekd.data.pixels import DESCRIPTION, normalise_pixels
from facekd.fileio import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

PREPROCESS = DESCRIPTION  # part of the feature-cache key
PART_ROWS = 4096
MODEL_BATCH = 32


class ImageSource(Protocol):
    """Images to embed: uint8 RGB ``n x 3 x H x W`` blocks, plus a content fingerprint."""

    fingerprint: str

    def __len__(self) -> int: ...

    def load(self, start: int, stop: int) -> np.ndarray: ...


@dataclass
class ArrayImageSource:
    """Images already in memory (e.g. a decoded ``.bin``)."""

    images: np.ndarray
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = hashlib.sha256(np.ascontiguousarray(self.images)).hexdigest()

    def __len__(self) -> int:
        return len(self.images)

    def load(self, start: int, stop: int) -> np.ndarray:
        return self.images[start:stop]


def as_embedder(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Accept a model file/run folder, an ``nn.Module`` or any callable batch -> embeddings
    (:func:`facekd.models.embedder.as_embedder`; a callable is used as is)."""
    torch = sys.modules.get("torch")  # an nn.Module implies torch is loaded; never import it
    if isinstance(model, (str, os.PathLike)) or (
            torch is not None and isinstance(model, torch.nn.Module)):
        from facekd.models.embedder import as_embedder as to_embedder

        return to_embedder(model)
    if not callable(model):
        raise TypeError(f"{type(model).__name__} is not an embedder")
    return model


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [-1, 1] (:func:`facekd.data.pixels.normalise_pixels`)."""
    return normalise_pixels(images)


def embed_fixed_batches(embedder: Callable, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Embed uint8 images calling the model with exactly ``batch_size`` rows each time."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    outs = []
    for s in range(0, len(images), batch_size):
        block = images[s:s + batch_size]
        n = len(block)
        if n < batch_size:
            pad = np.zeros((batch_size - n, *block.shape[1:]), dtype=block.dtype)
            block = np.concatenate([block, pad])
        emb = np.asarray(embedder(to_model_input(block)), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != batch_size:
            raise ValueError(f"embedder returned shape {emb.shape} for a batch of {batch_size}")
        outs.append(emb[:n])
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)


def cache_key(model_sha256: str, dataset_fingerprint: str, settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True).encode()
    return (f"{model_sha256[:16]}-{dataset_fingerprint[:16]}-"
            f"{hashlib.sha256(blob).hexdigest()[:8]}")


def default_cache_dir() -> Path:
    env = os.environ.get("FACEKD_CACHE")
    if env:
        return Path(env) / "features"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facekd" / "features"


def extract_features(embedder: Any, source: ImageSource, *, batch_size: int = 256,
                     flip: bool = True, cache_dir: str | Path | None = None,
                     use_cache: bool = True, progress: bool = True, desc: str = "embed",
                     model_batch: int = MODEL_BATCH) -> np.ndarray:
    """Float32 features ``[orig | flip]`` (N x 2D) or ``orig`` (N x D) for every image.

    ``batch_size`` images are loaded at a time; the model always gets ``model_batch``
    rows. Cached under ``cache_dir`` when the embedder has a ``sha256`` (a model file);
    parts of ``PART_ROWS`` images are saved as they finish, so a killed run resumes.
    """
    from tqdm import tqdm

    embedder = as_embedder(embedder)
    n = len(source)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    settings = {"flip": flip, "model_batch": model_batch, "preprocess": PREPROCESS,
                "layout": "[orig|flip]" if flip else "orig"}
    model_sha = getattr(embedder, "sha256", "") or ""
    cache_on = use_cache and bool(model_sha) and bool(source.fingerprint)
    if cache_on:
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        key = cache_key(model_sha, source.fingerprint, settings)
        final = root / f"{key}.npy"
        parts_dir = root / f"{key}.parts"
        if final.is_file():
            feats = np.load(final, allow_pickle=False, mmap_mode="r")
            if feats.shape[0] == n:
                log.info("features from cache %s", final)
                return feats
    feats: np.ndarray | None = None  # allocated once the embedding size is known
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for i, start in enumerate(range(0, n, PART_ROWS)):
            stop = min(start + PART_ROWS, n)
            part_path = parts_dir / f"part_{i:06d}.npy" if cache_on else None
            if part_path is not None and part_path.is_file():
                part = np.load(part_path, allow_pickle=False)
            else:
                pieces = []
                for s in range(start, stop, batch_size):
                    images = source.load(s, min(s + batch_size, stop))
                    emb = embed_fixed_batches(embedder, images, model_batch)
                    if flip:
                        flipped = np.ascontiguousarray(images[..., ::-1])
                        emb = np.concatenate(
                            [emb, embed_fixed_batches(embedder, flipped, model_batch)], axis=1)
                    pieces.append(emb)
                part = np.concatenate(pieces)
                if part_path is not None:
                    with atomic_path(part_path, suffix=".npy") as tmp:
                        np.save(tmp, part)
            if feats is None:
                feats = np.empty((n, part.shape[1]), dtype=np.float32)
            feats[start:stop] = part
            bar.update(stop - start)
    if feats is None:
        feats = np.zeros((0, 0), dtype=np.float32)
    if cache_on:
        with atomic_path(final, suffix=".npy") as tmp:
            np.save(tmp, feats)
        write_json_atomic(root / f"{key}.json", {
            "model": getattr(embedder, "name", ""), "model_sha256": model_sha,
            "dataset_fingerprint": source.fingerprint, "settings": settings,
            "shape": list(feats.shape)})
        shutil.rmtree(parts_dir, ignore_errors=True)
    return feats


def split_flip(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[orig | flip]`` -> (orig, flip)."""
    half = features.shape[1] // 2
    return features[:, :half], features[:, half:]
