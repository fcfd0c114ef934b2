"""The one embedding path: torch modules, facekd checkpoints, arcface_torch state dicts,
run folders and ONNX files.

An embedder is a callable from a float32 NCHW batch in [-1, 1] (numpy or tensor) to
float32 numpy embeddings, so training-time checks, evaluation, export and calibration
never care what runs underneath. :func:`load_embedder` takes every model form a command
accepts; :func:`as_embedder` also takes an ``nn.Module`` or any such callable.

Input scaling has one rule, :func:`input_is_raw_pixels`: a facekd file's metadata says
where ``(x - 127.5) / 127.5`` lives; a file from elsewhere follows insightface's
ArcFaceONNX (``Sub`` and ``Mul`` among the first nodes mean the graph takes raw 0..255
pixels). Either way the caller feeds [-1, 1] and the embedder converts, exactly once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facekd.data.pixels import to_raw_pixels
from facekd.devices import pick_device
from facekd.errors import CheckpointError

NORMALIZATION_KEY = "facekd.input_normalization"  # ONNX metadata: "inside" | "outside"


def _as_numpy(batch: Any) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"embedder expects an N x 3 x H x W batch, got shape {batch.shape}")
    return batch


class Embedder:
    """Base: ``name`` (for reports), ``sha256`` of the weights file (empty: never cached),
    ``embedding_size``."""

    name: str = ""
    sha256: str = ""
    embedding_size: int | None = None

    def __call__(self, batch: Any) -> np.ndarray:
        raise NotImplementedError


class TorchEmbedder(Embedder):
    """An ``nn.Module`` backbone in eval mode, without gradients.

    ``device`` None leaves the module where it is (a student in training is not moved);
    a tensor batch stays on its device until the model's.
    """

    def __init__(self, model: nn.Module, name: str = "", sha256: str = "",
                 device: str | torch.device | None = None):
        if device is not None:
            model = model.to(torch.device(device))
        self.model = model.eval()
        self.name = name or type(model).__name__
        self.sha256 = sha256
        self.embedding_size = getattr(model, "num_features", None)

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def __call__(self, batch: Any) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            x = batch.float()
        else:
            x = torch.from_numpy(_as_numpy(batch))
        with torch.no_grad():
            return self.model(x.to(self.device)).float().cpu().numpy()


class OnnxEmbedder(Embedder):
    """onnxruntime session; CUDA provider when available and not asked for CPU.

    ``session`` may be given (export's parity gate uses its own single-thread CPU one).
    """

    def __init__(self, path: str | os.PathLike, sha256: str = "",
                 device: str | torch.device | None = None, session: Any = None):
        if session is None:
            session = _onnx_session(path, device)
        self.session = session
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise CheckpointError(f"{path}: expected one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_dtype = np.float16 if "float16" in inputs[0].type else np.float32
        batch_dim = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.raw_pixels = input_is_raw_pixels(path)
        self.output_name = outputs[0].name
        dim = outputs[0].shape[-1] if outputs[0].shape else None
        self.embedding_size = dim if isinstance(dim, int) else None
        self.name = Path(path).stem + (" (normalises inside)" if self.raw_pixels else "")
        self.sha256 = sha256

    def __call__(self, batch: Any) -> np.ndarray:
        x = _as_numpy(batch)
        if self.raw_pixels:  # the graph subtracts/scales itself: feed 0..255 like insightface
            x = to_raw_pixels(x)
        x = x.astype(self.input_dtype, copy=False)
        step = self.fixed_batch or len(x)
        outs = [self.session.run([self.output_name],
                                 {self.input_name: np.ascontiguousarray(x[i:i + step])})[0]
                for i in range(0, len(x), max(step, 1))]
        return np.concatenate([np.asarray(o, dtype=np.float32).reshape(len(o), -1)
                               for o in outs]) if outs else np.zeros((0, 0), np.float32)


def _onnx_session(path: str | os.PathLike, device: str | torch.device | None) -> Any:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if (pick_device(device).type == "cuda"
            and "CUDAExecutionProvider" in ort.get_available_providers()):
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise CheckpointError(f"{path}: onnxruntime cannot load it: "
                              f"{str(exc).splitlines()[0]}") from exc


def input_is_raw_pixels(model: str | os.PathLike | Any) -> bool:
    """Whether an ONNX file (path or loaded ModelProto) takes raw 0..255 pixels.

    The file's ``facekd.input_normalization`` metadata decides when present; otherwise
    insightface's ArcFaceONNX rule: ``Sub`` and ``Mul`` among the first 8 node names mean
    the graph normalises itself (MXNet-converted models), else the input is [-1, 1].
    """
    if isinstance(model, (str, os.PathLike)):
        import onnx

        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception:  # unreadable here but loadable by onnxruntime: the usual input
            return False
    for prop in model.metadata_props:
        if prop.key == NORMALIZATION_KEY and prop.value in ("inside", "outside"):
            return prop.value == "inside"
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


def load_embedder(path: str | os.PathLike, arch: str | None = None,
                  device: str | torch.device | None = None) -> Embedder:
    """Embedder for a facekd checkpoint or run folder, an arcface_torch state dict (+ arch)
    or an ``.onnx`` file."""
    from facekd.fileio import sha256_file
    from facekd.models.checkpoint import load_backbone, resolve_model_file

    path = resolve_model_file(path)
    digest = sha256_file(path)
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path, sha256=digest, device=device)
    model, info = load_backbone(path, arch=arch)
    return TorchEmbedder(model, name=f"{path.stem} ({info['arch']})", sha256=digest,
                         device=pick_device(device))


def as_embedder(model: Any, arch: str | None = None,
                device: str | torch.device | None = None) -> Any:
    """An embedder from any model form: a path (see :func:`load_embedder`), an
    ``nn.Module``, or a callable batch -> embeddings (returned as is)."""
    if isinstance(model, (str, os.PathLike)):
        return load_embedder(model, arch=arch, device=device)
    if isinstance(model, nn.Module):
        return TorchEmbedder(model, device=device)
    if not callable(model):
        raise TypeError(f"{type(model).__name__} is not an embedder")
    return model
