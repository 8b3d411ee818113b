"""A run's input side: the demo data, the sources and grain iterator of a config, the held-out batches, and
host batches -> global arrays on the mesh."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from llava_jax import sharding
from llava_jax.data import batch as batch_spec
from llava_jax.data import synthetic
from llava_jax.data.anyres_samples import AnyResLayouts
from llava_jax.data.images import ImageConfig
from llava_jax.data.pipeline import PipelineConfig, make_train_iterator
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.train import metrics, model_init
from llava_jax.train import step as step_lib
from llava_jax.train.distributed import barrier
from llava_jax.vision_layout import ImageLayout


@dataclasses.dataclass
class DataSetup:
    iterator: object
    num_samples: int
    image_seq_length: int
    demo_paths: object = None


def prepare_demo_data(c: mlc.ConfigDict, workdir: Path) -> synthetic.SyntheticPaths:
    """Generates the demo's synthetic data into `<workdir>/data` once (process 0), then every process reads it;
    its tokenizer covers the run's data.template. Data a kill left incomplete is generated again."""
    root = workdir / "data"
    if not synthetic.is_complete(root):
        if jax.process_index() == 0:
            synthetic.generate(root, num_stage1=c.demo.num_stage1, num_stage2=c.demo.num_stage2,
                               num_eval=c.demo.num_eval, image_size=c.demo.image_size, seed=c.demo.seed,
                               varied_sizes=c.demo.get("varied_sizes", False),
                               num_multi_image=c.demo.num_multi_image, num_video=c.demo.num_video,
                               template=c.data.template)
        barrier("demo-data")
    return synthetic.paths_of(root)


def image_config(c: mlc.ConfigDict, model_cfg) -> ImageConfig:
    return ImageConfig.for_tower(model_cfg.vision, aspect=c.data.image_aspect)


def video_frames(c: mlc.ConfigDict) -> int:
    """Frames sampled per video: the one count, data.video_frames (AnyRes: 0 no videos; sources and
    `anyres_layouts` read it here)."""
    return c.data.get("video_frames", 0) or AnyResLayouts.video_frames


def video_fields(c: mlc.ConfigDict) -> dict:
    """A source's video arguments: `video_frames` frames of the records' videos below data.video_root."""
    return dict(video_root=c.data.get("video_root") or None, video_frames=video_frames(c))


def make_sources(c: mlc.ConfigDict, demo_paths) -> tuple[list, list[float]]:
    video = video_fields(c)
    if demo_paths is not None:
        json_path = demo_paths.stage1 if c.stage == 1 else demo_paths.stage2
        return [LlavaJsonSource(json_path, demo_paths.images, **video)], [1.0]
    if c.data.tfds_dir:
        from llava_jax.data.tfds_builder import TfdsLlavaSource  # TensorFlow Datasets: heavy, optional
        main = TfdsLlavaSource(c.data.tfds_dir)
    else:
        main = LlavaJsonSource(c.data.json, c.data.images, **video)
    sources, weights = [main], [float(c.data.weight)]
    for extra in c.data.extra_sources:
        sources.append(LlavaJsonSource(extra["json"], extra["images"], **video))
        weights.append(float(extra.get("weight", 1.0)))
    return sources, weights


def image_layout(name: str, model_cfg) -> ImageLayout:
    """One of the config's layout names (`train.anyres_recipes`: data.image_layout, data.multi_image_layout)
    on the model's tiles: "single", "single_newline", "anyres" or "anyres_max_N"."""
    tile, patch = model_cfg.vision.image_size, model_cfg.vision.patch_size
    if name in ("single", "single_newline"):
        return ImageLayout("single", tile, patch, newline=name == "single_newline")
    max_tiles = int(name[len("anyres_max_"):]) if name.startswith("anyres_max_") else 0
    return ImageLayout("anyres", tile, patch, model_cfg.image_grid_pinpoints, max_tiles=max_tiles)


def anyres_layouts(c: mlc.ConfigDict, model_cfg) -> AnyResLayouts:
    """The AnyRes input layouts of an AnyRes run. The one source of truth: the config's data fields say which
    layout each input takes (the stage's choice: stage 1 single tiles, later AnyRes); the model config gives
    the geometry (tile and patch size, grid pinpoints, the video token), which data.tile_size / patch_size
    must match."""
    tile, patch = model_cfg.vision.image_size, model_cfg.vision.patch_size
    if (c.data.tile_size, c.data.patch_size) != (tile, patch):
        raise ValueError(f"config.data.tile_size / patch_size {c.data.tile_size} / {c.data.patch_size} differ from "
                         f"the model's tower ({tile} / {patch})")
    video_token = getattr(model_cfg, "video_token_index", None)
    layouts = AnyResLayouts(image_layout(c.data.image_layout, model_cfg),
                            image_layout(c.data.multi_image_layout, model_cfg),
                            ImageLayout("video", tile, patch) if c.data.video_frames else None,
                            video_frames=video_frames(c), video_token_id=video_token)
    if layouts.tile_tokens != model_cfg.tile_tokens:
        raise ValueError(f"config.model: the tower gives {model_cfg.tile_tokens} features a tile, the layouts "
                         f"{layouts.tile_tokens}")
    return layouts


