"""The ResNet50 trained on the cells (`train.unfreeze_stages` >= 1): the whole trunk, or its
last N stages, with a linear classifier on its 2,048 pooled features, trained end to end
on augmented crops (`leukray.distributed.trunktraining`). Its pooled features are the
`trained` feature family; `trunk_state` gives the trunk alone, in torchvision's key names,
so `leukray.models.trunk` loads it like any weights file (the bundle's trunk.pt).

May import: torch, `leukray.models.head`, `leukray.models.trunk`. No Ray.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leukray.models.head import TRUNK_STAGES
from leukray.models.trunk import FEATURE_DIM, IMAGENET_MEAN, IMAGENET_STD, build_trunk

STEM = ("conv1", "bn1")
# The trunk's parts in order: the stem, then the 4 stages; `stages` trains the last N.
TRUNK_PARTS = (STEM, *((s,) for s in TRUNK_STAGES))


class TrunkClassifier(nn.Module):
    """A torchvision ResNet50 trunk (fc removed) + Linear(2048, 1 | C).

    Only the last `stages` parts of `TRUNK_PARTS` train (5 = all, the stem too); the others
    are frozen, their BatchNorm statistics too (kept in eval mode by `train()`).
    """

    def __init__(self, trunk: nn.Module, num_classes: int, stages: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 1 <= stages <= len(TRUNK_PARTS):
            raise ValueError(f"stages must be 1-{len(TRUNK_PARTS)}, got {stages}")
        self.trunk = trunk
        self.num_classes = num_classes
        self.fc = nn.Linear(FEATURE_DIM, 1 if num_classes == 2 else num_classes)
        self.frozen = [getattr(trunk, name) for part in TRUNK_PARTS[: len(TRUNK_PARTS) - stages] for name in part]
        for module in self.frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> TrunkClassifier:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def trunk_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.trunk.parameters() if p.requires_grad]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, 2048) pooled trunk features."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: (N,) for binary (sigmoid gives P(positive)), (N, C) otherwise."""
        logits = self.fc(self.trunk(x))
        return logits.squeeze(1) if self.num_classes == 2 else logits

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 2:
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float())
        return nn.functional.cross_entropy(logits.float(), target.long())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) class probabilities."""
        if self.num_classes == 2:
            p = torch.sigmoid(logits.float())
            return torch.stack([1 - p, p], dim=1)
        return torch.softmax(logits.float(), dim=1)


def build_trunk_classifier(
    trunk_weights: dict[str, Any] | None, weights_seed: int, num_classes: int, stages: int, seed: int
) -> TrunkClassifier:
    """The model training starts from: the trunk with `trunk_weights` (None: torchvision's
    init seeded by `weights_seed`) and a linear classifier initialised from `seed`."""
    trunk = build_trunk(trunk_weights, weights_seed)
    torch.manual_seed(seed)
    return TrunkClassifier(trunk, num_classes, stages)


def trunk_state(model: TrunkClassifier | dict[str, Any]) -> dict[str, Any]:
    """The trunk's state dict alone (torchvision's names, no fc) from a model or its state."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k[len("trunk.") :]: v.detach().clone() for k, v in state.items() if k.startswith("trunk.")}


def normalised_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """N x H x W x 3 uint8 (a tensor, from Ray's iterator) -> N x 3 x H x W float32 on
    `device`, ImageNet-normalised as `leukray.models.trunk.images_to_tensor` does."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected NxHxWx3 uint8, got {tuple(images.shape)} {images.dtype}")
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(
        memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format
    )
