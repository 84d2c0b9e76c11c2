"""edgekd's own edge students. Plain Conv-BN-ReLU stacks ("nano": < 100K parameters): every op
has an INT8 kernel on TensorRT and onnxruntime, BN folds into the conv, and nothing (SiLU,
hard-swish, squeeze-excite) quantizes badly."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from edgekd.models.registry import register_student


def _round_ch(c: float) -> int:
    return max(8, int(round(c / 8.0)) * 8)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Classifier(nn.Module):
    """Global average pool -> dropout -> linear, as attributes ``pool``, ``flatten``, ``dropout``,
    ``head`` (the names checkpoints and feature hooks use)."""

    def add_classifier(self, channels: int, num_classes: int, dropout: float) -> None:
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)
        self.num_features = channels

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.flatten(self.pool(features))))


class PlainCNN(_Classifier):
    """Stages of Conv-BN-ReLU, 2x2 max-pool between stages, global average pool, linear head."""

    def __init__(self, stages: list[list[int]], in_chans: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for si, stage in enumerate(stages):
            if si > 0:
                layers.append(nn.MaxPool2d(2))
            for cout in stage:
                layers.append(conv_bn_relu(c, cout))
                c = cout
        self.features = nn.Sequential(*layers)
        self.add_classifier(c, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; the residual Add is the op TensorRT needs Q/DQ on both inputs of."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class SmallResNet(_Classifier):
    def __init__(self, widths: list[int], in_chans: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.stem = conv_bn_relu(in_chans, widths[0])
        blocks = []
        c = widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, 1 if i == 0 else 2))
            c = w
        self.features = nn.Sequential(*blocks)
        self.add_classifier(c, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(self.stem(x)))


@register_student("nano")
def nano_cnn(num_classes: int = 10, in_chans: int = 1, width: float = 1.0, **_: Any) -> nn.Module:
    """Nano: 6 plain 3x3 Conv-BN-ReLU in 3 stages (~98K params at width 1), INT8-friendly."""
    w = [[_round_ch(24 * width), _round_ch(32 * width)], [_round_ch(48 * width), _round_ch(48 * width)], [_round_ch(64 * width), _round_ch(48 * width)]]
    return PlainCNN(w, in_chans, num_classes)


@register_student("nano")
def pico_cnn(num_classes: int = 10, in_chans: int = 1, width: float = 1.0, **_: Any) -> nn.Module:
    """Pico: 3 Conv-BN-ReLU, 16-32-64 channels (~24K params); for tests and tiny MCUs-class budgets."""
    return PlainCNN([[_round_ch(16 * width)], [_round_ch(32 * width)], [_round_ch(64 * width)]], in_chans, num_classes, dropout=0.0)


@register_student("small")
def small_cnn(num_classes: int = 10, in_chans: int = 1, width: float = 1.0, **_: Any) -> nn.Module:
    """Small: plain 64-128-256 Conv-BN-ReLU stages (~0.56M params), wide enough that INT8 pays off on CPU."""
    w = [[_round_ch(64 * width), _round_ch(64 * width)], [_round_ch(128 * width), _round_ch(128 * width)], [_round_ch(256 * width)]]
    return PlainCNN(w, in_chans, num_classes)


@register_student("small")
def small_resnet(num_classes: int = 10, in_chans: int = 1, width: float = 1.0, **_: Any) -> nn.Module:
    """Small ResNet: stem + 3 basic blocks 64-128-256 with residual adds (~1.2M params)."""
    return SmallResNet([_round_ch(64 * width), _round_ch(128 * width), _round_ch(256 * width)], in_chans, num_classes)
