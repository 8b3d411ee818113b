"""The model families conversion knows, one row each: what import (`importers.from_hf`), export (`to_hf`) and
our own format (`native`) need to know about a family. Adding a family is a row here plus its
`hf_<family>.py` (config and tensor names both ways, the preprocessing files an export writes).

Our format's allow-lists (`native.MODEL_TYPES` / `CONFIG_TYPES`, the only types a model.json may name) are
the model and config classes of these rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from llava_jax.convert import hf_clip, hf_llama, hf_llava, hf_llava_next, hf_siglip
from llava_jax.models.clip_vit import CLIPVisionConfig, CLIPVisionModel
from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM
from llava_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration
from llava_jax.models.llava_next import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                                         LlavaOnevisionForConditionalGeneration)
from llava_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Where a family keeps its language model (vocabulary, tokenizer, tied head)."""

    config: Callable[[Any], LlamaConfig]  # our family config -> the decoder's config
    hf_key: str | None  # key of the decoder's config in the Hugging Face config (None: the top level)
    prefix: str  # prefix of the decoder's tensor names, e.g. 'language_model.'


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model: type[nnx.Module]
    config: type
    hf_model_types: tuple[str, ...]  # config.json model_type values imported as this family
    config_from_hf: Callable[[dict], Any]  # Hugging Face config dict -> our config (no runtime fields)
    config_to_hf: Callable[[Any], dict]  # our config -> config.json dict (model_type, architectures)
    rename: Callable[[str], str | None]  # checkpoint tensor name -> ours; None skips; ValueError refuses
    write_preprocessing: Callable[..., None]  # (model, folder, tokenizer, image_processor, chat_template)
    decoder: Decoder | None = None
    image_token: bool = False  # the exported tokenizer gets `<image>` at config.image_token_index
    hf_architecture_suffixes: tuple[str, ...] = ()  # architectures also imported as this family
    ignore: Callable[[str], bool] | None = None  # our names a checkpoint may hold that the model lacks

    def param_dtype(self, config):
        return (self.decoder.config(config) if self.decoder else config).param_dtype


def _tied_head(name: str) -> bool:
    # Some tied-embedding checkpoints also store lm_head.weight; transformers ignores it too.
    return name.endswith("lm_head.weight")


LLAVA = Family(
    name="llava", model=LlavaForConditionalGeneration, config=LlavaConfig, hf_model_types=("llava",),
    config_from_hf=hf_llava.llava_config_from_hf, config_to_hf=hf_llava.llava_hf_config,
    rename=hf_llava.llava_tensor_name_to_ours, write_preprocessing=hf_llava.write_llava_preprocessing,
    decoder=Decoder(config=lambda c: c.text, hf_key="text_config", prefix="language_model."),
    image_token=True, ignore=_tied_head)
LLAVA_NEXT = Family(
    name="llava_next", model=LlavaNextForConditionalGeneration, config=LlavaNextConfig,
    hf_model_types=("llava_next",), config_from_hf=hf_llava_next.next_config_from_hf,
    config_to_hf=hf_llava_next.next_config_to_hf, rename=hf_llava_next.next_tensor_name_to_ours,
    write_preprocessing=hf_llava_next.write_next_preprocessing,
    decoder=Decoder(config=lambda c: c.text, hf_key="text_config", prefix="language_model."),
    image_token=True, ignore=_tied_head)
LLAVA_ONEVISION = dataclasses.replace(
    LLAVA_NEXT, name="llava_onevision", model=LlavaOnevisionForConditionalGeneration, config=LlavaOnevisionConfig,
    hf_model_types=("llava_onevision",), config_from_hf=hf_llava_next.onevision_config_from_hf,
    config_to_hf=hf_llava_next.onevision_config_to_hf)
LLAMA = Family(
    name="llama", model=LlamaForCausalLM, config=LlamaConfig, hf_model_types=hf_llama.SUPPORTED_MODEL_TYPES,
    config_from_hf=hf_llama.llama_config_from_hf, config_to_hf=hf_llama.llama_config_to_hf,
    rename=hf_llama.llama_tensor_name_to_ours, write_preprocessing=hf_llama.write_llama_preprocessing,
    decoder=Decoder(config=lambda c: c, hf_key=None, prefix=""), hf_architecture_suffixes=("ForCausalLM",),
    ignore=_tied_head)
CLIP = Family(
    name="clip", model=CLIPVisionModel, config=CLIPVisionConfig, hf_model_types=("clip", "clip_vision_model"),
    config_from_hf=hf_clip.clip_config_from_hf, config_to_hf=hf_clip.clip_hf_config,
    rename=hf_clip.clip_tensor_name_to_ours, write_preprocessing=hf_clip.write_clip_preprocessing)
SIGLIP = Family(
    name="siglip", model=SiglipVisionModel, config=SiglipVisionConfig,
    hf_model_types=("siglip", "siglip_vision_model"), config_from_hf=hf_siglip.siglip_config_from_hf,
    config_to_hf=hf_siglip.siglip_hf_config, rename=hf_siglip.siglip_tensor_name_to_ours,
    write_preprocessing=hf_siglip.write_siglip_preprocessing)

FAMILIES: tuple[Family, ...] = (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, LLAMA, CLIP, SIGLIP)
# The rows that are a vision tower (what `importers.from_clip_and_llm` accepts as the tower).
VISION_TOWERS: tuple[Family, ...] = (CLIP, SIGLIP)


def of_model(model: nnx.Module, what: str = "to_hf") -> Family:
    """The row of a model (an instance of one of the rows' model classes). Raises TypeError otherwise."""
    for family in FAMILIES:
        if isinstance(model, family.model):
            return family
    names = [f.model.__name__ for f in FAMILIES]
    raise TypeError(f"{what}: cannot export a {type(model).__name__} (expected {', '.join(names[:-1])} or "
                    f"{names[-1]})")


def of_hf_config(config: dict) -> Family | None:
    """The row that imports a Hugging Face config.json: by model_type, else by architecture; None if none."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.hf_model_types:
            return family
    architectures = config.get("architectures") or ()
    for family in FAMILIES:
        if any(a.endswith(family.hf_architecture_suffixes) for a in architectures):
            return family
    return None
