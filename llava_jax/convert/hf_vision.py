"""The vision tower of a composite (LLaVA) config, both ways, whichever tower it is: chosen by the Hugging Face
`model_type` on import and by our config's type on export (CLIP or SigLIP)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from llava_jax.convert import hf_clip, hf_siglip
from llava_jax.models.clip_vit import CLIPVisionConfig
from llava_jax.models.siglip import SiglipVisionConfig


@dataclasses.dataclass(frozen=True)
class Tower:
    config: type
    hf_model_types: tuple[str, ...]
    from_hf: Callable[..., Any]  # (hf config, **runtime) -> our config
    to_hf: Callable[[Any], dict]  # our config -> vision_config dict
    image_processor: Callable[[Any, Any], Any]  # (image processor | folder | None, our config) -> processor


TOWERS = (
    Tower(CLIPVisionConfig, ("clip_vision_model", "clip"), hf_clip.clip_config_from_hf, hf_clip.clip_config_to_hf,
          hf_clip.clip_image_processor),
    Tower(SiglipVisionConfig, ("siglip_vision_model", "siglip"), hf_siglip.siglip_config_from_hf,
          hf_siglip.siglip_config_to_hf, hf_siglip.siglip_image_processor),
)


def _of_config(cfg) -> Tower:
    for tower in TOWERS:
        if type(cfg) is tower.config:
            return tower
    raise TypeError(f"vision config: no conversion for a {type(cfg).__name__}")


def vision_config_from_hf(hf_config: Any, **runtime):
    """A vision_config (object or dict) -> our tower config, by its model_type (CLIP when it names none)."""
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = d.get("model_type", "clip_vision_model")
    for tower in TOWERS:
        if model_type in tower.hf_model_types:
            return tower.from_hf(d, **runtime)
    known = [t for tower in TOWERS for t in tower.hf_model_types]
    raise ValueError(f"vision_config: unsupported model_type {model_type!r} (expected one of {known})")


def vision_config_to_hf(cfg) -> dict:
    """Our tower config -> the vision_config dict of a Hugging Face composite config."""
    return _of_config(cfg).to_hf(cfg)


def vision_image_processor(image_processor, cfg):
    """The tower's image processor an export writes (see `hf_clip.clip_image_processor`)."""
    return _of_config(cfg).image_processor(image_processor, cfg)

