"""LLaVA-NeXT and LLaVA-OneVision: LLaVA with AnyRes images (a base tile plus the tiles of the best grid
pinpoint, the grid's features unpadded to the image's aspect ratio, an `image_newline` embedding ending each
feature row), as transformers' LlavaNextForConditionalGeneration / LlavaOnevisionForConditionalGeneration.
OneVision adds `vision_aspect_ratio` "anyres_max_N" (the unpadded grid bilinearly downsampled beyond ~N
tiles), single-tile images when a message holds several, and videos (frames pooled 2x2, one newline each).

Parameter names are the classic on-disk layout: `vision_tower.vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.weight`, `image_newline` [D_text].

Shapes stay static under jit: the host computes each image's arrangement as feature taps
(`llava_jax.vision_layout`, `image_taps` / `video_taps` below): the forward takes all images' tiles
pixel_values [n_tiles, 3, S, S] and taps (index int32 [n_tokens, 4], weight float32 [n_tokens, 4]) over
the rows `[tile features (n_tiles * tokens per tile); image_newline]`. The k-th image token of input_ids
(counted over the whole batch, row by row) receives token k, as transformers' masked_scatter.

Training batches are row-aligned instead (`data.batch`'s AnyRes fields): pixel_values [B, P, 3, S, S] (P tile
slots a row), image_mask [B, P] and token-aligned taps image_taps_index / image_taps_weight [B, T, 4] over the
row's own `[tile features (P * tokens per tile); image_newline]`, so each device encodes and merges its own
rows' tiles (see `embed_rows`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax import vision_layout
from llava_jax.models import clip_vit, layers, llama, siglip
from llava_jax.models.towers import VisionConfig, check_vision_config
from llava_jax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM
from llava_jax.models.llava import (VisionFeatures, _concrete, build_projector, build_vision_tower, embed_placeholders,
                                    merge_image_features, project_image_features)
from llava_jax.models.projector import num_linears
from llava_jax.sharding import BTD, constrain

Taps = tuple[jax.Array, jax.Array]  # (index int32 [n_tokens, 4], weight float32 [n_tokens, 4])

# llava-hf/llava-v1.6-* (336 px tiles).
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(VisionFeatures):
    """As `LlavaConfig`, with `image_grid_pinpoints` ((height, width) pixel sizes of the AnyRes grids) instead of
    a fixed image_seq_length (an image's token count depends on its size: see `image_taps`)."""

    vision: VisionConfig = dataclasses.field(default_factory=lambda: clip_vit.PRESETS["clip_l14_336"])
    text: LlamaConfig = dataclasses.field(default_factory=lambda: llama.PRESETS["vicuna_7b"])
    projector: str = "mlp2x_gelu"
    image_token_index: int = 32000
    image_grid_pinpoints: tuple[tuple[int, int], ...] = NEXT_PINPOINTS
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True
    freeze_vision_tower: bool = True

    def __post_init__(self):
        name = type(self).__name__
        check_vision_config(self.vision, f"{name}.vision")
        layer = self.vision_feature_layer
        if not isinstance(layer, int):
            object.__setattr__(self, "vision_feature_layer", tuple(int(i) for i in layer))
        for i in self.feature_layers:
            clip_vit.resolve_layer(i, self.vision.num_hidden_layers)
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.image_grid_pinpoints)
        if not pinpoints or any(len(p) != 2 or min(p) < 1 for p in pinpoints):
            raise ValueError(f"{name}: image_grid_pinpoints must be (height, width) pairs, got "
                             f"{self.image_grid_pinpoints!r}")
        tile = self.vision.image_size
        if any(v % tile for p in pinpoints for v in p):
            raise ValueError(f"{name}: image_grid_pinpoints {[list(p) for p in pinpoints]} must be multiples of the "
                             f"vision tower's image_size {tile} (whole tiles)")
        object.__setattr__(self, "image_grid_pinpoints", pinpoints)
        strategy = self.vision_feature_select_strategy
        if self.vision.num_tokens(strategy) != self.patches_per_side ** 2:
            raise ValueError(f"{name}: vision_feature_select_strategy {strategy!r} gives "
                             f"{self.vision.num_tokens(strategy)} features a tile, not the square patch grid AnyRes "
                             f"arranges ({self.patches_per_side}**2): use 'default' with a CLIP tower (drops CLS), "
                             f"'full' with a SigLIP tower (keeps every patch)")
        num_linears(self.projector)

    @property
    def patches_per_side(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    @property
    def tile_tokens(self) -> int:
        """Feature vectors the tower gives per tile: its patch grid (the strategy is checked to give that)."""
        return self.vision.num_tokens(self.vision_feature_select_strategy)

    @property
    def max_tiles(self) -> int:
        """0: LLaVA-NeXT keeps the whole unpadded grid."""
        return 0


@dataclasses.dataclass(frozen=True)
class LlavaOnevisionConfig(LlavaNextConfig):
    """LLaVA-NeXT plus `vision_aspect_ratio` ('anyres_max_N' or 'anyres') and videos (`video_token_index`)."""

    image_token_index: int = 151646
    video_token_index: int = 151647
    vision_aspect_ratio: str = "anyres_max_9"

    def __post_init__(self):
        super().__post_init__()
        vision_layout.max_tiles_from_aspect_ratio(self.vision_aspect_ratio)  # validates

    @property
    def max_tiles(self) -> int:
        return vision_layout.max_tiles_from_aspect_ratio(self.vision_aspect_ratio)


ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))  # 1x1 .. 6x6 tiles


