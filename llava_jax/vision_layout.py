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

import dataclasses
import math
from typing import Sequence

import numpy as np

LAYOUT_KINDS = ("single", "anyres", "video")


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """How one image (or video) becomes tiles and tokens; the counts equal transformers' processors
    (`LlavaNextProcessor`, `LlavaOnevisionProcessor`).

    Attributes:
      kind: "single" (one tile: LLaVA-1.5, OneVision's images of a multi-image sample), "anyres" (a base tile
        plus the grid tiles of the best pinpoint; `max_tiles` > 0 makes it OneVision's "anyres_max_N") or
        "video" (each frame one tile, pooled 2x2, one newline after the last frame).
      tile_size: S, the tower's input side; every tile is [3, S, S].
      patch_size: the tower's patch size; a tile has (S // patch_size)**2 patch features.
      grid_pinpoints: ((height, width), ...) the AnyRes canvases, multiples of tile_size.
      cls_token: the single / base tile keeps the tower's CLS feature too (strategy "full" on a CLIP tower).
      newline: "single" only: a newline embedding follows the tile (OneVision's multi-image). AnyRes always
        ends each grid feature row with one, video ends with one.
      max_tiles: "anyres" only: N of "anyres_max_N", 0 for none.
    """

    kind: str
    tile_size: int
    patch_size: int
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    cls_token: bool = False
    newline: bool = False
    max_tiles: int = 0

    def __post_init__(self):
        object.__setattr__(self, "grid_pinpoints", tuple((int(h), int(w)) for h, w in self.grid_pinpoints))
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"ImageLayout.kind must be one of {LAYOUT_KINDS}, got {self.kind!r}")
        if not 0 < self.patch_size <= self.tile_size:
            raise ValueError(f"ImageLayout.patch_size must be in 1..tile_size, got {self.patch_size} "
                             f"(tile_size {self.tile_size})")
        if self.max_tiles < 0 or (self.max_tiles and self.kind != "anyres"):
            raise ValueError(f"ImageLayout.max_tiles must be >= 0 and only set for 'anyres', got {self.max_tiles}")
        if self.newline and self.kind != "single":
            raise ValueError(f"ImageLayout.newline is a 'single' option, not for {self.kind!r}")
        if self.cls_token and self.kind == "video":
            raise ValueError("ImageLayout.cls_token cannot be set for 'video' (frames are pooled patch grids)")
        self._check_pinpoints()

    def _check_pinpoints(self) -> None:
        if self.kind == "anyres" and not self.grid_pinpoints:
            raise ValueError("ImageLayout.grid_pinpoints must not be empty for 'anyres'")
        for height, width in self.grid_pinpoints:
            if height <= 0 or width <= 0 or height % self.tile_size or width % self.tile_size:
                raise ValueError(f"ImageLayout.grid_pinpoints: {[height, width]} is not a positive multiple of "
                                 f"tile_size {self.tile_size}")

    @property
    def patches_per_side(self) -> int:
        """Patch features along a tile's side (SigLIP 384 / 14 -> 27: the tower drops the remainder)."""
        return self.tile_size // self.patch_size

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        """Pixel tiles of an image of (height, width): 1, or 1 + rows * cols for AnyRes; 1 a video frame."""
        _check_image_size(image_size)
        if self.kind != "anyres":
            return 1
        rows, cols = anyres_grid_shape(image_size, self.grid_pinpoints, self.tile_size)
        return 1 + rows * cols

    @property
    def max_num_tiles(self) -> int:
        """The most tiles one image can have: 1 + the largest pinpoint's grid ("anyres"), else 1."""
        if self.kind != "anyres":
            return 1
        return 1 + max(h // self.tile_size * (w // self.tile_size) for h, w in self.grid_pinpoints)

    def num_tokens(self, image_size: tuple[int, int]) -> int:
        """Feature vectors (image tokens) an image of (height, width) yields."""
        _check_image_size(image_size)
        if self.kind == "video":
            raise ValueError("ImageLayout.num_tokens: a 'video' layout counts frames, use num_video_tokens")
        side = self.patches_per_side
        base = side * side + int(self.cls_token)
        if self.kind == "single":
            return base + int(self.newline)
        rows, cols = self.grid_feature_shape(image_size)
        return base + rows * cols + rows  # + one newline per feature row

    def grid_feature_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of an AnyRes image's grid features after unpadding (and anyres_max downsampling)."""
        rows, cols = anyres_grid_shape(image_size, self.grid_pinpoints, self.tile_size)
        side = self.patches_per_side
        shape = unpadded_shape(image_size, (rows * side, cols * side))
        return downsampled_shape(shape, self.max_tiles, side) if self.max_tiles else shape

    @property
    def tile_tokens(self) -> int:
        """Feature vectors the tower gives per tile: its patch grid, plus CLS when `cls_token`."""
        return self.patches_per_side ** 2 + int(self.cls_token)

    def taps(self, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The image's own taps over `[its num_tiles(image_size) * tile_tokens tile features; newline]`:
        (index int32 [num_tokens, TAPS], weight float32 [num_tokens, TAPS])."""
        _check_image_size(image_size)
        size = (int(image_size[0]), int(image_size[1]))
        if self.kind == "video":
            raise ValueError("ImageLayout.taps: a 'video' layout takes frames, use video_taps")
        if self.kind == "single":
            return gather_taps(np.arange(self.tile_tokens + int(self.newline)))
        if self.cls_token:
            raise ValueError("ImageLayout.taps: cls_token is not supported for 'anyres' (the models take the "
                             "square patch grid)")
        return anyres_taps(size, self.grid_pinpoints, self.tile_size, self.patches_per_side, self.max_tiles)

    def video_taps(self, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """A video's own taps over `[num_frames * tile_tokens frame features; newline]`:
        (index int32 [num_video_tokens, TAPS], weight float32 [num_video_tokens, TAPS])."""
        self.num_video_tokens(num_frames)  # checks kind and num_frames
        return video_taps(num_frames, self.patches_per_side)

    def num_video_tokens(self, num_frames: int) -> int:
        """Tokens of a video of `num_frames` frames: each frame's patch grid pooled to ceil(side / 2) a side,
        one newline at the end (`LlavaOnevisionProcessor`)."""
        if self.kind != "video":
            raise ValueError(f"ImageLayout.num_video_tokens needs kind 'video', got {self.kind!r}")
        if num_frames < 1:
            raise ValueError(f"ImageLayout.num_video_tokens: num_frames must be >= 1, got {num_frames}")
        pooled = math.ceil(self.patches_per_side / 2)
        return num_frames * pooled * pooled + 1


def max_tiles_from_aspect_ratio(vision_aspect_ratio: str) -> int:
    """N of OneVision's `vision_aspect_ratio` "anyres_max_N"; 0 for plain "anyres"."""
    if vision_aspect_ratio == "anyres":
        return 0
    prefix = "anyres_max_"
    digits = vision_aspect_ratio[len(prefix):] if vision_aspect_ratio.startswith(prefix) else ""
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"vision_aspect_ratio must be 'anyres' or 'anyres_max_N' (N >= 1), got "
                         f"{vision_aspect_ratio!r}")
    return int(digits)


def _check_image_size(image_size: tuple[int, int]) -> None:
    height, width = image_size
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be a positive (height, width), got {tuple(image_size)}")


def unpadded_shape(image_size: tuple[int, int], grid_shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a padded feature grid of `grid_shape` once the rows / columns of the letterbox padding
    are removed, for an image of (height, width); transformers' arithmetic, `round(..., 7)` included."""
    top, bottom, left, right = unpad_bounds(image_size, *grid_shape)
    return bottom - top, right - left


def downsampled_shape(shape: tuple[int, int], max_tiles: int, patches_per_side: int) -> tuple[int, int]:
    """OneVision's anyres_max_N: an unpadded grid of (rows, cols) features holding over 1.1**2 * N tiles'
    worth is bilinearly resized by 1 / ratio, ratio = sqrt(rows * cols / (N * side**2))."""
    rows, cols = shape
    ratio = math.sqrt(rows * cols / (max_tiles * patches_per_side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


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


# --- Feature taps: each image's tokens as a sparse linear map of its tile features and the newline. ---


TAPS = 4  # taps per token: a gather uses 1 (the others weigh 0), bilinear resampling 4


def gather_taps(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain gather of `rows` (int [n]) -> (index int32 [n, TAPS], weight float32 [n, TAPS]) with one tap of
    weight 1 (the padding taps point at row 0 with weight 0)."""
    rows = np.asarray(rows, np.int32).reshape(-1)
    index = np.zeros((rows.size, TAPS), np.int32)
    weight = np.zeros((rows.size, TAPS), np.float32)
    index[:, 0], weight[:, 0] = rows, 1.0
    return index, weight


def _linear_source(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's upsample source indices (align_corners=False, output size given, no antialias), float32
    arithmetic as its CPU kernel: (i0 [out], i1 [out], lambda1 [out]) with out = (1 - l1) * x[i0] + l1 * x[i1]."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, lam


def bilinear_taps(grid_rows: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """`F.interpolate(mode="bilinear", align_corners=False)` of a feature grid whose cell (y, x) is row
    grid_rows[y, x] (int [H, W]) to [out_h, out_w] -> (index [out_h * out_w, 4], weight [out_h * out_w, 4]),
    row-major over the output grid."""
    in_h, in_w = grid_rows.shape
    y0, y1, ly = _linear_source(in_h, out_h)
    x0, x1, lx = _linear_source(in_w, out_w)
    ys, xs = (y0, y0, y1, y1), (x0, x1, x0, x1)
    wy, wx = (1 - ly, 1 - ly, ly, ly), (1 - lx, lx, 1 - lx, lx)
    index = np.stack([grid_rows[y[:, None], x[None, :]] for y, x in zip(ys, xs)], axis=-1)
    weight = np.stack([a[:, None] * b[None, :] for a, b in zip(wy, wx)], axis=-1).astype(np.float32)
    return index.reshape(-1, TAPS).astype(np.int32), weight.reshape(-1, TAPS)


def unpad_bounds(image_size: tuple[int, int], grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the image's content in a [grid_h, grid_w] feature grid of its padded,
    resized tiles (transformers' `unpad_image`); image_size: (height, width) of the original image."""
    height, width = image_size
    if width / height > grid_w / grid_h:
        new_height = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_height) // 2
        return pad, grid_h - pad, 0, grid_w
    new_width = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_width) // 2
    return 0, grid_h, pad, grid_w - pad


def anyres_grid_rows(image_size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int,
                     patches_per_side: int) -> np.ndarray:
    """The unpadded feature grid of an AnyRes image: int [h, w], each cell its row among the image's tile
    features (tile-major, tile 0 = the base tile, then the grid tiles row by row)."""
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, tile_size)
    side, per_tile = patches_per_side, patches_per_side ** 2
    y, x = np.arange(rows * side)[:, None], np.arange(cols * side)[None, :]
    tile = 1 + (y // side) * cols + x // side
    grid = tile * per_tile + (y % side) * side + x % side
    top, bottom, left, right = unpad_bounds(image_size, rows * side, cols * side)
    return grid[top:bottom, left:right]


def _with_newlines(index: np.ndarray, weight: np.ndarray, h: int, w: int, newline: int):
    """Row-major grid taps [h * w, 4] -> [h * (w + 1), 4] with a newline tap ending each grid row."""
    nl_index, nl_weight = gather_taps(np.full(h, newline))
    index = np.concatenate([index.reshape(h, w, TAPS), nl_index[:, None]], axis=1)
    weight = np.concatenate([weight.reshape(h, w, TAPS), nl_weight[:, None]], axis=1)
    return index.reshape(-1, TAPS), weight.reshape(-1, TAPS)


def anyres_taps(image_size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int,
                patches_per_side: int, max_tiles: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Taps of one AnyRes image over `[tile features (num_tiles * patches); newline]`: the base tile's
    patches, then the unpadded grid (bilinearly downsampled as LLaVA-OneVision's anyres_max_N when it holds
    more than ~1.1x max_tiles tiles' worth of features), each of its rows ended by the newline.
    image_size: (height, width). Returns (index int32 [n_tokens, 4], weight float32 [n_tokens, 4])."""
    per_tile = patches_per_side ** 2
    grid = anyres_grid_rows(image_size, grid_pinpoints, tile_size, patches_per_side)
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, tile_size)
    newline = (1 + rows * cols) * per_tile
    h, w = grid.shape
    index, weight = gather_taps(grid)
    if max_tiles and downsampled_shape((h, w), max_tiles, patches_per_side) != (h, w):
        h, w = downsampled_shape((h, w), max_tiles, patches_per_side)
        index, weight = bilinear_taps(grid, h, w)
    index, weight = _with_newlines(index, weight, h, w, newline)
    base_index, base_weight = gather_taps(np.arange(per_tile))
    return np.concatenate([base_index, index]), np.concatenate([base_weight, weight])


def single_tile_taps(tile_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """One tile's features followed by the newline (LLaVA-OneVision's images in a multi-image message)."""
    return gather_taps(np.arange(tile_tokens + 1))


def video_taps(num_frames: int, patches_per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """A video of `num_frames` one-tile frames (LLaVA-OneVision): each frame's [s, s] feature map bilinearly
    pooled to [ceil(s / 2), ceil(s / 2)], frame after frame, then one newline ending the video."""
    side, per_tile = patches_per_side, patches_per_side ** 2
    pooled = -(-side // 2)
    frame = np.arange(per_tile).reshape(side, side)
    parts = [bilinear_taps(frame + f * per_tile, pooled, pooled) for f in range(num_frames)]
    parts.append(gather_taps([num_frames * per_tile]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def concat_taps(taps: Sequence[tuple[np.ndarray, np.ndarray]], tiles: Sequence[int], tile_tokens: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Several images' taps -> taps over `[all images' tile features, image after image; newline]` (the
    rows a model sees for one forward). taps[i] indexes image i's rows `[tiles[i] * tile_tokens; newline]`.
    Returns (index int32 [sum n_tokens, 4], weight float32 [sum n_tokens, 4])."""
    if len(taps) != len(tiles):
        raise ValueError(f"concat_taps: {len(taps)} taps but {len(tiles)} tile counts")
    total, offset, out_index = sum(tiles) * tile_tokens, 0, []
    for (index, _), n in zip(taps, tiles):
        own = n * tile_tokens
        if index.size and int(index.max()) > own:
            raise ValueError(f"concat_taps: taps index row {int(index.max())} beyond the {own} + 1 rows of "
                             f"{n} tiles")
        out_index.append(np.where(index == own, total, index + offset))
        offset += own
    if not taps:
        return np.zeros((0, TAPS), np.int32), np.zeros((0, TAPS), np.float32)
    return np.concatenate(out_index).astype(np.int32), np.concatenate([w for _, w in taps]).astype(np.float32)
