"""Teacher cache: the teacher's embedding of every training image and of its mirror image.

Horizontal flip is the only augmentation in face-recognition training, so a frozen teacher
sees exactly two versions of each sample; running it once per version and storing the
embeddings makes distillation cost close to training the student alone. Margin-free
teacher logits are ``scale * normalise(emb) @ centres.T``, so storing the embedding plus
the (small, C x D) centre matrix gives exact logits over any class subset a method samples.

Layout of a cache folder::

    meta.json      format, teacher hash, source, sizes, dtype, scale, complete flag
    keys.npy       int64 (N,), sorted sample keys
    emb.npy        (N, 2, D) float16/float32; [:, 0] the image, [:, 1] its mirror
    centres.npy    float32 (C, D) normalised teacher class centres (when the teacher has them)

The build writes chunks of batches under ``chunks/`` with the loader state after each
chunk, so a killed build resumes where it stopped; the final arrays are written
atomically and the chunks removed.
"""

from __future__ import annotations

import json
import logging
import mmap
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facekd.errors import ConfigError, DataError
from facekd.fileio import atomic_path, reserve_space, write_json_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = "facekd-teacher-cache"
_RELEASE_BYTES = 64 << 20  # emb.npy pages written between page releases
CACHE_VERSION = 1


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing (not a facekd teacher cache?)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg})") from None


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


@dataclass
class CacheLookup:
    """Teacher outputs for one batch, read from the cache."""

    embedding: torch.Tensor              # (B, D) float32
    centres: torch.Tensor | None
    scale: float


class TeacherCache:
    """Read side: memory-mapped embeddings looked up by (sample key, flipped)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta = _load_json(self.folder / "meta.json")
        if meta.get("format") != CACHE_FORMAT:
            raise DataError(f"{self.folder / 'meta.json'}: format is {meta.get('format')!r}, "
                            f"expected {CACHE_FORMAT!r}")
        if not meta.get("complete"):
            raise DataError(f"{self.folder}: teacher cache is incomplete; rerun "
                            "'facekd teacher cache' to finish it")
        self.meta = meta
        try:
            self.keys = np.load(self.folder / "keys.npy", mmap_mode="r")
            self.emb = np.load(self.folder / "emb.npy", mmap_mode="r")
        except FileNotFoundError as exc:
            raise DataError(f"{exc.filename}: missing from the teacher cache") from None
        except ValueError as exc:
            raise DataError(f"{self.folder}: unreadable cache array ({exc})") from None
        if self.emb.ndim != 3 or self.emb.shape[1] != 2 or self.emb.shape[0] != len(self.keys):
            raise DataError(f"{self.folder / 'emb.npy'}: shape {self.emb.shape} does not match "
                            f"{len(self.keys)} keys x 2 x dim")
        self.dim = int(self.emb.shape[2])
        self.scale = float(meta.get("scale") or 64.0)
        self.centres: torch.Tensor | None = None
        self._centres_by_device: dict[str, torch.Tensor] = {}
        centres_path = self.folder / "centres.npy"
        if centres_path.exists():
            # copy-on-write map: at 2.06M x 512 the matrix is 4.2 GB, and every rank of a
            # node held a private copy; mapped, the ranks share the page cache (a rank
            # that wrote into it would get private pages, never change the file)
            try:
                centres = np.load(centres_path, mmap_mode="c", allow_pickle=False)
            except ValueError as exc:
                raise DataError(f"{centres_path}: unreadable cache array ({exc})") from None
            if centres.ndim != 2 or centres.shape[1] != self.dim:
                raise DataError(f"{centres_path}: shape {centres.shape}, expected (C, {self.dim})")
            self.centres = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Row index of each sample key; a key the cache lacks is a DataError naming it."""
        keys = np.asarray(keys, dtype=np.int64)
        idx = np.searchsorted(self.keys, keys)
        idx_clipped = np.minimum(idx, len(self.keys) - 1)
        found = (idx < len(self.keys)) & (np.asarray(self.keys[idx_clipped]) == keys)
        if not found.all():
            missing = int(keys[~found][0])
            raise DataError(f"{self.folder}: sample key {missing} is not in the teacher cache "
                            f"(built from {self.meta.get('source')!r}); rebuild it for this data")
        return idx_clipped

    def lookup(self, keys: np.ndarray | torch.Tensor, flipped: np.ndarray | torch.Tensor,
               device: torch.device | str = "cpu", with_centres: bool = True) -> CacheLookup:
        """Embeddings of (key, flipped) on ``device``; ``with_centres=False`` when the caller
        already holds the centres (the trainer), so no second device copy is made."""
        if isinstance(keys, torch.Tensor):
            keys = keys.cpu().numpy()
        if isinstance(flipped, torch.Tensor):
            flipped = flipped.cpu().numpy()
        rows = self.rows(keys)
        view = np.asarray(flipped, dtype=bool).astype(np.int64)
        emb = torch.from_numpy(np.asarray(self.emb[rows, view], dtype=np.float32))
        device = torch.device(device)
        if device.type == "cuda":  # pinned: the copy overlaps the step instead of blocking it
            emb = emb.pin_memory().to(device, non_blocking=True)
        return CacheLookup(emb.to(device), self.centres_on(device) if with_centres else None,
                           self.scale)

    def centres_on(self, device: torch.device | str) -> torch.Tensor | None:
        """The centre matrix on ``device``, copied once per device and kept.

        At MS1MV3 size it is 93k x 512 (190 MB): copying it per lookup, i.e. per step,
        cost more host-to-device traffic than the batch itself.
        """
        if self.centres is None:
            return None
        device = torch.device(device)
        key = str(device)
        if key not in self._centres_by_device:
            self._centres_by_device[key] = self.centres.to(device)
        return self._centres_by_device[key]


