"""The custom-model stage of `leukray run`: train the Table II head on the trunk maps (Ray
Train), then extract its penultimate activations for every image (Ray Data) for the second
classifier sweep (the paper's Table IV)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from leukray import storage
from leukray.config import RunConfig
from leukray.splits import TRAIN, VAL
from leukray.train import KILL_MARKER_ENV, TrainResult, run_name, train_head

HISTORY_COLUMNS = [
    "epoch",
    "train_loss",
    "train_accuracy",
    "train_balanced_accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
]


def _with_codes(batch: dict[str, np.ndarray], codes: dict[str, int], split: str, originals_only: bool) -> dict[str, np.ndarray]:
    keep = (batch["split"] == split) & np.asarray([not e for e in batch["error"]], dtype=bool)
    if originals_only:
        keep &= batch["aug_index"] == 0
    return {
        "maps": batch["maps"][keep],
        "label_code": np.asarray([codes[str(v)] for v in batch["label"][keep]], dtype=np.int64),
    }


def load_model_state(path: str) -> dict[str, Any]:
    """A CustomResNet50 state dict saved with torch.save, loaded without arbitrary pickle."""
    import torch

    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)


def build_custom_model(state: dict[str, Any], head_config: dict[str, Any]):
    """Rebuild the trained CustomResNet50 from its state dict (no trunk weights needed: the
    unfrozen stages' weights are in the state)."""
    from leukray.features import build_trunk
    from leukray.model import CustomResNet50, PaperHead, trunk_suffix

    unfreeze = head_config["unfreeze_stages"]
    suffix = trunk_suffix(build_trunk(None), unfreeze) if unfreeze else None
    import torch

    head = PaperHead(head_config["in_features"], head_config["num_classes"], head_config["dropout"])
    model = CustomResNet50(suffix if suffix is not None else torch.nn.Sequential(), head)
    model.load_state_dict(state, strict=True)
    return model.eval()


class CustomEmbedder:
    """Ray Data actor: trunk maps -> the custom model's penultimate activations (`features`)
    and its own class probabilities (`head_prob`)."""

    def __init__(self, state_path: str, head_config: dict[str, Any], embedding: int):
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_custom_model(load_model_state(state_path), head_config).to(self.device)
        self.embedding = embedding

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        maps = batch.pop("maps")
        with torch.inference_mode():
            x = torch.from_numpy(np.array(maps, dtype=np.float32)).to(self.device)
            batch["features"] = self.model.embed(x, self.embedding).float().cpu().numpy()
            batch["head_prob"] = self.model.head.probabilities(self.model(x)).float().cpu().numpy()
        return batch


@dataclass
class CustomStage:
    result: TrainResult
    head_config: dict[str, Any]
    state_path: str
    head_probs: pd.DataFrame  # path, split, aug_index, label, head_prob (N x C)
    meta: pd.DataFrame  # custom features metadata


def train_and_embed(
    cfg: RunConfig,
    maps_ds,
    classes: list[str],
    fingerprint: str,
    out: str,
    provenance: dict[str, str],
) -> CustomStage:
    """Train the head with Ray Train, save the best model, write history.csv and
    custom_features.parquet."""
    from leukray.model import head_in_features, map_shape
    from leukray.pipeline import FeatureFileWriter, extractor_compute, log, write_csv

    codes = {name: i for i, name in enumerate(classes)}
    c, h, w = map_shape(cfg.preprocess.size, cfg.train.unfreeze_stages)
    in_features = head_in_features(cfg.preprocess.size)
    # Blocks come in path order (all ALL cells, then all normal ones): reshuffle the block
    # order every epoch, and rows within the trainer's local shuffle buffer.
    train_ds = maps_ds.map_batches(
        _with_codes, batch_format="numpy", fn_kwargs={"codes": codes, "split": TRAIN, "originals_only": False}
    ).randomize_block_order()
    val_ds = maps_ds.map_batches(_with_codes, batch_format="numpy", fn_kwargs={"codes": codes, "split": VAL, "originals_only": True})
    use_gpu = extractor_compute(cfg.train.use_gpu, 0)[0]
    storage_path = cfg.train.storage_path or storage.join(out, "train")
    if not storage.is_uri(storage_path):
        storage_path = os.path.abspath(storage_path)
    name = run_name(cfg.train, fingerprint, cfg.extract.weights, in_features, len(classes))
    log(
        f"training the custom ResNet50 head (Table II) with Ray Train: {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
        f"{cfg.train.workers} worker(s){' on GPU' if use_gpu else ''}; maps {c}x{h}x{w}; checkpoints in {storage_path}/{name}"
    )
    result = train_head(
        train_ds,
        val_ds,
        cfg.train,
        in_features=in_features,
        num_classes=len(classes),
        weights=cfg.extract.weights,
        weights_seed=cfg.extract.seed,
        storage_path=storage_path,
        name=name,
        use_gpu=use_gpu,
        kill_marker=os.environ.get(KILL_MARKER_ENV, ""),
    )
    history = pd.DataFrame(result.history).reindex(columns=HISTORY_COLUMNS)
    write_csv(storage.join(out, "history.csv"), history)
    log(f"best epoch {result.best_epoch}: validation balanced accuracy {result.best_val_balanced_accuracy:.4f}")

    import torch

    state_path = storage.join(out, "model", "custom_resnet50.pt")
    buffer = io.BytesIO()
    torch.save(result.state_dict, buffer)
    storage.write_bytes(state_path, buffer.getvalue())
    head_config = {
        "in_features": in_features,
        "num_classes": len(classes),
        "dropout": cfg.train.dropout,
        "unfreeze_stages": cfg.train.unfreeze_stages,
        "embedding": cfg.train.embedding,
    }

    _, pool, resources = extractor_compute(cfg.extract.use_gpu, cfg.extract.actors, cfg.extract.accelerator_resource)
    embedded = maps_ds.map_batches(
        CustomEmbedder,
        batch_format="numpy",
        batch_size=max(cfg.extract.batch_size, 64),
        fn_constructor_kwargs={"state_path": state_path, "head_config": head_config, "embedding": cfg.train.embedding},
        compute=pool,
        **resources,
    )
    prob_parts = []
    with FeatureFileWriter(storage.join(out, "custom_features.parquet"), cfg.train.embedding, provenance) as writer:
        for batch in embedded.iter_batches(batch_format="numpy", batch_size=256):
            writer.write(batch)
            keep = np.asarray([not e for e in batch["error"]], dtype=bool) & (batch["aug_index"] == 0)
            prob_parts.append(
                pd.DataFrame(
                    {
                        "path": batch["path"][keep].astype(str),
                        "split": batch["split"][keep].astype(str),
                        "label": batch["label"][keep].astype(str),
                        "subject": batch["subject"][keep].astype(str),
                        "head_prob": list(batch["head_prob"][keep]),
                    }
                )
            )
    head_probs = pd.concat(prob_parts, ignore_index=True) if prob_parts else pd.DataFrame()
    return CustomStage(result, head_config, state_path, head_probs, writer.meta)

