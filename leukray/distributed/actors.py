"""Ray Data adapters (STYLE 2): the batch functions and callable classes handed to
`map_batches`. Each wraps a pure function or model from a lower folder and stamps the Ray
node it ran on, which the stages record in summary.json.

May import: numpy, `leukray.distributed.resources`, `leukray.io.storage`, `leukray.io.mapshards`,
`leukray.io.wholeslide`, `leukray.ops`,
`leukray.models`, `leukray.data`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from leukray.data.discovery import hash_files
from leukray.distributed.resources import ray_node_id
from leukray.io import mapshards, storage, wholeslide
from leukray.io.features import error_mask
from leukray.models.bundle import load_bundle
from leukray.models.custom import build_custom_model, load_model_state
from leukray.models.trunk import TrunkExtractor, set_cpu_threads
from leukray.ops import allocator
from leukray.ops.preprocess import READ_ERRORS, load_and_preprocess, read_error_reason, to_rgb_uint8
from leukray.ops.review import add_review_media, field_thumbnail, thumbnailing_reader
from leukray.ops.smear import detect_and_crop, field_row, slide_tile_rows


def _stamp(batch: dict[str, np.ndarray], column: str, rows: int) -> dict[str, np.ndarray]:
    batch[column] = np.asarray([ray_node_id()] * rows, dtype=object)
    return batch


def hash_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`path` -> sha256 and read_error (`leukray.data.discovery.hash_files`) + node_id."""
    out = hash_files(batch, storage.read_bytes)
    return _stamp(out, "node_id", len(out["path"]))


def preprocess_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """`leukray.ops.preprocess.load_and_preprocess` reading through storage + preprocess_node."""
    out = load_and_preprocess(batch, read_bytes=storage.read_bytes, **kwargs)
    return _stamp(out, "preprocess_node", len(out["path"]))


def write_maps_batch(batch: dict[str, np.ndarray], folder: str) -> dict[str, np.ndarray]:
    """The batch's trunk `maps` written as one shard under `folder`
    (`leukray.io.mapshards`) and dropped; each row says its shard (`maps_shard`)."""
    out = {key: value for key, value in batch.items() if key != "maps"}
    name = mapshards.write_shard(folder, batch) if len(batch["path"]) else ""
    out["maps_shard"] = np.full(len(batch["path"]), name, dtype=object)
    return out


def this_node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


