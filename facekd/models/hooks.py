"""Forward hooks that expose named intermediate feature maps without editing the model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from facekd.errors import ConfigError


class FeatureHooks:
    """Record the outputs of named submodules on every forward pass.

    ``features`` maps each name to the latest output (kept in the graph, so a student's
    features carry gradients). Use as a context manager or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool = False):
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self.detach = detach
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            sample = ", ".join(n for n in list(modules)[1:8])
            raise ConfigError(f"{type(model).__name__} has no module named '{missing[0]}' "
                              f"(modules look like: {sample}, ...)")
        self._handles = [modules[n].register_forward_hook(self._make_hook(n))
                         for n in self.names]

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            self.features[name] = output.detach() if self.detach else output
        return hook

    def ordered(self) -> list[torch.Tensor]:
        """Feature maps in the order the names were given."""
        return [self.features[n] for n in self.names]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
