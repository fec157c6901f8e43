"""OSNet-AIN: OSNet with instance normalisation placed by neural architecture search.

Paper: Zhou, Yang, Cavallaro, Xiang, "Learning Generalisable Omni-Scale Representations for
Person Re-Identification", TPAMI 2021 (https://arxiv.org/abs/1910.06827).
Upstream: https://github.com/KaiyangZhou/deep-person-reid (torchreid/models/osnet_ain.py).

Names mirror torchreid: streams live in `conv2` (a ModuleList of `LightConvStream`), and the
stage transitions are `pool2`/`pool3` rather than the last entry of each stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_builder.osnet import (
    ChannelGate,
    Conv1x1,
    Conv1x1Linear,
    ConvLayer,
    LightConv3x3,
    build_embedding_head,
    init_osnet_parameters,
)
from osnet_base.contract import FEATURE_DIM


class LightConvStream(nn.Module):
    """`depth` stacked Lite 3x3 convolutions."""

    def __init__(self, in_channels: int, out_channels: int, depth: int):
        super().__init__()
        layers = [LightConv3x3(in_channels, out_channels)]
        layers += [LightConv3x3(out_channels, out_channels) for _ in range(depth - 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class OSBlockAIN(nn.Module):
    """Omni-scale block; with `instance_norm`, an affine InstanceNorm replaces conv3's BatchNorm
    inside the residual branch (torchreid's `OSBlockINin`), otherwise torchreid's `OSBlock`."""

    def __init__(self, in_channels: int, out_channels: int, instance_norm: bool, reduction: int = 4, num_streams: int = 4):
        super().__init__()
        mid_channels = out_channels // reduction
        self.conv1 = Conv1x1(in_channels, mid_channels)
        self.conv2 = nn.ModuleList(LightConvStream(mid_channels, mid_channels, t) for t in range(1, num_streams + 1))
        self.gate = ChannelGate(mid_channels)
        self.conv3 = Conv1x1Linear(mid_channels, out_channels, bn=not instance_norm)
        self.downsample = Conv1x1Linear(in_channels, out_channels) if in_channels != out_channels else None
        self.IN = nn.InstanceNorm2d(out_channels, affine=True) if instance_norm else None

    def streams(self) -> list[nn.Module]:
        return list(self.conv2)

    def aggregate(self, x1: torch.Tensor) -> torch.Tensor:
        """The streams fused by the shared gate: what the fused kernels replace."""
        gated = [self.gate(stream(x1)) for stream in self.streams()]
        return gated[0] + gated[1] + gated[2] + gated[3]

    def residual_output(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x3 = self.conv3(x2)
        if self.IN is not None:
            x3 = self.IN(x3)  # inside the residual branch, unlike OSBlock
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(x3 + identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual_output(x, self.aggregate(self.conv1(x)))


# Which blocks of each stage carry instance norm, as searched in the paper (torchreid's table).
AIN_STAGE_INSTANCE_NORM = ((True, True), (False, True), (True, False))


class OSNetAIN(nn.Module):
    """OSNet-AIN backbone + `fc` embedding head; `forward` returns torchreid's eval feature."""

    def __init__(self, channels: tuple[int, int, int, int], feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.feature_dim = feature_dim
        self.conv1 = ConvLayer(3, channels[0], 7, stride=2, padding=3, instance_norm=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = self._make_stage(channels[0], channels[1], AIN_STAGE_INSTANCE_NORM[0])
        self.pool2 = nn.Sequential(Conv1x1(channels[1], channels[1]), nn.AvgPool2d(2, stride=2))
        self.conv3 = self._make_stage(channels[1], channels[2], AIN_STAGE_INSTANCE_NORM[1])
        self.pool3 = nn.Sequential(Conv1x1(channels[2], channels[2]), nn.AvgPool2d(2, stride=2))
        self.conv4 = self._make_stage(channels[2], channels[3], AIN_STAGE_INSTANCE_NORM[2])
        self.conv5 = Conv1x1(channels[3], channels[3])
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = build_embedding_head(channels[3], feature_dim)
        init_osnet_parameters(self)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, instance_norm: tuple[bool, ...]) -> nn.Sequential:
        blocks = [OSBlockAIN(in_channels, out_channels, instance_norm[0])]
        blocks += [OSBlockAIN(out_channels, out_channels, use_in) for use_in in instance_norm[1:]]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.pool3(self.conv3(x))
        return self.conv5(self.conv4(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.global_avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
