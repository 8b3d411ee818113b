"""Images and videos of AnyRes models (LLaVA-NeXT, LLaVA-OneVision) for generation: each becomes `Tiles` (its pixel
tiles and its feature taps, so its token count), and a batch's tiles are packed into bucketed arrays.

Rules (transformers' processors): an AnyRes image is a base tile plus its best pinpoint's grid; on OneVision a
prompt holding several images gets single-tile images (`batch_num_images` > 1); a video (OneVision) is its frames,
one tile each. Buckets: the tiles of a batch are padded (zero tiles) to a power of two, and the taps to
`tile_bucket * (tile_tokens + patches_per_side)` rows (a bound on the tokens of that many tiles), so the compiled
prefill depends on the tile bucket only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from llava_jax import vision_layout
from llava_jax.data.anyres import PixelNorm, image_tiles, video_tiles
from llava_jax.data.images import ImageConfig, read_image_bytes
from llava_jax.data.video import DEFAULT_MAX_VIDEO_BYTES, decode_frames, decode_video, read_frame_folder
from llava_jax.infer.decoding import next_power_of_two
from llava_jax.models import llava_next


@dataclasses.dataclass(frozen=True)
class Video:
    """A video for a OneVision prompt: frames uint8 [T, H, W, 3] or a list of PIL images (sampled already,
    `data.video`)."""

    frames: np.ndarray | Sequence[Image.Image]


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One prepared image or video: pixels float32 [n, 3, S, S] and its taps (index int32 [tokens, 4], weight
    float32 [tokens, 4]) over `[its n * tile_tokens features; newline]`."""

    pixels: np.ndarray
    index: np.ndarray
    weight: np.ndarray
    video: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.index.shape[0])


def read_video(path: str | os.PathLike, num_frames: int) -> Video:
    """A video file (PyAV) or a folder of frame images -> `Video` of `num_frames` frames sampled uniformly
    (`data.video`; BadSample naming the file when it cannot be read)."""
    path = Path(path)
    if path.is_dir():
        frames = read_frame_folder(path, os.listdir(path), num_frames=num_frames)
        return Video(decode_frames(frames, name=str(path)))
    data = read_image_bytes(path, max_bytes=DEFAULT_MAX_VIDEO_BYTES, name=str(path))
    return Video(decode_video(data, num_frames=num_frames, name=str(path)))


def pixel_norm(image_config: ImageConfig) -> PixelNorm:
    return PixelNorm(image_config.mean, image_config.std, image_config.rescale_factor, image_config.resample)


def max_tiles_per_image(config: llava_next.LlavaNextConfig) -> int:
    """The most tiles one AnyRes image takes: the base tile plus the largest pinpoint's grid."""
    side = config.vision.image_size
    return 1 + max((h // side) * (w // side) for h, w in config.image_grid_pinpoints)


def taps_rows(config: llava_next.LlavaNextConfig, tiles: int) -> int:
    """Taps rows of a tile bucket: every image's tokens are at most its tiles x (tile_tokens + one newline per
    feature row of a tile), so the tokens of `tiles` tiles fit."""
    return tiles * (config.tile_tokens + config.patches_per_side)


def prepare(config: llava_next.LlavaNextConfig, items: Sequence, image_config: ImageConfig) -> list[Tiles]:
    """A prompt's images (PIL) and videos (`Video`), in placeholder order -> their `Tiles`; `Tiles` pass through."""
    norm, side, patch = pixel_norm(image_config), config.vision.image_size, config.vision.patch_size
    onevision = isinstance(config, llava_next.LlavaOnevisionConfig)
    num_images = sum(isinstance(x, Image.Image) for x in items)
    out = []
    for k, item in enumerate(items):
        if isinstance(item, Tiles):
            out.append(item)
        elif isinstance(item, Video):
            if not onevision:
                raise ValueError(f"item {k}: videos need a LLaVA-OneVision model")
            pixels = video_tiles(item.frames, vision_layout.ImageLayout("video", side, patch), norm)
            index, weight = vision_layout.video_taps(len(pixels), config.patches_per_side)
            out.append(Tiles(pixels, index, weight, video=True))
        elif isinstance(item, Image.Image):
            out.append(_image(config, item, norm, single=onevision and num_images > 1))
        else:
            raise TypeError(f"item {k}: expected a PIL image, a Video or Tiles, got {type(item).__name__}")
    return out


def _image(config: llava_next.LlavaNextConfig, image: Image.Image, norm: PixelNorm, single: bool) -> Tiles:
    side, patch = config.vision.image_size, config.vision.patch_size
    if single:
        layout = vision_layout.ImageLayout("single", side, patch, newline=True)
        index, weight = vision_layout.single_tile_taps(config.tile_tokens)
    else:
        layout = vision_layout.ImageLayout("anyres", side, patch, config.image_grid_pinpoints,
                                           max_tiles=config.max_tiles)
        index, weight, _ = llava_next.image_taps(config, [(image.height, image.width)])
    return Tiles(image_tiles(image, layout, norm), index, weight)


def pack(config: llava_next.LlavaNextConfig, tiles: Sequence[Tiles], min_tiles: int = 1
         ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Tiles of a batch (row after row, in order) -> (pixels float32 [N, 3, S, S], taps (index [R, 4], weight
    [R, 4])), N = the tiles' power-of-two bucket (at least `min_tiles`), R = `taps_rows(N)`; padding tiles are
    zeros, padding taps weigh 0."""
    counts = [len(t.pixels) for t in tiles]
    n = next_power_of_two(max(sum(counts), min_tiles))
    side = config.vision.image_size
    pixels = np.zeros((n, 3, side, side), np.float32)
    if tiles:
        pixels[:sum(counts)] = np.concatenate([t.pixels for t in tiles])
    empty = (np.zeros((0, vision_layout.TAPS), np.int32), np.zeros((0, vision_layout.TAPS), np.float32))
    index, weight = vision_layout.concat_taps([(t.index, t.weight) for t in tiles] + [empty],
                                              counts + [n - sum(counts)], config.tile_tokens)
    rows = taps_rows(config, n)
    padded_index = np.zeros((rows, vision_layout.TAPS), np.int32)
    padded_weight = np.zeros((rows, vision_layout.TAPS), np.float32)
    padded_index[:len(index)], padded_weight[:len(weight)] = index, weight
    return pixels, (padded_index, padded_weight)


__all__ = ["Video", "Tiles", "prepare", "read_video", "pack", "pixel_norm", "max_tiles_per_image", "taps_rows"]
