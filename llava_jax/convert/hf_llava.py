"""Hugging Face <-> llava_jax conversion for LLaVA: the composite config and tensor names.

Our parameter names are the classic on-disk layout of transformers' LlavaForConditionalGeneration:
`vision_tower.vision_model.*`, `multi_modal_projector.linear_{k}.*`, `language_model.model.*`,
`language_model.lm_head.weight` (encoder/decoder layers stacked, see `llava_jax.convert.params`).
`llava_tensor_name_to_ours` also reads the other layouts found in checkpoints and state dicts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import transformers

from llava_jax.convert.hf_clip import clip_tensor_name_to_ours
from llava_jax.convert.hf_siglip import HEAD_PREFIXES
from llava_jax.convert.hf_vision import vision_config_from_hf, vision_config_to_hf, vision_image_processor
from llava_jax.data.conversation import IMAGE_TOKEN
from llava_jax.convert.hf_llama import llama_config_from_hf, llama_config_to_hf
from llava_jax.models.llava import LlavaConfig
from llava_jax.models.projector import num_linears

# Original LLaVA checkpoints: mm_projector is an nn.Sequential (Linear at even indices) or one nn.Linear.
_OFFICIAL_PROJECTOR = re.compile(r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$")
# Non-persistent buffers some checkpoints still carry.
_BUFFERS = re.compile(r"(position_ids|rotary_emb\.inv_freq)$")


def _vision_tower_name(rest: str, name: str) -> str | None:
    """A vision tower tensor (CLIP and SigLIP share the layout); None for SigLIP's attention-pool head, which
    LLaVA never runs."""
    if rest.startswith(HEAD_PREFIXES):
        return None
    ours = clip_tensor_name_to_ours(rest)
    if ours is None:
        raise ValueError(f"tensor '{name}' is not a vision tower parameter")
    return "vision_tower." + ours


def llava_tensor_name_to_ours(name: str) -> str | None:
    """Any known LLaVA tensor name -> our (classic) name; None for non-parameter buffers to skip.

    Layouts read:
    - classic on-disk: `vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
      `language_model.lm_head.*` (returned unchanged);
    - transformers 4.52+ / 5.x in memory: `model.vision_tower.*`, `model.multi_modal_projector.*`,
      `model.language_model.*`, `lm_head.*`;
    - transformers 5.x on disk: `vision_tower.*` without `vision_model`;
    - original LLaVA (liuhaotian/llava-v1.5-*): `model.layers.*`, `model.embed_tokens.*`, `model.norm.*`,
      `model.mm_projector.{0,2,..}.*` (or `model.mm_projector.weight` for `linear`),
      `model.vision_tower.vision_tower.vision_model.*`, `lm_head.*`.
    Raises ValueError naming the tensor for anything else.
    """
    if _BUFFERS.search(name):
        return None
    official = _OFFICIAL_PROJECTOR.match(name)
    if official:
        index, leaf = official.groups()
        return f"multi_modal_projector.linear_{int(index or 0) // 2 + 1}.{leaf}"
    for prefix in ("model.vision_tower.vision_tower.", "model.vision_tower.", "vision_tower."):
        if name.startswith(prefix):
            return _vision_tower_name(name[len(prefix):], name)
    for prefix, target in (("model.multi_modal_projector.", "multi_modal_projector."),
                           ("multi_modal_projector.", "multi_modal_projector."),
                           ("model.language_model.", "language_model.model."),
                           ("language_model.model.", "language_model.model."),
                           ("language_model.lm_head.", "language_model.lm_head."),
                           ("lm_head.", "language_model.lm_head."),
                           ("model.", "language_model.model.")):
        if name.startswith(prefix):
            return target + name[len(prefix):]
    raise ValueError(f"tensor '{name}' is not part of a LLaVA checkpoint in any known layout")


def llava_tensors_to_ours(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Renames a LLaVA state dict (any layout above) to our names, dropping buffers.

    Raises ValueError when two tensors map to the same name (a checkpoint mixing layouts).
    """
    out, source = {}, {}
    for name, value in tensors.items():
        ours = llava_tensor_name_to_ours(name)
        if ours is None:
            continue
        if ours in out:
            raise ValueError(f"tensors '{source[ours]}' and '{name}' both map to '{ours}'")
        out[ours], source[ours] = value, name
    return out


def _as_dict(hf_config: Any) -> dict:
    """A LlavaConfig (object or dict) -> dict, with missing fields filled in by transformers' LlavaConfig."""
    if isinstance(hf_config, Mapping):
        if hf_config.get("model_type", "llava") != "llava":
            raise ValueError(f"llava config: unsupported model_type {hf_config.get('model_type')!r} "
                             f"(expected 'llava')")
        hf_config = transformers.LlavaConfig(**{k: v for k, v in hf_config.items() if k != "model_type"})
    elif hf_config.model_type != "llava":
        raise ValueError(f"llava config: unsupported model_type {hf_config.model_type!r} (expected 'llava')")
    return hf_config.to_dict()


def _projector_type(d: dict) -> str:
    """transformers' LlavaMultiModalProjector is mlp2x with `projector_hidden_act`; we also write
    `projector_type` (an extra key transformers keeps) for the types transformers lacks."""
    if "projector_type" in d:
        return d["projector_type"]
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"llava config: projector_hidden_act {act!r} is not supported (only exact 'gelu', "
                         f"as in LLaVA's mlp2x_gelu)")
    return "mlp2x_gelu"


def llava_config_from_hf(hf_config: Any, *, vision_runtime: Mapping[str, Any] | None = None,
                         text_runtime: Mapping[str, Any] | None = None) -> LlavaConfig:
    """A transformers LlavaConfig (object or dict) -> LlavaConfig.

    image_seq_length is derived from the vision tower (what the model actually produces), not read.
    vision_runtime / text_runtime: runtime fields (dtype, param_dtype, scan_layers, remat) per tower.
    """
    d = _as_dict(hf_config)
    text = dict(d["text_config"])
    if d.get("tie_word_embeddings"):
        text["tie_word_embeddings"] = True
    layer = d.get("vision_feature_layer", -2)
    return LlavaConfig(
        vision=vision_config_from_hf(d["vision_config"], **(vision_runtime or {})),
        text=llama_config_from_hf(text, **(text_runtime or {})),
        projector=_projector_type(d),
        image_token_index=int(d.get("image_token_index", d.get("image_token_id", 32000))),
        image_seq_length=None,
        vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)),
    )


def llava_config_to_hf(cfg: LlavaConfig) -> dict:
    """LlavaConfig -> a dict that `transformers.LlavaConfig(**d)` accepts.

    transformers builds its mlp2x_gelu projector from it; other projector types are recorded in the
    extra key `projector_type`, which transformers keeps but does not use.
    """
    layer = cfg.vision_feature_layer
    d = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision_config_to_hf(cfg.vision),
        "text_config": llama_config_to_hf(cfg.text),
        "image_token_index": cfg.image_token_index,
        "image_seq_length": cfg.image_seq_length,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "multimodal_projector_bias": cfg.multimodal_projector_bias,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }
    if cfg.projector != "mlp2x_gelu":
        num_linears(cfg.projector)  # validates
        d["projector_type"] = cfg.projector
    return d


def llava_hf_config(cfg: LlavaConfig) -> dict:
    """config.json of an exported LlavaForConditionalGeneration (the decoder's architectures left out)."""
    d = llava_config_to_hf(cfg)
    return {**d, "text_config": {k: v for k, v in d["text_config"].items() if k != "architectures"}}


def write_llava_preprocessing(model, path: Path, tokenizer, image_processor, chat_template) -> None:
    """preprocessor_config.json (CLIP's at the tower's resolution unless `image_processor` is given); with a
    tokenizer also the tokenizer files and processor_config.json (LlavaProcessor: patch size, select strategy,
    num_additional_image_tokens: 1 for CLIP's CLS token, 0 for SigLIP)."""
    cfg = model.config
    processor = vision_image_processor(image_processor, cfg.vision)
    if tokenizer is None:
        processor.save_pretrained(path)
        return
    transformers.LlavaProcessor(image_processor=processor, tokenizer=tokenizer, patch_size=cfg.vision.patch_size,
                                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                chat_template=chat_template, image_token=IMAGE_TOKEN,
                                num_additional_image_tokens=cfg.vision.num_positions - cfg.vision.num_patches
                                ).save_pretrained(path)
