"""Small pieces the backbones share."""

from __future__ import annotations

from typing import Any


def autocast_if(enabled: bool, x: Any) -> Any:
    """Autocast on ``x``'s device when ``enabled`` (the backbones' ``fp16`` flag); a no-op
    context otherwise, so meta-device shape passes (MAC counting) work too."""
    import contextlib

    import torch

    return torch.autocast(x.device.type) if enabled else contextlib.nullcontext()
