"""facekd.models: backbones, margin heads, Partial FC, checkpoints, teachers, embedders.

Attributes are resolved lazily (PEP 562) so that ``facekd.models.commands`` can be
imported by the CLI without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_model": "facekd.models.registry",
    "list_models": "facekd.models.registry",
    "model_info": "facekd.models.registry",
    "register_model": "facekd.models.registry",
    "feature_layers": "facekd.models.registry",
    "feature_channels": "facekd.models.registry",
    "embedding_size": "facekd.models.registry",
    "FeatureHooks": "facekd.models.hooks",
    "create_head": "facekd.models.heads",
    "MarginHead": "facekd.models.heads",
    "PartialFC": "facekd.models.partial_fc",
    "save_checkpoint": "facekd.models.checkpoint",
    "load_backbone": "facekd.models.checkpoint",
    "load_teacher": "facekd.models.teacher",
    "Teacher": "facekd.models.teacher",
    "load_embedder": "facekd.models.embedder",
    "Embedder": "facekd.models.embedder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'facekd.models' has no attribute '{name}'")