def open_cache(folder: str | Path) -> TeacherCache:
    return TeacherCache(folder)


def _teacher_sha(spec: str) -> str | None:
    from facekd.fileio import sha256_file

    path = Path(spec)
    return sha256_file(path) if path.is_file() else None


def _complete_cache_there(out: Path, teacher_spec: str, source: str, dtype: str) -> bool:
    """True when ``out`` already holds this very cache; another complete one is an error."""
    meta_path = out / "meta.json"
    if not meta_path.exists():
        return False
    meta = _load_json(meta_path)
    if not meta.get("complete"):
        return False
    same = (meta.get("source") == str(source) and meta.get("dtype") == dtype
            and meta.get("teacher") == str(teacher_spec))
    if not same:
        raise ConfigError(f"{out} already holds a complete cache of teacher "
                          f"{meta.get('teacher')!r} on {meta.get('source')!r} "
                          f"({meta.get('dtype')}); choose another OUT")
    return True


def _progress_state(progress_path: Path, settings: dict[str, Any], out: Path
                    ) -> dict[str, Any]:
    """This rank's progress (chunks written, loader position): saved, or a fresh start."""
    if not progress_path.exists():
        return {"settings": settings, "chunks": 0, "loader": None}
    state = _load_json(progress_path)
    if state.get("settings") != settings:
        raise ConfigError(f"{out}: an unfinished cache with different settings is "
                          f"there ({state.get('settings')}); remove it or use another OUT")
    return state


class _RankChunks:
    """One rank's rows, gathered batch by batch and written a chunk per resume point.

    Embeddings stay device tensors until a chunk is written: one host copy (and sync)
    per chunk, not one per batch. Each chunk is followed by the progress file that
    records it and the loader position after it.
    """

    def __init__(self, teacher: Any, chunks_dir: Path, rank: int, dtype: str,
                 state: dict[str, Any], progress_path: Path,
                 position: Callable[[], dict[str, Any]]) -> None:
        self.teacher, self.chunks_dir, self.rank = teacher, chunks_dir, rank
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        self.torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        self.state, self.progress_path, self.position = state, progress_path, position
        self.keys: list[np.ndarray] = []
        self.emb: list[Any] = []

    def add_batch(self, images: torch.Tensor, batch: dict[str, Any]) -> None:
        """The teacher on image and mirror in one call (rows [:n] and [n:]), stored as pairs."""
        emb = self.teacher.embed(torch.cat([images, images.flip(3)]))
        n = images.shape[0]
        if isinstance(emb, torch.Tensor):  # float32 -> storage dtype on the device
            emb = emb.detach().float()
            pair: Any = torch.stack([emb[:n], emb[n:]], dim=1).to(self.torch_dtype)
        else:
            emb = np.asarray(emb, dtype=np.float32)
            pair = np.stack([emb[:n], emb[n:]], axis=1).astype(self.np_dtype)
        self.keys.append(batch["key"].cpu().numpy().astype(np.int64))
        self.emb.append(pair)

    def flush(self) -> None:
        """Write the gathered rows as the next chunk, then the progress after it."""
        if not self.keys:
            return
        index = self.state["chunks"]
        name = f"chunk-r{self.rank}-{index:06d}.npz"
        with atomic_path(self.chunks_dir / name, suffix=".npz") as tmp:
            emb = (torch.cat(self.emb).cpu().numpy()
                   if isinstance(self.emb[0], torch.Tensor) else np.concatenate(self.emb))
            np.savez(tmp, keys=np.concatenate(self.keys), emb=emb)
        self.keys.clear()
        self.emb.clear()
        self.state["chunks"] = index + 1
        self.state["loader"] = self.position()
        write_json_atomic(self.progress_path, self.state)