def _qwen2(vocab: int, hidden: int, intermediate: int, layers_: int, heads: int, kv_heads: int,
           tied: bool) -> LlamaConfig:
    """Qwen2-*-Instruct as a LLaMA-family config (q/k/v biases, rope theta 1e6, eps 1e-6)."""
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers_, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, attention_bias=True,
                       o_proj_bias=False, tie_word_embeddings=tied)


def _next_preset(text: LlamaConfig) -> LlavaNextConfig:
    return LlavaNextConfig(vision=clip_vit.PRESETS["clip_l14_336"], text=dataclasses.replace(text, vocab_size=32064))


def _onevision_preset(text: LlamaConfig) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(vision=siglip.PRESETS["siglip_so400m_p14_384"], text=text,
                                image_grid_pinpoints=ONEVISION_PINPOINTS, vision_feature_select_strategy="full")


# Shapes of the released models (llava-hf/llava-v1.6-*, llava-hf/llava-onevision-qwen2-*-ov-hf) for the planner
# and the training recipes: the vocabularies as released (<image> 32000, <pad> 32001 padded to 32064; Qwen2's
# <image> 151646 and <video> 151647 inside its table).
PRESETS: dict[str, LlavaNextConfig] = {
    "llava_next_vicuna_7b": _next_preset(llama.PRESETS["vicuna_7b"]),
    "llava_next_vicuna_13b": _next_preset(llama.PRESETS["vicuna_13b"]),
    "llava_next_mistral_7b": _next_preset(dataclasses.replace(  # Mistral-7B-Instruct-v0.2
        llama.PRESETS["mistral_7b"], rope_theta=1000000.0, sliding_window=None)),
    "llava_onevision_qwen2_7b": _onevision_preset(_qwen2(152064, 3584, 18944, 28, 28, 4, False)),
    "llava_onevision_qwen2_0_5b": _onevision_preset(_qwen2(151936, 896, 4864, 24, 14, 2, True)),
}


def image_tiles(config: LlavaNextConfig, image_size: tuple[int, int], single_tile: bool = False) -> int:
    """Tiles of one image: the base tile plus the best pinpoint's grid (1 for a single-tile image)."""
    if single_tile:
        return 1
    rows, cols = vision_layout.anyres_grid_shape(image_size, config.image_grid_pinpoints, config.vision.image_size)
    return 1 + rows * cols


def _single_tile_flags(image_sizes: Sequence, batch_num_images: Sequence[int] | None) -> list[bool]:
    """OneVision: images of a message with several images are single tiles (transformers' batch_num_images)."""
    if batch_num_images is None:
        return [False] * len(image_sizes)
    flags = [n != 1 for n in batch_num_images for _ in range(n)]
    if len(flags) != len(image_sizes):
        raise ValueError(f"batch_num_images {list(batch_num_images)} counts {len(flags)} images but "
                         f"image_sizes holds {len(image_sizes)}")
    return flags


