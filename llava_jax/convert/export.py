"""Export to Hugging Face: config.json, streamed safetensors shards, tokenizer, image processor and
LlavaProcessor files that transformers' `from_pretrained` and `AutoProcessor.from_pretrained` load."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
import transformers

from llava_jax.atomic_files import replaced_directory
from llava_jax.convert.build import check_stacked, model_tensors, tensor_specs, vocab_transforms
from llava_jax.convert.checkpoint_io import write_safetensors
from llava_jax.convert.hf_clip import clip_config_to_hf
from llava_jax.convert.hf_llama import llama_config_to_hf
from llava_jax.convert.hf_llava import llava_config_to_hf
from llava_jax.models.clip_vit import CLIPVisionModel
from llava_jax.models.llama import LlamaForCausalLM
from llava_jax.models.llava import LlavaForConditionalGeneration

IMAGE_TOKEN = "<image>"
# OpenAI CLIP normalization (CLIPImageProcessor defaults, REFERENCE.md).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def _model_kind(model: nnx.Module) -> str:
    for cls, kind in ((LlavaForConditionalGeneration, "llava"), (LlamaForCausalLM, "llama"),
                      (CLIPVisionModel, "clip")):
        if isinstance(model, cls):
            return kind
    raise TypeError(f"to_hf: cannot export a {type(model).__name__} (expected LlavaForConditionalGeneration, "
                    f"LlamaForCausalLM or CLIPVisionModel)")


def _hf_config(model: nnx.Module, kind: str) -> dict:
    """Our config -> Hugging Face config dict (with architectures and dtype)."""
    cfg = model.config
    if kind == "llava":
        d, arch = llava_config_to_hf(cfg), "LlavaForConditionalGeneration"
        d["text_config"] = {k: v for k, v in d["text_config"].items() if k != "architectures"}
    elif kind == "llama":
        d = llama_config_to_hf(cfg)
        arch = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(d.get("model_type"),
                                                                                 "LlamaForCausalLM")
    else:
        d, arch = clip_config_to_hf(cfg), "CLIPVisionModel"
    param_dtype = cfg.text.param_dtype if kind == "llava" else cfg.param_dtype
    return {**d, "architectures": [arch], "dtype": jnp.dtype(param_dtype).name}


def _text_config_dict(hf_config: dict, kind: str) -> dict:
    return hf_config["text_config"] if kind == "llava" else hf_config


def _write_hf_config(hf_config: dict, path: Path) -> None:
    """Writes config.json through transformers' own config class, so it is in the canonical form."""
    d = dict(hf_config)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    config.save_pretrained(path)


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        return transformers.AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=False)
    return copy.deepcopy(tokenizer)  # The caller's tokenizer is left unchanged.


def add_image_token(tokenizer, image_token_index: int):
    """Ensures `<image>` is a special token with id `image_token_index` (adding it when absent).

    Raises:
      ValueError when the tokenizer already maps `<image>` elsewhere, or adding it cannot give that id.
    """
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN in vocab:
        if vocab[IMAGE_TOKEN] != image_token_index:
            raise ValueError(f"tokenizer: {IMAGE_TOKEN!r} has id {vocab[IMAGE_TOKEN]} but the model's "
                             f"image_token_index is {image_token_index}")
        return tokenizer
    if len(tokenizer) != image_token_index:
        raise ValueError(f"tokenizer: it has {len(tokenizer)} tokens and no {IMAGE_TOKEN!r}; adding it gives id "
                         f"{len(tokenizer)}, but the model's image_token_index is {image_token_index}")
    tokenizer.add_tokens([transformers.AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def _default_image_processor(vision_cfg):
    """CLIPImageProcessor of OpenAI CLIP at the tower's resolution (resize shortest side, center crop)."""
    size = vision_cfg.image_size
    return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_resize=True, do_center_crop=True, resample=3, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                              image_std=list(CLIP_STD), do_convert_rgb=True)


def _load_image_processor(image_processor, vision_cfg):
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


def to_hf(model: nnx.Module, path: str | os.PathLike, tokenizer=None, image_processor=None,
          max_shard_size: int | str = "5GB", chat_template: str | None = None) -> Path:
    """Exports a model to a Hugging Face folder, streaming tensors shard by shard.

    Writes config.json, `model.safetensors` or sharded `model-0000k-of-0000n.safetensors` +
    `model.safetensors.index.json` in the classic layout (LLaVA: `vision_tower.vision_model.*`,
    `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`), and:
    - LLaVA: preprocessor_config.json (CLIPImageProcessor at the tower's resolution unless `image_processor`
      is given); with a tokenizer also the tokenizer files (with `<image>` added as a special token at
      `image_token_index`) and processor_config.json (LlavaProcessor: patch size, select strategy,
      num_additional_image_tokens=1 for the CLS token). When the tokenizer outgrows the vocabulary,
      embed_tokens and lm_head are padded with mean rows and text_config.vocab_size follows.
    - LLaMA: the tokenizer files when given. CLIP: preprocessor_config.json.
    Args:
      tokenizer: a folder or a transformers tokenizer (not modified), or None.
      image_processor: a folder or a transformers image processor, or None for the CLIP default.
      max_shard_size: bytes or a string like '5GB' / '500MB'.
      chat_template: a Jinja chat template stored with the tokenizer / processor, or None.
    Returns:
      The output folder. It is written as a temporary sibling and renamed into place: an export already
      there is replaced whole, and stays intact when this one fails. A non-empty folder that is not an
      export is refused (FileExistsError).
    """
    path = Path(path)
    kind = _model_kind(model)
    check_stacked(model, "to_hf")
    hf_config = _hf_config(model, kind)
    tensors, specs = model_tensors(model), tensor_specs(model)
    tok = _load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and kind != "clip":
        if kind == "llava":
            add_image_token(tok, model.config.image_token_index)
        if chat_template is not None:
            tok.chat_template = chat_template
        text = _text_config_dict(hf_config, kind)
        grow = len(tok) - text["vocab_size"]
        if grow > 0:
            prefix = "language_model." if kind == "llava" else ""
            for name, pad in vocab_transforms(prefix, grow, text.get("tie_word_embeddings", False)).items():
                tensors[name] = (lambda thunk, pad: lambda: pad(thunk()))(tensors[name], pad)
                shape = specs[name].shape
                specs[name] = type(specs[name])((shape[0] + grow,) + tuple(shape[1:]), specs[name].dtype)
            text["vocab_size"] = len(tok)
    with replaced_directory(path) as tmp:  # a previous export at `path` is replaced whole, or left intact
        write_safetensors(tensors, specs, tmp, max_shard_size=max_shard_size)
        _write_hf_config(hf_config, tmp)
        _write_preprocessing(model, kind, tmp, tok, image_processor, chat_template)
    return path


def _write_preprocessing(model, kind: str, path: Path, tokenizer, image_processor, chat_template) -> None:
    if kind == "llama":
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return
    vision_cfg = model.config.vision if kind == "llava" else model.config
    processor = _load_image_processor(image_processor, vision_cfg)
    if kind == "clip" or tokenizer is None:
        processor.save_pretrained(path)
        return
    transformers.LlavaProcessor(image_processor=processor, tokenizer=tokenizer, patch_size=vision_cfg.patch_size,
                   vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                   chat_template=chat_template, image_token=IMAGE_TOKEN,
                   num_additional_image_tokens=1).save_pretrained(path)
