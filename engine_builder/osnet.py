"""OSNet: Omni-Scale Feature Learning for Person Re-Identification.

Paper: Zhou, Yang, Cavallaro, Xiang, "Omni-Scale Feature Learning for Person Re-Identification",
ICCV 2019 (https://arxiv.org/abs/1905.00953); IBN variant from the TPAMI 2021 extension
"Learning Generalisable Omni-Scale Representations for Person Re-Identification".
Upstream: https://github.com/KaiyangZhou/deep-person-reid (torchreid/models/osnet.py).

Module and parameter names mirror torchreid exactly so that a torchreid checkpoint loads with no
conversion. The classifier is dropped: `forward` returns the 512-d eval feature (after `fc`).
The AIN family (`osnet_ain.py`) reuses the layers defined here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from osnet_base.contract import FEATURE_DIM


class ConvLayer(nn.Module):
    """Convolution + BatchNorm (or affine InstanceNorm) + ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        instance_norm: bool = False,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False, groups=groups
        )
        self.bn = nn.InstanceNorm2d(out_channels, affine=True) if instance_norm else nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Conv1x1(nn.Module):
    """1x1 convolution + BatchNorm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Conv1x1Linear(nn.Module):
    """1x1 convolution + optional BatchNorm, no non-linearity."""

    def __init__(self, in_channels: int, out_channels: int, bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.bn is None else self.bn(x)


class LightConv3x3(nn.Module):
    """Lite 3x3: 1x1 pointwise (linear), then 3x3 depthwise + BatchNorm + ReLU.

    The depthwise half (`conv2`, `bn`, `relu`) is what the fused depthwise LiteConv kernel replaces.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False, groups=out_channels)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class ChannelGate(nn.Module):
    """Unified aggregation gate: `x * sigmoid(fc2(relu(fc1(GAP(x)))))`, shared by all streams."""

    def __init__(self, in_channels: int, reduction: int = 16):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(in_channels, in_channels // reduction, 1, bias=True)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(in_channels // reduction, in_channels, 1, bias=True)
        self.gate_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gate_activation(self.fc2(self.relu(self.fc1(self.global_avgpool(x)))))
        return x * gates


class OSBlock(nn.Module):
    """Omni-scale block: four Lite 3x3 streams of depth 1..4 fused by one aggregation gate."""

    def __init__(self, in_channels: int, out_channels: int, instance_norm: bool = False, bottleneck_reduction: int = 4):
        super().__init__()
        mid_channels = out_channels // bottleneck_reduction
        self.conv1 = Conv1x1(in_channels, mid_channels)
        self.conv2a = LightConv3x3(mid_channels, mid_channels)
        self.conv2b = nn.Sequential(*[LightConv3x3(mid_channels, mid_channels) for _ in range(2)])
        self.conv2c = nn.Sequential(*[LightConv3x3(mid_channels, mid_channels) for _ in range(3)])
        self.conv2d = nn.Sequential(*[LightConv3x3(mid_channels, mid_channels) for _ in range(4)])
        self.gate = ChannelGate(mid_channels)
        self.conv3 = Conv1x1Linear(mid_channels, out_channels)
        self.downsample = Conv1x1Linear(in_channels, out_channels) if in_channels != out_channels else None
        self.IN = nn.InstanceNorm2d(out_channels, affine=True) if instance_norm else None

    def streams(self) -> list[nn.Module]:
        return [self.conv2a, self.conv2b, self.conv2c, self.conv2d]

    def aggregate(self, x1: torch.Tensor) -> torch.Tensor:
        """The streams fused by the shared gate: what the fused kernels replace."""
        gated = [self.gate(stream(x1)) for stream in self.streams()]
        return gated[0] + gated[1] + gated[2] + gated[3]

    def residual_output(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv3(x2) + identity
        if self.IN is not None:
            out = self.IN(out)
        return F.relu(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual_output(x, self.aggregate(self.conv1(x)))


def build_embedding_head(in_features: int, feature_dim: int) -> nn.Sequential:
    """torchreid's `fc`: Linear + BatchNorm1d + ReLU, the eval-mode output of every OSNet."""
    return nn.Sequential(nn.Linear(in_features, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU())


def init_osnet_parameters(model: nn.Module) -> None:
    """torchreid's `_init_params`, so that seeded untrained models behave like torchreid's."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d)):
            if module.weight is not None:
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)


class OSNet(nn.Module):
    """OSNet backbone + `fc` embedding head; `forward` returns torchreid's eval feature."""

    def __init__(self, channels: tuple[int, int, int, int], instance_norm: bool = False, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.feature_dim = feature_dim
        self.conv1 = ConvLayer(3, channels[0], 7, stride=2, padding=3, instance_norm=instance_norm)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = self._make_stage(channels[0], channels[1], reduce_spatial_size=True, instance_norm=instance_norm)
        self.conv3 = self._make_stage(channels[1], channels[2], reduce_spatial_size=True)
        self.conv4 = self._make_stage(channels[2], channels[3], reduce_spatial_size=False)
        self.conv5 = Conv1x1(channels[3], channels[3])
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = build_embedding_head(channels[3], feature_dim)
        init_osnet_parameters(self)

    @staticmethod
    def _make_stage(
        in_channels: int, out_channels: int, reduce_spatial_size: bool, instance_norm: bool = False, depth: int = 2
    ) -> nn.Sequential:
        layers: list[nn.Module] = [OSBlock(in_channels, out_channels, instance_norm=instance_norm)]
        layers += [OSBlock(out_channels, out_channels, instance_norm=instance_norm) for _ in range(depth - 1)]
        if reduce_spatial_size:
            layers.append(nn.Sequential(Conv1x1(out_channels, out_channels), nn.AvgPool2d(2, stride=2)))
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.conv4(self.conv3(self.conv2(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.global_avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