def build_teacher_cache(teacher_spec: str, source: str, out: str | Path, *,
                        arch: str | None = None, classifier: str | None = None,
                        batch_size: int = 64, dtype: str = "float16",
                        device: str | None = None, num_workers: int = 0,
                        chunk_batches: int = 50, teacher: Any = None,
                        progress: bool = True,
                        loader_factory: Callable[..., Any] | None = None) -> Path:
    """Run the teacher over every sample of ``source`` (image and mirror); resumable.

    ``teacher`` may be an already loaded teacher object (tests, the trainer); otherwise
    ``teacher_spec`` is loaded with :func:`facekd.models.teacher.load_teacher`.
    ``loader_factory`` replaces :func:`facekd.data.loader.build_train_loader`. The loop,
    its resume points (a chunk of rows every ``chunk_batches`` batches) and progress are
    :class:`~facekd.models.teacher_pass.TeacherPass`, shared with ``teacher centres``.
    """
    from facekd.logs import add_file_log
    from facekd.models.teacher_pass import TeacherPass, check_pass_sizes

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype must be float16 or float32, got {dtype!r}")
    check_pass_sizes(batch_size, chunk_batches, "batch size and chunk size")
    out = Path(out)
    if _complete_cache_there(out, teacher_spec, source, dtype):
        log.info("teacher cache %s is already complete", out)
        return out
    from facekd.train.ddp import barrier, init_distributed

    info, dist_device = init_distributed(device or "auto")
    rank = info.rank
    chunks_dir = out / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    handler = add_file_log(out / "cache.log") if info.is_main else None
    try:
        if teacher is None:
            from facekd.models.teacher import load_teacher

            teacher = load_teacher(teacher_spec, arch=arch, classifier=classifier,
                                   device=dist_device if info.enabled else device)
        teacher_sha = _teacher_sha(teacher_spec) if teacher_spec else None
        settings = {"teacher": str(teacher_spec), "teacher_sha256": teacher_sha,
                    "source": str(source), "dtype": dtype, "batch_size": batch_size,
                    "chunk_batches": chunk_batches, "world_size": info.world_size}
        progress_path = chunks_dir / f"progress-r{rank}.json"
        state = _progress_state(progress_path, settings, out)
        # torchrun: every rank caches its own disjoint share; rank 0 merges at the end.
        input_device = getattr(teacher, "input_device", None)
        # pinned batches when the teacher runs on a GPU (asked only then: stand-in loaders)
        pinned = {"pin_memory": True} if input_device is not None and \
            torch.device(input_device).type == "cuda" else {}
        teacher_pass = TeacherPass(loader_factory, source, batch_size, num_workers=num_workers,
                                   save_every=chunk_batches, desc="teacher cache",
                                   input_device=input_device,
                                   progress=progress and info.is_main, rank=rank,
                                   world_size=info.world_size, **pinned)
        if state["loader"] is not None:
            teacher_pass.resume(state["loader"], f"{progress_path} (chunk {state['chunks']})")
        chunks = _RankChunks(teacher, chunks_dir, rank, dtype, state, progress_path,
                             teacher_pass.position)
        with torch.inference_mode():
            teacher_pass.run(chunks.add_batch, chunks.flush)
            chunks.flush()   # the last, shorter chunk
        barrier(info)
        _check_chunks_visible(out, chunks_dir, state["chunks"], info)
        if info.is_main:
            _finalise(out, chunks_dir, chunks.np_dtype, settings,
                      getattr(teacher, "centres", None),
                      float(getattr(teacher, "scale", 64.0) or 64.0))
        barrier(info)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    return out


