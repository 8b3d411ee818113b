"""Tiny random LLaVA-NeXT (CLIP + LLaMA) and LLaVA-OneVision (SigLIP "full" + Qwen2) Hugging Face folders with
their tokenizer (LLaMA-2's, `<image>` / `<video>` added) and image processor, for the generation, chat, eval and
serving tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from tests.models import anyres_helpers as H

SIGLIP_MEAN = [0.5, 0.5, 0.5]


def siglip_config() -> transformers.SiglipVisionConfig:
    return transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=97, num_hidden_layers=3,
                                           num_attention_heads=3, image_size=H.TILE, patch_size=H.PATCH)


def onevision_config() -> transformers.LlavaOnevisionConfig:
    text = transformers.Qwen2Config(**H._text_fields(), tie_word_embeddings=False)
    return transformers.LlavaOnevisionConfig(
        vision_config=siglip_config(), text_config=text, image_token_index=H.IMAGE_ID, video_token_index=H.VIDEO_ID,
        image_grid_pinpoints=H.PINPOINTS, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_1")


def onevision_image_processor() -> transformers.LlavaOnevisionImageProcessor:
    return transformers.LlavaOnevisionImageProcessor(size={"height": H.TILE, "width": H.TILE},
                                                     image_grid_pinpoints=H.PINPOINTS, image_mean=SIGLIP_MEAN,
                                                     image_std=SIGLIP_MEAN)


def _save(model_class, config, path: Path, seed: int):
    """Random weights large enough that greedy answers depend on the images (and vary token to token)."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model


def save_next(path: Path, seed: int = 1):
    """A LLaVA-NeXT folder (model, tokenizer, LlavaNextImageProcessor) -> the transformers model."""
    hf = _save(transformers.LlavaNextForConditionalGeneration, H.next_config(), path, seed)
    H.next_processor().save_pretrained(path)
    return hf


def save_onevision(path: Path, seed: int = 1):
    """A LLaVA-OneVision folder (SigLIP "full" tower, Qwen2 decoder) -> the transformers model."""
    hf = _save(transformers.LlavaOnevisionForConditionalGeneration, onevision_config(), path, seed)
    H.tokenizer().save_pretrained(path)
    onevision_image_processor().save_pretrained(path)
    return hf


def frames(count: int = 8, seed: int = 2) -> np.ndarray:
    """uint8 video frames [count, TILE, TILE, 3] (already at the tile size: the resize keeps them)."""
    return np.random.RandomState(seed).randint(0, 256, (count, H.TILE, H.TILE, 3), dtype=np.uint8)


def video_pixels(video: np.ndarray) -> np.ndarray:
    """SigLIP-normalized frames [1, T, 3, S, S], what transformers' video processor gives for S x S frames."""
    return ((video.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2)[None]
