"""Hugging Face <-> llava_jax conversion for LLaVA-NeXT (`llava_next`) and LLaVA-OneVision
(`llava_onevision`): the composite configs both ways, the tensor names (LLaVA's plus `image_newline`) and the
preprocessing files of an export (AnyRes image processor, processor with its chat template).

Refused, naming the field: model_type, projector_hidden_act other than gelu, a projector transformers cannot
build, a vision_feature_select_strategy that does not give the tower's square patch grid, an unknown
vision_aspect_ratio, a vision tower other than CLIP or SigLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import transformers

from llava_jax.convert.hf_llama import llama_config_from_hf, llama_config_to_hf
from llava_jax.convert.hf_llava import llava_tensor_name_to_ours
from llava_jax.convert.hf_vision import vision_config_from_hf, vision_config_to_hf
from llava_jax.data.conversation import IMAGE_TOKEN
from llava_jax.models.llava_next import LlavaNextConfig, LlavaOnevisionConfig

VIDEO_TOKEN = "<video>"
_TRANSFORMERS_CONFIG = {"llava_next": transformers.LlavaNextConfig,
                        "llava_onevision": transformers.LlavaOnevisionConfig}


def next_tensor_name_to_ours(name: str) -> str | None:
    """LLaVA's names (every layout `hf_llava.llava_tensor_name_to_ours` reads) plus `image_newline`
    (`model.image_newline` in transformers' in-memory layout)."""
    if name in ("image_newline", "model.image_newline"):
        return "image_newline"
    return llava_tensor_name_to_ours(name)


def _as_dict(hf_config: Any, model_type: str) -> dict:
    """A transformers config (object or dict) of `model_type` -> dict, missing fields filled by transformers."""
    found = hf_config.get("model_type") if isinstance(hf_config, Mapping) else hf_config.model_type
    if found != model_type:
        raise ValueError(f"{model_type} config: unsupported model_type {found!r} (expected {model_type!r})")
    if isinstance(hf_config, Mapping):
        hf_config = _TRANSFORMERS_CONFIG[model_type](**{k: v for k, v in hf_config.items() if k != "model_type"})
    return hf_config.to_dict()


def _common_fields(d: dict, model_type: str) -> dict:
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{model_type} config: projector_hidden_act {act!r} is not supported (only exact 'gelu')")
    text = dict(d["text_config"])
    if d.get("tie_word_embeddings"):
        text["tie_word_embeddings"] = True
    layer = d.get("vision_feature_layer", -2)
    return dict(vision=vision_config_from_hf(d["vision_config"]), text=llama_config_from_hf(text),
                image_token_index=int(d.get("image_token_index", d.get("image_token_id"))),
                image_grid_pinpoints=tuple(tuple(p) for p in d["image_grid_pinpoints"]),
                vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
                vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)))


def next_config_from_hf(hf_config: Any) -> LlavaNextConfig:
    """A transformers LlavaNextConfig (object or dict) -> LlavaNextConfig (no runtime fields)."""
    return LlavaNextConfig(**_common_fields(_as_dict(hf_config, "llava_next"), "llava_next"))


def onevision_config_from_hf(hf_config: Any) -> LlavaOnevisionConfig:
    """A transformers LlavaOnevisionConfig (object or dict) -> LlavaOnevisionConfig (no runtime fields)."""
    d = _as_dict(hf_config, "llava_onevision")
    return LlavaOnevisionConfig(**_common_fields(d, "llava_onevision"),
                                video_token_index=int(d.get("video_token_index", d.get("video_token_id"))),
                                vision_aspect_ratio=d.get("vision_aspect_ratio", "anyres_max_9"))


def _common_to_hf(cfg: LlavaNextConfig, model_type: str, architecture: str) -> dict:
    if cfg.projector != "mlp2x_gelu":
        raise ValueError(f"{model_type} export: projector {cfg.projector!r} cannot be built by transformers' "
                         f"{architecture} (only 'mlp2x_gelu')")
    layer = cfg.vision_feature_layer
    text = {k: v for k, v in llama_config_to_hf(cfg.text).items() if k != "architectures"}
    return {"model_type": model_type, "architectures": [architecture],
            "vision_config": vision_config_to_hf(cfg.vision), "text_config": text,
            "image_token_index": cfg.image_token_index, "image_seq_length": cfg.tile_tokens,
            "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints], "projector_hidden_act": "gelu",
            "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "multimodal_projector_bias": cfg.multimodal_projector_bias,
            "tie_word_embeddings": cfg.text.tie_word_embeddings}


