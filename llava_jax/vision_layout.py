"""Where an image's pixels and tokens are decided: the one place that says, per image, which pixel tiles it
becomes and which feature vectors (how many tokens) it yields. Ground floor (numpy only): data reads it to
tokenize and pack, models to merge, infer and the planner to size prompts and batches.

Layouts:
- "single" (LLaVA-1.5 pad / resize): one tile, the tower's tokens (576, or 577 with CLS).
- "anyres" (LLaVA-NeXT): a base tile plus the tiles of the best grid pinpoint; the grid features are
  unpadded to the image's aspect ratio and a newline embedding ends each feature row.
- "anyres_max_N" (LLaVA-OneVision): as "anyres", the unpadded grid bilinearly downsampled when it holds
  more than N tiles' worth of features.
- video frames: each frame one tile, its feature map pooled 2x2 (bilinear).

Feature *taps* express every layout as one sparse linear map: an image's token t is
`sum_k weight[t, k] * rows[index[t, k]]` over the rows of `[tile features (tiles * patches, tile-major); the
newline embedding]`. A plain gather is one tap of weight 1, bilinear resampling four. The number of taps
rows is the image's token count, so counting and merging cannot disagree.
"""

from __future__ import annotations

from typing import Sequence


def select_best_resolution(original_size: tuple[int, int], possible_resolutions: Sequence[Sequence[int]]
                           ) -> tuple[int, int]:
    """The (height, width) of `possible_resolutions` that keeps the most of the image's resolution after an
    aspect-preserving resize, ties broken by the least padding (transformers' and LLaVA-NeXT's rule).
    original_size: (height, width)."""
    original_height, original_width = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best_fit, max_effective, min_wasted = (int(height), int(width)), effective, wasted
    if best_fit is None:
        raise ValueError(f"select_best_resolution: no grid pinpoint in {list(possible_resolutions)!r}")
    return best_fit


def anyres_grid_shape(image_size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]],
                      tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of (height, width) under AnyRes."""
    height, width = select_best_resolution(image_size, grid_pinpoints)
    return height // tile_size, width // tile_size
