"""Hugging Face <-> llava_jax conversion for the CLIP vision tower: configs and tensor names.

Our CLIPVisionModel uses the classic layout `vision_model.embeddings.*`, `vision_model.encoder.layers.*`,
... . transformers 5.x drops the `vision_model.` level in CLIPVisionModel (`embeddings.*`, `encoder.*`), and
full CLIP checkpoints (openai/clip-vit-large-patch14-336) also hold the text tower and projections, which
the vision tower does not use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import transformers

from llava_jax.models.clip_vit import CLIPVisionConfig

_VISION_MODULES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
# Tensors of a full CLIP checkpoint that are not part of the vision tower, and non-persistent buffers.
_NOT_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")

_CHECKPOINT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "image_size", "patch_size", "num_channels", "layer_norm_eps", "hidden_act")


def _vision_config(hf_config: Any) -> transformers.CLIPVisionConfig:
    """A CLIPVisionConfig / CLIPConfig (object or dict) -> transformers' CLIPVisionConfig, so missing fields
    get transformers' defaults (not ours)."""
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = d.get("model_type", "clip_vision_model")
    if model_type == "clip":
        return _vision_config(d.get("vision_config") or {})
    if model_type != "clip_vision_model":
        raise ValueError(f"vision config: unsupported model_type {model_type!r} (expected 'clip_vision_model')")
    return transformers.CLIPVisionConfig(**{k: v for k, v in d.items() if k != "model_type"})


def clip_config_from_hf(hf_config: Any, **runtime) -> CLIPVisionConfig:
    """A transformers CLIPVisionConfig / CLIPConfig (object or dict) -> CLIPVisionConfig.

    Args:
      runtime: dtype, param_dtype, scan_layers, remat.
    """
    hf = _vision_config(hf_config)
    return CLIPVisionConfig(**{k: getattr(hf, k) for k in _CHECKPOINT_FIELDS}, **runtime)


def clip_config_to_hf(cfg: CLIPVisionConfig) -> dict:
    """CLIPVisionConfig -> a dict that `transformers.CLIPVisionConfig(**d)` accepts."""
    d = {k: getattr(cfg, k) for k in _CHECKPOINT_FIELDS}
    # projection_dim is only used by CLIPVisionModelWithProjection; 768 is the value of CLIP ViT-L/14.
    return {"model_type": "clip_vision_model", **d, "projection_dim": 768, "attention_dropout": 0.0}


def clip_hf_config(cfg: CLIPVisionConfig) -> dict:
    """config.json of an exported CLIPVisionModel."""
    return {**clip_config_to_hf(cfg), "architectures": ["CLIPVisionModel"]}


def vision_tensor_name_to_ours(name: str, *, tower: str, modules: tuple[str, ...], skipped: tuple[str, ...]
                              ) -> str | None:
    """A Hugging Face vision tower tensor name -> our name (`vision_model.` + the module path); None for the
    `skipped` prefixes and position ids; ValueError naming `tower` for a name outside the tower's `modules`."""
    if name.startswith(skipped) or name.endswith("position_ids"):
        return None
    if name.startswith("vision_model."):
        return name
    if name.startswith(modules):
        return "vision_model." + name
    raise ValueError(f"tensor '{name}' is not a {tower} vision tower tensor")


def clip_tensor_name_to_ours(name: str) -> str | None:
    """A Hugging Face CLIP tensor name -> our name; None for tensors outside the vision tower.

    'vision_model.encoder.layers.3.mlp.fc1.weight' and (5.x CLIPVisionModel) 'encoder.layers.3.mlp.fc1.weight'
    both map to 'vision_model.encoder.layers.3.mlp.fc1.weight'.
    """
    return vision_tensor_name_to_ours(name, tower="CLIP", modules=_VISION_MODULES, skipped=_NOT_VISION)


def clip_tensors_to_ours(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Renames a Hugging Face CLIP state dict to our names, dropping tensors outside the vision tower."""
    renamed = ((clip_tensor_name_to_ours(name), value) for name, value in tensors.items())
    return {ours: value for ours, value in renamed if ours is not None}


def _default_image_processor(vision_cfg: CLIPVisionConfig) -> transformers.CLIPImageProcessor:
    """CLIPImageProcessor of OpenAI CLIP at the tower's resolution (resize shortest side, center crop)."""
    size = vision_cfg.image_size
    return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                           do_resize=True, do_center_crop=True, resample=3, do_rescale=True,
                                           rescale_factor=1 / 255, do_normalize=True,
                                           image_mean=list(vision_cfg.image_mean),
                                           image_std=list(vision_cfg.image_std), do_convert_rgb=True)


def clip_image_processor(image_processor, vision_cfg: CLIPVisionConfig):
    """The image processor an export writes: `image_processor` (a folder or a transformers image processor)
    checked against the tower's resolution, or CLIP's default at that resolution when None."""
    if image_processor is None:
        return _default_image_processor(vision_cfg)
    if isinstance(image_processor, (str, os.PathLike)):
        image_processor = transformers.AutoImageProcessor.from_pretrained(str(image_processor),
                                                                           trust_remote_code=False)
    crop = getattr(image_processor, "crop_size", None) or {}
    if crop and (crop.get("height"), crop.get("width")) != (vision_cfg.image_size,) * 2:
        raise ValueError(f"image processor: crop size {crop} does not match the vision tower's image_size "
                         f"{vision_cfg.image_size}")
    return image_processor


def write_clip_preprocessing(model, path: Path, tokenizer, image_processor, chat_template) -> None:
    """preprocessor_config.json of a CLIP tower export (a tokenizer has no place in it)."""
    clip_image_processor(image_processor, model.config).save_pretrained(path)
