"""The batch contract: every field of a training batch with its axes, dtype and padding value.

The collate function and the packer of the input pipeline build batches from it, `train.inputs.common_length`
pads the token axis with its fill values, the planner lowers the step with its shapes and the train step
passes its packed-only fields to the model. A batch is a dict of numpy arrays (jax.Arrays on the device):

    field           axes                     dtype    padding
    input_ids       rows, tokens             int32    the tokenizer's pad id
    labels          rows, tokens             int32    -100 (no loss)
    attention_mask  rows, tokens             int32    0
    pixel_values    rows, images, pixels     float32  0
    image_mask      rows, images             bool     False (empty image slot)
    segment_ids     rows, tokens             int32    0 (packed only: 1, 2, ... per sample)
    positions       rows, tokens             int32    0 (packed only: restart at 0 per sample)
    image_taps_index   rows, tokens, taps    int32    0 (anyres only)
    image_taps_weight  rows, tokens, taps    float32  0.0 (anyres only)

Axes: `rows` the batch rows (absent for the single row the packer builds), `tokens` T, `images` I (image
slots of a row; AnyRes: its tile slots P), `pixels` the shape of one preprocessed image or tile (3, S, S),
`taps` `vision_layout.TAPS`. A row made of padding only (the last batch of a finite pass, see
`data.pipeline`) is all fill values: no tokens attend, no label counts.

Batch kinds: a field marked `only="packed"` exists in packed batches, `only="anyres"` in the batches of an
AnyRes model (LLaVA-NeXT / OneVision: `Layout.anyres`). An AnyRes row's token t takes the embedding
`sum_k weight[t, k] * rows[index[t, k]]` over `rows = [features of tile slot 0, ..., slot P - 1; newline]`
(`tile_tokens` rows a slot, the newline at row P * tile_tokens); weight 0 everywhere else.

A new field is one more row of FIELDS and, for a new axis, one more size of `Layout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from llava_jax.data.tokenize import IGNORE_INDEX
from llava_jax.vision_layout import TAPS

PAD_TOKEN = "pad_token"  # fill value standing for the tokenizer's pad id


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    axes: tuple[str, ...]
    dtype: type
    fill: int | float | bool | str  # PAD_TOKEN: the pad id
    only: str | None = None  # the batch kind that has the field (BATCH_KINDS), None: every batch

    def fill_value(self, pad_token_id: int):
        return pad_token_id if self.fill == PAD_TOKEN else self.fill


FIELDS = (
    Field("input_ids", ("rows", "tokens"), np.int32, PAD_TOKEN),
    Field("labels", ("rows", "tokens"), np.int32, IGNORE_INDEX),
    Field("attention_mask", ("rows", "tokens"), np.int32, 0),
    Field("pixel_values", ("rows", "images", "pixels"), np.float32, 0.0),
    Field("image_mask", ("rows", "images"), np.bool_, False),
    Field("segment_ids", ("rows", "tokens"), np.int32, 0, only="packed"),
    Field("positions", ("rows", "tokens"), np.int32, 0, only="packed"),
    Field("image_taps_index", ("rows", "tokens", "taps"), np.int32, 0, only="anyres"),
    Field("image_taps_weight", ("rows", "tokens", "taps"), np.float32, 0.0, only="anyres"),
)
BATCH_KINDS = ("packed", "anyres")
# The fields the model takes besides input_ids and the images, present in packed / AnyRes batches only.
PACKED_INPUTS = tuple(f.name for f in FIELDS if f.only == "packed")
ANYRES_INPUTS = tuple(f.name for f in FIELDS if f.only == "anyres")
TOKEN_FIELDS = tuple(f.name for f in FIELDS if "tokens" in f.axes)
_BY_NAME = {f.name: f for f in FIELDS}


@dataclasses.dataclass(frozen=True)
class Layout:
    """The sizes of a batch's axes and its kinds: `rows` None for one row without the rows axis (a packed
    row); `images` the image slots I of a row (AnyRes: its tile slots P); `anyres` adds the taps fields."""

    rows: int | None
    tokens: int
    images: int
    pixels: tuple[int, ...]
    packed: bool = False
    anyres: bool = False

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(k for k, on in zip(BATCH_KINDS, (self.packed, self.anyres)) if on)

    def shape(self, field: Field) -> tuple[int, ...]:
        sizes = {"rows": () if self.rows is None else (self.rows,), "tokens": (self.tokens,),
                 "images": (self.images,), "pixels": tuple(self.pixels), "taps": (TAPS,)}
        return tuple(size for axis in field.axes for size in sizes[axis])


def fields(layout: Layout) -> tuple[Field, ...]:
    """The fields a batch in `layout` has."""
    return tuple(f for f in FIELDS if f.only is None or f.only in layout.kinds)


def shapes(layout: Layout) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """field -> (shape, dtype) of a batch in `layout`."""
    return {f.name: (layout.shape(f), np.dtype(f.dtype)) for f in fields(layout)}


def empty(layout: Layout, pad_token_id: int) -> dict[str, np.ndarray]:
    """A batch in `layout` made of padding only (every field at its fill value)."""
    return {f.name: np.full(layout.shape(f), f.fill_value(pad_token_id), f.dtype) for f in fields(layout)}


def with_rows(rows: Sequence[Mapping[str, np.ndarray]], num_rows: int, layout: Layout,
              pad_token_id: int) -> dict[str, np.ndarray]:
    """Single rows (no rows axis) stacked into a batch of `num_rows`, padding rows after them."""
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {num_rows}")
    batch = empty(dataclasses.replace(layout, rows=num_rows), pad_token_id)
    for i, row in enumerate(rows):
        for name, array in batch.items():
            array[i] = row[name]
    return batch


def token_fill_values(pad_token_id: int) -> dict[str, int]:
    """field -> padding value of every field with a token axis."""
    return {f.name: f.fill_value(pad_token_id) for f in FIELDS if f.name in TOKEN_FIELDS}


def pad_tokens(batch: Mapping[str, np.ndarray], length: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """Right-pads the token axis of every token field of a batch (rows axis present) to `length`."""
    fill = token_fill_values(pad_token_id)
    out = {}
    for name, value in batch.items():
        if name not in fill:
            out[name] = value
            continue
        axis = _BY_NAME[name].axes.index("tokens")
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, length - value.shape[axis])
        out[name] = np.pad(value, widths, constant_values=fill[name])
    return out


def place_taps(index: np.ndarray, weight: np.ndarray, *, tiles: int, slot: int, slots: int, tile_tokens: int
               ) -> np.ndarray:
    """A sample's own taps index [T, TAPS] (over `[its tiles * tile_tokens features; newline]`, the newline at
    tiles * tile_tokens) -> the row's index when its tiles take slots `slot, slot + 1, ...` of `slots`: a
    feature row i -> i + slot * tile_tokens, the newline -> slots * tile_tokens. Text tokens (all weights 0)
    keep index 0."""
    own = tiles * tile_tokens
    moved = np.where(index == own, slots * tile_tokens, index + slot * tile_tokens)
    return np.where(np.any(weight != 0, axis=-1, keepdims=True), moved, 0).astype(np.int32)


def padding_rows(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool [rows]: the rows holding no sample (padding of a last, partial batch)."""
    return ~np.asarray(batch["attention_mask"]).astype(bool).any(axis=-1)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise ValueError(f"length {length} exceeds the largest length bucket {buckets[-1]}")