def next_config_to_hf(cfg: LlavaNextConfig) -> dict:
    """LlavaNextConfig -> config.json dict of a LlavaNextForConditionalGeneration."""
    return _common_to_hf(cfg, "llava_next", "LlavaNextForConditionalGeneration")


def onevision_config_to_hf(cfg: LlavaOnevisionConfig) -> dict:
    """LlavaOnevisionConfig -> config.json dict of a LlavaOnevisionForConditionalGeneration."""
    return {**_common_to_hf(cfg, "llava_onevision", "LlavaOnevisionForConditionalGeneration"),
            "video_token_index": cfg.video_token_index, "vision_aspect_ratio": cfg.vision_aspect_ratio}


def _image_processor_kwargs(cfg: LlavaNextConfig) -> dict:
    return dict(image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints], do_resize=True, resample=3,
                do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg.vision.image_mean),
                image_std=list(cfg.vision.image_std), do_convert_rgb=True, do_pad=True)


def anyres_image_processor(cfg: LlavaNextConfig, image_processor=None):
    """The image processor an export writes: `image_processor` (a folder or an instance) checked against the
    config's pinpoints, or transformers' AnyRes processor of the family at the tower's resolution."""
    if isinstance(image_processor, (str, Path)):
        image_processor = transformers.AutoImageProcessor.from_pretrained(str(image_processor))
    if image_processor is not None:
        pinpoints = [list(p) for p in getattr(image_processor, "image_grid_pinpoints", None) or []]
        if pinpoints != [list(p) for p in cfg.image_grid_pinpoints]:
            raise ValueError(f"image processor: image_grid_pinpoints {pinpoints} differ from the model's "
                             f"{[list(p) for p in cfg.image_grid_pinpoints]}")
        return image_processor
    size = cfg.vision.image_size
    if isinstance(cfg, LlavaOnevisionConfig):
        return transformers.LlavaOnevisionImageProcessor(size={"height": size, "width": size},
                                                         **_image_processor_kwargs(cfg))
    return transformers.LlavaNextImageProcessor(size={"shortest_edge": size}, do_center_crop=True,
                                                crop_size={"height": size, "width": size},
                                                **_image_processor_kwargs(cfg))


def _check_video_token(tokenizer, video_token_index: int):
    """`<video>` must be in the tokenizer at video_token_index (added when it is the next id)."""
    vocab = tokenizer.get_vocab()
    if VIDEO_TOKEN not in vocab and len(tokenizer) == video_token_index:
        tokenizer.add_tokens([transformers.AddedToken(VIDEO_TOKEN, special=True, normalized=False)],
                             special_tokens=True)
        vocab = tokenizer.get_vocab()
    if vocab.get(VIDEO_TOKEN) != video_token_index:
        raise ValueError(f"tokenizer: {VIDEO_TOKEN!r} has id {vocab.get(VIDEO_TOKEN)} but the model's "
                         f"video_token_index is {video_token_index}")


def write_next_preprocessing(model, path: Path, tokenizer, image_processor, chat_template) -> None:
    """preprocessor_config.json (the AnyRes image processor); with a tokenizer also the tokenizer files and
    processor_config.json (LlavaNextProcessor / LlavaOnevisionProcessor with the select strategy and, for
    CLIP's CLS token, one additional image token)."""
    cfg = model.config
    processor = anyres_image_processor(cfg, image_processor)
    if tokenizer is None:
        processor.save_pretrained(path)
        return
    if isinstance(cfg, LlavaOnevisionConfig):
        _check_video_token(tokenizer, cfg.video_token_index)
        _write_onevision_processor(cfg, path, processor, tokenizer, chat_template)
        return
    transformers.LlavaNextProcessor(
        image_processor=processor, tokenizer=tokenizer, patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, chat_template=chat_template,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1).save_pretrained(path)


def _write_onevision_processor(cfg: LlavaOnevisionConfig, path: Path, image_processor, tokenizer,
                               chat_template) -> None:
    """LlavaOnevisionProcessor's files, written without building it (its video processor needs torchvision):
    the image processor, the tokenizer, processor_config.json and chat_template.jinja."""
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    fields = {"processor_class": "LlavaOnevisionProcessor", "image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN,
              "num_image_tokens": cfg.vision.num_positions,  # a tile's tokens as the processor counts them
              "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
              "vision_aspect_ratio": cfg.vision_aspect_ratio}
    (Path(path) / "processor_config.json").write_text(json.dumps(fields, indent=2) + "\n")
    if chat_template is not None:
        (Path(path) / "chat_template.jinja").write_text(chat_template)
