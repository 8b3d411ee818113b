"""Pixel tiles of an `ImageLayout`: images and video frames -> float32 [n_tiles, 3, S, S], pixel for pixel
transformers' PIL processors (`LlavaNextImageProcessorPil`, `LlavaOnevisionImageProcessorPil`).

AnyRes (LLaVA-NeXT, OneVision): the image is resized (PIL bicubic on uint8, aspect kept, the short side
rounded up) to fit the best grid pinpoint, pasted centered on a black canvas of the pinpoint's size and cut
into S x S tiles, row-major; the base tile in front is the whole image squashed to S x S. "single" tiles are
OneVision's multi-image tiles: padded to a square of the mean colour, then resized to S x S (for LLaVA-1.5
use `images.preprocess`, which equals it for a square crop). Video frames are each resized to S x S.

Unlike the processors we never pad a batch's images to its largest tile count (their `do_pad`, zero tiles
appended): each image has exactly `layout.num_tiles(size)` tiles, the batch layout decides the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.images import expand_to_square, level_table, normalize_levels
from llava_jax.vision_layout import ImageLayout, select_best_resolution

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class PixelNorm:
    """What turns resized uint8 pixels into the tower's input (the tower's config owns the values).

    Attributes:
      mean, std: per-channel normalization (CLIP's in `images.CLIP_MEAN` / `CLIP_STD`, SigLIP's 0.5 / 0.5).
      rescale_factor: applied to uint8 levels before normalizing.
      resample: PIL filter of every resize (bicubic).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"PixelNorm.mean and std need 3 values, got {self.mean} and {self.std}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    @property
    def background(self) -> tuple[int, int, int]:
        """The padding colour of a square tile: `tuple(int(x * 255) for x in image_mean)`."""
        return tuple(int(x * 255) for x in self.mean)


@functools.lru_cache(maxsize=16)
def _table(norm: PixelNorm) -> np.ndarray:
    return level_table(norm.rescale_factor, norm.mean, norm.std)


def image_tiles(image: Image.Image, layout: ImageLayout, norm: PixelNorm) -> np.ndarray:
    """An image -> float32 [layout.num_tiles((H, W)), 3, S, S]: the base tile then the grid row-major
    ("anyres"), or the one padded square tile ("single")."""
    if layout.kind == "video":
        raise ValueError("image_tiles: layout.kind 'video' takes frames, use video_tiles")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image_tiles: the image is empty ({image.width}x{image.height})")
    if image.mode != "RGB":
        image = image.convert("RGB")
    side = layout.tile_size
    if layout.kind == "single":
        square = expand_to_square(image, norm.background).resize((side, side), resample=norm.resample)
        tiles = np.asarray(square)[None]
    else:
        base = np.asarray(image.resize((side, side), resample=norm.resample))
        tiles = np.concatenate([base[None], _grid_tiles(image, layout, norm.resample)])
    return normalize_levels(tiles, _table(norm))


def _grid_tiles(image: Image.Image, layout: ImageLayout, resample: int) -> np.ndarray:
    """uint8 [rows * cols, S, S, 3]: the image fitted into its best pinpoint's canvas, cut row-major."""
    height, width = select_best_resolution((image.height, image.width), layout.grid_pinpoints)
    canvas = letterbox(image, (height, width), resample)
    side = layout.tile_size
    tiles = canvas.reshape(height // side, side, width // side, side, 3).transpose(0, 2, 1, 3, 4)
    return tiles.reshape(-1, side, side, 3)


def letterbox(image: Image.Image, target: tuple[int, int], resample: int) -> np.ndarray:
    """uint8 [height, width, 3]: the image resized to fit `target` (height, width) with its aspect kept
    (transformers' `get_patch_output_size`: the fitted side exact, the other rounded up), centered on black."""
    target_height, target_width = target
    scale_w, scale_h = target_width / image.width, target_height / image.height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(image.height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(image.width * scale_h), target_width), target_height
    resized = np.asarray(image.resize((new_width, new_height), resample=resample))
    top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
    canvas = np.zeros((target_height, target_width, 3), np.uint8)
    canvas[top:top + new_height, left:left + new_width] = resized
    return canvas


def video_tiles(frames: np.ndarray | Sequence[Image.Image], layout: ImageLayout, norm: PixelNorm) -> np.ndarray:
    """Video frames (PIL images, or uint8 [T, H, W, 3]) -> float32 [T, 3, S, S], each frame resized to S x S."""
    if layout.kind != "video":
        raise ValueError(f"video_tiles needs a layout of kind 'video', got {layout.kind!r}")
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
            raise ValueError(f"video_tiles: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        frames = [Image.fromarray(frame) for frame in frames]
    if not frames:
        raise ValueError("video_tiles: frames is empty")
    side = layout.tile_size
    resized = [np.asarray(frame.convert("RGB").resize((side, side), resample=norm.resample)) for frame in frames]
    return normalize_levels(np.stack(resized), _table(norm))
