"""Feature taps (vision_layout) against transformers' own packing: LLaVA-NeXT's unpadded grid + newlines,
LLaVA-OneVision's anyres_max_N bilinear downsample and its 2x2 video pooling, applied to random features."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import transformers
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from llava_jax import vision_layout as vl

TILE, PATCH = 30, 6
SIDE = TILE // PATCH  # 5 patches per side
PINPOINTS = [[30, 60], [60, 30], [60, 60], [90, 30]]
SIZES = [(31, 77), (77, 31), (45, 45), (100, 17), (13, 29)]
DIM = 3


def _apply(taps, rows: np.ndarray) -> np.ndarray:
    index, weight = taps
    return (weight[..., None] * rows[index]).sum(axis=1)


def _fake_self(aspect: str = "anyres_max_9"):
    vision = types.SimpleNamespace(image_size=TILE, patch_size=PATCH)
    return types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision, image_grid_pinpoints=PINPOINTS,
                                                               vision_aspect_ratio=aspect))


def _tiles(size, seed=0) -> np.ndarray:
    n = image_size_to_num_patches(list(size), PINPOINTS, TILE)
    return np.random.RandomState(seed).randn(n, SIDE * SIDE, DIM).astype(np.float32)


@pytest.mark.parametrize("size", SIZES)
def test_next_taps_equal_transformers_packing(size):
    feats, newline = _tiles(size), np.arange(DIM, dtype=np.float32) + 10
    ref, _ = LlavaNextModel.pack_image_features(_fake_self(), [torch.tensor(feats)], torch.tensor([size]),
                                                "default", torch.tensor(newline))
    taps = vl.anyres_taps(size, PINPOINTS, TILE, SIDE)
    rows = np.concatenate([feats.reshape(-1, DIM), newline[None]])
    assert taps[0].shape == (ref[0].shape[0], vl.TAPS)
    np.testing.assert_array_equal(_apply(taps, rows), ref[0].numpy())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("max_tiles", [1, 2, 9])
def test_onevision_taps_equal_transformers_downsample(size, max_tiles):
    feats, newline = _tiles(size, 1), np.ones(DIM, np.float32)
    aspect = f"anyres_max_{max_tiles}"
    ref, _ = LlavaOnevisionModel.pack_image_features(_fake_self(aspect), [torch.tensor(feats)], torch.tensor([size]),
                                                     torch.tensor(newline), vision_aspect_ratio=aspect)
    taps = vl.anyres_taps(size, PINPOINTS, TILE, SIDE, max_tiles=vl.max_tiles_from_aspect_ratio(aspect))
    rows = np.concatenate([feats.reshape(-1, DIM), newline[None]])
    assert taps[0].shape[0] == ref[0].shape[0]
    np.testing.assert_allclose(_apply(taps, rows), ref[0].numpy(), rtol=1e-6, atol=1e-6)


def test_some_onevision_case_is_downsampled():
    """The grid above really exercises the 4-tap path (a weight strictly between 0 and 1)."""
    _, weight = vl.anyres_taps((100, 17), PINPOINTS, TILE, SIDE, max_tiles=1)
    assert ((weight > 0) & (weight < 1)).any()


@pytest.mark.parametrize("side", [5, 4])
def test_video_taps_equal_transformers_pooling(side):
    frames, per = 8, side * side
    feats = np.random.RandomState(2).randn(frames, per, DIM).astype(np.float32)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=side * PATCH, patch_size=PATCH)))
    ref = LlavaOnevisionModel.apply_pooling(fake, torch.tensor(feats)).reshape(-1, DIM).numpy()
    newline = np.full(DIM, 7.0, np.float32)
    taps = vl.video_taps(frames, side)
    out = _apply(taps, np.concatenate([feats.reshape(-1, DIM), newline[None]]))
    np.testing.assert_allclose(out[:-1], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[-1], newline)


def test_concat_taps_offsets_tiles_and_shares_newline():
    a, b = vl.single_tile_taps(4), vl.gather_taps([0, 5, 8])  # b: 2 tiles of 4 rows, row 8 = its newline
    index, weight = vl.concat_taps([a, b], [1, 2], 4)
    np.testing.assert_array_equal(index[:, 0], [0, 1, 2, 3, 12, 4, 9, 12])
    assert weight.shape == (8, vl.TAPS) and weight[:, 0].sum() == 8


def test_processor_counts_equal_taps_rows():
    """transformers' processors count the same tokens (their own arithmetic, not the model's)."""
    nxt = transformers.LlavaNextProcessor.__new__(transformers.LlavaNextProcessor)
    nxt.image_processor = types.SimpleNamespace(image_grid_pinpoints=PINPOINTS)
    nxt.num_additional_image_tokens, nxt.vision_feature_select_strategy = 1, "default"
    nxt.patch_size = PATCH
    ov = transformers.LlavaOnevisionProcessor.__new__(transformers.LlavaOnevisionProcessor)
    ov.image_processor, ov.num_image_tokens, ov.vision_aspect_ratio = nxt.image_processor, SIDE * SIDE, "anyres_max_1"
    for h, w in SIZES:
        next_tokens = len(vl.anyres_taps((h, w), PINPOINTS, TILE, SIDE)[0])
        assert nxt._get_number_of_features(h, w, TILE, TILE) - 1 == next_tokens
        assert ov._get_number_of_features(h, w, TILE, TILE) == len(
            vl.anyres_taps((h, w), PINPOINTS, TILE, SIDE, max_tiles=1)[0])