def on_node(node_ip: str | None, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` as called from this process on what lies on node `node_ip`'s disk: `fn` itself
    when `node_ip` is None (a URI, readable anywhere) or this node; else a call of `fn` in a
    task placed on that node (its result comes through the object store)."""
    if node_ip is None or node_ip == this_node_ip():
        return fn
    import ray

    # every Ray node offers one unit of its own `node:<ip>` resource: a sliver pins a task
    # there; no CPU, so a busy node still serves its files
    task = ray.remote(num_cpus=0)(fn).options(resources={f"node:{node_ip}": 0.001})
    return lambda *args: ray.get(task.remote(*args))


def detect_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """`leukray.ops.smear.detect_and_crop` reading through storage (whole-slide tiles through
    `leukray.io.wholeslide`) + detect_node."""
    out = detect_and_crop(batch, read_bytes=storage.read_bytes, read_region=wholeslide.read_region, **kwargs)
    return _stamp(out, "detect_node", len(out["slide"]))


# A whole slide's thumbnail comes from its coarsest pyramid level when that level is at most
# this many pixels (a pyramid's top level is typically a few million); otherwise it has none
# rather than decode a large level whole.
THUMBNAIL_LEVEL_PIXELS = 16_000_000


def slide_tiles(row: dict[str, Any], cfg: Any) -> list[dict[str, Any]]:
    """Ray Data flat_map: one slide row (`path`) -> its detection rows: one for a camera
    field, one per tile for a whole-slide image (`leukray.ops.smear.slide_tile_rows`; only
    the header, the central tile and the coarsest level for the thumbnail are read here), or
    one row with the reason when the slide cannot be opened. Every row says how many rows
    its slide has (`tiles`); a whole slide's first row carries its review thumbnail."""
    path = str(row["path"])
    is_tiff = path.lower().endswith(wholeslide.TIFF_EXTENSIONS)
    thumbnail: tuple[bytes, float] = (b"", 0.0)
    if not wholeslide.is_openslide_path(path) and not (
        is_tiff and wholeslide.tiff_is_whole_slide(path, cfg.max_pixels)
    ):
        rows = [field_row(path)]
    else:
        try:
            with wholeslide.open_slide(path) as slide:
                levels = [(lv.width, lv.height, lv.downsample) for lv in slide.info.levels]
                rows = slide_tile_rows(path, levels, slide.info.mpp, slide.read_region, cfg)
                thumbnail = slide_thumbnail(slide, cfg.thumbnail_px)
        except (*READ_ERRORS, ValueError) as exc:
            rows = [field_row(path, read_error_reason(exc))]
    for k, tile in enumerate(rows):
        tile.update(tiles=len(rows), thumbnail=thumbnail[0] if k == 0 else b"", thumb_scale=thumbnail[1])
    return rows


def slide_thumbnail(slide: Any, max_side: int) -> tuple[bytes, float]:
    """(JPEG, thumbnail px per level-0 px) of an open whole slide, from its coarsest level;
    (b"", 0.0) when that level is larger than THUMBNAIL_LEVEL_PIXELS."""
    level = slide.info.levels[-1]
    if level.width * level.height > THUMBNAIL_LEVEL_PIXELS:
        return b"", 0.0
    image = to_rgb_uint8(slide.read_region(len(slide.info.levels) - 1, 0, 0, level.width, level.height))
    jpeg, scale = field_thumbnail(image, max_side)
    return jpeg, scale / level.downsample


def detect_review_batch(batch: dict[str, np.ndarray], thumbnail_px: int, **kwargs: Any) -> dict[str, np.ndarray]:
    """`detect_batch` plus what the visual review shows (`leukray.ops.review.add_review_media`):
    each field's thumbnail, made from the bytes detection reads (not read twice; a whole
    slide's comes with its first tile row), each cell's crop as JPEG, and the unit columns
    that say when a slide is complete (REVIEW_COLUMNS: each input row, a field or a tile,
    is one unit)."""
    read, thumbnails = thumbnailing_reader(storage.read_bytes, thumbnail_px, kwargs["cfg"].max_pixels)
    outs = []
    for i in range(len(batch["path"])):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        out = detect_and_crop(row, read_bytes=read, read_region=wholeslide.read_region, **kwargs)
        n = len(out["slide"])
        unit = max(int(row["tile_index"][0]), 0) if "tile_index" in row else 0
        out["unit"] = np.full(n, unit, dtype=np.int64)
        out["units"] = np.full(n, int(row["tiles"][0]) if "tiles" in row else 1, dtype=np.int64)
        out["unit_rows"] = np.full(n, n, dtype=np.int64)
        if "thumbnail" in row and len(row["thumbnail"][0]):
            thumbnails[str(row["path"][0])] = (bytes(row["thumbnail"][0]), float(row["thumb_scale"][0]))
        outs.append(out)
    if not outs:  # an empty block: the columns, no rows
        out = detect_and_crop(batch, read_bytes=read, read_region=wholeslide.read_region, **kwargs)
        outs = [{**out, **{c: np.zeros(0, dtype=np.int64) for c in ("unit", "units", "unit_rows")}}]
    out = {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}
    out = add_review_media(out, thumbnails)
    return _stamp(out, "detect_node", len(out["slide"]))


class FeatureExtractor(TrunkExtractor):
    """Ray Data actor: the trunk loaded once per actor; crops -> `features` (and `maps`)
    + node_id. GPU actors run bf16 channels_last (see `TrunkExtractor`); the actor's process
    keeps freed batch memory for the next batch (`allocator.TENSOR`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        allocator.keep_freed_memory(*allocator.TENSOR)
        super().__init__(*args, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = super().__call__(batch)
        return _stamp(batch, "node_id", len(batch["features"]))


class CustomEmbedder:
    """Ray Data actor: shards of trunk maps (`shard`: their paths or URIs, on node `node_ip`'s
    disk or a URI; `on_node`) -> their rows (`mapshards.ROW_COLUMNS`) with the custom
    model's penultimate activations (`features`) and its own class probabilities
    (`head_prob`). The actor reads the maps itself: they never enter the object store."""

    def __init__(
        self,
        state_path: str,
        head_config: dict[str, Any],
        embedding: int,
        shape: tuple[int, ...],
        node_ip: str | None,
        threads: int = 0,
    ):
        import torch

        allocator.keep_freed_memory(*allocator.TENSOR)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        set_cpu_threads(self.device, threads)
        self.model = build_custom_model(head_config, state=load_model_state(state_path)).to(self.device)
        self.embedding, self.shape = embedding, tuple(shape)
        self.read = on_node(node_ip, mapshards.read_shard)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [self._embed(self.read(str(path), self.shape)) for path in batch["shard"]]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def _embed(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        maps = rows.pop("maps")
        with torch.inference_mode():
            x = torch.from_numpy(np.array(maps, dtype=np.float32)).to(self.device)
            rows["features"] = self.model.embed(x, self.embedding).float().cpu().numpy()
            rows["head_prob"] = self.model.head.probabilities(self.model(x)).float().cpu().numpy()
        return rows


class BundlePredictor:
    """Ray Data actor: loads (and verifies) the bundle once; crops -> class probabilities
    (`prob_all`, `predicted_label`)."""

    def __init__(self, model_dir: str, threads: int = 0):
        self.bundle = load_bundle(model_dir)
        seed = int(self.bundle.manifest.get("weights_seed", 0))
        self.extractor = None
        if self.bundle.needs_trunk:  # a model on cell features alone needs no ResNet50
            self.extractor = FeatureExtractor(
                self.bundle.trunk_weights, seed=seed, maps_stage=self.bundle.maps_stage, threads=threads
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.extractor is not None:
            batch = self.extractor(batch)
        else:
            batch.pop("image")
            batch = _stamp(batch, "node_id", len(batch["error"]))
        columns = {name: batch.pop(name, None) for name in ("features", "maps", "cell_features")}
        ok = ~error_mask(batch)
        prob = np.full(len(ok), np.nan)
        predicted = np.full(len(ok), "", dtype=object)
        if ok.any():
            features, maps, cells = (c[ok] if c is not None else None for c in columns.values())
            probs = self.bundle.probabilities(features, maps, cells)
            prob[ok] = probs[:, self.bundle.positive_index]
            predicted[ok] = self.bundle.predicted_labels(probs)  # at the bundle's decision threshold
        batch["prob_all"] = prob
        batch["predicted_label"] = predicted
        return batch
