"""JPEG batches decoded on the training device (nvJPEG through torchvision on CUDA).

When CPU decoding would bound a GPU (few cores per GPU, a fast student), the loader's
workers only read the encoded bytes and pack a batch of them into one buffer; the main
process decodes the whole batch with ``torchvision.io.decode_jpeg(..., device=...)`` and
mirrors the flipped rows there. The result is the same uint8 NCHW RGB batch the CPU path
yields (on CPU, torchvision's libjpeg-turbo decode equals OpenCV's bit for bit: tested;
nvJPEG's tolerance is measured by ``bench/gpu_check.py``). Anything that is not a plain
112x112 JPEG (PNG, another size, a corrupt record) is decoded by the CPU path instead,
in the worker, so the option never changes which images a run can read.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

JPEG_MAGIC = b"\xff\xd8"


def pack_payloads(payloads: list[bytes]) -> tuple[Any, Any]:
    """One uint8 buffer + int64 lengths: a single shared-memory tensor per batch instead
    of one per image on the way from a worker to the main process."""
    import torch

    lengths = torch.tensor([len(p) for p in payloads], dtype=torch.int64)
    buffer = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8) \
        if payloads and int(lengths.sum()) else torch.zeros(0, dtype=torch.uint8)
    return buffer, lengths


def is_jpeg(payload: bytes) -> bool:
    return payload[:2] == JPEG_MAGIC


def decode_on_device(buffer: Any, lengths: Any, flipped: Any, device: Any, size: int,
                     fallback: Any = None, fallback_rows: Any = None) -> Any:
    """Decode a packed JPEG batch on ``device`` into uint8 N x 3 x size x size RGB.

    ``fallback_rows`` (int64) are rows the worker already decoded on the CPU
    (``fallback``, K x 3 x size x size, flips applied); their bytes are empty here.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    n = len(lengths)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    cpu_rows = set() if fallback_rows is None else set(fallback_rows.tolist())
    rows = [i for i in range(n) if i not in cpu_rows]
    if rows:
        parts = torch.split(buffer, lengths.tolist())
        with warnings.catch_warnings():  # torchvision 0.29 points at TorchCodec; same decoder
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg([parts[i] for i in rows], mode=ImageReadMode.RGB,
                                 device=device)
        flips = flipped.tolist()
        ok = [k for k, image in enumerate(images) if image.shape == (3, size, size)]
        if ok:
            good = torch.stack([images[k] for k in ok])
            index = torch.tensor([rows[k] for k in ok], dtype=torch.int64)
            mirror = torch.tensor([flips[rows[k]] for k in ok]).to(device)[:, None, None, None]
            out[index.to(device)] = torch.where(mirror, good.flip(-1), good)
        for k in sorted(set(range(len(rows))) - set(ok)):
            i = rows[k]  # another size: the CPU path resizes it exactly as always
            out[i] = _cpu_decode(parts[i], bool(flips[i]), size).to(device)
    if cpu_rows:
        out[fallback_rows.to(device)] = fallback.to(device, non_blocking=True)
    return out


def _cpu_decode(payload: Any, flip: bool, size: int) -> Any:
    import torch

    from facekd.data.decode import decode_into

    plane = np.empty((3, size, size), np.uint8)
    decode_into(payload.numpy().tobytes(), plane, flip, "device decode", -1)
    return torch.from_numpy(plane)
