"""One embedding path for evaluation and export: torch checkpoints and ONNX files alike.

An embedder is a callable from a float32 NCHW batch in [-1, 1] (numpy or tensor) to
float32 numpy embeddings, so verification/IJB code never cares what runs underneath.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facekd.devices import pick_device
from facekd.errors import CheckpointError


def _as_numpy(batch: Any) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"embedder expects an N x 3 x H x W batch, got shape {batch.shape}")
    return batch


class Embedder:
    """Base: ``name`` (for reports), ``sha256`` of the weights file, ``embedding_size``."""

    name: str = ""
    sha256: str = ""
    embedding_size: int | None = None

    def __call__(self, batch: Any) -> np.ndarray:
        raise NotImplementedError


class TorchEmbedder(Embedder):
    """Wraps an ``nn.Module`` backbone; runs in eval mode without gradients."""

    def __init__(self, model: nn.Module, name: str = "", sha256: str = "",
                 device: str | torch.device | None = None):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.name = name or type(model).__name__
        self.sha256 = sha256
        self.embedding_size = getattr(model, "num_features", None)

    def __call__(self, batch: Any) -> np.ndarray:
        x = torch.from_numpy(_as_numpy(batch)).to(self.device)
        with torch.no_grad():
            return self.model(x).float().cpu().numpy()


class OnnxEmbedder(Embedder):
    """onnxruntime session; CUDA provider when available and not asked for CPU."""

    def __init__(self, path: str | os.PathLike, sha256: str = "",
                 device: str | torch.device | None = None):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if (pick_device(device).type == "cuda"
                and "CUDAExecutionProvider" in ort.get_available_providers()):
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise CheckpointError(f"{path}: onnxruntime cannot load it: "
                                  f"{str(exc).splitlines()[0]}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise CheckpointError(f"{path}: expected one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_dtype = np.float16 if "float16" in inputs[0].type else np.float32
        batch_dim = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.raw_pixels = graph_normalises_input(path)
        self.output_name = outputs[0].name
        dim = outputs[0].shape[-1] if outputs[0].shape else None
        self.embedding_size = dim if isinstance(dim, int) else None
        self.name = Path(path).stem
        self.sha256 = sha256

    def __call__(self, batch: Any) -> np.ndarray:
        x = _as_numpy(batch)
        if self.raw_pixels:  # the graph subtracts/scales itself: feed 0..255 like insightface
            x = x * 127.5 + 127.5
        x = x.astype(self.input_dtype, copy=False)
        step = self.fixed_batch or len(x)
        outs = [self.session.run([self.output_name], {self.input_name: x[i:i + step]})[0]
                for i in range(0, len(x), max(step, 1))]
        return np.concatenate([np.asarray(o, dtype=np.float32).reshape(len(o), -1)
                               for o in outs]) if outs else np.zeros((0, 0), np.float32)


def graph_normalises_input(path: str | os.PathLike) -> bool:
    """insightface's ArcFaceONNX rule: Sub and Mul among the first 8 nodes mean the graph
    normalises raw 0..255 pixels itself (MXNet-converted models); else input is [-1, 1]."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # unreadable here but loadable by onnxruntime: assume the usual input
        return False
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


def load_embedder(path: str | os.PathLike, arch: str | None = None,
                  device: str | torch.device | None = None) -> Embedder:
    """Embedder for a facekd checkpoint, an arcface_torch state dict (+ arch) or ``.onnx``."""
    from facekd.fileio import sha256_file
    from facekd.models.checkpoint import load_backbone

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    digest = sha256_file(path)
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path, sha256=digest, device=device)
    model, info = load_backbone(path, arch=arch)
    return TorchEmbedder(model, name=f"{path.stem} ({info['arch']})", sha256=digest,
                         device=device)
