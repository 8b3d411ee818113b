"""Export to Hugging Face: config.json, streamed safetensors shards, tokenizer, image processor and
LlavaProcessor files that transformers' `from_pretrained` and `AutoProcessor.from_pretrained` load."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import transformers

from llava_jax.atomic_files import replaced_directory
from llava_jax.convert import families
from llava_jax.convert import params as param_names
from llava_jax.convert.build import _leaves, vocab_transforms
from llava_jax.convert.checkpoint_io import write_safetensors
from llava_jax.data.conversation import IMAGE_TOKEN
from llava_jax.models.clip_vit import CLIP_MEAN, CLIP_STD  # re-exported; CLIPVisionConfig.image_mean/std

__all__ = ["to_hf", "add_image_token", "check_stacked", "model_tensors", "tensor_specs", "IMAGE_TOKEN",
           "CLIP_MEAN", "CLIP_STD"]


def check_stacked(model: nnx.Module, what: str) -> None:
    """Raises TypeError when the model's repeated layers are unstacked (the decode layout of `load_model` and
    `Generator`), whose parameter names no conversion table knows."""
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        keys = [str(k) for k in path]
        if "layers" in keys[:-1] and keys[keys.index("layers") + 1].isdigit():
            raise TypeError(f"{what}: the model has per-layer weight buffers (the decode layout of load_model / "
                            "Generator); export a model from convert (from_hf, load, ...) or from training")


def _named_leaves(model: nnx.Module):
    """(Hugging Face name, the leaf holding it, its layer index or None) for every tensor of the model."""
    leaves = _leaves(model)
    for name, (path, layer) in param_names.hf_names(model).items():
        yield name, leaves[path], layer


def model_tensors(model: nnx.Module) -> dict[str, Callable[[], np.ndarray]]:
    """{Hugging Face name: thunk producing that tensor on the host}; stacked leaves are sliced lazily."""
    def thunk(var, layer):
        if layer is None:
            return lambda: np.asarray(jax.device_get(var.get_value()))
        return lambda: np.asarray(jax.device_get(var.get_value()[layer]))

    return {name: thunk(var, layer) for name, var, layer in _named_leaves(model)}


def tensor_specs(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """{Hugging Face name: shape and dtype} without touching the values."""
    out = {}
    for name, var, layer in _named_leaves(model):
        value = var.get_value()
        out[name] = jax.ShapeDtypeStruct(value.shape if layer is None else value.shape[1:], value.dtype)
    return out


def _hf_config(model: nnx.Module, family: families.Family) -> dict:
    """Our config -> Hugging Face config dict (with architectures and dtype)."""
    return {**family.config_to_hf(model.config), "dtype": jnp.dtype(family.param_dtype(model.config)).name}


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


def to_hf(model: nnx.Module, path: str | os.PathLike, tokenizer=None, image_processor=None,
          max_shard_size: int | str = "5GB", chat_template: str | None = None) -> Path:
    """Exports a model to a Hugging Face folder, streaming tensors shard by shard.

    Writes config.json, `model.safetensors` or sharded `model-0000k-of-0000n.safetensors` +
    `model.safetensors.index.json` in the classic layout (LLaVA: `vision_tower.vision_model.*`,
    `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`), and:
    - LLaVA: preprocessor_config.json (the tower's image processor at its resolution unless `image_processor`
      is given); with a tokenizer also the tokenizer files (with `<image>` added as a special token at
      `image_token_index`) and processor_config.json (LlavaProcessor: patch size, select strategy,
      num_additional_image_tokens: 1 for CLIP's CLS token, 0 for SigLIP). When the tokenizer outgrows the vocabulary,
      embed_tokens and lm_head are padded with mean rows and text_config.vocab_size follows.
    - LLaMA: the tokenizer files when given. CLIP, SigLIP: preprocessor_config.json.
    Args:
      tokenizer: a folder or a transformers tokenizer (not modified), or None.
      image_processor: a folder or a transformers image processor, or None for the tower's default.
      max_shard_size: bytes or a string like '5GB' / '500MB'.
      chat_template: a Jinja chat template stored with the tokenizer / processor, or None.
    Returns:
      The output folder. It is written as a temporary sibling and renamed into place: an export already
      there is replaced whole, and stays intact when this one fails. A non-empty folder that is not an
      export is refused (FileExistsError).
    """
    path = Path(path)
    family = families.of_model(model)
    check_stacked(model, "to_hf")
    hf_config = _hf_config(model, family)
    tensors, specs = model_tensors(model), tensor_specs(model)
    tok = _load_tokenizer(tokenizer) if tokenizer is not None and family.decoder is not None else None
    if tok is not None:
        if family.image_token:
            add_image_token(tok, model.config.image_token_index)
        if chat_template is not None:
            tok.chat_template = chat_template
        decoder = family.decoder
        _fit_vocab(tensors, specs, hf_config[decoder.hf_key] if decoder.hf_key else hf_config, decoder.prefix,
                   len(tok))
    with replaced_directory(path) as tmp:  # a previous export at `path` is replaced whole, or left intact
        write_safetensors(tensors, specs, tmp, max_shard_size=max_shard_size)
        _write_hf_config(hf_config, tmp)
        family.write_preprocessing(model, tmp, tok, image_processor, chat_template)
    return path


def _fit_vocab(tensors: dict, specs: dict, text_config: dict, prefix: str, vocab: int) -> None:
    """Pads embed_tokens (and an untied lm_head) with mean rows, in place, when the tokenizer's `vocab`
    outgrows the decoder's vocab_size; the config's vocab_size follows."""
    grow = vocab - text_config["vocab_size"]
    if grow <= 0:
        return
    for name, pad in vocab_transforms(prefix, grow, text_config.get("tie_word_embeddings", False)).items():
        tensors[name] = (lambda thunk, pad: lambda: pad(thunk()))(tensors[name], pad)
        shape = specs[name].shape
        specs[name] = jax.ShapeDtypeStruct((shape[0] + grow,) + tuple(shape[1:]), specs[name].dtype)
    text_config["vocab_size"] = vocab