def pipeline_config(c: mlc.ConfigDict, model_cfg, sources, **fields) -> PipelineConfig:
    """The fields every pipeline of a run shares (the train stream's and the held-out pass's), LLaVA-1.5 or
    AnyRes (`model_init.family`: the layouts, tile slots and frames of `anyres_layouts`)."""
    if model_init.family(c) == "llava":
        images = dict(image_seq_length=model_cfg.image_seq_length)
    else:  # each image its own token count (image_seq_length unused)
        images = dict(anyres=anyres_layouts(c, model_cfg), max_tiles_per_row=c.data.max_tiles_per_row,
                      max_images_per_sample=c.data.max_images_per_sample)
    return PipelineConfig(sources=tuple(sources), template=c.data.template, max_length=c.data.max_length,
                          length_buckets=tuple(c.data.length_buckets), global_batch_size=c.train.global_batch_size,
                          image_config=image_config(c, model_cfg), image_token_id=model_cfg.image_token_index,
                          report_every=0, **images, **fields)


def make_data(c: mlc.ConfigDict, tokenizer, model_cfg, demo_paths, seed_offset: int = 0) -> DataSetup:
    sources, weights = make_sources(c, demo_paths)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if image_token != model_cfg.image_token_index:
        raise ValueError(f"the tokenizer's <image> id {image_token} differs from the model's image_token_index "
                         f"{model_cfg.image_token_index} (check config.data.tokenizer)")
    pc = pipeline_config(c, model_cfg, sources, weights=tuple(weights) if len(sources) > 1 else None,
                         seed=c.train.seed + seed_offset, num_epochs=None,
                         group_by_modality_length=c.data.group_by_modality_length, strict=c.data.strict,
                         worker_count=c.data.worker_count, packing=c.data.packing, pack_length=c.data.pack_length,
                         pack_window=c.data.pack_window, max_images_per_row=c.data.max_images_per_row)
    # FLOPs / MFU count image_mask.sum() images (AnyRes: tiles), each giving the projector this many features.
    return DataSetup(make_train_iterator(pc, tokenizer), sum(len(s) for s in sources),
                     metrics.features_per_tile(model_cfg), demo_paths)


class HeldOut:
    """The held-out loss: token-weighted cross entropy over the first `data.eval_batches` batches of one pass
    over `data.eval_json` (images under `data.images`), the same batches every time. Each sample counts at
    most once: a file shorter than the batches ends in a batch filled up with padding rows (no loss)."""

    def __init__(self, c: mlc.ConfigDict, tokenizer, model_cfg, demo_paths, graphdef, pad_token_id: int):
        images = demo_paths.images if demo_paths is not None else c.data.images
        source = LlavaJsonSource(c.data.eval_json, images, **video_fields(c))
        pc = pipeline_config(c, model_cfg, (source,), seed=c.train.seed, num_epochs=1, worker_count=0)
        iterator = make_train_iterator(pc, tokenizer)
        self.batches = [common_length(b, pad_token_id) for b in itertools.islice(iterator, c.data.eval_batches)]
        self.step = jax.jit(step_lib.make_eval_step(graphdef, model_init.DTYPES[c.model.dtype]))

    def loss(self, trainable, frozen, rest, mesh) -> float:
        sums = [self.step(trainable, frozen, rest, to_global(b, mesh)) for b in self.batches]
        total = sum(float(s["loss_sum"]) for s in sums)
        return total / max(sum(int(s["count"]) for s in sums), 1)


def to_global(batch: dict, mesh) -> dict:
    """This process's rows -> global jax.Arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}


def common_length(local: dict, pad_token_id: int) -> dict:
    """Right-pads every process's token arrays [b, T] to the longest T of all processes (each process picks
    its length bucket from its own rows; the global batch needs one)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    length = local["input_ids"].shape[1]
    target = int(np.max(multihost_utils.process_allgather(np.int32(length))))
    if target == length:
        return local
    return batch_spec.pad_tokens(local, target, pad_token_id)


