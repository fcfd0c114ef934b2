"""MobileFaceNet students: arcface_torch's ``mbf`` / ``mbf_large`` and the original 2018 net.

``MobileFaceNet`` keeps arcface_torch's module names (``layers.N``, ``conv_sep``,
``features``) so its ``model.pt`` files load with ``strict=True``. ``expand`` and
``stem_groups`` generalise its hard-coded widths only so that ``mbf_tiny`` can exist;
their defaults reproduce the original exactly. ``OriginalMobileFaceNet`` follows Chen et
al. 2018 (bottlenecks t/c/n/s of their Table 1, GDConv head, 128-d).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from facekd.models.catalog import register_model
from facekd.models.layers import autocast_if


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class ConvBlock(nn.Module):
    """Conv + BN + PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                 groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding,
                      bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv + BN without activation (the linear bottleneck projection)."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                 groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: expand to ``groups`` channels, depthwise conv, project."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, kernel=(3, 3),
                 stride=(2, 2), padding=(1, 1), groups: int = 1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups),
            ConvBlock(groups, groups, kernel, stride, padding, groups=groups),
            LinearBlock(groups, out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    def __init__(self, c: int, num_block: int, groups: int, kernel=(3, 3), stride=(1, 1),
                 padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[
            DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the 7x7 map, then a linear embedding + BN."""

    def __init__(self, embedding_size: int, channels: int = 512):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, (7, 7), groups=channels),
            Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """arcface_torch's MobileFaceNet; stage maps at 56, 28, 14 and 7 px for feature hooks."""

    default_feature_layers = ("layers.1", "layers.3", "layers.5", "conv_sep")

    def __init__(self, num_features: int = 512, blocks: Sequence[int] = (1, 4, 6, 2),
                 scale: float = 2, fp16: bool = False,
                 expand: Sequence[int] = (128, 128, 256, 256, 512, 256),
                 stem_groups: int = 64, sep_channels: int = 512):
        super().__init__()
        self.num_features = num_features
        self.fp16 = fp16
        c1, c2 = int(64 * scale), int(128 * scale)
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c1, (3, 3), (2, 2), (1, 1)))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, (3, 3), (1, 1), (1, 1), groups=stem_groups))
        else:
            self.layers.append(Residual(c1, blocks[0], expand[0]))
        self.layers.extend([
            DepthWise(c1, c1, groups=expand[0]),
            Residual(c1, blocks[1], expand[1]),
            DepthWise(c1, c2, groups=expand[2]),
            Residual(c2, blocks[2], expand[3]),
            DepthWise(c2, c2, groups=expand[4]),
            Residual(c2, blocks[3], expand[5]),
        ])
        self.conv_sep = ConvBlock(c2, sep_channels)
        self.features = GDC(num_features, sep_channels)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_if(self.fp16, x):
            for layer in self.layers:
                x = layer(x)
        x = self.conv_sep(x.float() if self.fp16 else x)
        return self.features(x)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                m.bias.data.zero_()


class Bottleneck(nn.Module):
    """MobileNetV2 bottleneck with PReLU (expansion t), residual when shapes allow."""

    def __init__(self, in_c: int, out_c: int, stride: int, t: int):
        super().__init__()
        hidden = in_c * t
        self.residual = stride == 1 and in_c == out_c
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, (3, 3), (stride, stride), (1, 1), groups=hidden),
            LinearBlock(hidden, out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class OriginalMobileFaceNet(nn.Module):
    """Chen et al. 2018: 0.99M parameters, 128-d embedding, stages at 56/28/14/7 px."""

    default_feature_layers = ("conv2_dw", "stage1", "stage2", "conv_sep")
    # (t, c, n, s) per bottleneck row of the paper's Table 1, grouped by output resolution.
    settings = (((2, 64, 5, 2),), ((4, 128, 1, 2), (2, 128, 6, 1)),
                ((4, 128, 1, 2), (2, 128, 2, 1)))

    def __init__(self, num_features: int = 128, fp16: bool = False):
        super().__init__()
        self.num_features = num_features
        self.fp16 = fp16
        self.conv1 = ConvBlock(3, 64, (3, 3), (2, 2), (1, 1))
        self.conv2_dw = ConvBlock(64, 64, (3, 3), (1, 1), (1, 1), groups=64)
        in_c = 64
        for index, rows in enumerate(self.settings, start=1):
            blocks = []
            for t, c, n, s in rows:
                for i in range(n):
                    blocks.append(Bottleneck(in_c, c, s if i == 0 else 1, t))
                    in_c = c
            setattr(self, f"stage{index}", nn.Sequential(*blocks))
        self.conv_sep = ConvBlock(in_c, 512)
        self.features = GDC(num_features, 512)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_if(self.fp16, x):
            x = self.conv2_dw(self.conv1(x))
            x = self.stage3(self.stage2(self.stage1(x)))
        x = self.conv_sep(x.float() if self.fp16 else x)
        return self.features(x)


@register_model
def mbf(num_features: int = 512, **kwargs) -> MobileFaceNet:
    """arcface_torch ``get_mbf``: blocks (1, 4, 6, 2), scale 2."""
    return MobileFaceNet(num_features, blocks=(1, 4, 6, 2), scale=2, **kwargs)


@register_model
def mbf_large(num_features: int = 512, **kwargs) -> MobileFaceNet:
    """arcface_torch ``get_mbf_large``: blocks (2, 8, 12, 4), scale 4."""
    return MobileFaceNet(num_features, blocks=(2, 8, 12, 4), scale=4, **kwargs)


@register_model
def mobilefacenet(num_features: int = 128, **kwargs) -> OriginalMobileFaceNet:
    """The original MobileFaceNet of Chen et al. 2018 (128-d)."""
    return OriginalMobileFaceNet(num_features, **kwargs)


@register_model
def mbf_tiny(num_features: int = 128, **kwargs) -> MobileFaceNet:
    """A CPU-sized mbf (quarter widths, one block per stage) for tests and the demo.

    Its 56 px stem conv is fully depthwise (mbf's uses 2 channels per group): ~20 %
    faster train steps on CPU for the same capacity.
    """
    kwargs.setdefault("blocks", (1, 1, 1, 1))
    kwargs.setdefault("scale", 0.5)
    kwargs.setdefault("expand", (32, 32, 64, 64, 128, 64))
    kwargs.setdefault("stem_groups", 32)
    kwargs.setdefault("sep_channels", 128)
    return MobileFaceNet(num_features, **kwargs)