def image_taps(config: LlavaNextConfig, image_sizes: Sequence[Sequence[int]],
               batch_num_images: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Host side: the taps of all images of one forward and their tile counts.

    image_sizes: (height, width) of each original image, in prompt order. batch_num_images (OneVision only):
    images per message; a message with several gets single-tile images.
    Returns (index int32 [n_tokens, 4], weight float32 [n_tokens, 4], tiles per image).
    """
    if batch_num_images is not None and not isinstance(config, LlavaOnevisionConfig):
        raise ValueError("batch_num_images: single-tile images are a LLaVA-OneVision feature")
    flags = _single_tile_flags(image_sizes, batch_num_images)
    taps, tiles = [], []
    for size, single in zip(image_sizes, flags):
        size = (int(size[0]), int(size[1]))
        tiles.append(image_tiles(config, size, single))
        taps.append(vision_layout.single_tile_taps(config.tile_tokens) if single else vision_layout.anyres_taps(
            size, config.image_grid_pinpoints, config.vision.image_size, config.patches_per_side, config.max_tiles))
    index, weight = vision_layout.concat_taps(taps, tiles, config.tile_tokens)
    return index, weight, tiles


def video_taps(config: LlavaOnevisionConfig, num_frames: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Host side: the taps of all videos of one forward (num_frames per video, frames as tiles in order)."""
    if not isinstance(config, LlavaOnevisionConfig):
        raise ValueError("video_taps: videos are a LLaVA-OneVision feature")
    taps = [vision_layout.video_taps(int(n), config.patches_per_side) for n in num_frames]
    index, weight = vision_layout.concat_taps(taps, [int(n) for n in num_frames], config.tile_tokens)
    return index, weight


def apply_taps(rows: jax.Array, taps: Taps) -> jax.Array:
    """rows [R, D], taps over them -> tokens [n_tokens, D] (sum of weight x row, float32 accumulation)."""
    index, weight = taps
    out = jnp.zeros((index.shape[0], rows.shape[-1]), jnp.float32)
    for k in range(index.shape[1]):  # one [n_tokens, D] gather at a time
        out = out + weight[:, k, None].astype(jnp.float32) * jnp.take(rows, index[:, k], axis=0).astype(jnp.float32)
    return out.astype(rows.dtype)


def apply_row_taps(rows: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
    """Row-local taps: rows [B, R, D], index int32 [B, T, 4], weight [B, T, 4] -> [B, T, D] (sum of weight x
    row of the same batch row, float32 accumulation; no gather crosses rows)."""
    out = jnp.zeros(index.shape[:2] + rows.shape[-1:], jnp.float32)
    for k in range(index.shape[-1]):  # one [B, T, D] gather at a time
        picked = jnp.take_along_axis(rows, index[:, :, k, None], axis=1).astype(jnp.float32)
        out = out + weight[:, :, k, None].astype(jnp.float32) * picked
    return out.astype(rows.dtype)


def check_row_taps(is_visual, index, weight, image_mask, tile_tokens: int) -> None:
    """Raises ValueError when a row's visual tokens (image / video ids) and its tapped positions differ, or a
    tap reads outside the row or an empty tile slot (checked only when the values are concrete)."""
    visual, index, weight, mask = (_concrete(x) for x in (is_visual, index, weight, image_mask))
    if any(x is None for x in (visual, index, weight, mask)):
        return
    tapped = (weight != 0).any(axis=-1)
    bad = np.argwhere(visual != tapped)
    if bad.size:
        row, pos = (int(v) for v in bad[0])
        what = "holds an image / video token but no taps" if visual[row, pos] else \
            "has taps but its input_id is no image / video token"
        raise ValueError(f"image_taps_weight: row {row} position {pos} {what}")
    used, last = np.where(weight != 0, index, 0), mask.shape[1] * tile_tokens
    if (used < 0).any() or (used > last).any():
        raise ValueError(f"image_taps_index: an index outside 0..{last} (the {mask.shape[1]} tile slots' "
                         f"features, then the newline at {last})")
    slots = used // tile_tokens
    real = np.concatenate([mask, np.ones(mask.shape[:1] + (1,), bool)], axis=1)  # slot P: the newline
    empty = ~np.take_along_axis(real, slots.reshape(len(slots), -1), axis=1)
    if empty.any():
        row = int(np.argwhere(empty)[0][0])
        raise ValueError(f"image_taps_index: row {row} taps an empty tile slot (image_mask False)")


def check_placeholders(input_ids, token_index: int, taps: Taps, what: str) -> None:
    """Raises ValueError when input_ids hold another number of `token_index` than the taps have tokens
    (checked only when the values are concrete)."""
    ids = _concrete(input_ids)
    if ids is None:
        return
    have, need = int((ids == token_index).sum()), int(taps[0].shape[0])
    if have != need:
        raise ValueError(f"input_ids hold {have} {what} tokens (id {token_index}) but the {what}s give {need}")


class AnyResLlava(nnx.Module):
    """`vision_tower`, `multi_modal_projector`, `language_model` (LlamaForCausalLM), `image_newline` [D_text]."""

    def __init__(self, config: LlavaNextConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.vision_tower = build_vision_tower(config, rngs)
        self.multi_modal_projector = build_projector(config, rngs)
        hidden = config.text.hidden_size
        self.image_newline = layers.param(rngs, layers.normal(1 / math.sqrt(hidden)), (hidden,), ("embed",),
                                          config.text.param_dtype)
        self.language_model = LlamaForCausalLM(config.text, rngs=rngs)

    def get_image_tokens(self, pixel_values: jax.Array, taps: Taps) -> jax.Array:
        """pixel_values [n_tiles, 3, S, S] (all images' tiles), taps -> image tokens [n_tokens, D_text]."""
        c = self.config
        features = project_image_features(self.vision_tower, self.multi_modal_projector, c, pixel_values)
        newline = self.image_newline[...].astype(features.dtype)[None]
        return apply_taps(jnp.concatenate([features.reshape(-1, features.shape[-1]), newline]), taps)

    def visual_positions(self, input_ids: jax.Array) -> jax.Array:
        """bool [B, T]: the image token positions (and OneVision's video tokens)."""
        c = self.config
        placeholders = input_ids == c.image_token_index
        video_index = getattr(c, "video_token_index", None)
        return placeholders if video_index is None else placeholders | (input_ids == video_index)

    def embed_rows(self, input_ids: jax.Array, pixel_values: jax.Array, image_mask: jax.Array | None,
                   image_taps_index: jax.Array, image_taps_weight: jax.Array, *, check_counts: bool = True
                   ) -> jax.Array:
        """Row-aligned training inputs -> embeddings [B, T, D_text] (the module docstring's batch fields).

        input_ids [B, T]; pixel_values [B, P, 3, S, S]; image_mask bool [B, P] (None: all real); taps
        [B, T, 4] over row b's `[P * tile_tokens tile features; image_newline]` (the newline row P *
        tile_tokens). Image / video token positions take their taps' sum, the others their text embedding."""
        c = self.config
        b, p = pixel_values.shape[:2]
        is_visual = self.visual_positions(input_ids)
        if check_counts:
            mask = jnp.ones((b, p), bool) if image_mask is None else image_mask
            check_row_taps(is_visual, image_taps_index, image_taps_weight, mask, c.tile_tokens)
        embeds = embed_placeholders(self.language_model, input_ids, is_visual)
        features = project_image_features(self.vision_tower, self.multi_modal_projector, c,
                                          pixel_values.reshape((b * p,) + pixel_values.shape[2:]))
        features = features.reshape(b, p * features.shape[1], features.shape[-1])
        newline = jnp.broadcast_to(self.image_newline[...].astype(features.dtype), (b, 1, features.shape[-1]))
        rows = constrain(jnp.concatenate([features, newline], axis=1), BTD)
        tokens = apply_row_taps(rows, image_taps_index, image_taps_weight)
        return constrain(jnp.where(is_visual[..., None], tokens.astype(embeds.dtype), embeds), BTD)

    def _merge(self, embeds, input_ids, pixel_values, taps: Taps, token_index: int, what: str, check: bool):
        if check:
            check_placeholders(input_ids, token_index, taps, what)
        tokens = self.get_image_tokens(pixel_values, taps)
        return merge_image_features(embeds, input_ids == token_index, tokens[None])

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                     image_taps: Taps | None = None, *, pixel_values_videos: jax.Array | None = None,
                     video_taps: Taps | None = None, check_counts: bool = True) -> jax.Array:
        """input_ids [B, T] -> embeddings [B, T, D_text] with the image (and video) tokens merged in.

        pixel_values [n_tiles, 3, S, S] with image_taps; pixel_values_videos [n_frames, 3, S, S] with
        video_taps (OneVision). check_counts: raise when placeholders and taps disagree (concrete inputs)."""
        c = self.config
        video_index = getattr(c, "video_token_index", None)
        embeds = embed_placeholders(self.language_model, input_ids, self.visual_positions(input_ids))
        if pixel_values is not None:
            if image_taps is None:
                raise ValueError("embed_inputs: pixel_values need image_taps (llava_next.image_taps)")
            embeds = self._merge(embeds, input_ids, pixel_values, image_taps, c.image_token_index, "image",
                                 check_counts)
        if pixel_values_videos is not None:
            if video_taps is None or video_index is None:
                raise ValueError("embed_inputs: pixel_values_videos need video_taps and a LLaVA-OneVision config")
            embeds = self._merge(embeds, input_ids, pixel_values_videos, video_taps, video_index, "video",
                                 check_counts)
        return embeds

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, image_taps: Taps | None = None, *,
                 pixel_values_videos: jax.Array | None = None, video_taps: Taps | None = None) -> jax.Array:
        """input_ids [B, T], attention_mask [B, T] -> logits float32 [B, T, V] (see `embed_inputs`)."""
        return self.logits(self.hidden_states(input_ids, pixel_values, attention_mask, image_taps,
                                              pixel_values_videos=pixel_values_videos, video_taps=video_taps))

    def hidden_states(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                      attention_mask: jax.Array | None = None, image_taps: Taps | None = None, *,
                      pixel_values_videos: jax.Array | None = None, video_taps: Taps | None = None,
                      image_mask: jax.Array | None = None, image_taps_index: jax.Array | None = None,
                      image_taps_weight: jax.Array | None = None, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None) -> jax.Array:
        """As `__call__`, up to the decoder's final norm: hidden [B, T, D] (the training loss applies the head
        itself, in chunks). Row-aligned training batches pass pixel_values [B, P, 3, S, S] with image_mask and
        the taps fields (`embed_rows`); packed rows add segment_ids [B, T] (0 = padding) and positions."""
        if pixel_values is not None and pixel_values.ndim == 5:
            if image_taps_index is None or image_taps_weight is None:
                raise ValueError("hidden_states: row-aligned pixel_values [B, P, 3, S, S] need image_taps_index "
                                 "and image_taps_weight")
            embeds = self.embed_rows(input_ids, pixel_values, image_mask, image_taps_index, image_taps_weight)
        else:
            embeds = self.embed_inputs(input_ids, pixel_values, image_taps,
                                       pixel_values_videos=pixel_values_videos, video_taps=video_taps)
        return self.language_model.hidden_states(inputs_embeds=embeds, attention_mask=attention_mask,
                                                 segment_ids=segment_ids, positions=positions)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits float32 [..., V]."""
        return self.language_model.logits(hidden)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        return self.language_model.init_cache(batch, max_length, dtype)

    def decode(self, cache: KVCache, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None, image_taps: Taps | None = None, *,
               pixel_values_videos: jax.Array | None = None,
               video_taps: Taps | None = None) -> tuple[jax.Array, KVCache]:
        """Appends input_ids [B, T] to the cache (a prefill with images, or a step) -> (logits [B, T, V], cache)."""
        check = pixel_values is not None or pixel_values_videos is not None
        embeds = self.embed_inputs(input_ids, pixel_values, image_taps, pixel_values_videos=pixel_values_videos,
                                   video_taps=video_taps, check_counts=check)
        return self.language_model.decode(cache, inputs_embeds=embeds, attention_mask=attention_mask)


class LlavaNextForConditionalGeneration(AnyResLlava):
    """transformers' LlavaNextForConditionalGeneration (a `LlavaNextConfig`)."""


class LlavaOnevisionForConditionalGeneration(AnyResLlava):
    """transformers' LlavaOnevisionForConditionalGeneration (a `LlavaOnevisionConfig`: anyres_max_N, multi-image,
    video)."""


__all__ = ["AnyResLlava", "LlavaNextConfig", "LlavaOnevisionConfig", "LlavaNextForConditionalGeneration",
           "LlavaOnevisionForConditionalGeneration", "image_taps", "video_taps", "image_tiles", "apply_taps",
           "apply_row_taps", "check_row_taps", "PRESETS"]
