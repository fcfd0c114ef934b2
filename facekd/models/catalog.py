"""The name -> factory table behind the backbone registry.

Kept apart from :mod:`facekd.models.registry` so architecture modules can register
themselves without importing the registry that imports them (no import cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from facekd.errors import FacekdError

MODELS: dict[str, Callable[..., Any]] = {}


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: register a model factory under its function name.

    Registering the same factory again (a re-import, an idempotent helper) is fine; a
    different factory under a taken name is refused, as the method registry does, so a
    plugin cannot silently replace a built-in architecture.
    """
    name = fn.__name__
    known = MODELS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (
            fn.__module__, fn.__qualname__):
        raise FacekdError(f"model '{name}' registered twice ({known.__module__}."
                          f"{known.__qualname__} and {fn.__module__}.{fn.__qualname__})")
    MODELS[name] = fn
    return fn
