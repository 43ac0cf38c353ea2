"""The ResNet50 trunk (top removed) that maps a 224x224 cell crop to 2,048 features (the
paper's step 3), where its weights come from, and `TrunkExtractor`, which runs it on
batches of crops (the Ray actor around it is `leukray.distributed.actors.FeatureExtractor`).

Weights are always explicit and always recorded:
- ``imagenet`` (or ``imagenet:IMAGENET1K_V2``): torchvision's weights API and cache
  (``$TORCH_HOME/hub/checkpoints``), hash-checked; offline, a missing file is a one-line
  error naming the file and where to put it;
- a file path: a state dict loaded strictly (``fc.*`` — the removed top — is dropped); when
  the file name carries torchvision's hash prefix (``resnet50-0676ba61.pth``) the sha256 is
  checked;
- ``random``: a seeded random initialisation, never presented as ImageNet;
- ``auto`` (the demo's default): ImageNet when the file is already cached, else random, with
  a warning.

May import: torch, torchvision, numpy, `leukray.errors`, `leukray.models.head`. No Ray.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from leukray.errors import WeightsError
from leukray.models.head import map_shape, trunk_prefix, trunk_suffix

FEATURE_DIM = 2048
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HASH_PREFIX = re.compile(r"-([a-f0-9]{6,64})\.(?:pth|pt|bin)$")
DEFAULT_IMAGENET = "IMAGENET1K_V1"  # the classic ResNet50 weights, as in Keras' application the paper used


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a trunk carries; written into every output."""

    kind: str  # imagenet | file | random
    name: str  # e.g. ResNet50_Weights.IMAGENET1K_V1, a file name, or random-init
    source: str  # URL / file path / "torch.manual_seed(<seed>)"
    sha256: str  # of the weights file; "" for random
    is_pretrained: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.kind == "random":
            return f"RANDOM-INIT ResNet50 trunk ({self.source}); not ImageNet features"
        return f"{self.name} (sha256 {self.sha256[:12]}…)"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _imagenet_enum(spec: str):
    from torchvision.models import ResNet50_Weights

    variant = spec.split(":", 1)[1] if ":" in spec else DEFAULT_IMAGENET
    try:
        return ResNet50_Weights[variant]
    except KeyError:
        raise WeightsError(
            f"unknown ImageNet weights {variant!r}; choose one of {', '.join(ResNet50_Weights.__members__)}"
        ) from None


def imagenet_cache_file(spec: str = "imagenet") -> str:
    """Where torchvision's cache keeps the ImageNet file for `spec`."""
    import torch

    weights = _imagenet_enum(spec)
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def resolve_weights(spec: str, seed: int = 0) -> tuple[dict[str, Any] | None, WeightsInfo]:
    """Load the trunk's state dict for `spec` (None for random) and describe it.

    Raises:
        WeightsError: one line saying what is missing or wrong, and what to do.
    """
    if spec == "auto":
        spec = "imagenet" if os.path.exists(imagenet_cache_file()) else "random"
        if spec == "random":
            print(
                f"leukray: WARNING: ImageNet weights not found at {imagenet_cache_file()}; "
                "using a RANDOM-INIT trunk (results are not ImageNet results). "
                "Put resnet50-0676ba61.pth there or pass --weights PATH.",
                file=sys.stderr,
            )
    if spec == "random":
        return None, WeightsInfo("random", "random-init", f"torch.manual_seed({seed})", "", False)
    if spec == "imagenet" or spec.startswith("imagenet:"):
        return _load_imagenet(spec)
    return _load_file(spec)


def _load_imagenet(spec: str) -> tuple[dict[str, Any], WeightsInfo]:
    import torch

    weights = _imagenet_enum(spec)
    cached = imagenet_cache_file(spec)
    if not os.path.exists(cached):
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # urllib, ssl, socket, hash mismatch: all mean "not available"
            raise WeightsError(
                f"ImageNet weights {os.path.basename(weights.url)} are not in the torch cache and could not be "
                f"downloaded ({type(exc).__name__}); put the file from {weights.url} at {cached} "
                f"(or set TORCH_HOME), or pass --weights PATH or --weights random"
            ) from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    else:
        try:
            state = torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True, map_location="cpu")
        except RuntimeError as exc:
            raise WeightsError(f"ImageNet weights file {cached} is corrupt: {str(exc).splitlines()[0]}") from None
    info = WeightsInfo("imagenet", f"ResNet50_Weights.{weights.name}", weights.url, sha256_file(cached), True)
    return state, info


