"""Training input: shuffled, flipped, normalised batches from shards or a ``.rec``.

Every choice that affects *which* image is seen and *how* (the permutation, the per-rank
and per-worker split, the flip) is a pure function of ``(seed, epoch, sample index)``, so
a run resumed mid-epoch sees exactly the batches it would have seen, and a teacher cache
keyed by (key, flipped) stays valid. Images are decoded into one uint8 NCHW RGB batch
(``batch["image"]``), which is what the loader yields: consumers call
:func:`normalise_batch` once per batch on their own device (late and vectorised: per-image
float conversion halves the throughput, and float batches would quadruple worker-to-main
and host-to-device traffic).

Split rule: the epoch permutation is dealt round-robin to ranks (``perm[rank::world]``),
then cut into batches; the main process names batch ``j`` of the epoch and a worker
decodes it (which worker does cannot change its content).
With ``drop_last=False`` every sample appears exactly once per epoch over all ranks (the
last batch may be short and ranks may differ by one batch); with ``drop_last=True`` every
rank has the same number of full batches (what DDP needs) and the few leftovers change
from epoch to epoch.

Identity-grouped (P x K) batches, ``images_per_identity=K > 1``: relation losses
(REFILLED stage 1, RKD-like terms) need several images of one identity per batch, which
plain random batches over many identities almost never hold. Each epoch every identity's
images are shuffled and cut into chunks of K; an identity whose image count is not a
multiple of K has its last chunk completed by repeating its own first images of that
epoch's order (so an identity with fewer than K images repeats images inside its chunk,
and every image is still seen at least once per epoch: nothing is dropped). The chunks
are shuffled and dealt exactly like samples above (``chunks[rank::world]``, then
``batch_size / K`` chunks per batch, decoded by any worker), so every
chunk appears exactly once per epoch over all ranks (``drop_last=False``). Flips are drawn
per batch slot, not per image, so a repeated image may come once plain, once mirrored.
K = 1 keeps the plain per-sample plan above, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from facekd.data.decode import decode_batch, decode_into
from facekd.data.pixels import NORMALISE_LUT, PIXEL_MEAN, PIXEL_SCALE
from facekd.errors import DataError

IMAGE_SIZE = 112


# --------------------------------------------------------------------------------------
# Sources: keys, labels and random access to encoded bytes


class RecImages:
    """Image records of a ``.rec`` dataset, by position in ``image_keys()``."""

    def __init__(self, path: str | os.PathLike) -> None:
        from facekd.data.recordio import open_rec

        self.reader = open_rec(path)
        self.name = str(self.reader.rec_path)
        self.keys = self.reader.image_keys()
        self.labels = self.reader.labels()
        self.num_classes = self.reader.num_classes

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int) -> bytes:
        return self.reader.read_image(int(self.keys[index]))[2]


class ShardImages:
    """Samples of a shards folder, by manifest row (random access into the tars)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from facekd.data.shards import ShardSet

        self.name = str(path)
        self.shards = ShardSet(path)
        self.keys = self.shards.keys
        self.labels = self.shards.labels
        self.num_classes = self.shards.num_classes

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int) -> bytes:
        return self.shards.read(index)


def open_source(source: str | os.PathLike) -> RecImages | ShardImages:
    """A shards folder (has ``manifest.parquet``) or a ``.rec`` dataset folder/file."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: training source not found")
    if (path / "manifest.parquet").is_file():
        return ShardImages(path)
    return RecImages(path)


# --------------------------------------------------------------------------------------
# Deterministic epoch plan


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % (1 << 63), epoch, stream]))


_DRAW_ROWS = 1 << 20  # flips drawn a block at a time: no float64 array of every sample


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of all samples, ``Generator.permutation(num_samples)`` exactly.

    Held as int32 below 2**31 samples: a shuffle's draws do not depend on the array's
    dtype, so the order is the same, at half the memory every rank and worker pays.
    """
    order = np.arange(num_samples, dtype=np.int32 if num_samples < 2**31 else np.int64)
    _rng(seed, epoch, 0).shuffle(order)
    return order


