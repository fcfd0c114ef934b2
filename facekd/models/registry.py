"""Backbone registry: one name per architecture, timm-style.

Names are what recipes, checkpoints (``"arch"``) and ``facekd models list`` use, so a
checkpoint can always be rebuilt from its name and kwargs alone.
"""

from __future__ import annotations

from typing import Any

from facekd.errors import FacekdError
from facekd.models.catalog import MODELS as _MODELS
from facekd.models.catalog import register_model

__all__ = ["create_model", "embedding_size", "feature_channels", "feature_layers",
           "feature_shapes", "format_model_table", "list_models", "model_info",
           "register_model"]

_BUILTINS_LOADED = False


def _load_builtins() -> None:
    # Imported lazily so importing the registry never drags every architecture in.
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        from facekd.models import iresnet, mobilefacenet  # noqa: F401

        _BUILTINS_LOADED = True


def list_models() -> list[str]:
    """Registered architecture names, teachers (IResNet) first."""
    _load_builtins()
    return list(_MODELS)


def create_model(name: str, **kwargs: Any):
    """Build the backbone ``name``; kwargs go to its factory (e.g. ``num_features``)."""
    _load_builtins()
    if name not in _MODELS:
        raise FacekdError(f"unknown model '{name}'; known: {', '.join(_MODELS)}")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as exc:
        raise FacekdError(f"model '{name}': bad arguments {kwargs}: {exc}") from exc


def model_info(name: str, **kwargs: Any) -> dict[str, Any]:
    """Params, MACs at 112x112 and embedding size, counted on a freshly built model."""
    import torch

    from facekd.models.flops import count_macs, count_params

    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = create_model(name, **kwargs)
    return {
        "name": name,
        "params": count_params(model),
        "macs": count_macs(model),
        "embedding_size": embedding_size(model),
    }


def embedding_size(model) -> int:
    """Embedding size a backbone produces (every facekd backbone sets ``num_features``)."""
    size = getattr(model, "num_features", None)
    if size is None:
        raise FacekdError(f"{type(model).__name__} has no num_features attribute")
    return int(size)


def feature_layers(model) -> list[str]:
    """Default multi-scale feature-map module names for hooks (last spatial map last)."""
    names = getattr(model, "default_feature_layers", None)
    if not names:
        raise FacekdError(f"{type(model).__name__} exposes no feature layers")
    return list(names)


def feature_channels(model, layers: list[str] | None = None,
                     input_size: tuple[int, int] = (112, 112)) -> list[int]:
    """Channels of the named feature maps, found with one tiny forward pass on the model."""
    return [shape[0] for shape in feature_shapes(model, layers, input_size)]


def feature_shapes(model, layers: list[str] | None = None,
                   input_size: tuple[int, int] = (112, 112)) -> list[tuple[int, ...]]:
    """(C, H, W) of the named feature maps for one input image."""
    import torch

    from facekd.models.hooks import FeatureHooks

    layers = feature_layers(model) if layers is None else list(layers)
    was_training = model.training
    param = next(model.parameters())
    model.eval()
    try:
        with FeatureHooks(model, layers) as hooks, torch.no_grad():
            model(torch.zeros(1, 3, *input_size, dtype=param.dtype, device=param.device))
            return [tuple(hooks.features[n].shape[1:]) for n in layers]
    finally:
        model.train(was_training)


def format_model_table(as_json: bool = False) -> str:
    """The `facekd models list` output: one row per registered architecture."""
    import json

    rows = [model_info(name) for name in list_models()]
    if as_json:
        return json.dumps(rows, indent=2)
    lines = [f"{'name':<14} {'params (M)':>10} {'GMACs':>8} {'embedding':>9}"]
    lines += [f"{r['name']:<14} {r['params'] / 1e6:>10.2f} {r['macs'] / 1e9:>8.3f} "
              f"{r['embedding_size']:>9d}" for r in rows]
    return "\n".join(lines)
