"""IResNet (the ArcFace "improved ResNet") with arcface_torch's module names.

Parameter names and order match ``backbones/iresnet.py`` of insightface's arcface_torch,
so released ``backbone.pth`` files load with ``strict=True`` and give the same outputs.
``widths`` is an addition (default = the published 64..512) for the CPU-sized ``r_tiny``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from facekd.models.catalog import register_model
from facekd.models.layers import autocast_if


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN-conv-BN-PReLU-conv-BN residual block; the stride sits on the second conv."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """Stem at full resolution, four stride-2 stages, BN-flatten-FC-BN embedding."""

    fc_scale = 7 * 7
    default_feature_layers = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, layers: Sequence[int], num_features: int = 512, dropout: float = 0.0,
                 widths: Sequence[int] = (64, 128, 256, 512), fp16: bool = False):
        super().__init__()
        self.num_features = num_features
        self.fp16 = fp16
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(widths[3] * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # as arcface_torch: a fixed-gamma BN
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 2) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_if(self.fp16, x):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)


@register_model
def r18(num_features: int = 512, **kwargs) -> IResNet:
    return IResNet([2, 2, 2, 2], num_features, **kwargs)


@register_model
def r34(num_features: int = 512, **kwargs) -> IResNet:
    return IResNet([3, 4, 6, 3], num_features, **kwargs)


@register_model
def r50(num_features: int = 512, **kwargs) -> IResNet:
    return IResNet([3, 4, 14, 3], num_features, **kwargs)


@register_model
def r100(num_features: int = 512, **kwargs) -> IResNet:
    return IResNet([3, 13, 30, 3], num_features, **kwargs)


@register_model
def r200(num_features: int = 512, **kwargs) -> IResNet:
    return IResNet([6, 26, 60, 6], num_features, **kwargs)


@register_model
def r_tiny(num_features: int = 256, **kwargs) -> IResNet:
    """A CPU-sized IResNet (one block per stage, widths 16..128): a toy teacher for tests."""
    kwargs.setdefault("widths", (16, 32, 64, 128))
    return IResNet([1, 1, 1, 1], num_features, **kwargs)