def epoch_flips(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Per-sample flip decision of an epoch (independent of ranks and workers).

    ``Generator.random(num_samples) < 0.5`` drawn in blocks (the same stream of doubles),
    so a 42M-sample epoch needs no 340 MB float array.
    """
    rng = _rng(seed, epoch, 1)
    flips = np.empty(num_samples, bool)
    for lo in range(0, num_samples, _DRAW_ROWS):
        hi = min(lo + _DRAW_ROWS, num_samples)
        flips[lo:hi] = rng.random(hi - lo) < 0.5
    return flips


def rank_indices(num_samples: int, seed: int, epoch: int, rank: int, world_size: int
                 ) -> np.ndarray:
    return epoch_permutation(num_samples, seed, epoch)[rank::world_size]


def batches_per_rank(num_samples: int, batch_size: int, rank: int, world_size: int,
                     drop_last: bool) -> int:
    if drop_last:
        return (num_samples // world_size) // batch_size
    mine = len(range(rank, num_samples, world_size))
    return -(-mine // batch_size)


def check_identity_labels(labels: np.ndarray, images_per_identity: int, where: str) -> None:
    """Grouped batches need a real identity on every sample."""
    if images_per_identity > 1 and len(labels) and int(labels.min()) < 0:
        bad = int(np.flatnonzero(labels < 0)[0])
        raise DataError(f"{where}: sample {bad} has no identity label ({int(labels[bad])}); "
                        f"images_per_identity > 1 needs a labelled source")


def num_identity_chunks(labels: np.ndarray, images_per_identity: int) -> int:
    """Chunks per epoch: sum over identities of ceil(images / K)."""
    counts = np.unique(labels, return_counts=True)[1]
    return int(((counts + images_per_identity - 1) // images_per_identity).sum())


def identity_chunks(labels: np.ndarray, images_per_identity: int, seed: int, epoch: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's shuffled chunks (M x K sample indices, one identity each) and their flips.

    Vectorised (one sort of n keys) because every DataLoader worker recomputes it on
    MS1MV3-size sources. Flips are per slot (M x K bool), drawn after the chunk shuffle.
    """
    k = int(images_per_identity)
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    if n == 0:
        return np.empty((0, k), np.int64), np.empty((0, k), bool)
    # identity-major order with a fresh random order inside every identity
    jitter = _rng(seed, epoch, 2).integers(0, 1 << 32, n, dtype=np.int64)
    order = np.argsort((labels - labels.min()) << 32 | jitter, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    counts = np.diff(np.r_[starts, n])
    per_identity = (counts + k - 1) // k
    identity = np.repeat(np.arange(len(starts)), per_identity)
    first_chunk = np.repeat(np.cumsum(per_identity) - per_identity, per_identity)
    slot = (np.arange(len(identity)) - first_chunk)[:, None] * k + np.arange(k)[None, :]
    count = counts[identity][:, None]
    # slots past the identity's last image wrap round to its first images of this epoch
    slot = np.where(slot < count, slot, (slot - count) % count)
    chunks = order[starts[identity][:, None] + slot]
    rng = _rng(seed, epoch, 3)
    chunks = chunks[rng.permutation(len(chunks))]
    flips = rng.random(chunks.shape) < 0.5
    return chunks, flips


# --------------------------------------------------------------------------------------
# Decoding


class _BatchStream:
    """Decodes the batches (uint8 NCHW RGB, labels, keys, flipped) of one rank.

    Lives in DataLoader workers too, so it holds only picklable state. A batch is named by
    ``(seed, epoch, j)``: persistent workers receive that name from the main process's
    sampler each step and compute the epoch plan themselves (cached per epoch) instead of
    being sent index arrays, so one long-lived worker pool serves every epoch.
    """

    def __init__(self, source: Any, batch_size: int, rank: int, world_size: int,
                 flip: bool, drop_last: bool, labelled: bool,
                 pool: BufferPool | None = None, images_per_identity: int = 1,
                 raw_jpeg: bool = False) -> None:
        self.source = source
        self.raw_jpeg = raw_jpeg  # JPEG bytes only: the main process decodes on its device
        self.images_per_identity = images_per_identity
        self.pool = pool  # only in-process: worker batches travel through shared memory
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.flip, self.drop_last, self.labelled = flip, drop_last, labelled
        self._plan_key: tuple[int, int] | None = None
        self._plan: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_plan_key"], state["_plan"] = None, None  # workers compute their own
        return state

    def total(self) -> int:
        """Batches of this rank per epoch."""
        if self.images_per_identity == 1:
            units, per_batch = len(self.source), self.batch_size
        else:
            units = num_identity_chunks(np.asarray(self.source.labels),
                                        self.images_per_identity)
            per_batch = self.batch_size // self.images_per_identity
        return batches_per_rank(units, per_batch, self.rank, self.world_size, self.drop_last)

    def _epoch_plan(self, seed: int, epoch: int) -> Any:
        if self._plan_key != (seed, epoch):
            n = len(self.source)
            if self.images_per_identity == 1:
                self._plan = None  # the old epoch's plan goes before the new one is built
                mine = rank_indices(n, seed, epoch, self.rank, self.world_size)
                if self.world_size > 1:
                    mine = mine.copy()  # not a view keeping every rank's rows alive
                # this rank's flips only, in its row order (flips[mine] of the whole epoch)
                flips = epoch_flips(n, seed, epoch)[mine] if self.flip \
                    else np.zeros(len(mine), bool)
                self._plan = (mine, flips)
            else:
                chunks, chunk_flips = identity_chunks(self.source.labels,
                                                      self.images_per_identity, seed, epoch)
                self._plan = (chunks[self.rank::self.world_size],
                              chunk_flips[self.rank::self.world_size])
            self._plan_key = (seed, epoch)
        return self._plan

    def rows(self, seed: int, epoch: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample rows and flips of batch ``j`` of this rank in ``epoch``."""
        if self.images_per_identity == 1:
            mine, flips = self._epoch_plan(seed, epoch)
            batch = slice(j * self.batch_size, (j + 1) * self.batch_size)
            return mine[batch], flips[batch]
        chunks, chunk_flips = self._epoch_plan(seed, epoch)
        per_batch = self.batch_size // self.images_per_identity
        rows = chunks[j * per_batch:(j + 1) * per_batch].reshape(-1)
        flips = chunk_flips[j * per_batch:(j + 1) * per_batch].reshape(-1)
        return rows, flips if self.flip else np.zeros(len(rows), bool)

    def batch(self, seed: int, epoch: int, j: int,
              scratch: np.ndarray | None = None) -> dict[str, Any]:
        import torch

        keys, labels = self.source.keys, self.source.labels
        rows, batch_flips = self.rows(seed, epoch, j)
        if self.raw_jpeg:
            batch = self._raw_jpeg(rows, batch_flips)
        else:
            shape = (len(rows), 3, IMAGE_SIZE, IMAGE_SIZE)
            images = self.pool.empty(shape, np.uint8) if self.pool \
                else np.empty(shape, np.uint8)
            decode_batch(self.source.read, rows.tolist(), batch_flips.tolist(), images,
                         self.source.name, keys, scratch)
            batch = {"image": torch.from_numpy(images)}
        return {**batch,
                "label": torch.from_numpy(labels[rows].astype(np.int64)) if self.labelled
                else torch.full((len(rows),), -1, dtype=torch.int64),
                "key": torch.from_numpy(keys[rows].astype(np.int64)),
                "flipped": torch.from_numpy(batch_flips.copy()),
                "batch_index": j}

    def _raw_jpeg(self, rows: np.ndarray, flips: np.ndarray) -> dict[str, Any]:
        """Encoded JPEGs packed for device decoding; other payloads decoded here."""
        import torch

        from facekd.data.device_decode import is_jpeg, pack_payloads

        payloads, cpu_rows, cpu_planes = [], [], []
        for i, row in enumerate(rows.tolist()):
            payload = self.source.read(row)
            if is_jpeg(payload):
                payloads.append(payload)
                continue
            plane = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
            decode_into(payload, plane, bool(flips[i]), self.source.name,
                        int(self.source.keys[row]))
            payloads.append(b"")
            cpu_rows.append(i)
            cpu_planes.append(plane)
        buffer, lengths = pack_payloads(payloads)
        fallback = torch.from_numpy(np.stack(cpu_planes)) if cpu_planes \
            else torch.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
        return {"jpeg": buffer, "jpeg_lengths": lengths, "fallback": fallback,
                "fallback_rows": torch.tensor(cpu_rows, dtype=torch.int64)}

    def __getitem__(self, name: tuple[int, int, int]) -> dict[str, Any]:
        return self.batch(*name)

    def batches(self, seed: int, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        scratch = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for j in range(start, self.total()):
            yield self.batch(seed, epoch, j, scratch)


def _map_dataset(stream: _BatchStream) -> Any:
    """``stream`` as a map-style Dataset indexed by batch name (one torch thread per worker)."""
    from torch.utils.data import Dataset

    class _Batches(Dataset):
        def __getitem__(self, name: tuple[int, int, int]) -> dict[str, Any]:
            return stream[name]

    return _Batches()


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # decoding is OpenCV's; torch threads would only contend


class _BatchNames:
    """Sampler in the main process: the names of the batches this pass must yield, read
    from the loader when the pass starts (so ``set_epoch`` / ``load_state_dict`` reach
    workers that outlive the epoch)."""

    def __init__(self, loader: TrainLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        loader = self.loader
        seed, epoch, start = loader.seed, loader.epoch, loader._pass_start  # fixed per pass
        for j in range(start, len(loader)):
            yield (seed, epoch, j)

    def __len__(self) -> int:
        return max(0, len(self.loader) - self.loader._pass_start)


class BufferPool:
    """Reuses batch arrays whose tensors every consumer has dropped.

    A fresh batch array means the kernel zeroes new pages each step (19 MB for a float
    batch of 128), a cost comparable to the normalisation itself. ``torch.from_numpy``
    keeps a reference to its array until the last tensor or view of it dies, so a pooled
    array whose only reference is the pool's is provably free to overwrite.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.arrays: list[np.ndarray] = []

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        import sys

        for i in range(len(self.arrays)):
            # 2 = the list slot + getrefcount's own argument: nobody else holds it
            if sys.getrefcount(self.arrays[i]) == 2 and self.arrays[i].shape == shape \
                    and self.arrays[i].dtype == dtype:
                return self.arrays[i]
        array = np.empty(shape, dtype)
        if len(self.arrays) < self.size:
            self.arrays.append(array)
        return array


_NORMALISE_LUT = NORMALISE_LUT  # facekd.data.pixels: the one rule


def normalise_batch(images: Any, device: Any = None, pool: BufferPool | None = None) -> Any:
    """A loader batch as float32 NCHW in [-1, 1] on ``device``: ``(x - 127.5) / 127.5``.

    The loader yields uint8 (4x fewer bytes through worker shared memory and host->device),
    so every consumer calls this once per batch: the batch moves to ``device`` first
    (non-blocking from pinned memory) and is normalised there. On CPU a 256-entry lookup
    table (``cv2.LUT``) writes exactly those floats in one pass; on an accelerator the same
    float32 arithmetic runs in torch, bit-identical (IEEE division, tested against the
    table). A floating batch (a test stand-in, an already normalised source) is taken as
    normalised and only moved. ``pool`` recycles CPU float batches (no fresh pages per step).
    """
    import torch

    device = images.device if device is None else torch.device(device)
    if images.device != device:
        pinned = device.type == "cuda" and images.device.type == "cpu" and images.is_pinned()
        images = images.to(device, non_blocking=pinned)
    if images.dtype != torch.uint8:
        return images
    if device.type != "cpu":
        return _normalise_arithmetic(images)
    import cv2

    # numpy allocates big arrays with MADV_HUGEPAGE: a fresh 19 MB batch then costs a few
    # page faults instead of thousands (torch.empty's fresh pages cost up to ~40 us/image)
    shape = tuple(images.shape)
    out = pool.empty(shape, np.float32) if pool is not None else np.empty(shape, np.float32)
    if out.size:
        width = out.shape[-1]
        cv2.LUT(images.numpy().reshape(-1, width), _NORMALISE_LUT, dst=out.reshape(-1, width))
    return torch.from_numpy(out)


def _normalise_arithmetic(images: Any) -> Any:
    """The device path of :func:`normalise_batch` (torch ops; exact same floats as the LUT)."""
    return images.float().sub_(float(PIXEL_MEAN)).div_(float(PIXEL_SCALE))


class TrainLoader:
    """Iterable of dict batches with ``set_epoch`` and mid-epoch ``state_dict`` resume."""

    def __init__(self, source: str | os.PathLike | Any, batch_size: int, *, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 flip: bool = True, drop_last: bool = True, labelled: bool = True,
                 images_per_identity: int = 1, pin_memory: bool = False,
                 prefetch_factor: int = 4, persistent_workers: bool = True,
                 decode_device: Any = None) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if images_per_identity < 1 or batch_size % images_per_identity:
            raise DataError(f"batch_size {batch_size} must be a multiple of "
                            f"images_per_identity {images_per_identity} (>= 1)")
        self.source = open_source(source) if isinstance(source, (str, os.PathLike)) else source
        self.images_per_identity = int(images_per_identity)
        self._num_units = len(self.source)  # samples, or identity chunks when K > 1
        if self.images_per_identity > 1:
            labels = np.asarray(self.source.labels)
            check_identity_labels(labels, self.images_per_identity, str(self.source.name))
            self._num_units = num_identity_chunks(labels, self.images_per_identity)
        self.batch_size = batch_size
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.flip, self.drop_last, self.labelled = flip, drop_last, labelled
        self.num_classes = int(self.source.num_classes)
        self._batches_done = 0
        self._resumed_complete = False
        self._pool = BufferPool()
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = int(prefetch_factor)
        self.persistent_workers = bool(persistent_workers)
        self._pass_start = 0
        self._workers: Any = None   # the DataLoader, built on the first pass and kept
        self.decode_device = decode_device  # None: workers decode; else JPEGs decode there

    @property
    def num_samples(self) -> int:
        return len(self.source)

    def __len__(self) -> int:
        return batches_per_rank(self._num_units, self.batch_size // self.images_per_identity,
                                self.rank, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._batches_done = 0
        self._resumed_complete = False

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self._batches_done,
                "num_samples": len(self.source), "batch_size": self.batch_size,
                "rank": self.rank, "world_size": self.world_size,
                "images_per_identity": self.images_per_identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("num_samples", "batch_size", "world_size", "images_per_identity"):
            mine = len(self.source) if name == "num_samples" else getattr(self, name)
            # states saved before grouped batches existed were plain (K = 1)
            saved = int(state.get(name, 1 if name == "images_per_identity" else mine))
            if saved != mine:
                raise DataError(f"loader state: {name} was {saved}, now {mine}; the "
                                f"data or batch layout changed, cannot resume mid-epoch")
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self._batches_done = int(state["batches_done"])
        # a state saved after the epoch's last batch resumes to an empty pass, not a
        # repeat of the epoch (a teacher cache would otherwise see every sample twice)
        self._resumed_complete = self._batches_done >= len(self)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._resumed_complete:
            self._resumed_complete = False
            return
        start = self._batches_done if self._batches_done < len(self) else 0
        self._batches_done = start
        self._pass_start = start
        if self.num_workers > 0:
            raw: Any = self._worker_loader()
        else:
            stream = _BatchStream(self.source, self.batch_size, self.rank, self.world_size,
                                  self.flip, self.drop_last, self.labelled, pool=self._pool,
                                  images_per_identity=self.images_per_identity,
                                  raw_jpeg=self.decode_device is not None)
            raw = stream.batches(self.seed, self.epoch, start)
        for batch in raw:
            batch.pop("batch_index")
            if self.pin_memory and self.num_workers <= 0:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            if self.decode_device is not None:
                from facekd.data.device_decode import decode_on_device

                batch["image"] = decode_on_device(
                    batch.pop("jpeg"), batch.pop("jpeg_lengths"), batch["flipped"],
                    self.decode_device, IMAGE_SIZE, batch.pop("fallback"),
                    batch.pop("fallback_rows"))
            self._batches_done += 1
            yield batch

    def _worker_loader(self) -> Any:
        """The DataLoader over worker processes: pinned batches when asked (CUDA), workers
        kept across epochs (no re-fork and re-open of the source each epoch) and
        ``prefetch_factor`` batches in flight per worker."""
        if self._workers is None or not self.persistent_workers:
            from torch.utils.data import DataLoader

            stream = _BatchStream(self.source, self.batch_size, self.rank, self.world_size,
                                  self.flip, self.drop_last, self.labelled, pool=None,
                                  images_per_identity=self.images_per_identity,
                                  raw_jpeg=self.decode_device is not None)
            self._workers = DataLoader(_map_dataset(stream), batch_size=None,
                                       sampler=_BatchNames(self),
                                       num_workers=self.num_workers,
                                       pin_memory=self.pin_memory,
                                       prefetch_factor=self.prefetch_factor,
                                       persistent_workers=self.persistent_workers,
                                       worker_init_fn=_worker_init)
        return self._workers


def build_train_loader(source: str | os.PathLike | Any, batch_size: int, *, seed: int = 0,
                       epoch: int = 0, rank: int = 0, world_size: int = 1,
                       num_workers: int = 0, flip: bool = True, drop_last: bool = True,
                       labelled: bool = True, images_per_identity: int = 1,
                       pin_memory: bool = False, prefetch_factor: int = 4,
                       persistent_workers: bool = True,
                       decode_device: Any = None) -> TrainLoader:
    """The training loader over a shards folder or ``.rec`` dataset (see module docstring).

    Batches are dicts: ``image`` uint8 N x 3 x 112 x 112 RGB (turn it into the [-1, 1]
    float input with ``normalise_batch(batch["image"], device)``), ``label`` and ``key``
    int64, ``flipped`` bool.
    ``labelled=False`` gives label -1 on every row: a second, unlabelled source for
    semi-supervised distillation is simply a second loader built this way.
    ``images_per_identity=K > 1`` gives P x K batches (``batch_size / K`` identities with K
    images each, consecutive rows); ``batch_size`` must be a multiple of K.
    ``pin_memory`` (the trainer sets it on CUDA) yields page-locked batches, so the
    ``non_blocking`` host-to-device copies overlap; worker processes persist across epochs
    and keep ``prefetch_factor`` batches each in flight. ``decode_device`` (e.g. the
    trainer's GPU): workers send the JPEG bytes and the batch is decoded there
    (:mod:`facekd.data.device_decode`); ``image`` is then uint8 on that device.
    """
    return TrainLoader(source, batch_size, seed=seed, epoch=epoch, rank=rank,
                       world_size=world_size, num_workers=num_workers, flip=flip,
                       drop_last=drop_last, labelled=labelled,
                       images_per_identity=images_per_identity, pin_memory=pin_memory,
                       prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                       decode_device=decode_device)
