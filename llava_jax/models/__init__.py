"""Models: the CLIP and SigLIP vision towers (`towers.py` picks one by its config type), projectors, the
LLaMA-family decoder and the LLaVA composites (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision).

`PRESETS` holds every named config (CLIP and SigLIP towers, decoders and LLaVA models; the names do not collide).
"""

from llava_jax.models.clip_vit import PRESETS as CLIP_PRESETS
from llava_jax.models.clip_vit import CLIPVisionConfig, CLIPVisionModel
from llava_jax.models.llama import PRESETS as LLAMA_PRESETS
from llava_jax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM
from llava_jax.models.llava import PRESETS as LLAVA_PRESETS
from llava_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration, merge_image_features
from llava_jax.models.llava_next import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                                         LlavaOnevisionForConditionalGeneration)
from llava_jax.models.projector import Projector
from llava_jax.models.siglip import PRESETS as SIGLIP_PRESETS
from llava_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel

PRESETS = {**CLIP_PRESETS, **SIGLIP_PRESETS, **LLAMA_PRESETS, **LLAVA_PRESETS}

__all__ = ["CLIPVisionConfig", "CLIPVisionModel", "KVCache", "LlamaConfig", "LlamaForCausalLM", "LlavaConfig",
           "LlavaForConditionalGeneration", "LlavaNextConfig", "LlavaNextForConditionalGeneration",
           "LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration", "Projector", "merge_image_features",
           "PRESETS", "CLIP_PRESETS", "LLAMA_PRESETS", "LLAVA_PRESETS", "SiglipVisionConfig", "SiglipVisionModel",
           "SIGLIP_PRESETS"]
