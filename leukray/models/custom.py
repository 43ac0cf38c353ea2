"""Building the custom ResNet50 (the paper's Table II) for training and for inference: one
builder, so the trained model and the rebuilt one cannot differ.

May import: torch, `leukray.io.storage`, `leukray.models.head`, `leukray.models.trunk`. No Ray.
"""

from __future__ import annotations

import io
from typing import Any

from leukray.io import storage
from leukray.models.head import CustomResNet50, PaperHead, trunk_suffix
from leukray.models.trunk import build_trunk


def head_config_of(
    in_features: int, num_classes: int, dropout: float, unfreeze_stages: int, embedding: int
) -> dict[str, Any]:
    """What rebuilds a trained model (recorded in train.json and the bundle)."""
    return {
        "in_features": in_features,
        "num_classes": num_classes,
        "dropout": dropout,
        "unfreeze_stages": unfreeze_stages,
        "embedding": embedding,
    }


def build_custom_model(
    head_config: dict[str, Any],
    *,
    trunk_weights: dict[str, Any] | None = None,
    weights_seed: int = 0,
    state: dict[str, Any] | None = None,
) -> CustomResNet50:
    """The CustomResNet50 that `head_config` describes.

    Args:
        head_config: in_features, num_classes, dropout, unfreeze_stages (see `head_config_of`).
        trunk_weights: the trunk's state dict for the unfrozen stages when training starts
            (None: torchvision's init seeded by `weights_seed`).
        weights_seed: seed of a random trunk.
        state: a trained model's state dict; loaded strictly and the model put in eval mode
            (the unfrozen stages' weights are in it, so `trunk_weights` is not needed).
    """
    import torch

    unfreeze = head_config["unfreeze_stages"]
    suffix = trunk_suffix(build_trunk(trunk_weights, weights_seed), unfreeze) if unfreeze else torch.nn.Sequential()
    head = PaperHead(head_config["in_features"], head_config["num_classes"], head_config["dropout"])
    model = CustomResNet50(suffix, head)
    if state is not None:
        model.load_state_dict(state, strict=True)
        model.eval()
    return model


def load_model_state(path: str) -> dict[str, Any]:
    """A CustomResNet50 state dict saved with torch.save, loaded without arbitrary pickle."""
    import torch

    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)


def save_model_state(path: str, state: dict[str, Any]) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(path, buffer.getvalue())
