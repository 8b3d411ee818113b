"""Hugging Face <-> llava_jax conversion for the SigLIP vision tower: configs and tensor names.

Our SiglipVisionModel uses the classic layout `vision_model.embeddings.*`, `vision_model.encoder.layers.*`,
`vision_model.post_layernorm.*`. transformers 5.x drops the `vision_model.` level in SiglipVisionModel, and
full SigLIP checkpoints (google/siglip-so400m-patch14-384) also hold the text tower and `logit_scale` /
`logit_bias`. The attention-pool head (`head.*`) is skipped on import (LLaVA never uses it) and an export
writes `vision_use_head: false`, so transformers builds the tower without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import transformers

from llava_jax.convert.hf_clip import vision_tensor_name_to_ours
from llava_jax.models.clip_vit import ACTIVATIONS
from llava_jax.models.siglip import SiglipVisionConfig

_VISION_MODULES = ("embeddings.", "encoder.", "post_layernorm.")
# The attention-pool head, in the classic and the 5.x layout.
HEAD_PREFIXES = ("vision_model.head.", "head.")
# Tensors of a full SigLIP checkpoint outside the vision tower.
_NOT_VISION = ("text_model.", "logit_scale", "logit_bias")

_CHECKPOINT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "image_size", "patch_size", "num_channels", "layer_norm_eps", "hidden_act")


def _vision_dict(hf_config: Any) -> dict:
    """A SiglipVisionConfig / SiglipConfig (object or dict) -> the vision config as a dict with transformers'
    defaults filled in (not ours)."""
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = d.get("model_type", "siglip_vision_model")
    if model_type == "siglip":
        return _vision_dict({"model_type": "siglip_vision_model", **(d.get("vision_config") or {})})
    if model_type != "siglip_vision_model":
        raise ValueError(f"vision config: unsupported model_type {model_type!r} (expected 'siglip_vision_model' "
                         f"or 'siglip')")
    return transformers.SiglipVisionConfig(**{k: v for k, v in d.items() if k != "model_type"}).to_dict()


def _square(d: dict, field: str) -> int:
    """image_size / patch_size: an int or a square [n, n] pair."""
    value = d[field]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"siglip config: {field} {value!r} is not square (only square sizes are supported)")
        value = value[0]
    return int(value)


def siglip_config_from_hf(hf_config: Any, **runtime) -> SiglipVisionConfig:
    """A transformers SiglipVisionConfig / SiglipConfig (object or dict) -> SiglipVisionConfig.

    Refuses what the model cannot honour with a ValueError naming the field.
    Args:
      runtime: dtype, param_dtype, scan_layers, remat, attention_impl.
    """
    d = _vision_dict(hf_config)
    if d["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"siglip config: hidden_act {d['hidden_act']!r} is not supported "
                         f"(expected one of {sorted(ACTIVATIONS)})")
    fields = {k: d[k] for k in _CHECKPOINT_FIELDS}
    fields.update(image_size=_square(d, "image_size"), patch_size=_square(d, "patch_size"))
    return SiglipVisionConfig(**fields, **runtime)


def siglip_config_to_hf(cfg: SiglipVisionConfig) -> dict:
    """SiglipVisionConfig -> a dict that `transformers.SiglipVisionConfig(**d)` accepts (no attention-pool
    head: the model has none)."""
    d = {k: getattr(cfg, k) for k in _CHECKPOINT_FIELDS}
    return {"model_type": "siglip_vision_model", **d, "attention_dropout": 0.0, "vision_use_head": False}


def siglip_hf_config(cfg: SiglipVisionConfig) -> dict:
    """config.json of an exported SiglipVisionModel."""
    return {**siglip_config_to_hf(cfg), "architectures": ["SiglipVisionModel"]}


def siglip_tensor_name_to_ours(name: str) -> str | None:
    """A Hugging Face SigLIP tensor name -> our name; None for the head and tensors outside the vision tower.

    'vision_model.encoder.layers.3.mlp.fc1.weight' and (5.x SiglipVisionModel) 'encoder.layers.3.mlp.fc1.weight'
    both map to 'vision_model.encoder.layers.3.mlp.fc1.weight'.
    """
    return vision_tensor_name_to_ours(name, tower="SigLIP", modules=_VISION_MODULES,
                                      skipped=_NOT_VISION + HEAD_PREFIXES)


def siglip_tensors_to_ours(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Renames a Hugging Face SigLIP state dict to our names, dropping the head and the text tower."""
    renamed = ((siglip_tensor_name_to_ours(name), value) for name, value in tensors.items())
    return {ours: value for ours, value in renamed if ours is not None}


def _default_image_processor(cfg: SiglipVisionConfig) -> transformers.SiglipImageProcessor:
    """SigLIP's processor at the tower's resolution: resize to a square (bicubic), rescale, normalize."""
    size = cfg.image_size
    return transformers.SiglipImageProcessor(size={"height": size, "width": size}, do_resize=True, resample=3,
                                             do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                             image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
                                             do_convert_rgb=True)


def siglip_image_processor(image_processor, cfg: SiglipVisionConfig):
    """The image processor an export writes: `image_processor` (a folder or a transformers image processor)
    checked against the tower's resolution, or SigLIP's default at that resolution when None."""
    if image_processor is None:
        return _default_image_processor(cfg)
    if isinstance(image_processor, (str, os.PathLike)):
        image_processor = transformers.AutoImageProcessor.from_pretrained(str(image_processor),
                                                                           trust_remote_code=False)
    size = dict(getattr(image_processor, "size", None) or {})
    if "height" in size and (size.get("height"), size.get("width")) != (cfg.image_size,) * 2:
        raise ValueError(f"image processor: size {size} does not match the vision tower's image_size "
                         f"{cfg.image_size}")
    return image_processor


def write_siglip_preprocessing(model, path: Path, tokenizer, image_processor, chat_template) -> None:
    """preprocessor_config.json of a SigLIP tower export (a tokenizer has no place in it)."""
    siglip_image_processor(image_processor, model.config).save_pretrained(path)
