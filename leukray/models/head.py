"""The custom ResNet50 of the paper (its Table II): a frozen ResNet50 trunk and a dense head.

Head, exactly as Table II: Flatten of the 7x7x2048 map (100,352) -> BatchNorm -> Dense 512
(ReLU) -> Dropout -> BatchNorm -> Dense 256 (ReLU) -> Dropout -> Dense 1 with sigmoid
(binary cross-entropy); with more than two classes the last layer is Dense(num_classes) with
softmax and cross-entropy. Keras counts BatchNorm's running statistics as parameters, so the
head "has" 51,915,777 parameters: the paper's 75,503,489 minus the trunk's 23,587,712.

While the trunk is frozen it is not run every epoch: the maps are computed once (by the Ray
Data extractor) and the head trains on them. Fine-tuning unfreezes the last trunk stages:
the maps then come from the frozen prefix and the unfrozen stages train with the head.
"""

from __future__ import annotations

import torch
from torch import nn

TABLE_II_HEAD_PARAMETERS = 51_915_777
TRUNK_STAGES = ("layer1", "layer2", "layer3", "layer4")


def keras_parameter_count(module: nn.Module) -> int:
    """Parameters plus BatchNorm running mean/variance, as Keras' model.summary() counts."""
    params = sum(p.numel() for p in module.parameters())
    stats = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )
    return params + stats


class PaperHead(nn.Module):
    """Table II's head on an (N, C, H, W) map; `embed` gives the penultimate activations."""

    def __init__(self, in_features: int, num_classes: int = 2, dropout: float = 0.5):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.flatten = nn.Flatten()
        self.bn0 = nn.BatchNorm1d(in_features)
        self.fc1 = nn.Linear(in_features, 512)
        self.drop1 = nn.Dropout(dropout)
        self.bn1 = nn.BatchNorm1d(512)
        self.fc2 = nn.Linear(512, 256)
        self.drop2 = nn.Dropout(dropout)
        self.out = nn.Linear(256, 1 if num_classes == 2 else num_classes)

    def embed(self, maps: torch.Tensor, layer: int = 256) -> torch.Tensor:
        """Penultimate activations: (N, 256) after Dense 256 + ReLU, or (N, 512) after Dense 512."""
        x = torch.relu(self.fc1(self.bn0(self.flatten(maps))))
        if layer == 512:
            return x
        if layer != 256:
            raise ValueError(f"embedding layer must be 256 or 512, got {layer}")
        return torch.relu(self.fc2(self.bn1(self.drop1(x))))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits: (N,) for binary (sigmoid gives P(positive)), (N, C) otherwise."""
        logits = self.out(self.drop2(self.embed(maps)))
        return logits.squeeze(1) if self.num_classes == 2 else logits

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy (on logits, numerically stable) or cross-entropy."""
        if self.num_classes == 2:
            return nn.functional.binary_cross_entropy_with_logits(logits, target.float())
        return nn.functional.cross_entropy(logits, target.long())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) class probabilities."""
        if self.num_classes == 2:
            p = torch.sigmoid(logits)
            return torch.stack([1 - p, p], dim=1)
        return torch.softmax(logits, dim=1)


def trunk_prefix(trunk: nn.Module, unfreeze_stages: int) -> nn.Sequential:
    """The frozen part of a torchvision ResNet50: stem + the first 4 - `unfreeze_stages` stages."""
    keep = TRUNK_STAGES[: len(TRUNK_STAGES) - unfreeze_stages]
    return nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, *[getattr(trunk, s) for s in keep])


def trunk_suffix(trunk: nn.Module, unfreeze_stages: int) -> nn.Sequential:
    """The last `unfreeze_stages` stages of the trunk (trained when fine-tuning)."""
    if unfreeze_stages == 0:
        return nn.Sequential()
    return nn.Sequential(*[getattr(trunk, s) for s in TRUNK_STAGES[-unfreeze_stages:]])


class CustomResNet50(nn.Module):
    """Trainable part of the custom model: the unfrozen trunk stages (if any) and the head.

    Its input is the output of `trunk_prefix` (the 7x7x2048 map when nothing is unfrozen).
    """

    def __init__(self, suffix: nn.Sequential, head: PaperHead):
        super().__init__()
        self.suffix = suffix
        self.head = head

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(self.suffix(maps))

    def embed(self, maps: torch.Tensor, layer: int = 256) -> torch.Tensor:
        return self.head.embed(self.suffix(maps), layer)


def map_shape(size: int, unfreeze_stages: int = 0) -> tuple[int, int, int]:
    """(C, H, W) of the frozen prefix's output for a size x size input."""
    channels = {0: 2048, 1: 1024, 2: 512, 3: 256}[unfreeze_stages]
    stride = {0: 32, 1: 16, 2: 8, 3: 4}[unfreeze_stages]
    side = -(-size // stride)  # ceil: each stride-2 stage rounds up
    return channels, side, side


def head_in_features(size: int) -> int:
    c, h, w = map_shape(size, 0)
    return c * h * w