def _check_chunks_visible(out: Path, chunks_dir: Path, chunks: int, info: Any) -> None:
    """Rank 0 merges every rank's chunks: on several nodes they must all reach it.

    A node writing ``OUT`` to a local disk gave a "complete" cache missing that node's
    samples (training then failed on a missing key). Every rank reports its chunk count;
    rank 0 checks the files and every rank raises the same one-line error if any is
    missing.
    """
    if not info.enabled:
        return
    from facekd.train.ddp import broadcast_object, gather_objects

    counts = gather_objects(int(chunks), info)
    missing = None
    if info.is_main:
        for rank, count in enumerate(counts):
            for index in range(count):
                name = chunks_dir / f"chunk-r{rank}-{index:06d}.npz"
                if not name.is_file():
                    missing = (rank, str(name))
                    break
            if missing:
                break
    missing = broadcast_object(missing, info)
    if missing is not None:
        raise ConfigError(f"{out}: rank 0 cannot see {missing[1]} written by rank "
                          f"{missing[0]}; on several nodes the cache folder must be on a "
                          "filesystem every node shares")


def _finalise(out: Path, chunks_dir: Path, np_dtype: type, settings: dict[str, Any],
              centres: Any, scale: float) -> None:
    """Merge every rank's chunks into sorted keys.npy / emb.npy, write centres and meta."""
    chunk_files = sorted(chunks_dir.glob("chunk-r*-*.npz"))
    key_parts, counts, dim = [], [], None
    for chunk in chunk_files:
        with np.load(chunk) as z:
            key_parts.append(z["keys"])
            counts.append(len(z["keys"]))
            dim = int(z["emb"].shape[2])
    if not key_parts or dim is None:
        raise DataError(f"{settings['source']}: no samples to cache")
    keys = np.concatenate(key_parts)
    del key_parts
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    del keys  # three key-sized arrays at most, not four (8 bytes a sample each)
    dup = np.flatnonzero(np.diff(sorted_keys) == 0)
    if dup.size:
        raise DataError(f"{settings['source']}: sample key {int(sorted_keys[dup[0]])} occurs "
                        "twice; keys must be unique to cache teacher outputs")
    dest_row = np.empty_like(order)
    dest_row[order] = np.arange(len(order))
    del order
    num_samples = len(sorted_keys)
    from facekd.data.recordio import release_array

    with atomic_path(out / "emb.npy", suffix=".npy") as tmp:
        emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype,
                                        shape=(num_samples, 2, dim))
        reserve_space(tmp)  # a full disk fails here, not as SIGBUS inside the mapping
        start = written = 0
        for chunk, count in zip(chunk_files, counts, strict=True):
            with np.load(chunk) as z:
                emb[dest_row[start:start + count]] = z["emb"]
            start += count
            written += count * max(emb[0].nbytes, mmap.PAGESIZE)  # a page a scattered row
            if written >= _RELEASE_BYTES:
                # chunks land on rows all over the file: without this every page of
                # emb.npy (87 GB at WebFace42M, D 512 fp16) would stay mapped in RSS;
                # a shared mapping's dirty pages stay in the page cache (nothing is lost)
                release_array(emb)
                written = 0
        emb.flush()
        del emb
    _save_npy(out / "keys.npy", sorted_keys)
    has_centres = centres is not None
    if has_centres:
        c = centres.detach().float().cpu().numpy() if isinstance(centres, torch.Tensor) \
            else np.asarray(centres, dtype=np.float32)
        _save_npy(out / "centres.npy", np.ascontiguousarray(c, dtype=np.float32))
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **settings,
            "num_samples": num_samples, "dim": dim, "scale": scale,
            "num_centres": int(centres.shape[0]) if has_centres else 0, "complete": True}
    write_json_atomic(out / "meta.json", meta)
    shutil.rmtree(chunks_dir, ignore_errors=True)
    log.info("teacher cache %s: %d samples x 2 views, dim %d, %s", out, num_samples, dim,
             np.dtype(np_dtype).name)