def _load_file(path: str) -> tuple[dict[str, Any], WeightsInfo]:
    import torch

    if not os.path.isfile(path):
        raise WeightsError(
            f"--weights {path!r}: no such file (use imagenet, random, auto, or a path to a ResNet50 state dict)"
        )
    digest = sha256_file(path)
    prefix = HASH_PREFIX.search(os.path.basename(path))
    if prefix and not digest.startswith(prefix.group(1)):
        raise WeightsError(
            f"weights file {path} fails its hash check: name says sha256 {prefix.group(1)}…, "
            f"file has {digest[: len(prefix.group(1))]}…"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"weights file {path} is not a readable PyTorch state dict: {str(exc).splitlines()[0][:200]}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state, WeightsInfo("file", os.path.basename(path), os.path.abspath(path), digest, True)


def build_trunk(state: dict[str, Any] | None, seed: int = 0):
    """torchvision ResNet50 with its top (fc) replaced by identity: (N,3,H,W) -> (N,2048).

    Loads `state` strictly (after dropping `fc.*`, the top that is removed anyway).

    Raises:
        WeightsError: keys or shapes do not match a ResNet50.
    """
    import torch
    from torchvision.models import resnet50

    torch.manual_seed(seed)
    model = resnet50(weights=None)
    model.fc = torch.nn.Identity()
    if state is not None:
        trunk_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            model.load_state_dict(trunk_state, strict=True)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise WeightsError(f"weights do not fit a ResNet50 trunk: {' '.join(lines[1:3])[:300]}") from None
    return model.eval()


def images_to_tensor(images: np.ndarray, device, channels_last: bool):
    """N x H x W x 3 uint8 RGB -> N x 3 x H x W float, ImageNet-normalised, on `device`."""
    import torch

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected NxHxWx3 uint8, got {images.shape} {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def use_deterministic_algorithms() -> None:
    """torch's deterministic kernels for this process (and the fixed cuBLAS workspace CUDA
    needs for them): the same input gives the same output bit for bit, run after run."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def set_cpu_threads(device: Any, threads: int = 0) -> None:
    """On a CPU, torch's thread count: `threads`, or for 0 as many as the actor was given
    (Ray sets OMP_NUM_THREADS from an actor's num_cpus)."""
    import torch

    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)


class TrunkExtractor:
    """Loads the trunk once, then maps batches of crops to 2,048 features.

    On a GPU it runs channels_last with bf16 autocast; on a CPU in float32 with `threads`
    torch threads (`set_cpu_threads`).
    Rows whose `error` is set are passed through with NaN features.

    With `maps_stage` >= 0 it also emits `maps` (float16): the output of the trunk's frozen
    prefix for the custom model (the 7x7x2048 map for 0; an earlier stage when the last
    `maps_stage` stages are fine-tuned), computed in the same pass as the features.
    """

    def __init__(
        self,
        weights: str,
        seed: int = 0,
        device: str = "auto",
        maps_stage: int = -1,
        deterministic: bool = False,
        threads: int = 0,
    ):
        import torch

        if deterministic:
            use_deterministic_algorithms()
        state, self.weights_info = resolve_weights(weights, seed)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        set_cpu_threads(self.device, threads)
        self.on_gpu = self.device.type == "cuda"
        trunk = build_trunk(state, seed)
        self.maps_stage = maps_stage
        stage = max(maps_stage, 0)
        self.prefix = trunk_prefix(trunk, stage).to(self.device)
        self.rest = torch.nn.Sequential(trunk_suffix(trunk, stage), trunk.avgpool, torch.nn.Flatten()).to(self.device)
        if self.on_gpu:
            self.prefix = self.prefix.to(memory_format=torch.channels_last)
            self.rest = self.rest.to(memory_format=torch.channels_last)

    def extract(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """N x H x W x 3 uint8 -> (N x 2048 float32 features, N x C x h x w float16 maps or None)."""
        import torch

        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_gpu):
            maps = self.prefix(images_to_tensor(images, self.device, channels_last=self.on_gpu))
            features = self.rest(maps)
        kept = maps.to(torch.float16).cpu().numpy() if self.maps_stage >= 0 else None
        return features.float().cpu().numpy(), kept

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A stream batch with `image` (N x H x W x 3 uint8) and `error` -> the same batch
        without `image`, with `features` (and `maps`)."""
        images = batch.pop("image")
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        features = np.full((len(images), FEATURE_DIM), np.nan, dtype=np.float32)
        maps = None
        if ok.any():
            features[ok], ok_maps = self.extract(images[ok])
            if ok_maps is not None:
                maps = np.zeros((len(images), *ok_maps.shape[1:]), dtype=np.float16)
                maps[ok] = ok_maps
        batch["features"] = features
        if self.maps_stage >= 0:
            if maps is None:
                maps = np.zeros((len(images), *map_shape(images.shape[1], self.maps_stage)), dtype=np.float16)
            batch["maps"] = maps
        return batch
