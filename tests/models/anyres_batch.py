"""Hand-built AnyRes training batches (the AnyRes batch contract's fields) for tiny random LLaVA-NeXT / OneVision
models: each sample's tiles from `data/anyres.py`, its taps from `vision_layout`, placed in rows as collate and the
packer do (tile slots in prompt order; own index i -> i + slot_offset * tile_tokens, own newline -> P * tile_tokens).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from llava_jax import vision_layout
from llava_jax.data import anyres
from llava_jax.models import clip_vit, llama
from llava_jax.models.llava_next import LlavaNextConfig, LlavaOnevisionConfig

TILE, PATCH = 24, 6          # 4 x 4 = 16 features a tile (CLIP "default" drops the CLS)
PINPOINTS = ((24, 48), (48, 24), (48, 48))
IMAGE, VIDEO, VOCAB = 61, 62, 64
NORM = anyres.PixelNorm(mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))


def tiny_config(onevision: bool = False, **overrides) -> LlavaNextConfig:
    vision = clip_vit.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=TILE, patch_size=PATCH)
    text = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if onevision:
        return LlavaOnevisionConfig(vision=vision, text=text, image_token_index=IMAGE, video_token_index=VIDEO,
                                    image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1", **overrides)
    return LlavaNextConfig(vision=vision, text=text, image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS,
                           **overrides)


@dataclasses.dataclass
class Sample:
    """One tokenized sample: input_ids / labels [n], tiles [n_tiles, 3, S, S], own taps [visual tokens, 4] over
    `[its tiles' features; newline]` (images' tiles, then the video's frames), and what made them."""

    input_ids: np.ndarray
    labels: np.ndarray
    tiles: np.ndarray
    index: np.ndarray
    weight: np.ndarray
    image_sizes: tuple = ()
    video_frames: int = 0


def _layout(config) -> vision_layout.ImageLayout:
    return vision_layout.ImageLayout("anyres", config.vision.image_size, config.vision.patch_size,
                                     config.image_grid_pinpoints, max_tiles=config.max_tiles)


def _visual_ids(config) -> tuple[int, ...]:
    return tuple(i for i in (config.image_token_index, getattr(config, "video_token_index", None)) if i is not None)


def sample(config, rng: np.random.Generator, image_sizes=(), video_frames: int = 0) -> Sample:
    """A prompt, each image's tokens (then the video's), an answer; random pixels (token ids 2..59)."""
    side, tokens, tile = config.patches_per_side, config.tile_tokens, config.vision.image_size
    taps, tile_counts, tiles, ids = [], [], [], list(rng.integers(2, 60, int(rng.integers(1, 5))))
    for height, width in image_sizes:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        tiles.append(anyres.image_tiles(image, _layout(config), NORM))
        taps.append(vision_layout.anyres_taps((height, width), config.image_grid_pinpoints, tile, side,
                                              config.max_tiles))
        tile_counts.append(len(tiles[-1]))
        ids += [config.image_token_index] * len(taps[-1][0]) + list(rng.integers(2, 60, 2))
    if video_frames:
        tiles.append(rng.normal(size=(video_frames, 3, tile, tile)).astype(np.float32))
        taps.append(vision_layout.video_taps(video_frames, side))
        tile_counts.append(video_frames)
        ids += [config.video_token_index] * len(taps[-1][0])
    index, weight = vision_layout.concat_taps(taps, tile_counts, tokens)
    answer = list(rng.integers(2, 60, int(rng.integers(2, 8))))
    prompt_length = len(ids)
    ids = np.asarray(ids + answer, np.int32)
    labels = np.where(np.arange(len(ids)) < prompt_length, -100, ids).astype(np.int32)
    all_tiles = np.concatenate(tiles) if tiles else np.zeros((0, 3, tile, tile), np.float32)
    return Sample(ids, labels, all_tiles, index, weight, tuple(image_sizes), video_frames)


def rows(config, layout: list[list[Sample]], length: int, slots: int, packed: bool) -> dict[str, np.ndarray]:
    """A batch of the contract: row r holds the samples layout[r] one after the other (packed: segment_ids 1,
    2, ... and positions restarting per sample); `slots` = P tile slots a row."""
    b, tt, tile = len(layout), config.tile_tokens, config.vision.image_size
    batch = {"input_ids": np.zeros((b, length), np.int32), "labels": np.full((b, length), -100, np.int32),
             "attention_mask": np.zeros((b, length), np.int32),
             "pixel_values": np.zeros((b, slots, 3, tile, tile), np.float32),
             "image_mask": np.zeros((b, slots), bool),
             "image_taps_index": np.zeros((b, length, vision_layout.TAPS), np.int32),
             "image_taps_weight": np.zeros((b, length, vision_layout.TAPS), np.float32)}
    if packed:
        batch |= {"segment_ids": np.zeros((b, length), np.int32), "positions": np.zeros((b, length), np.int32)}
    for r, samples in enumerate(layout):
        pos = slot = 0
        for j, s in enumerate(samples):
            n, k = len(s.input_ids), len(s.tiles)
            span = slice(pos, pos + n)
            batch["input_ids"][r, span], batch["labels"][r, span], batch["attention_mask"][r, span] = \
                s.input_ids, s.labels, 1
            if packed:
                batch["segment_ids"][r, span], batch["positions"][r, span] = j + 1, np.arange(n)
            visual = pos + np.flatnonzero(np.isin(s.input_ids, _visual_ids(config)))
            own = k * tt
            batch["image_taps_index"][r, visual] = np.where(s.index == own, slots * tt, s.index + slot * tt)
            batch["image_taps_weight"][r, visual] = s.weight
            batch["pixel_values"][r, slot:slot + k], batch["image_mask"][r, slot:slot + k] = s.tiles, True
            pos, slot = pos + n, slot + k
    return batch
